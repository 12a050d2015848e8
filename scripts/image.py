"""Snakemake job: one image of an image level (see msifusion.steps.image.image_step)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.job import run_job, script_params
from msifusion.steps.image import image_step

run_job(snakemake, image_step, image=snakemake.input.image, out=snakemake.output.maps,
        figure=snakemake.output.figure, modality=snakemake.wildcards.modality,
        file_id=snakemake.wildcards.file_id, **script_params(snakemake))
