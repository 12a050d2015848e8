"""Snakemake job: the registration scores of every section and chain pair as one table
(see msifusion.steps.register.registration_table_step)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.job import run_job, script_params
from msifusion.steps.register import registration_table_step

run_job(snakemake, registration_table_step, transforms=list(snakemake.input.transforms),
        out=snakemake.output.table, **script_params(snakemake))
