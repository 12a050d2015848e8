"""Snakemake job: accuracy against ground truth (see msifusion.evaluate.evaluate_study)."""
from msifusion.evaluate import evaluate_study
from msifusion.pipeline import run_job

run_job(snakemake, evaluate_study, truth=list(snakemake.input.truth),
        fused=list(snakemake.input.fused), reference=list(snakemake.input.reference),
        out=snakemake.output.table, **snakemake.params)
