"""Fusion accuracy benchmark: every fusion method against ground truth and against bicubic.

(a) Phantom studies (``msifusion.phantom``; several seeds and geometries: presets ``small`` and
    ``demo``, with the demo's configuration, config/demo/config.yaml: NMF ranks 12 / 16 / 20).
    The workflow runs up to the registration (conversion, NMF, grid removal, section maps, registration: the transforms
    are estimated, not given); then each method fuses the chain in this process and its ion images
    at every finer level are compared with the noise-free truth. Bicubic upsampling of the coarse
    reference ion image uses the TRUE transform. Printed per study and level: mean Pearson r and
    SSIM (on tissue) of each method and of bicubic, then per target for the default method.
(b) The real ToF-SIMS cube (``../shared/data/real/tofsims_poplar``) as downsample-and-predict:
    its strongest channels are split into two disjoint groups (alternating by total count); group
    A is area-averaged by 4 and by 8 and fused with group B at full resolution (as the coarse
    target and the fine maps of one chain step), then compared with the untouched group A:
    Pearson r of A's summed image, mean per-channel r and PSNR, against bicubic.

(c) The same cube split through the whole workflow (``--part split``; sheet, chain, binning and
    targets only, every group-A channel a target): summed and per-target r of the shipped target
    images against bicubic, fidelity, targets given detail.
(d) The real MSIght MALDI + H&E pair through the whole workflow (``--part msight``; MALDI
    area-averaged by 4 and 8, the H&E an image level): the shipped images averaged over each
    measured 25 um pixel against the measured 25 um images, against bicubic and nearest-block.

The phantom part also prints a ceiling per level: the truth fitted by least squares on that
level's own multi-scale component maps, in-sample (see :func:`linear_ceiling`), and the no-harm
test of the default method per level (:func:`no_harm`); ``--responses nonlinear`` generates
phantoms whose finer modalities see the species through power laws and ion suppression, so the
fusion's linear model is wrong there. A study whose registration is refused is reported, not
fused. The run ends with one table of every case run through the workflow (:func:`print_table`).

Usage::

    python benchmarks/bench_fusion.py [--part phantoms|real|split|msight|all] [--seeds 0 1 2]
        [--presets small demo] [--responses linear nonlinear] [--methods default]
        [--channels 40] [--crops 128 256] [--factors 4 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from msifusion.affine import block_matrix  # noqa: E402
from msifusion.evaluate import (bicubic_to_grid, evaluate_section, pearson,  # noqa: E402
                                raw_ion_image, section_roi)
from msifusion.store import ConvertedReader  # noqa: E402
from msifusion.fuse import fuse_pair  # noqa: E402
from msifusion.phantom import generate_study  # noqa: E402
from msifusion.steps.fuse import fuse_step  # noqa: E402
from msifusion.steps.ions import ion_images_step  # noqa: E402
from msifusion.products import product_ion_image, read_fused  # noqa: E402

CUBE = ROOT.parent / "shared" / "data" / "real" / "tofsims_poplar" / "tofsims_trift_poplar_256x256.h5"

#: Methods compared: name -> fuse_step / fuse_pair keywords. "default" is the shipped config.
METHODS = {
    "cca (published)": dict(method="cca", n_components=None, consistency=False),
    "ridge, single scale": dict(method="ridge", scales_px=(0,), consistency=False),
    "ridge, single scale + consistency": dict(method="ridge", scales_px=(0,), consistency=True),
    "ridge, multi-scale": dict(method="ridge", scales_px=(0, 1, 2, 4), consistency=False),
    "ridge, multi-scale + consistency": dict(method="ridge", scales_px=(0, 1, 2, 4),
                                             consistency=True),
    "ridge, multi-scale + consistency auto": dict(method="ridge", scales_px=(0, 1, 2, 4),
                                                  consistency="auto"),
    "ridge, multi-scale + consistency, 1 se": dict(method="ridge", scales_px=(0, 1, 2, 4),
                                                   consistency=True, alpha_se=1.0),
    "ridge, multi-scale + consistency, alpha min": dict(method="ridge", scales_px=(0, 1, 2, 4),
                                                        consistency=True, alpha_se=0.0),
}


def default_method() -> str:
    """Name in :data:`METHODS` of the shipped configuration's fusion settings."""
    from msifusion.config import validate_config

    demo = yaml.safe_load((ROOT / "config" / "demo" / "config.yaml").read_text())
    fu = validate_config(demo)["fusion"]
    for name, kw in METHODS.items():
        if kw["method"] == fu["method"] == "cca":
            return name
        if (kw["method"] == fu["method"] and kw["consistency"] == fu["consistency"]
                and list(kw["scales_px"]) == list(fu["scales_px"])
                and kw.get("alpha_se", 0.25) == fu["alpha_se"]):
            return name
    raise SystemExit(f"the shipped fusion settings {fu} are not among the benchmarked methods")


def ssim(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Mean SSIM over the ``mask`` pixels (data range of the truth there)."""
    from skimage.metrics import structural_similarity

    t = np.where(mask, truth, np.nan)
    lo, hi = np.nanmin(t), np.nanmax(t)
    fill = float(np.nanmean(t))
    _, full = structural_similarity(np.where(mask, truth, fill), np.where(mask & np.isfinite(pred), pred, fill),
                                    data_range=float(hi - lo) or 1.0, full=True)
    return float(full[mask].mean())


#: One row per case run through the workflow, printed at the end as one table (:func:`print_table`).
TABLE: list[dict] = []


def table_row(case: str, r_fused: float, r_bicubic: float, worse: int, fidelity: float,
              detail: str, good: bool | None) -> None:
    """Add a case to the final table: mean r of the shipped target images and of bicubic, the
    targets more than 0.01 below bicubic, the least fidelity r, targets given detail; ``good``
    None: nothing shipped (a registration refused)."""
    TABLE.append(dict(case=case, fused=r_fused, bicubic=r_bicubic, worse=worse, fidelity=fidelity,
                      detail=detail, good=good))


def print_table() -> None:
    """Every case of this run through the workflow in one table."""
    if not TABLE:
        return
    print(f"\n{'case (through the workflow, its own registration)':<52s}{'fused r':>8s}"
          f"{'bicubic':>8s}{'worse':>6s}{'fidelity':>9s}{'detail':>8s}  done-when")
    for t in TABLE:
        print(f"{t['case']:<52s}{t['fused']:8.3f}{t['bicubic']:8.3f}{t['worse']:6d}"
              f"{t['fidelity']:9.4f}{t['detail']:>8s}  "
              f"{'refused: nothing shipped' if t['good'] is None else 'meets' if t['good'] else 'MISSES'}")


def run_study(preset: str, seed: int, workdir: Path, response: str = "linear") -> dict:
    """Generate a study (``response``: see :func:`msifusion.phantom.generate_study`) and run the
    workflow up to the registration; return what fusion needs."""
    from test_workflow import snakemake

    chain = ("fticr", "maldi", "tofsims")
    tile = 20 if preset == "small" else 40
    summary = generate_study(workdir / "study", preset=preset, seed=seed, chain=chain, tile_px=tile,
                             response=response)
    # the demo configuration (NMF ranks 12 / 16 / 20), with the phantom's pixel size and tile
    cfg = yaml.safe_load((ROOT / "config" / "demo" / "config.yaml").read_text())
    cfg.update(sections="study/sections.tsv")
    cfg["evaluation"]["truth"] = "study/truth"
    cfg["modalities"]["tofsims"]["pixel_size_um"] = 10 if preset == "small" else 5
    cfg["modalities"]["tofsims"]["grid"]["tile_px"] = tile
    cfg["targets"]["mz"] = [float(m) for m in summary["targets_mz"]]
    (workdir / "config").mkdir(exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    targets = [f"results/{s}/transform_{c}_{f}.json" for s in summary["sections"]
               for c, f in zip(chain[:-1], chain[1:])]
    snakemake(workdir, *targets)
    return dict(summary=summary, cfg=cfg, chain=chain, workdir=workdir)


def evaluate_methods(study: dict, out: Path, methods=None) -> tuple[list[dict], dict]:
    """Fuse each section with every method (``methods``: names in :data:`METHODS`, default all)
    and evaluate against the truth; also return the shipped target images' fidelity r and gain
    per (method, level): ``{(method, level): {"fidelity": [...], "gain": [...]}}``."""
    w, chain, summary = study["workdir"], study["chain"], study["summary"]
    ref = chain[0]
    rows, fid = [], {}
    for name in methods or list(METHODS):
        kw = METHODS[name]
        for s in summary["sections"]:
            maps = [str(w / "results" / s / f"maps_{m}.h5") for m in chain]
            transforms = [str(w / "results" / s / f"transform_{c}_{f}.json")
                          for c, f in zip(chain[:-1], chain[1:])]
            fused = {m: str(out / f"{s}_{m}.h5") for m in chain[1:]}
            reference = next((w / "results" / "converted" / ref).glob("*.h5"))
            ions = str(out / f"{s}_ions.h5")
            ion_images_step(str(reference), maps[0], ions, targets=list(summary["targets_mz"]),
                            ppm=study["cfg"]["targets"]["ppm"])
            fuse_step(maps, transforms, list(fused.values()), str(out / f"{s}_fusion.json"),
                      ions=ions, targets=list(summary["targets_mz"]),
                      ppm=study["cfg"]["targets"]["ppm"], **kw)
            for m, path in fused.items():
                extra = read_fused(path)["extra"]
                got = fid.setdefault((name, m), {"fidelity": [], "gain": []})
                got["fidelity"] += extra["target_fidelity_r"].tolist()
                got["gain"] += extra["target_gain"].tolist()
            for r in evaluate_section(str(w / "study" / "truth" / f"{s}.h5"), fused, str(reference),
                                      section_roi(maps[0]), targets=summary["targets_mz"],
                                      ppm=study["cfg"]["targets"]["ppm"]):
                with h5py.File(w / "study" / "truth" / f"{s}.h5") as t:
                    g = t[r["level"]]
                    ti = int(np.argmin(np.abs(t.attrs["targets_mz"] - r["target_mz"])))
                    truth, mask = g["ion_images"][ti], g["mask"][()]
                    d = read_fused(fused[r["level"]])
                    pred = product_ion_image(d, r["target_mz"], study["cfg"]["targets"]["ppm"])[0]
                    raw = _raw(reference, r["target_mz"], study["cfg"]["targets"]["ppm"],
                               section_roi(maps[0]))
                    bic = bicubic_to_grid(raw, g["matrix_to_reference"][()], truth.shape)
                    valid = mask & np.isfinite(pred) & np.isfinite(bic)
                    r.update(method=name, ssim_fused=ssim(pred, truth, valid),
                             ssim_bicubic=ssim(bic, truth, valid))
                rows.append(r)
    return rows, fid


def linear_ceiling(study: dict, scales_px=(0, 1, 2, 4, 8)) -> dict:
    """Mean r (shared targets, over sections) of the best linear map from each level's OWN
    component maps to the truth: least squares of the true ion image on the level's multi-scale
    features (intercept included), fitted in-sample on the truth's tissue pixels.

    No fusion method that predicts from these maps can beat it: it shows how much of a gap to
    the truth lies in the data (NMF rank, counting noise of the finer maps) rather than in the
    fusion.
    """
    from msifusion.fuse import multiscale_features
    from msifusion.steps.section import read_section_maps

    w, summary = study["workdir"], study["summary"]
    only = float(summary["reference_only_mz"])
    out = {}
    for level in study["chain"][1:]:
        rs = []
        for s in summary["sections"]:
            maps = read_section_maps(str(w / "results" / s / f"maps_{level}.h5"))["maps"]
            with h5py.File(w / "study" / "truth" / f"{s}.h5") as t:
                g = t[level]
                mask = g["mask"][()] & np.isfinite(maps).all(0)
                x = multiscale_features(np.nan_to_num(maps), scales_px)[:, mask].T
                x = np.c_[x, np.ones(len(x))]
                for ti, mz in enumerate(t.attrs["targets_mz"]):
                    if abs(mz - only) < 1e-6:
                        continue
                    y = g["ion_images"][ti][mask]
                    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
                    rs.append(_r(x @ coef, y))
        out[level] = float(np.mean(rs))
    return out


def _raw(reference, mz, ppm, roi):
    """The reference's raw ion image (+- ppm) cut to the section ROI."""
    img = raw_ion_image(ConvertedReader(str(reference)), float(mz), ppm)
    x0, x1, y0, y1 = roi
    return img[y0:y1, x0:x1]


def _refused(study: dict) -> list[str]:
    """The registrations of a study that did not pass (the workflow does not fuse those sections)."""
    import json

    w, chain = study["workdir"], study["chain"]
    out = []
    for s in study["summary"]["sections"]:
        for c, f in zip(chain[:-1], chain[1:]):
            doc = json.loads((w / "results" / s / f"transform_{c}_{f}.json").read_text())
            if not doc["passed"]:
                out.append(f"{s} {f} -> {c} (rotation {doc['rotation_deg']:.1f} deg, margin "
                           f"{doc['margin']:.3f})")
    return out


def no_harm(rows: list[dict], fidelity: list[float]) -> tuple[bool, str]:
    """Issue 16's no-harm test on one level's rows of the default method: no target more than
    0.01 r below bicubic, mean fused r >= mean bicubic r, every fidelity >= 0.99."""
    worse = [r for r in rows if r["r_fused"] < r["r_bicubic"] - 0.01]
    mean_ok = np.mean([r["r_fused"] for r in rows]) >= np.mean([r["r_bicubic"] for r in rows])
    fid = float(np.min(fidelity)) if len(fidelity) else float("nan")
    ok = not worse and mean_ok and fid >= 0.99
    return ok, (f"no harm: {len(worse)} worse, mean {'>=' if mean_ok else '<'} bicubic, min "
                f"fidelity {fid:.4f}: {'meets' if ok else 'MISSES'}")


def phantoms(presets, seeds, responses=("linear",), methods=None) -> bool:
    default = default_method()
    methods = list(METHODS) if not methods else [default if m == "default" else m for m in methods]
    print(f"(a) phantom studies; default method: {default}")
    all_ok = True
    for preset, seed, response in ((p, s, r) for p in presets for s in seeds for r in responses):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            study = run_study(preset, seed, Path(tmp), response)
            t1 = time.perf_counter()
            refused = _refused(study)
            if refused:
                print(f"\n-- preset {preset}, seed {seed}, {response} response: registration "
                      f"REFUSED, nothing fused (the workflow stops these sections with the QC "
                      f"figure): {'; '.join(refused)}")
                table_row(f"phantom {preset} seed {seed} {response}: registration refused",
                          np.nan, np.nan, 0, np.nan, "-", None)
                continue
            (Path(tmp) / "bench").mkdir()
            rows, fid = evaluate_methods(study, Path(tmp) / "bench", methods)
            ceiling = linear_ceiling(study)
            t2 = time.perf_counter()
        only = float(study["summary"]["reference_only_mz"])
        print(f"\n-- preset {preset}, seed {seed}, {response} response: workflow to registration "
              f"{t1 - t0:.0f} s, "
              f"fusion + evaluation of {len(methods)} methods {t2 - t1:.0f} s; means without "
              f"the reference-only m/z {only:.4f}")
        for level in study["chain"][1:]:
            print(f"{'level ' + level:<46s}{'r fused':>9s}{'r bicubic':>11s}{'gain':>7s}"
                  f"{'SSIM fused':>12s}{'SSIM bicubic':>14s}")
            for name in methods:
                sel = [r for r in rows if r["method"] == name and r["level"] == level
                       and abs(r["target_mz"] - only) > 1e-6]
                rf = np.mean([r["r_fused"] for r in sel])
                rb = np.mean([r["r_bicubic"] for r in sel])
                mark = ""
                if name == default:
                    own = [r for r in rows if r["method"] == name and r["level"] == level]
                    ok, mark = no_harm(own, fid[(name, level)]["fidelity"])
                    mark = "  <- default, " + mark
                    if level == study["chain"][-1] and response == "linear":
                        good = rf >= 0.93 and rf - rb >= 0.15
                        ok &= good
                        mark += "; " + ("meets" if good else "MISSES") + " r >= 0.93 and +0.15"
                    all_ok &= ok
                    table_row(f"phantom {preset} seed {seed} {response}, {level}", rf, rb,
                              sum(r["r_fused"] < r["r_bicubic"] - 0.01 for r in own),
                              float(np.min(fid[(name, level)]["fidelity"])),
                              f"{sum(g > 0 for g in fid[(name, level)]['gain'])}/{len(own)}", ok)
                print(f"{name:<46s}{rf:9.3f}{rb:11.3f}{rf - rb:+7.3f}"
                      f"{np.mean([r['ssim_fused'] for r in sel]):12.3f}"
                      f"{np.mean([r['ssim_bicubic'] for r in sel]):14.3f}{mark}")
            print(f"{'ceiling: truth fitted on own maps (in-sample)':<46s}"
                  f"{ceiling[level]:9.3f}")
        for level in study["chain"][1:]:
            print(f"per target, {default}, level {level} (r fused / r bicubic, mean over sections):")
            for mz in study["summary"]["targets_mz"]:
                sel = [r for r in rows if r["method"] == default and r["level"] == level
                       and abs(r["target_mz"] - mz) < 1e-6]
                tag = "  (reference-only species)" if abs(mz - only) < 1e-6 else ""
                print(f"  m/z {mz:10.4f}: {np.mean([r['r_fused'] for r in sel]):.3f} / "
                      f"{np.mean([r['r_bicubic'] for r in sel]):.3f}{tag}")
    return all_ok


def _psnr(pred: np.ndarray, truth: np.ndarray) -> float:
    mse = float(np.mean((pred - truth) ** 2))
    return 10.0 * np.log10(float(truth.max()) ** 2 / mse)


def _r(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r over the pixels finite in both."""
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


def real_cube(n_channels: int) -> bool:
    if not CUBE.exists():
        print(f"\n(b) real cube not found at {CUBE}; skipped")
        return True
    with h5py.File(CUBE, "r") as f:
        cube = f["intensities"][:].astype(np.float64).transpose(2, 0, 1)      # (m/z, y, x)
    order = np.argsort(cube.sum(axis=(1, 2)))[::-1][:n_channels]
    a, b = order[0::2], order[1::2]
    ny, nx = cube.shape[1:]
    default = default_method()
    print(f"\n(b) real ToF-SIMS cube {ny} x {nx}: {n_channels} strongest channels, group A "
          f"{len(a)} (degraded), group B {len(b)} (full resolution); default: {default}")
    print(f"{'factor / method':<50s}{'summed r':>9s}{'chan r':>8s}{'PSNR dB':>9s}"
          f"{'PSNR wins':>11s}{'s':>6s}")
    ok = True
    for factor in (4, 8):
        target = cube[a].reshape(len(a), ny // factor, factor, nx // factor, factor).mean(axis=(2, 4))
        m = block_matrix(factor)
        bic = np.array([bicubic_to_grid(c, m, (ny, nx)) for c in target])
        psnr_b = [_psnr(bic[i], cube[a[i]]) for i in range(len(a))]
        print(f"{f'x{factor} bicubic':<50s}{_r(bic.sum(0), cube[a].sum(0)):9.3f}"
              f"{np.mean([_r(bic[i], cube[a[i]]) for i in range(len(a))]):8.3f}"
              f"{np.mean(psnr_b):9.2f}")
        for name, kw in METHODS.items():
            t0 = time.perf_counter()
            pred = fuse_pair(target, None, cube[b], m, **kw).pred.astype(np.float64)
            dt = time.perf_counter() - t0
            psnr_f = [_psnr(pred[i], cube[a[i]]) for i in range(len(a))]
            summed = _r(pred.sum(0), cube[a].sum(0))
            wins = sum(p > q for p, q in zip(psnr_f, psnr_b))
            mark = ""
            if name == default:
                need = 0.93 if factor == 4 else 0.92
                good = summed >= need and np.mean(psnr_f) > np.mean(psnr_b)
                ok &= good
                mark = f"  <- default: {'meets' if good else 'MISSES'} summed r >= {need}, PSNR > bicubic"
            print(f"{f'x{factor} {name}':<50s}{summed:9.3f}"
                  f"{np.mean([_r(pred[i], cube[a[i]]) for i in range(len(a))]):8.3f}"
                  f"{np.mean(psnr_f):9.2f}{f'{wins}/{len(a)}':>11s}{dt:6.1f}{mark}")
    return ok


def split_workflow(crops, factors, n_channels: int = 40, seed: int = 0) -> bool:
    """(c) The real cube split as in ``benchmarks/bench_register_split.py``, through the whole
    workflow (its own NMF, masks, registration and target images); every group-A channel is a
    target. Per case: summed r (the targets' summed image against group A's), mean per-target r
    of the shipped images and of bicubic (true transform), how many targets lose more than 0.01
    to bicubic, the least fidelity (r of a shipped image averaged back onto the coarse grid with
    the measured coarse image) and the targets given detail."""
    import bench_register_split as brs

    from msifusion.steps.ions import read_ion_images

    if not CUBE.exists():
        print(f"\n(c) real cube not found at {CUBE}; skipped")
        return True
    cube, mz = brs.load_cube()
    groups = brs.split_channels(cube, n_channels, seed)
    print(f"\n(c) real ToF-SIMS cube split through the workflow (seed {seed}; every group-A channel "
          "a target)")
    print(f"{'case':<18s}{'summed r':>9s}{'bicubic':>9s}{'mean r':>8s}{'bicubic':>9s}"
          f"{'worse':>7s}{'min fid':>9s}{'detail':>8s}{'s':>6s}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for crop in crops:
            for factor in factors:
                folder = Path(tmp) / f"crop{crop}_x{factor}"
                t0 = time.perf_counter()
                cfg = brs.write_study(folder, cube, mz, groups, crop, factor,
                                      n_targets=len(groups[0]))
                done, tail = brs.run_workflow(folder, cfg, True, ROOT / "Snakefile")
                if not done:
                    print(f"crop {crop} x{factor}: workflow FAILED\n{tail[-1500:]}")
                    ok = False
                    continue
                res = folder / "results" / brs.SECTION
                d = read_fused(res / "fused_hi.h5")
                extra = d["extra"]
                measured = read_ion_images(res / "ions_lo.h5")["images"]
                truth = cube[:, :crop, :crop][groups[0]]
                order = [int(np.argmin(np.abs(mz[groups[0]] - t))) for t in extra["target_mz"]]
                truth = truth[order]
                m_true = block_matrix(factor)
                shipped = np.asarray(extra["target_image"], dtype=np.float64)
                bic = np.array([bicubic_to_grid(c, m_true, truth.shape[1:]) for c in measured])
                r_f = np.array([_r(p, t) for p, t in zip(shipped, truth)])
                r_b = np.array([_r(p, t) for p, t in zip(bic, truth)])
                summed_f, summed_b = _r(shipped.sum(0), truth.sum(0)), _r(bic.sum(0), truth.sum(0))
                worse = int(np.sum(r_f < r_b - 0.01))
                fid = float(np.min(extra["target_fidelity_r"]))
                detail = f"{int(np.sum(extra['target_gain'] > 0))}/{len(r_f)}"
                need = 0.93 if factor == 4 else 0.92
                good = summed_f >= need and worse == 0 and r_f.mean() >= r_b.mean() and fid >= 0.99
                ok &= good
                table_row(f"ToF-SIMS poplar split x{factor}, {crop} px (summed r)", summed_f,
                          summed_b, worse, fid, detail, good)
                print(f"{f'{crop} px x{factor}':<18s}{summed_f:9.3f}{summed_b:9.3f}{r_f.mean():8.3f}"
                      f"{r_b.mean():9.3f}{worse:7d}{fid:9.4f}"
                      f"{detail:>8s}"
                      f"{time.perf_counter() - t0:6.0f}  {'meets' if good else 'MISSES'} summed r >= "
                      f"{need}, none worse than bicubic - 0.01, fidelity >= 0.99")
                print("   per target (m/z: fused / bicubic, gain): " + ", ".join(
                    f"{t:.0f}: {a:.3f}/{b:.3f} g{g:g}" for t, a, b, g in
                    zip(extra["target_mz"], r_f, r_b, extra["target_gain"])))
    return ok


def msight_workflow(factors) -> bool:
    """(d) The real MALDI + H&E pair (``benchmarks/bench_register_image.py``): the MALDI
    area-averaged by ``k`` (100 / 200 um) and the H&E as an image level, through the whole
    workflow (its own registration), the 20 most intense m/z as targets. The shipped images (on
    the H&E grid) are averaged over each 25 um MALDI pixel through the found registration and
    scored against the measured 25 um images on the acquired pixels; bicubic and nearest-block
    upsample the measured coarse image onto the 25 um grid. Fidelity: r of each shipped image
    averaged back onto the coarse grid with the measured coarse image."""
    import subprocess

    import bench_register_image as bri

    from msifusion.fuse import footprint_average
    from msifusion.steps.ions import read_ion_images

    if not (bri.MALDI.exists() and bri.HE.exists()):
        print(f"\n(d) real pair not found in {bri.DATA}; skipped")
        return True
    out = ROOT / "benchmarks" / "out" / "fusion_msight"
    out.mkdir(parents=True, exist_ok=True)
    converted = out / "maldi_25um.h5"
    if not converted.exists():
        subprocess.run([sys.executable, "-m", "msifusion", "convert", str(bri.MALDI), str(converted)],
                       check=True, capture_output=True, cwd=ROOT)
    reader = ConvertedReader(converted)
    x = bri.dense(reader)
    order = np.argsort(x.sum(0))[::-1][:20]
    targets = [round(float(reader.mz_axis[j]), 4) for j in order]
    truth = np.stack([reader.to_image(x[:, j]) for j in order])
    print("\n(d) MSIght MALDI + H&E through the workflow, 20 most intense m/z, scored against the "
          "measured 25 um images")
    print(f"{'case':<8s}{'fused r':>8s}{'bicubic':>8s}{'nearest':>8s}{'wins':>6s}{'worse':>7s}"
          f"{'min fid':>9s}{'detail':>8s}{'pixels':>8s}{'s':>6s}")
    ok = True
    for k in factors:
        folder = bri.study(out / f"x{k}", k, converted, None)
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        cfg["targets"] = {"mz": targets, "ppm": 25}
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        t0 = time.perf_counter()
        proc = subprocess.run([bri.SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "-d", str(folder),
                               "--configfile", str(folder / "config.yaml"), "--cores", "2"],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode:
            print(f"x{k}: workflow FAILED\n{proc.stderr[-2000:]}")
            ok = False
            continue
        res = folder / "results" / "s1"
        d = read_fused(res / "fused_he.h5")
        extra = d["extra"]
        measured = read_ion_images(res / "ions_maldi.h5")["images"]
        m25 = bri.to_25um(np.asarray(extra["matrix_to_reference"]), k)
        fused25, cov = footprint_average(np.asarray(extra["target_image"], np.float64), m25,
                                         truth.shape[1:])
        up = block_matrix(k)
        # the coarse grid's origin: the coarsened file's pixel (0, 0) is the block of 25 um pixel 0
        bic = np.array([bicubic_to_grid(c, up, truth.shape[1:]) for c in measured])
        yy, xx = np.mgrid[0:truth.shape[1], 0:truth.shape[2]]
        near = measured[:, np.minimum(yy // k, measured.shape[1] - 1), np.minimum(xx // k, measured.shape[2] - 1)]
        valid = np.isfinite(truth).all(0) & (cov >= 0.9) & np.isfinite(bic).all(0) & np.isfinite(near).all(0)
        r_f = np.array([pearson(a, b, valid) for a, b in zip(fused25, truth)])
        r_b = np.array([pearson(a, b, valid) for a, b in zip(bic, truth)])
        r_n = np.array([pearson(a, b, valid) for a, b in zip(near, truth)])
        worse = int(np.sum(r_f < r_b - 0.01))
        fid = float(np.min(extra["target_fidelity_r"]))
        good = worse == 0 and r_f.mean() >= r_b.mean() and fid >= 0.99
        ok &= good
        detail = f"{int(np.sum(extra['target_gain'] > 0))}/{len(r_f)}"
        table_row(f"MSIght MALDI x{k} + H&E, 20 m/z vs measured 25 um", r_f.mean(), r_b.mean(),
                  worse, fid, detail, good)
        print(f"{f'x{k}':<8s}{r_f.mean():8.3f}{r_b.mean():8.3f}{r_n.mean():8.3f}"
              f"{int(np.sum(r_f > r_b)):6d}{worse:7d}{fid:9.4f}{detail:>8s}{int(valid.sum()):8d}"
              f"{seconds:6.0f}  {'meets' if good else 'MISSES'} none worse than bicubic - 0.01, "
              "mean >= bicubic, fidelity >= 0.99")
        print("   per target (m/z: fused / bicubic, gain): " + ", ".join(
            f"{t:.2f}: {a:.3f}/{b:.3f} g{g:g}" for t, a, b, g in
            zip(extra["target_mz"], r_f, r_b, extra["target_gain"])))
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("phantoms", "real", "split", "msight", "all"), default="all")
    ap.add_argument("--factors", type=int, nargs="+", default=[4, 8],
                    help="MSIght coarsening factors (part msight)")
    ap.add_argument("--crops", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--presets", nargs="+", default=["small", "demo"])
    ap.add_argument("--responses", nargs="+", choices=["linear", "nonlinear"],
                    default=["linear", "nonlinear"],
                    help="phantom responses of the finer modalities (nonlinear: power laws and "
                         "ion suppression, not the fusion's linear assumption)")
    ap.add_argument("--methods", nargs="+", choices=["default"] + list(METHODS), default=None,
                    help="fusion methods of the phantom part (default: all; 'default': the shipped "
                         "config's)")
    ap.add_argument("--channels", type=int, default=40)
    a = ap.parse_args(argv)
    ok = True
    if a.part in ("real", "all"):
        ok &= real_cube(a.channels)
    if a.part in ("msight", "all"):
        ok &= msight_workflow(a.factors)
    if a.part in ("split", "all"):
        ok &= split_workflow(a.crops, (4, 8), a.channels)
    if a.part in ("phantoms", "all"):
        ok &= phantoms(a.presets, a.seeds, a.responses, a.methods)
    print_table()
    print("\nall done-when figures met" if ok else "\nsome done-when figures MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
