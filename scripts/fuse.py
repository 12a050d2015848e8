"""Snakemake job: chained fusion of one section (see msifusion.steps.fuse.fuse_step)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.job import run_job, script_params
from msifusion.steps.fuse import fuse_step

run_job(snakemake, fuse_step, maps=list(snakemake.input.maps), ions=snakemake.input.ions,
        transforms=list(snakemake.input.transforms), outs=list(snakemake.output.fused),
        report=snakemake.output.report, **script_params(snakemake))
