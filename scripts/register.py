"""Snakemake job: registration of an adjacent chain pair (see msifusion.steps.register.register_step)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.job import run_job, script_params
from msifusion.steps.register import register_step

run_job(snakemake, register_step, coarse=snakemake.input.coarse, fine=snakemake.input.fine,
        out_json=snakemake.output.transform, out_png=snakemake.output.qc, **script_params(snakemake))
