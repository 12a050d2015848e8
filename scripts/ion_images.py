"""Snakemake job: measured target ion images of one section (see msifusion.steps.ions.ion_images_step)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.job import run_job, script_params
from msifusion.steps.ions import ion_images_step

run_job(snakemake, ion_images_step, converted=snakemake.input.converted, maps=snakemake.input.maps,
        out=snakemake.output[0], **script_params(snakemake))
