"""Snakemake job: scan-tile grid removal (see msifusion.steps.degrid.degrid_step)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.job import run_job, script_params
from msifusion.steps.degrid import degrid_step

run_job(snakemake, degrid_step, nmf_in=snakemake.input.nmf, out=snakemake.output.nmf,
        figure=snakemake.output.figure, qc=snakemake.output.qc, report=snakemake.output.report,
        **script_params(snakemake))
