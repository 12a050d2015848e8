"""Snakemake job: chained fusion of one section (see msifusion.pipeline.fuse_step)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.config import script_params
from msifusion.pipeline import fuse_step, run_job

run_job(snakemake, fuse_step, maps=list(snakemake.input.maps),
        transforms=list(snakemake.input.transforms), outs=list(snakemake.output.fused),
        report=snakemake.output.report, **script_params(snakemake))
