"""Snakemake job: section ROI and tissue mask (see msifusion.steps.section.crop_step)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.job import run_job, script_params
from msifusion.steps.section import crop_step

run_job(snakemake, crop_step, nmf_file=snakemake.input.nmf, out=snakemake.output[0],
        section=snakemake.wildcards.section, modality=snakemake.wildcards.modality,
        **script_params(snakemake))
