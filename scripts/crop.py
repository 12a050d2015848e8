"""Snakemake job: section ROI and tissue mask (see msifusion.pipeline.crop_step)."""
from msifusion.pipeline import crop_step, run_job

run_job(snakemake, crop_step, nmf_file=snakemake.input.nmf, out=snakemake.output[0],
        section=snakemake.wildcards.section, modality=snakemake.wildcards.modality,
        **snakemake.params)
