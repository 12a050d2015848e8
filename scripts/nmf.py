"""Snakemake job: NMF of one modality (see msifusion.pipeline.nmf_step)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.config import script_params
from msifusion.pipeline import nmf_step, run_job

params = script_params(snakemake)
file_ids = params.pop("file_ids")
run_job(snakemake, nmf_step, converted=dict(zip(file_ids, snakemake.input.converted)),
        axis=snakemake.input.axis, out=snakemake.output.nmf, figure=snakemake.output.figure,
        modality=snakemake.wildcards.modality, **params)
