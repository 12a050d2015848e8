"""Snakemake job: accuracy against ground truth (see msifusion.evaluate.evaluate_study)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.evaluate import evaluate_study
from msifusion.job import run_job, script_params

run_job(snakemake, evaluate_study, truth=list(snakemake.input.truth),
        fused=list(snakemake.input.fused), reference=list(snakemake.input.reference),
        section_maps=list(snakemake.input.section_maps),
        out=snakemake.output.table, **script_params(snakemake))
