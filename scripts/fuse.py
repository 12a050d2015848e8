"""Snakemake job: chained fusion of one section (see msifusion.pipeline.fuse_step)."""
from msifusion.pipeline import fuse_step, run_job

run_job(snakemake, fuse_step, maps=list(snakemake.input.maps),
        transforms=list(snakemake.input.transforms), outs=list(snakemake.output.fused),
        report=snakemake.output.report, **snakemake.params)
