"""Snakemake job: tile-grid removal on converted spectra (see msifusion.steps.degrid.degrid_converted_step)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.job import run_job, script_params
from msifusion.steps.degrid import degrid_converted_step

run_job(snakemake, degrid_converted_step, converted=snakemake.input.converted,
        out=snakemake.output.converted, qc=snakemake.output.qc, report=snakemake.output.report,
        **script_params(snakemake))
