"""Snakemake job: m/z axis of one modality (see msifusion.steps.axis.axis_step)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(snakemake.scriptdir).parent))  # the msifusion package

from msifusion.job import run_job, script_params
from msifusion.steps.axis import axis_step

run_job(snakemake, axis_step, converted=list(snakemake.input.converted), out=snakemake.output[0],
        reference_axis=(snakemake.input.reference[0] if snakemake.input.reference else None),
        **script_params(snakemake))
