"""Target ion images from the measured data: detail injection validated at reduced scale.

The pan-sharpening scheme of remote sensing (Wald et al. 1997; Vivone et al. 2015), applied to
each target ion image of one chain step (a coarse grid, e.g. FT-ICR, and a finer modality's grid):

1. **Base**: the measured coarse ion image (raw spectra summed in the target's ppm window,
   :func:`msifusion.spectra.measured_ion_images`; along a chain always the reference's, through
   the composed registrations), interpolated onto the fine grid
   (:func:`msifusion.evaluate.bicubic_to_grid`, which does not ring at unknown pixels).
2. **Prediction**: the step's coarse image (the measured one, or at later chain steps the one
   the previous step shipped) regressed on the fine modality's features
   (:func:`msifusion.fuse.fuse_pair`, trained on coarse pixels, applied to fine pixels).
3. **Injection gain**, per target, from a held-out test at reduced scale (Wald's protocol,
   :func:`reduced_scale_scores`): both levels are degraded by the pixel ratio (the coarse image
   averaged over blocks of ``d x d`` coarse pixels, the fine modality averaged over each coarse
   pixel), the same scheme is run one scale down and scored against the measured coarse image.
   The gain is the one among :data:`GAINS` that scores best, and 0 unless it beats plain
   interpolation (gain 0) by ``min_gain``.
4. **Consistency** (:func:`make_consistent`): ``base + gain * (prediction - base)`` is corrected by
   iterative back-projection so that its average over every measured coarse pixel reproduces the
   measured value (the reference's, at every chain step): the finer modalities only add detail
   below the measured pixel.

A target with gain 0 ships the interpolated measured image (made consistent) and is flagged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .affine import block_matrix, linear_scale
from .errors import InputError
from .evaluate import bicubic_to_grid, pearson
from .fuse import (_check_matrix, _consistency_operators, _enforce_consistency, _footprint_operator,
                   _rows_needed, footprint_average, fuse_pair)
from .maps import principal_maps
from .schema import default

log = logging.getLogger("msifusion.sharpen")

__all__ = ["GAINS", "Sharpened", "make_consistent", "measured_ion_image", "fidelity",
           "reduced_scale_scores", "sharpen_targets", "pixel_ratio"]

#: Injection gains tried at reduced scale (0: the interpolated measured image).
GAINS = (0.0, 0.25, 0.5, 0.75, 1.0)
#: Fewest coarse tissue pixels the reduced-scale test needs at the degraded scale.
MIN_REDUCED_PIXELS = 16
#: Least degradation of the reduced-scale test, as a share of the pixel ratio: Wald's protocol
#: degrades by the ratio; where the coarse section is too small for that, by less, down to this
#: share. A shallower test does not validate the extrapolation the product makes: on the real
#: MSIght pair (MALDI 200 um, H&E ratio 41), a test at 1/4 passed 6 targets that then lost up to
#: 0.2 r to bicubic at full scale.
MIN_REDUCED_SHARE = 0.5


def pixel_ratio(matrix: np.ndarray) -> float:
    """Fine pixels per coarse pixel along a side: ``1 / sqrt(|det|)`` of the fine -> coarse map."""
    return 1.0 / linear_scale(matrix)


def _constrained(coarse: np.ndarray, coverage: np.ndarray, min_coverage: float) -> np.ndarray:
    """Flat indices of the coarse pixels a consistent image must reproduce: known in every image
    and covered by the fine grid on at least ``min_coverage`` of their area."""
    return np.flatnonzero((np.isfinite(coarse).all(0) & (coverage >= min_coverage)).ravel())


def make_consistent(images: np.ndarray, coarse: np.ndarray, matrix: np.ndarray, *,
                    min_coverage: float = default("fusion.min_coverage"),
                    supersample: int = 4) -> tuple[np.ndarray, dict]:
    """Correct fine images so that their footprint averages reproduce the coarse images.

    Iterative back-projection (bilinear) of the coarse residual, on every coarse pixel known in
    ``coarse`` and covered by acquired fine pixels on at least ``min_coverage`` of its area; the
    correction is smooth (no coarse blocks), and nothing changes where the fine image already
    averages to the coarse one.

    Parameters
    ----------
    images : ndarray, shape (T, nyf, nxf)
        Fine images; NaN where the fine modality was not acquired (kept NaN).
    coarse : ndarray, shape (T, nyc, nxc)
        Measured coarse images; NaN where unknown.
    matrix : ndarray, shape (2, 3)
        Fine pixel ``(x, y, 1)`` -> coarse pixel ``(x, y)``.
    min_coverage : float
        Share of a coarse pixel's area the fine grid must cover for the pixel to be reproduced.

    Returns
    -------
    images : ndarray, shape (T, nyf, nxf), float64
    info : dict
        ``iterations``, ``max_abs`` (largest remaining coarse residual), ``n_constrained``.
    """
    img = np.asarray(images, dtype=np.float64)
    c = np.asarray(coarse, dtype=np.float64)
    if img.ndim != 3 or c.ndim != 3 or len(img) != len(c):
        raise InputError(f"make_consistent: images {img.shape} and coarse {c.shape} must be "
                         "(T, ny, nx) with the same T")
    m = _check_matrix(matrix, "make_consistent")
    fine_valid = np.isfinite(img).all(0)
    fine_idx = np.flatnonzero(fine_valid)
    op = _footprint_operator(img.shape[1:], m, c.shape[1:], supersample, fine_valid)[:, fine_idx].tocsr()
    cov = np.asarray(op.sum(axis=1)).ravel()
    rows = _constrained(c, np.minimum(cov, 1.0).reshape(c.shape[1:]), min_coverage)
    out = img.copy()
    info = {"iterations": 0, "max_abs": 0.0, "n_constrained": int(len(rows))}
    if not len(rows) or not len(fine_idx):
        return out, info
    a, b = _consistency_operators(op, cov, rows, fine_idx, img.shape[1:], m, c.shape[1:])
    flat = img.reshape(len(img), -1)[:, fine_idx].T
    target = c.reshape(len(c), -1)[:, rows].T
    fixed, n_it, max_abs = _enforce_consistency(flat, a, b, target, max_iter=500)
    out.reshape(len(out), -1)[:, fine_idx] = fixed.T
    info.update(iterations=int(n_it), max_abs=float(max_abs))
    return out, info


def measured_ion_image(fused, target_mz: float, ppm: float, measured: np.ndarray,
                       min_coverage: float = default("fusion.min_coverage")) -> tuple[np.ndarray, float | None]:
    """A fused product's ion image, consistent with the reference's measured image of the window.

    A configured target ships as the product made it (already consistent, see
    :func:`msifusion.products.product_ion_image`); any other m/z is reconstructed from the maps
    and made consistent with ``measured`` (:func:`make_consistent`), which adds back the
    measured-minus-reconstructed residual: the image averages back to the measured one and is not
    limited by the NMF rank.

    Parameters
    ----------
    fused : mapping
        :func:`msifusion.products.read_fused` output.
    target_mz, ppm : float
        Window ``target_mz +- ppm``.
    measured : ndarray, shape (ny0, nx0)
        The reference's measured image of the window on the reference section's grid (the grid
        ``extra/matrix_to_reference`` maps to, :func:`msifusion.products.measured_section_image`);
        NaN where not acquired.

    Returns
    -------
    image : ndarray, shape (ny, nx), float64
    flag_r : float or None
        As :func:`msifusion.products.product_ion_image`.
    """
    from .products import product_ion_image, shipped_target

    img, flag = product_ion_image(fused, target_mz, ppm)
    extra = fused.get("extra", {})
    if shipped_target(extra, target_mz, ppm) is not None:
        return img, flag
    fixed, _ = make_consistent(img[None], np.asarray(measured, dtype=np.float64)[None],
                               np.asarray(extra.get("matrix_to_reference", np.eye(2, 3))),
                               min_coverage=min_coverage)
    return fixed[0], flag


def fidelity(images: np.ndarray, coarse: np.ndarray, matrix: np.ndarray, mask: np.ndarray | None = None,
             *, min_coverage: float = default("fusion.min_coverage")) -> np.ndarray:
    """Pearson r, per image, of the fine images averaged over each coarse pixel with the coarse ones.

    Parameters
    ----------
    images : ndarray, shape (T, nyf, nxf)
    coarse : ndarray, shape (T, nyc, nxc)
    matrix : ndarray, shape (2, 3)
        Fine pixel -> coarse pixel.
    mask : ndarray of bool, shape (nyc, nxc), optional
        Coarse pixels scored (e.g. the tissue); default all.
    min_coverage : float
        Coarse pixels covered less by the fine grid are not scored.

    Returns
    -------
    ndarray, shape (T,)
    """
    c = np.asarray(coarse, dtype=np.float64)
    avg, cov = footprint_average(images, matrix, c.shape[1:])
    keep = cov >= min_coverage
    if mask is not None:
        keep &= np.asarray(mask, dtype=bool)
    return np.array([pearson(a, b, keep) for a, b in zip(avg, c)])


def _degrade(coarse: np.ndarray, mask: np.ndarray, d: int, min_coverage: float):
    """The coarse images and mask averaged over ``d x d`` blocks (a block known on at least
    ``min_coverage`` of its area), and the coarse -> block matrix."""
    m = block_matrix(d)
    shape = (-(-coarse.shape[1] // d), -(-coarse.shape[2] // d))
    known = np.isfinite(coarse).all(0)
    mean, cov = footprint_average(np.where(known[None], coarse, np.nan), m, shape, supersample=1)
    mean[:, cov < min_coverage] = np.nan
    frac, _ = footprint_average(np.where(known, mask.astype(np.float64), np.nan), m, shape, supersample=1)
    return mean, np.nan_to_num(frac) >= 0.5, m


@dataclass
class Sharpened:
    """Target images of one chain step (:func:`sharpen_targets`).

    Attributes
    ----------
    images : ndarray, shape (T, nyf, nxf), float32
        The images to ship; NaN where the fine modality was not acquired.
    gain : ndarray, shape (T,)
        Injection gain used (0: the interpolated measured image).
    cv_r : ndarray, shape (T,)
        Cross-validated r of the regression at full scale (coarse pixels, spatial blocks).
    reduced_r : ndarray, shape (T, len(gains))
        Reduced-scale r of each gain against the coarse image (NaN when the test could not run).
    fidelity_r : ndarray, shape (T,)
        r of the shipped images averaged back over the anchor's pixels with the anchor images
        (the coarse ones unless an anchor is given), over ``anchor_mask`` (the coarse tissue
        without an anchor).
    info : dict
        ``gains``, ``reduced_factor`` (0: no test), ``reason`` (why not), ``consistency``.
    """

    images: np.ndarray
    gain: np.ndarray
    cv_r: np.ndarray
    reduced_r: np.ndarray
    fidelity_r: np.ndarray
    info: dict = field(default_factory=dict)


def _candidates(base: np.ndarray, pred: np.ndarray, gains: Sequence[float]) -> list[np.ndarray]:
    """``base + g * (pred - base)`` for each gain ``g``, (T, ny, nx) each."""
    return [base + g * (pred - base) for g in gains]


def _interpolate(coarse: np.ndarray, matrix: np.ndarray, fine_shape, fine_valid: np.ndarray) -> np.ndarray:
    """Each coarse image interpolated onto the fine grid (NaN off ``fine_valid``)."""
    out = np.array([bicubic_to_grid(c, matrix, fine_shape) for c in coarse]).reshape(
        (len(coarse),) + tuple(fine_shape))
    return np.where(fine_valid[None], out, np.nan)


def _feature_sets(maps: np.ndarray, n_rows: int):
    """The maps, then fewer and fewer of their principal maps, for a regression on ``n_rows``
    pixels: all maps when they fit (:func:`msifusion.fuse._rows_needed`), else the most that fit,
    halved until one does."""
    if _rows_needed(len(maps)) <= n_rows:
        yield maps
    n = min(len(maps), max(1, n_rows // 2 - 1))
    while n >= 1:
        yield principal_maps(maps, n)
        n //= 2


def reduced_scale_scores(coarse: np.ndarray, coarse_mask: np.ndarray, fine_maps: np.ndarray,
                         matrix: np.ndarray, *, gains: Sequence[float] = GAINS,
                         min_coverage: float = default("fusion.min_coverage"),
                         **fuse_kw) -> tuple[np.ndarray, int, str]:
    """Wald's protocol: score each injection gain one scale down, against the measured image.

    The coarse images are averaged over blocks of ``d x d`` pixels (``d``: the pixel ratio,
    rounded, at least 2, reduced while the degraded tissue holds fewer than
    :data:`MIN_REDUCED_PIXELS` pixels or too few for the regression, but not below
    :data:`MIN_REDUCED_SHARE` of the ratio: no test then) and the fine modality over
    each coarse pixel (its leading principal maps, :func:`principal_maps`, when the degraded
    section has too few pixels for all the maps); the scheme of :func:`sharpen_targets` then predicts the coarse images from
    these, for each gain, and each prediction is scored (Pearson r over the coarse tissue pixels)
    against the measured coarse image it never saw.

    Parameters
    ----------
    coarse : ndarray, shape (T, nyc, nxc)
    coarse_mask : ndarray of bool, shape (nyc, nxc)
        Tissue (training and scored pixels).
    fine_maps : ndarray, shape (k, nyf, nxf)
    matrix : ndarray, shape (2, 3)
        Fine pixel -> coarse pixel.
    gains : sequence of float
    min_coverage : float
    **fuse_kw
        Passed to :func:`msifusion.fuse.fuse_pair` (method, scales, penalty selection, seed).

    Returns
    -------
    r : ndarray, shape (T, len(gains))
        NaN when the test could not run.
    factor : int
        The degradation ``d`` used (0 when the test could not run).
    reason : str
        Why the test could not run ("" when it did).
    """
    c = np.asarray(coarse, dtype=np.float64)
    mask = np.asarray(coarse_mask, dtype=bool) & np.isfinite(c).all(0)
    r = np.full((len(c), len(gains)), np.nan)
    fine_c, cov = footprint_average(fine_maps, matrix, c.shape[1:])
    fine_c[:, cov < min_coverage] = np.nan
    fine_valid = np.isfinite(fine_c).all(0)
    scored = mask & fine_valid
    reason = ""
    ratio = pixel_ratio(matrix)
    d_max = max(2, int(round(ratio)))
    d_min = min(d_max, max(2, int(np.ceil(MIN_REDUCED_SHARE * ratio))))
    for d in range(d_max, d_min - 1, -1):
        degraded, mask_d, m_d = _degrade(c, mask, d, min_coverage)
        if (mask_d & np.isfinite(degraded).all(0)).sum() < MIN_REDUCED_PIXELS:
            reason = f"{int(mask_d.sum())} tissue pixels at 1/{d} scale (< {MIN_REDUCED_PIXELS})"
            continue
        fit = None
        for feats in _feature_sets(fine_c, int((mask_d & np.isfinite(degraded).all(0)).sum())):
            try:
                fit = fuse_pair(degraded, mask_d, feats, m_d, consistency=False,
                                min_coverage=min_coverage, level=f"reduced scale 1/{d}", **fuse_kw)
                break
            except InputError as err:
                reason = f"at 1/{d} scale: {err}"
        if fit is None:
            continue
        base = _interpolate(degraded, m_d, c.shape[1:], fine_valid)
        pred = np.where(fine_valid[None], fit.pred.astype(np.float64), np.nan)
        for j, cand in enumerate(_candidates(base, pred, gains)):
            cand, _ = make_consistent(cand, degraded, m_d, min_coverage=min_coverage, supersample=1)
            r[:, j] = [pearson(a, b, scored) for a, b in zip(cand, c)]
        return r, d, ""
    return r, 0, (f"{reason}; a test one scale down by less than {MIN_REDUCED_SHARE:g} x the pixel "
                  f"ratio {ratio:.1f} (1/{d_min}) would not validate the detail" if reason
                  else "the pixel ratio leaves no reduced scale")


def choose_gains(reduced_r: np.ndarray, gains: Sequence[float], min_gain: float) -> np.ndarray:
    """Per target, the gain whose reduced-scale r is best, 0 unless it beats gain 0 by ``min_gain``.

    Parameters
    ----------
    reduced_r : ndarray, shape (T, len(gains))
        Reduced-scale r (:func:`reduced_scale_scores`); ``gains[0]`` must be 0. A row with NaN
        (no test) gets 0.
    gains : sequence of float
    min_gain : float
        Least improvement of r over plain interpolation that makes detail worth injecting.
    """
    g = np.asarray(gains, dtype=np.float64)
    if g[0] != 0:
        raise InputError(f"choose_gains: the first gain must be 0 (interpolation), got {g[0]}")
    out = np.zeros(len(reduced_r))
    for t, row in enumerate(np.asarray(reduced_r, dtype=np.float64)):
        if not np.isfinite(row).all():
            continue
        best = int(np.argmax(row))
        if row[best] - row[0] >= min_gain:
            out[t] = g[best]
    return out


def sharpen_targets(coarse: np.ndarray, coarse_mask: np.ndarray, fine_maps: np.ndarray,
                    matrix: np.ndarray, *, anchor: np.ndarray | None = None,
                    anchor_matrix: np.ndarray | None = None, anchor_mask: np.ndarray | None = None,
                    allowed: np.ndarray | None = None,
                    gains: Sequence[float] = GAINS, min_gain: float = default("fusion.min_gain"),
                    min_target_r: float = default("fusion.min_target_r"),
                    min_coverage: float = default("fusion.min_coverage"),
                    **fuse_kw) -> Sharpened:
    """Target images of one chain step on the fine grid, faithful to the coarse images.

    See the module docstring. A target gets detail only when its full-scale cross-validated r
    reaches ``min_target_r``, the reduced-scale test finds a gain that beats interpolation by
    ``min_gain``, and ``allowed`` (e.g. it had detail at the previous chain step) says so.

    Parameters
    ----------
    coarse : ndarray, shape (T, nyc, nxc)
        The coarse target images (measured, or shipped by the previous step); NaN where unknown.
    coarse_mask : ndarray of bool, shape (nyc, nxc)
        Coarse tissue pixels (training, scoring).
    fine_maps : ndarray, shape (k, nyf, nxf)
        The finer modality's component maps; NaN where not acquired.
    matrix : ndarray, shape (2, 3)
        Fine pixel -> coarse pixel.
    anchor : ndarray, shape (T, nya, nxa), optional
        The measured images the shipped ones must reproduce and start from (default ``coarse``):
        along a chain, the reference's measured ion images, while ``coarse`` (what the regression
        learns) is the previous level's image, a prediction and no measurement.
    anchor_matrix : ndarray, shape (2, 3), optional
        Fine pixel -> anchor pixel (default ``matrix``).
    anchor_mask : ndarray of bool, shape (nya, nxa), optional
        Anchor pixels the fidelity is scored on (e.g. the reference's tissue; default
        ``coarse_mask`` without an anchor, every covered anchor pixel with one).
    allowed : ndarray of bool, shape (T,), optional
        Targets that may get detail (default all).
    gains, min_gain, min_target_r, min_coverage
        See :func:`choose_gains`, :func:`make_consistent`.
    **fuse_kw
        Passed to :func:`msifusion.fuse.fuse_pair`.

    Returns
    -------
    Sharpened
    """
    c = np.asarray(coarse, dtype=np.float64)
    fine = np.asarray(fine_maps)
    if c.ndim != 3 or fine.ndim != 3:
        raise InputError(f"sharpen_targets: coarse {c.shape} and fine maps {fine.shape} must be "
                         "(n, ny, nx)")
    T = len(c)
    mask = np.asarray(coarse_mask, dtype=bool)
    fine_valid = np.isfinite(fine).all(0)
    level = fuse_kw.pop("level", "fine level")
    if (anchor is None) != (anchor_matrix is None):
        raise InputError("sharpen_targets: give both anchor and anchor_matrix, or neither")
    a_img = c if anchor is None else np.asarray(anchor, dtype=np.float64)
    a_mat = matrix if anchor_matrix is None else anchor_matrix
    if a_img.ndim != 3 or len(a_img) != T:
        raise InputError(f"sharpen_targets: anchor {a_img.shape} must be ({T}, ny, nx)")
    fit = fuse_pair(c, mask, fine, matrix, consistency=False, min_coverage=min_coverage,
                    level=f"{level} (targets)", **fuse_kw)
    base = _interpolate(a_img, a_mat, fine.shape[1:], fine_valid)
    pred = np.where(fine_valid[None], fit.pred.astype(np.float64), np.nan)
    reduced_r, factor, reason = reduced_scale_scores(c, mask, fine, matrix, gains=gains,
                                                     min_coverage=min_coverage, **fuse_kw)
    gain = choose_gains(reduced_r, gains, min_gain)
    ok = np.nan_to_num(fit.cv_r, nan=-1.0) >= min_target_r
    if allowed is not None:
        ok &= np.asarray(allowed, dtype=bool)
    gain = np.where(ok, gain, 0.0)
    images, cinfo = make_consistent(base + gain[:, None, None] * (pred - base), a_img, a_mat,
                                    min_coverage=min_coverage)
    fid = fidelity(images, a_img, a_mat, mask if anchor is None else anchor_mask,
                   min_coverage=min_coverage)
    if reason:
        log.warning("%s: no reduced-scale test (%s): every target ships the interpolated coarse "
                    "image", level, reason)
    for t in range(T):
        log.info("%s: target %d: cv r %.3f, reduced-scale r by gain %s -> gain %.2f, fidelity %.4f",
                 level, t, fit.cv_r[t], np.round(reduced_r[t], 3).tolist(), gain[t], fid[t])
    return Sharpened(images=images.astype(np.float32), gain=gain, cv_r=np.asarray(fit.cv_r, np.float64),
                     reduced_r=reduced_r, fidelity_r=fid,
                     info={"gains": [float(g) for g in gains], "reduced_factor": int(factor),
                           "reason": reason, "consistency": cinfo})
