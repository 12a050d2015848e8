"""Snakemake job: ion images and ROI spectra of one section (see msifusion.pipeline.products_step)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.config import script_params
from msifusion.pipeline import products_step, run_job

run_job(snakemake, products_step, reference_maps=snakemake.input.reference,
        fused=list(snakemake.input.fused), out_dir=os.path.dirname(snakemake.output[0]),
        outputs=list(snakemake.output), **script_params(snakemake))
