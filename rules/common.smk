# Configuration, the sections sheet and the helpers that turn them into file names.
import os
import sys

# The library lives beside the workflow; make it importable here (jobs do the same in scripts/).
sys.path.insert(0, workflow.basedir)

from msifusion.codedeps import module_closure
from msifusion.config import canonical_path, load_study
from msifusion.errors import InputError
from msifusion.job import remove_error_markers
from msifusion.store import remove_stale_parts

# Everything knowable before the first job: config, sheet, files and their .ibd, headers, ROIs,
# pixel sizes, scan tiles, configured regions, ground truth (msifusion.config.check_study).
try:
    STUDY = load_study(config, source="config")
except InputError as err:
    sys.stderr.write(f"msifusion: invalid study: {err}\n")
    raise SystemExit(1)
if workflow.is_main_process:
    for line in STUDY.summary():
        sys.stderr.write(f"msifusion: {line}\n")

config.update(STUDY.config)  # defaults filled in, as snakemake.utils.validate(set_default=True)
CHAIN = STUDY.chain
REF = STUDY.reference
MODS = config["modalities"]
SECTIONS = STUDY.sections
TARGETS = [float(mz) for mz in config["targets"]["mz"]]


wildcard_constraints:
    modality="[A-Za-z][A-Za-z0-9-]*",
    coarse="[A-Za-z][A-Za-z0-9-]*",
    fine="[A-Za-z][A-Za-z0-9-]*",
    section="[A-Za-z0-9][A-Za-z0-9_.-]*",
    file_id="[A-Za-z0-9_.-]+",


def code(script):
    """The library modules a rule's script runs (the import closure of scripts/{script}.py within
    the package, msifusion.codedeps) as tracked inputs: editing any of them reruns the rule's jobs.
    Relative to the working directory when the workflow lies in it (snakemake records every job's
    input paths: an absolute path would rerun everything once the project folder is moved)."""
    path = os.path.join(workflow.basedir, "scripts", f"{script}.py")
    return [canonical_path(p) for p in module_closure(path)]


def named(**params):
    """Rule params plus ``tracked``: all of them by name, in one dict.

    Snakemake reruns a job when its params change, but it records only the set of their values'
    ``repr``, without names: a changed value is missed when the old value is still held by another
    param and the new one already was (an NMF rank 8 -> 10 next to ``memory_gb: 8`` and
    ``pixel_size_um: 10``; ``tissue.dilation_px`` 0 -> 4 next to ``min_size_px: 4``). The ``tracked``
    dict changes with any of them. Scripts drop it (``msifusion.config.script_params``). Param
    functions here take the wildcards only."""

    def tracked(wildcards):
        return {name: value(wildcards) if callable(value) else value
                for name, value in params.items()}

    return dict(params, tracked=tracked)


def grid_stage(modality):
    """Where the modality's tile grid is removed: None, "before_nmf" or "after_nmf"."""
    grid = MODS[modality]["grid"]
    return grid["stage"] if grid["enabled"] else None


def converted_file(modality, file_id):
    """One converted HDF5 file as the NMF reads it (grid-corrected when the grid is removed
    before NMF)."""
    folder = "degrid/" if grid_stage(modality) == "before_nmf" else ""
    return f"results/converted/{modality}/{folder}{file_id}.h5"


def converted(modality):
    """Converted HDF5 files of one modality as the NMF reads them, in sheet order."""
    return [converted_file(modality, fid) for fid in STUDY.files(modality)]


def components(modality):
    """The modality's component file used downstream (grid-corrected after NMF when so set)."""
    suffix = ".degrid" if grid_stage(modality) == "after_nmf" else ""
    return f"results/nmf/{modality}{suffix}.h5"


def image_file(modality, file_id, ext="h5"):
    """The features (ext h5) or figure (png) of one image of an image level (rule image)."""
    return f"results/images/{modality}/{file_id}.{ext}"


def section_components(section, modality):
    """The component maps a section of one modality is cut from: the modality's NMF file, or for
    an image level the features of the section's image."""
    if STUDY.kind(modality) == "image":
        return image_file(modality, STUDY.acquisition(section, modality).file_id)
    return components(modality)


def size_mb(paths):
    """Total size of existing input files in MB (0 for files not yet made)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    return sum(os.path.getsize(p) for p in paths if os.path.exists(p)) / 1e6


def pair_files(section, kind, ext):
    return [f"results/{section}/{kind}_{c}_{f}.{ext}" for c, f in STUDY.pairs()]


def section_rois(section):
    """The configured ROIs with the section's mask paths."""
    return [dict(r, mask=canonical_path(r["mask"].replace("{section}", section))) if "mask" in r
            else dict(r) for r in config["rois"]]


def truth_files():
    """Ground-truth files of the sections (phantom studies), one spelling of the folder."""
    truth = config["evaluation"]["truth"]
    return [canonical_path(os.path.join(truth, f"{s}.h5")) for s in SECTIONS] if truth else []


def product_files(section):
    files = [f"results/{section}/roi_mean_spectra.png"]
    for roi in config["rois"]:
        files += [f"results/{section}/roi_{roi['name']}.{ext}" for ext in ("tsv", "png")]
    for modality in CHAIN:
        for mz in TARGETS:
            stem = f"results/{section}/ion_{modality}_mz{mz:.4f}"
            files += [f"{stem}.png", f"{stem}.tif"]
    return files


def caption(name):
    """A report caption file (report/{name}.rst), relative to the rules/ folder."""
    return f"../report/{name}.rst"


def reported_product(path):
    """A products file flagged for the report when it is a figure (ion images, ROI spectra)."""
    name = os.path.basename(path)
    if name.startswith("ion_") and name.endswith(".png"):
        modality, mz = name[len("ion_"):-len(".png")].rsplit("_mz", 1)
        return report(path, caption=caption("ion_image"), category="Ion images",
                      subcategory="{section}", labels={"modality": modality, "m/z": mz})
    if name.startswith("roi_") and name.endswith(".png"):
        region = name[len("roi_"):-len(".png")]
        region = "tissue (mean spectra)" if region == "mean_spectra" else region
        return report(path, caption=caption("roi_spectra"), category="Spectra",
                      subcategory="{section}", labels={"region": region})
    return path


def output_groups():
    """The workflow's targets as (section or None, files of one job) groups."""
    groups = [(None, ["results/registration.tsv"])]
    for section in SECTIONS:
        groups.append((section, [f"results/{section}/fused_{m}.h5" for m in CHAIN[1:]]))
        groups += [(section, [f"results/{section}/transform_{c}_{f}.json",
                              f"results/{section}/qc_{c}_{f}.png"]) for c, f in STUDY.pairs()]
        groups.append((section, product_files(section)))
        if config["export"]["imzml"]:
            groups += [(section, [f"results/{section}/fused_{m}.{ext}" for ext in ("imzML", "ibd")])
                       for m in CHAIN[1:]]
    for m in CHAIN:
        if STUDY.kind(m) == "image":
            groups += [(None, [image_file(m, fid, "png")]) for fid in STUDY.files(m)]
        else:
            groups.append((None, [f"results/nmf/{m}_components.png"]))
    if config["evaluation"]["truth"]:
        groups.append((None, ["results/evaluation.tsv"]))
    return groups


def report_mode():
    """``snakemake --report``: the report is made of what the last run produced."""
    return any(arg == "--report" or arg.startswith("--report=") for arg in sys.argv)


def all_outputs():
    """Every target of the study. For ``--report``, only the jobs whose outputs all exist: after a
    run in which some sections failed, the report shows the rest and lists those sections (in
    its front page, through ``config["report_incomplete"]``) instead of failing."""
    groups = output_groups()
    if not report_mode():
        return [path for _, files in groups for path in files]
    done = [(s, files) for s, files in groups if all(os.path.exists(p) for p in files)]
    incomplete = sorted({s or "study" for s, files in groups if (s, files) not in done})
    config["report_incomplete"] = incomplete
    if incomplete:
        sys.stderr.write(f"msifusion: report without the missing products of "
                         f"{', '.join(incomplete)} (failed or not run yet: see logs/)\n")
    return [path for _, files in done for path in files]
