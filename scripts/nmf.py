"""Snakemake job: NMF of one modality (see msifusion.steps.nmf.nmf_step)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.job import run_job, script_params
from msifusion.steps.nmf import nmf_step

params = script_params(snakemake)
file_ids = params.pop("file_ids")
run_job(snakemake, nmf_step, converted=dict(zip(file_ids, snakemake.input.converted)),
        axis=snakemake.input.axis, out=snakemake.output.nmf, figure=snakemake.output.figure,
        modality=snakemake.wildcards.modality, **params)
