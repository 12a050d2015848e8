"""Snakemake job: every target m/z is in the reference data (see msifusion.steps.axis.targets_step)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.job import run_job, script_params
from msifusion.steps.axis import targets_step

run_job(snakemake, targets_step, axis=snakemake.input.axis, out=snakemake.output[0],
        **script_params(snakemake))
