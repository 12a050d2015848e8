"""Step of the fuse rule: chained fusion of one section."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..errors import InputError, QualityError
from ..fuse import fuse_chain
from ..products import write_fused
from ..register import Registration, chain_to_reference, pose
from ..schema import default
from ..sharpen import fidelity, make_consistent, sharpen_targets
from ..store import atomic_output
from .register import registration_summary
from .ions import read_ion_images
from .section import read_section_maps

log = logging.getLogger("msifusion.steps.fuse")


def fuse_step(maps: list[str], transforms: list[str], outs: list[str], report: str, *,
              ions: str | None = None,
              method: str = default("fusion.method"),
              n_components: int = default("fusion.n_components"),
              scales_px=default("fusion.scales_px"), alpha_se: float = default("fusion.alpha_se"),
              consistency: bool | str = default("fusion.consistency"),
              min_coverage: float = default("fusion.min_coverage"),
              targets: list[float] | None = default("targets.mz"),
              ppm: float = default("targets.ppm"),
              min_target_r: float = default("fusion.min_target_r"),
              min_gain: float = default("fusion.min_gain"),
              seed: int = default("seed")) -> None:
    """Chained fusion of one section: reference maps and target ion images at every finer level.

    The component maps are predicted along the chain (:func:`msifusion.fuse.fuse_chain`). Each
    target ion image starts from the measured one (``ions``) and is sharpened step by step
    (:func:`msifusion.sharpen.sharpen_targets`): fine detail only where a held-out test one scale
    down shows that it helps, and always averaging back to the image it started from. A target
    that gets no detail at a step ships the interpolated image from there on, flagged.

    Parameters
    ----------
    maps : list of str
        Section maps files in chain order (reference first).
    transforms : list of str
        Registration JSON files of the adjacent pairs, in chain order.
    outs : list of str
        Fused product paths for ``maps[1:]``.
    report : str
        JSON file with the cross-validated scores per level and component, and per target.
    ions : str, optional
        The section's measured target ion images (:func:`msifusion.steps.ions.ion_images_step`);
        required when there are targets.
    targets, ppm : list of float, float
        Target m/z (+- ppm).
    min_target_r, min_gain : float
        See :func:`msifusion.sharpen.sharpen_targets`.
    """
    regs = []
    for path in transforms:
        doc = json.loads(Path(path).read_text())
        if not doc.get("passed", False):
            qc = Path(path).with_name(Path(path).stem.replace("transform", "qc") + ".png")
            raise QualityError(
                f"section {doc.get('section')!r}: registration {doc.get('fine')} -> "
                f"{doc.get('coarse')} {registration_summary(doc)}; not fusing it. Inspect {qc}: "
                "when the placement shown is right, relax the config key(s) named; else fix the "
                "ROI, the pixel sizes or the tissue masks (modalities.<name>.all_tissue)")
        regs.append(Registration.from_json(doc))
    levels = [read_section_maps(p) for p in maps]
    ref = levels[0]
    targets = [float(t) for t in (targets or [])]
    measured = _measured(ions, targets, ppm, ref)
    target = np.where(ref["acquired"][None], ref["maps"], np.nan)
    fuse_kw = dict(method=method, scales_px=tuple(scales_px), alpha_se=alpha_se, seed=seed)
    results = fuse_chain(
        [dict(maps=target, mask=ref["mask"])] + [dict(maps=lv["maps"], mask=lv["mask"]) for lv in
                                                 levels[1:]],
        [r.matrix for r in regs], n_components=n_components, consistency=consistency,
        min_coverage=min_coverage, **fuse_kw)
    summary = {"section": ref["section"], "reference": ref["modality"], "method": method,
               "min_target_r": float(min_target_r), "min_gain": float(min_gain), "levels": []}
    to_ref = chain_to_reference([r.matrix for r in regs])
    step_images, step_mask = measured, ref["mask"]
    allowed = np.ones(len(targets), dtype=bool)
    for lv, res, out, reg, m_ref in zip(levels[1:], results, outs, regs, to_ref):
        if targets:
            sh = sharpen_targets(step_images, step_mask, lv["maps"], reg.matrix, anchor=measured,
                                 anchor_matrix=m_ref, anchor_mask=ref["mask"], allowed=allowed,
                                 min_gain=min_gain, min_target_r=min_target_r,
                                 min_coverage=min_coverage, level=f"section {ref['section']!r}, "
                                 f"{lv['modality']}", **fuse_kw)
            images, gain, cv_r, reduced_r, fid = sh.images, sh.gain, sh.cv_r, sh.reduced_r, sh.fidelity_r
        else:
            images = np.zeros((0,) + lv["maps"].shape[1:], np.float32)
            gain = cv_r = fid = np.zeros(0)
            reduced_r = np.zeros((0, 0))
        allowed = gain > 0
        step_images, step_mask = images, lv["mask"]
        maps_out, maps_fid = _consistent_maps(res.pred, target, m_ref, ref["mask"], consistency,
                                              min_coverage)
        write_fused(out, maps_out, ref["spectra"], ref["mz"], origin_xy=tuple(lv["origin_xy"]),
                    pixel_size_um=float(lv["pixel_size_um"]), reference=ref["modality"],
                    extra={"cv_r": np.asarray(res.cv_r, np.float32), "matrix_to_reference": m_ref,
                           "target_mz": np.asarray(targets, np.float64),
                           "target_cv_r": np.asarray(cv_r, np.float32),
                           "target_predictable": allowed, "target_gain": np.asarray(gain, np.float32),
                           "target_reduced_r": np.asarray(reduced_r, np.float32),
                           "target_fidelity_r": np.asarray(fid, np.float32),
                           "target_image": images, "tissue_mask": lv["mask"],
                           "maps_fidelity_r": maps_fid.astype(np.float32),
                           "reference_origin_xy": np.asarray(ref["origin_xy"], np.int64),
                           "reference_shape": np.asarray(ref["acquired"].shape, np.int64),
                           "target_ppm": float(ppm), "min_target_r": float(min_target_r)})
        summary["levels"].append({"modality": lv["modality"],
                                  "cv_r": [float(v) for v in res.cv_r],
                                  "maps_fidelity_r": [_num(v) for v in maps_fid],
                                  "targets": [{"mz": t, "cv_r": _num(r), "gain": float(g),
                                               "reduced_scale_r": [_num(v) for v in rr],
                                               "fidelity_r": _num(fr), "predictable": bool(o)}
                                              for t, r, g, rr, fr, o in zip(targets, cv_r, gain,
                                                                            reduced_r, fid, allowed)],
                                  "to_reference": pose(m_ref, lv["pixel_size_um"],
                                                       ref["pixel_size_um"])})
        log.info("section %r, %s: mean cross-validated r %.3f, maps fidelity to the reference "
                 "min r %.4f", ref["section"], lv["modality"], float(np.nanmean(res.cv_r)),
                 float(np.nanmin(maps_fid)) if np.isfinite(maps_fid).any() else float("nan"))
        for t, c in zip(np.asarray(targets)[~allowed], np.asarray(cv_r)[~allowed]):
            log.warning("section %r, %s: m/z %.4f is NOT PREDICTABLE from the finer modalities "
                        "(cross-validated r %.2f, or no gain in the reduced-scale test): its "
                        "product image is the measured coarse one interpolated", ref["section"],
                        lv["modality"], t, c)
    with atomic_output(report) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))


def _consistent_maps(pred: np.ndarray, reference: np.ndarray, to_ref: np.ndarray, mask: np.ndarray,
                     consistency: bool | str, min_coverage: float) -> tuple[np.ndarray, np.ndarray]:
    """The component maps a level ships, and their fidelity r to the reference's maps.

    Unless ``consistency`` is False, the predicted maps (k, ny, nx) are corrected
    (:func:`msifusion.sharpen.make_consistent`) so that their averages over every reference
    pixel (``to_ref``: level pixel -> reference pixel) reproduce the reference's measured maps
    (k, ny0, nx0), as the target images do; fidelity is scored on the reference tissue ``mask``.
    """
    maps = pred
    if consistency is not False:
        maps, info = make_consistent(pred, reference, to_ref, min_coverage=min_coverage)
        log.info("component maps made consistent with the reference in %d iterations "
                 "(max |residual| %.3g)", info["iterations"], info["max_abs"])
    return maps, fidelity(maps, reference, to_ref, mask, min_coverage=min_coverage)


def _measured(ions: str | None, targets: list[float], ppm: float, ref: dict) -> np.ndarray:
    """The measured target ion images (T, ny, nx) of the reference section, NaN off the scan."""
    shape = ref["acquired"].shape
    if not targets:
        return np.zeros((0,) + shape)
    if ions is None:
        raise InputError(f"section {ref['section']!r}: {len(targets)} targets but no measured ion "
                         "images (ions)")
    d = read_ion_images(ions)
    if (d["images"].shape != (len(targets),) + shape
            or not np.allclose(np.atleast_1d(d["targets_mz"]), targets) or not np.isclose(d["ppm"], ppm)):
        raise InputError(f"{ions}: ion images of m/z {np.atleast_1d(d['targets_mz']).tolist()} +- "
                         f"{d['ppm']} ppm, {d['images'].shape}, do not match the targets {targets} "
                         f"+- {ppm} ppm on the section's {shape} grid")
    return np.where(ref["acquired"][None], d["images"], np.nan)


def _num(v: float) -> float | None:
    """A float for JSON (None for NaN or infinite)."""
    return float(v) if np.isfinite(v) else None
