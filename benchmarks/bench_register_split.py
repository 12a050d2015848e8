"""Registration of the real ToF-SIMS cube split into two "modalities", through the workflow.

The poplar wood cube (``../shared/data/real/tofsims_poplar``; the whole field is tissue) is cut
to its top-left ``crop x crop`` pixels; its 40 strongest channels are split into two disjoint
groups (consecutive pairs by total count, a seeded coin flip per pair); group A is area-averaged
by ``factor`` (block mean: the coarse modality ``lo``, 2 * factor um pixels) and group B is kept
at full resolution (the fine modality ``hi``, 2 um). Both are written as continuous imzML with
their pixel sizes, with a sections sheet (roi ``*``) and a config holding only the sheet, the
chain [lo, hi], the binning (1000 ppm: the channels are unit masses) and a few targets of group
A. The workflow runs (to the registration, or everything with ``--full``) and each case prints:
the tissue fraction of each automatic mask, the verdict, rotation, scale, max and median error of
every fine pixel against the truth (coarse px), the criteria and the run time.

The true matrix (hi px -> lo px) of a block mean by f, pixel centres at integers, is
``[[1/f, 0, (1/f - 1)/2], [0, 1/f, (1/f - 1)/2]]`` (:func:`msifusion.affine.block_matrix`).

Usage::

    python benchmarks/bench_register_split.py [--crops 128 256] [--factors 4 8] [--full]
        [--workdir benchmarks/out/split] [--direct] [--seed 0] [--channels 40] [--snakefile FILE]
        [--rank K]

``--direct`` skips the workflow: it re-registers the section maps a previous run left in the
workdir (with ``msifusion.steps.register.register_step``), their tissue masks recomputed by the
current :func:`msifusion.tissue.tissue_mask_from_maps`; without such maps it uses the channel
images themselves as the component maps.

Done when: every case passes with max error <= 0.25 coarse px (and, with ``--full``, the workflow
completes).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from msifusion.affine import block_matrix, transform_points  # noqa: E402
from msifusion.phantom import write_imzml  # noqa: E402

CUBE = ROOT.parent / "shared" / "data" / "real" / "tofsims_poplar" / "tofsims_trift_poplar_256x256.h5"
SNAKEMAKE = str(ROOT / ".venv" / "bin" / "snakemake")
FINE_PX_UM = 2.0
SECTION = "s01"
#: Maximum error of a fine pixel (coarse px) that meets the goal.
GOAL_PX = 0.25


def load_cube(path: Path = CUBE) -> tuple[np.ndarray, np.ndarray]:
    """The cube as (m/z, y, x) float64 counts and its m/z axis (n_mz,)."""
    with h5py.File(path, "r") as f:
        return f["intensities"][:].astype(np.float64).transpose(2, 0, 1), f["mz"][:].astype(np.float64)


def split_channels(cube: np.ndarray, n_channels: int, seed: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint groups of the ``n_channels`` strongest channels.

    Channels sorted by total count are taken in consecutive pairs; a seeded coin flip per pair
    decides which one goes to group A (both groups get channels of every strength). With
    ``seed=None`` the stronger one of each pair always does (plain alternation, as
    ``benchmarks/bench_fusion.py``).

    Returns
    -------
    a, b : ndarray of int, each (n_channels // 2,), increasing (m/z order)
    """
    order = np.argsort(cube.sum(axis=(1, 2)))[::-1][:n_channels - n_channels % 2].reshape(-1, 2)
    flip = (np.zeros(len(order), dtype=bool) if seed is None
            else np.random.default_rng(seed).random(len(order)) < 0.5)
    a = np.where(flip, order[:, 1], order[:, 0])
    b = np.where(flip, order[:, 0], order[:, 1])
    return np.sort(a), np.sort(b)


def block_mean(stack: np.ndarray, f: int) -> np.ndarray:
    """Area average by ``f`` x ``f`` blocks: (k, ny, nx) -> (k, ny // f, nx // f)."""
    k, ny, nx = stack.shape
    return stack.reshape(k, ny // f, f, nx // f, f).mean(axis=(2, 4))


def write_continuous(path: Path, stack: np.ndarray, mz: np.ndarray, px_um: float) -> None:
    """A (k, ny, nx) stack as a continuous imzML on the m/z axis ``mz`` (k,), pixel ``px_um``."""
    k, ny, nx = stack.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    xy = np.stack([xx.ravel(), yy.ravel()], axis=1)
    spectra = stack.reshape(k, -1).T.astype(np.float32)  # (n_pixels, k)
    write_imzml(path, xy, np.arange(len(xy) + 1) * k, None, spectra.ravel(), mode="continuous",
                mz_axis=mz, pixel_size_um=px_um, spectrum_type="centroid", uuid_key=path.name)


def write_study(folder: Path, cube: np.ndarray, mz: np.ndarray, groups: tuple, crop: int,
                factor: int, n_targets: int = 3, rank: int | None = None) -> Path:
    """imzML files, sections sheet and config of one case; returns the config path.

    ``rank`` (NMF components of both modalities) is left to the default unless given."""
    a, b = groups
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    sub = cube[:, :crop, :crop]
    write_continuous(data / "lo.imzML", block_mean(sub[a], factor), mz[a], FINE_PX_UM * factor)
    write_continuous(data / "hi.imzML", sub[b], mz[b], FINE_PX_UM)
    (data / "sections.tsv").write_text(
        "section\tmodality\timzml\troi\n" + "".join(f"{SECTION}\t{m}\t{m}.imzML\t*\n" for m in ("lo", "hi")))
    strongest = a[np.argsort(cube[a].sum(axis=(1, 2)))[::-1][:n_targets]]
    cfg = {"sections": "data/sections.tsv", "chain": ["lo", "hi"],
           "modalities": {m: {"binning": {"ppm": 1000}} | ({"nmf": {"rank": rank}} if rank else {})
                          for m in ("lo", "hi")},
           "targets": {"mz": [round(float(mz[i]), 4) for i in sorted(strongest)], "ppm": 1000}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_workflow(folder: Path, cfg: Path, full: bool, snakefile: Path) -> tuple[bool, str]:
    """Run snakemake in ``folder``; returns (success, tail of its output)."""
    targets = [] if full else [f"results/{SECTION}/transform_lo_hi.json"]
    cmd = [SNAKEMAKE, "-s", str(snakefile), "-d", str(folder), "--cores", "2",
           *targets, "--configfile", str(cfg)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def fine_errors(matrix: np.ndarray, truth: np.ndarray, fine_shape: tuple) -> tuple[float, float]:
    """Max and median distance (coarse px) between every fine pixel mapped by ``matrix`` and by
    ``truth`` (both (2, 3))."""
    yy, xx = np.mgrid[0:fine_shape[0], 0:fine_shape[1]]
    p = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)
    d = np.linalg.norm(transform_points(matrix, p) - transform_points(truth, p), axis=1)
    return float(d.max()), float(np.median(d))


def mask_fraction(maps_file: Path) -> float:
    """Share of the acquired pixels that a section maps file's tissue mask keeps."""
    with h5py.File(maps_file, "r") as f:
        return float(f["mask"][()].sum() / max(1, f["acquired"][()].sum()))


def training_pixels(folder: Path) -> str:
    """Training coarse pixels the fuse step reported (its log), or the reason it stopped."""
    log = folder / "logs" / "fuse" / f"{SECTION}.log"
    if not log.exists():
        return "-"
    text = log.read_text()
    m = re.search(r"on (\d+) coarse pixels", text) or re.search(r"only (\d+) coarse pixels", text)
    return (m.group(1) + ("" if "on " + m.group(1) in text else " (stopped)")) if m else "?"


def case_row(folder: Path, factor: int) -> dict:
    """Figures of one case from the files the workflow (or :func:`direct`) wrote."""
    res = folder / "results" / SECTION
    row = {f"mask_{m}": mask_fraction(res / f"maps_{m}.h5") if (res / f"maps_{m}.h5").exists()
           else float("nan") for m in ("lo", "hi")}
    tj = res / "transform_lo_hi.json"
    if not tj.exists():
        return row
    doc = json.loads(tj.read_text())
    mx, med = fine_errors(np.asarray(doc["matrix_px"]), block_matrix(factor), tuple(doc["fine_shape"]))
    return row | {"passed": doc["passed"], "rotation": doc["rotation_deg"], "scale": doc["scale"],
                  "max_err": mx, "median_err": med, "score": doc["score"], "margin": doc["margin"],
                  "boundary": doc["boundary"], "ncc": doc["ncc"],
                  "ncc_channels": doc["details"].get("ncc_channels"), "train": training_pixels(folder)}


def _section_maps(folder: Path, module: str, stack: np.ndarray, px_um: float) -> Path:
    """Write a section maps file (``docs/design.md``, stage 4) of a whole-field acquisition whose
    component maps are ``stack`` (k, ny, nx), tissue mask by :func:`tissue_mask_from_maps`."""
    from msifusion.tissue import tissue_mask_from_maps

    out = folder / "direct" / f"maps_{module}.h5"
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out, "w") as f:
        f["maps"] = stack.astype(np.float32)
        f["mask"] = tissue_mask_from_maps(stack, dilation_px=0, min_size_px=4)
        f["acquired"] = np.isfinite(stack).all(axis=0)
        f["spectra"] = np.eye(len(stack), dtype=np.float32)
        f["mz"] = np.arange(len(stack), dtype=np.float64)
        f.attrs.update(origin_xy=(0, 0), pixel_size_um=px_um, pixel_size_source="imzML",
                       modality=module, section=SECTION, source="")
    return out


def direct(folder: Path, cube: np.ndarray, groups: tuple, crop: int, factor: int) -> None:
    """Register the case in this process (no workflow): section maps from a previous run's
    component maps when present (masks recomputed), else from the channel images."""
    from msifusion.steps.register import register_step

    res = folder / "results" / SECTION
    files = {}
    for m, px in (("lo", FINE_PX_UM * factor), ("hi", FINE_PX_UM)):
        if (res / f"maps_{m}.h5").exists():
            with h5py.File(res / f"maps_{m}.h5", "r") as f:
                stack = f["maps"][()]
        else:
            sub = cube[:, :crop, :crop]
            stack = block_mean(sub[groups[0]], factor) if m == "lo" else sub[groups[1]]
        files[m] = _section_maps(folder, m, stack, px)
    register_step(str(files["lo"]), str(files["hi"]), str(folder / "direct" / "transform_lo_hi.json"),
                  str(folder / "direct" / "qc_lo_hi.png"))


def direct_row(folder: Path, factor: int) -> dict:
    """:func:`case_row` for the files :func:`direct` wrote."""
    d = folder / "direct"
    doc = json.loads((d / "transform_lo_hi.json").read_text())
    mx, med = fine_errors(np.asarray(doc["matrix_px"]), block_matrix(factor), tuple(doc["fine_shape"]))
    return {"mask_lo": mask_fraction(d / "maps_lo.h5"), "mask_hi": mask_fraction(d / "maps_hi.h5"),
            "passed": doc["passed"], "rotation": doc["rotation_deg"], "scale": doc["scale"],
            "max_err": mx, "median_err": med, "score": doc["score"], "margin": doc["margin"],
            "boundary": doc["boundary"], "ncc": doc["ncc"],
            "ncc_channels": doc["details"].get("ncc_channels"), "train": "-"}


COLUMNS = (("crop", "{:>5}"), ("factor", "{:>6}"), ("mask_lo", "{:8.3f}"), ("mask_hi", "{:8.3f}"),
           ("passed", "{!s:>7}"), ("rotation", "{:9.2f}"), ("scale", "{:8.5f}"), ("max_err", "{:8.3f}"),
           ("median_err", "{:8.3f}"), ("score", "{:7.3f}"), ("margin", "{:7.3f}"),
           ("boundary", "{:9.3f}"), ("ncc", "{:7.3f}"), ("ncc_channels", "{:8.3f}"),
           ("train", "{:>14}"), ("seconds", "{:8.1f}"))


def _width(fmt: str) -> int:
    return int(re.search(r"(\d+)", fmt).group(1))


def _cell(fmt: str, value) -> str:
    width = _width(fmt)
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return f"{'NA':>{width}}"
    return fmt.format(value)


def print_table(rows: list[dict]) -> None:
    heads = {"mask_lo": "mask lo", "mask_hi": "mask hi", "max_err": "max err", "median_err": "med err",
             "ncc_channels": "ncc ch", "train": "train px"}
    print(" ".join(f"{heads.get(k, k):>{_width(f)}}" for k, f in COLUMNS))
    for r in rows:
        print(" ".join(_cell(f, r.get(k)) for k, f in COLUMNS))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crops", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--factors", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--channels", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0, help="seed of the channel split (-1: alternate)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / "out" / "split")
    ap.add_argument("--rank", type=int, default=None,
                    help="NMF rank of both modalities (default: the config default, which exceeds the "
                         "channels of a group unless the NMF caps it)")
    ap.add_argument("--full", action="store_true", help="run the whole workflow (fusion included)")
    ap.add_argument("--snakefile", type=Path, default=ROOT / "Snakefile",
                    help="the workflow to run (e.g. that of a snapshot of the repository)")
    ap.add_argument("--direct", action="store_true", help="register in this process, no workflow")
    a = ap.parse_args(argv)
    if not CUBE.exists():
        print(f"real cube not found at {CUBE}; nothing to do")
        return 0
    cube, mz = load_cube()
    groups = split_channels(cube, a.channels, None if a.seed < 0 else a.seed)
    print(f"cube {cube.shape[1]} x {cube.shape[2]}; group A (lo) m/z {np.round(mz[groups[0]]).astype(int).tolist()}")
    print(f"group B (hi) m/z {np.round(mz[groups[1]]).astype(int).tolist()}")
    rows, ok = [], True
    for crop in a.crops:
        for factor in a.factors:
            folder = a.workdir / f"crop{crop}_x{factor}"
            t0 = time.perf_counter()
            if a.direct:
                direct(folder, cube, groups, crop, factor)
                row = direct_row(folder, factor)
            else:
                cfg = write_study(folder, cube, mz, groups, crop, factor, rank=a.rank)
                success, tail = run_workflow(folder, cfg, a.full, a.snakefile)
                row = case_row(folder, factor)
                if not success:
                    print(f"-- crop {crop} x{factor}: workflow FAILED:\n{tail[-1500:]}")
                    ok = False
            row.update(crop=crop, factor=factor, seconds=time.perf_counter() - t0)
            ok &= bool(row.get("passed")) and row.get("max_err", np.inf) <= GOAL_PX
            rows.append(row)
    print_table(rows)
    print(f"\n{'all cases pass within' if ok else 'some cases MISS'} {GOAL_PX} coarse px")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
