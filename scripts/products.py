"""Snakemake job: ion images and ROI spectra of one section (see msifusion.steps.products.products_step)."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.job import run_job, script_params
from msifusion.steps.products import products_step

run_job(snakemake, products_step, reference_maps=snakemake.input.reference,
        fused=list(snakemake.input.fused), out_dir=os.path.dirname(snakemake.output[0]),
        outputs=list(snakemake.output), **script_params(snakemake))
