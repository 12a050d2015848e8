"""Snakemake job: fused product -> imzML (see msifusion.steps.export.export_step)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.job import run_job, script_params
from msifusion.steps.export import export_step

run_job(snakemake, export_step, source=snakemake.input.fused, out=snakemake.output.imzml,
        **script_params(snakemake))
