"""Snakemake job: imzML -> HDF5 (see msifusion.steps.convert.convert_step)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.job import run_job, script_params
from msifusion.steps.convert import convert_step

run_job(snakemake, convert_step, imzml=snakemake.input.imzml, out=snakemake.output[0],
        threads=snakemake.threads, **script_params(snakemake))
