# msifusion: fuse mass spectrometry imaging modalities, coarse (spectral reference) to fine.
# Run:  snakemake --profile profiles/local        (see README.md; config in config/config.yaml)
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


# snakemake --report report.html: QC figures, ion images, registration scores, accuracy
report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/convert.smk"
include: "rules/image.smk"
include: "rules/nmf.smk"
include: "rules/section.smk"
include: "rules/fuse.smk"
include: "rules/evaluate.smk"


onstart:
    # temporary files of jobs killed mid-write (msifusion.store.atomic_output)
    for path in remove_stale_parts("results"):
        sys.stderr.write(f"msifusion: removed {path} (temporary file of a killed job)\n")
    # a new run tries again the jobs that stopped on an input error (msifusion.job.run_job)
    remove_error_markers("logs")


rule all:
    input:
        all_outputs(),
    default_target: True
