# Configuration, the sections sheet and the helpers that turn them into file names.
import os
import sys

# The library lives beside the workflow; make it importable here (jobs do the same in scripts/).
sys.path.insert(0, workflow.basedir)

from msifusion.config import load_study
from msifusion.errors import InputError

try:
    STUDY = load_study(config, source="config")
except InputError as err:
    sys.stderr.write(f"msifusion: invalid study: {err}\n")
    raise SystemExit(1)

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


def lib(module):
    """A library module as a tracked input: editing it reruns the rules that use it."""
    return os.path.join(workflow.basedir, "msifusion", f"{module}.py")


def grid_stage(modality):
    """Where the modality's tile grid is removed: None, "before_nmf" or "after_nmf"."""
    grid = MODS[modality]["grid"]
    return grid["stage"] if grid["enabled"] else None


def converted(modality):
    """Converted HDF5 files of one modality as the NMF reads them (grid-corrected when the grid
    is removed before NMF), in sheet order."""
    folder = "degrid/" if grid_stage(modality) == "before_nmf" else ""
    return [f"results/converted/{modality}/{folder}{fid}.h5" for fid in STUDY.files(modality)]


def components(modality):
    """The modality's component file used downstream (grid-corrected after NMF when so set)."""
    suffix = ".degrid" if grid_stage(modality) == "after_nmf" else ""
    return f"results/nmf/{modality}{suffix}.h5"


def size_mb(paths):
    """Total size of existing input files in MB (0 for files not yet made)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    return sum(os.path.getsize(p) for p in paths if os.path.exists(p)) / 1e6


def pair_files(section, kind, ext):
    return [f"results/{section}/{kind}_{c}_{f}.{ext}" for c, f in STUDY.pairs()]


def section_rois(section):
    """The configured ROIs with the section's mask paths."""
    return [dict(r, mask=r["mask"].replace("{section}", section)) if "mask" in r else dict(r)
            for r in config["rois"]]


def product_files(section):
    files = [f"results/{section}/roi_mean_spectra.png"]
    for roi in config["rois"]:
        files += [f"results/{section}/roi_{roi['name']}.{ext}" for ext in ("tsv", "png")]
    for modality in CHAIN:
        for mz in TARGETS:
            stem = f"results/{section}/ion_{modality}_mz{mz:.4f}"
            files += [f"{stem}.png", f"{stem}.tif"]
    return files


def all_outputs():
    out = []
    for section in SECTIONS:
        out += [f"results/{section}/fused_{m}.h5" for m in CHAIN[1:]]
        out += pair_files(section, "qc", "png") + product_files(section)
    out += [f"results/nmf/{m}_components.png" for m in CHAIN]
    if config["export"]["imzml"]:
        out += [f"results/{s}/fused_{m}.imzML" for s in SECTIONS for m in CHAIN[1:]]
    if config["evaluation"]["truth"]:
        out.append("results/evaluation.tsv")
    return out
