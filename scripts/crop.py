"""Snakemake job: section ROI and tissue mask (see msifusion.pipeline.crop_step)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.config import script_params
from msifusion.pipeline import crop_step, run_job

run_job(snakemake, crop_step, nmf_file=snakemake.input.nmf, out=snakemake.output[0],
        section=snakemake.wildcards.section, modality=snakemake.wildcards.modality,
        **script_params(snakemake))
