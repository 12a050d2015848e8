"""Step of the fuse rule: chained fusion of one section."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from ..affine import compose, invert
from ..errors import QualityError
from ..evaluate import bicubic_to_grid
from ..fuse import fuse_chain, target_scores
from ..products import write_fused
from ..register import Registration, chain_to_reference, pose
from ..schema import default
from ..spectra import mz_window
from ..store import atomic_output
from .register import registration_summary
from .section import read_section_maps

log = logging.getLogger("msifusion.steps.fuse")


def fuse_step(maps: list[str], transforms: list[str], outs: list[str], report: str, *,
              method: str = default("fusion.method"),
              n_components: int = default("fusion.n_components"),
              scales_px=default("fusion.scales_px"), alpha_se: float = default("fusion.alpha_se"),
              consistency: bool | str = default("fusion.consistency"),
              min_coverage: float = default("fusion.min_coverage"),
              targets: list[float] | None = default("targets.mz"),
              ppm: float = default("targets.ppm"),
              min_target_r: float = default("fusion.min_target_r"),
              seed: int = default("seed")) -> None:
    """Chained fusion of one section: predict reference maps at every finer level.

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
    targets, ppm : list of float, float
        Target m/z (+- ppm) scored per level (:func:`msifusion.fuse.target_scores`); a target whose
        cross-validated r at some step of the chain up to a level is below ``min_target_r`` is
        flagged as not predictable at that level (and every finer one) in the products, the
        report and the log.
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
    target = np.where(ref["acquired"][None], ref["maps"], np.nan)
    results = fuse_chain(
        [dict(maps=target, mask=ref["mask"])] + [dict(maps=lv["maps"], mask=lv["mask"]) for lv in
                                                 levels[1:]],
        [r.matrix for r in regs], method=method, n_components=n_components,
        scales_px=tuple(scales_px), alpha_se=alpha_se, consistency=consistency,
        min_coverage=min_coverage, seed=seed)
    summary = {"section": ref["section"], "reference": ref["modality"], "method": method,
               "min_target_r": float(min_target_r), "levels": []}
    to_ref = chain_to_reference([r.matrix for r in regs])
    targets = [float(t) for t in (targets or [])]
    weights = np.array([ref["spectra"][:, mz_window(ref["mz"], t, ppm)].sum(axis=1)
                        for t in targets], dtype=np.float64).reshape(len(targets), len(ref["spectra"]))
    chain_r = np.full(len(targets), np.inf)
    step_target = target
    # per target: its image at the last level where it was predictable, and that grid -> reference
    ref_images = np.tensordot(weights, np.nan_to_num(ref["maps"].astype(np.float64)), axes=1)
    trusted = [(img, np.eye(2, 3)) for img in ref_images]
    for lv, res, out, m_ref in zip(levels[1:], results, outs, to_ref):
        r_t, resid_t = target_scores(weights, step_target, res.residual, res.info["train_mask"])
        chain_r = np.fmin(chain_r, np.where(np.isfinite(r_t), r_t, -np.inf))
        ok = chain_r >= min_target_r
        step_target = res.pred
        images = _target_images(weights, res.pred, ok, trusted, m_ref)
        trusted = [(img, m_ref) if o else t for img, o, t in zip(images, ok, trusted)]
        write_fused(out, res.pred, ref["spectra"], ref["mz"], origin_xy=tuple(lv["origin_xy"]),
                    pixel_size_um=float(lv["pixel_size_um"]), reference=ref["modality"],
                    extra={"cv_r": np.asarray(res.cv_r, np.float32), "matrix_to_reference": m_ref,
                           "target_mz": np.asarray(targets, np.float64),
                           "target_cv_r": np.asarray(chain_r, np.float32),
                           "target_predictable": ok, "target_cv_residual": resid_t,
                           "target_image": images, "tissue_mask": lv["mask"],
                           "target_ppm": float(ppm), "min_target_r": float(min_target_r)})
        summary["levels"].append({"modality": lv["modality"],
                                  "cv_r": [float(v) for v in res.cv_r],
                                  "targets": [{"mz": t, "cv_r": _num(r), "chain_cv_r": _num(c),
                                               "predictable": bool(o)}
                                              for t, r, c, o in zip(targets, r_t, chain_r, ok)],
                                  "to_reference": pose(m_ref, lv["pixel_size_um"],
                                                       ref["pixel_size_um"])})
        log.info("section %r, %s: mean cross-validated r %.3f", ref["section"], lv["modality"],
                 float(np.nanmean(res.cv_r)))
        for t, c in zip(np.asarray(targets)[~ok], chain_r[~ok]):
            log.warning("section %r, %s: m/z %.4f is NOT PREDICTABLE from the finer modalities "
                        "(cross-validated r %.2f < %.2f): its product image is the coarse one "
                        "interpolated", ref["section"], lv["modality"], t, c, min_target_r)
    with atomic_output(report) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))


def _target_images(weights: np.ndarray, pred: np.ndarray, predictable: np.ndarray,
                   trusted: list, to_reference: np.ndarray) -> np.ndarray:
    """The target ion images a fused product vouches for, shape (T, ny, nx) float32.

    A predictable target's image is reconstructed from the predicted maps ``pred`` (k, ny, nx)
    with ``weights`` (T, k). A target flagged as not predictable gets its image at the last
    coarser level where it was predictable (the reference's own image when none was),
    interpolated (bicubic) onto this grid, so the product never paints fine detail that no finer
    modality supports.

    Parameters
    ----------
    weights : ndarray, shape (T, k)
    pred : ndarray, shape (k, ny, nx)
        NaN where not acquired (NaN in the output there).
    predictable : ndarray of bool, shape (T,)
    trusted : list of (ndarray (ny_t, nx_t), ndarray (2, 3))
        Per target: its image at the last level where it was predictable and that level's
        pixel -> reference pixel matrix.
    to_reference : ndarray, shape (2, 3)
        This grid's pixel -> reference pixel.
    """
    acquired = np.isfinite(pred).all(0)
    images = np.tensordot(weights, np.nan_to_num(pred.astype(np.float64)), axes=1)
    for t in np.flatnonzero(~np.asarray(predictable, dtype=bool)):
        img, m_src = trusted[t]
        images[t] = bicubic_to_grid(img, compose(to_reference, invert(m_src)), pred.shape[1:])
    return np.where(acquired[None], images, np.nan).astype(np.float32)


def _num(v: float) -> float | None:
    """A float for JSON (None for NaN or infinite)."""
    return float(v) if np.isfinite(v) else None
