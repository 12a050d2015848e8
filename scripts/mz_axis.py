"""Snakemake job: m/z axis of one modality (see msifusion.pipeline.axis_step)."""
from msifusion.pipeline import axis_step, run_job

run_job(snakemake, axis_step, converted=list(snakemake.input.converted), out=snakemake.output[0],
        reference_axis=(snakemake.input.reference[0] if snakemake.input.reference else None),
        **snakemake.params)
