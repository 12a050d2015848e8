"""Registration of an image level (microscopy) onto a coarse MSI level: different contrasts,
scale unknown or uncertain, partial overlap, mirror.

An H&E image and an MSI acquisition of the same section share no intensity: the MSI total ion
image may be flat where the stain shows glands, a peptide may sit in lumens that look empty.
What they share is that the tissue types the stain tells apart have different spectra. So a
placement is scored by **how much of the coarse modality's component maps a regression on the
fine image's features explains** (the features averaged over each coarse pixel's footprint):

    similarity = sqrt(explained sum of squares / total sum of squares)

of the coarse channels (standardised, whitened by PCA: every independent pattern counts once),
the totals taken over ALL coarse pixels, so that a placement covering part of the coarse section
can explain at most that part (without it, a small overlap that happens to fit would win). The
regression is linear in the features, their squares and their tissue fraction, with an intercept.

Search (:func:`register_image`):

1. exhaustive: for every start rotation (and mirror), every scale of a log grid over the
   ranges of :func:`scale_ranges` and every translation, the similarity of the whole coarse section at a working resolution of
   at most ``search_px`` pixels across, by FFT cross-correlations of the sums the regression needs
   (the moving features rendered on a canvas at that resolution; about 60 correlations a pose);
2. the best distinct candidates (mirrored alternatives included, so that a mirrored placement that
   fits better shows as a negative margin) are refined at the full coarse resolution by a compass
   search over translation, rotation and scale (plus aspect and shear for ``model="affine"``),
   the features sampled at the mapped coarse pixel centres after a Gaussian of the footprint's
   width.

The scales: around the fine pixel size when the config gives it, around the ratio of the
tissue areas when nothing does, and both when the image's own metadata states one that the
areas contradict (:func:`scale_ranges`). Quality as in :mod:`msifusion.register`: ``score`` the
mask Dice in the fine field of view, ``margin`` the relative similarity gap to the best distinct
other placement (``1 - other / best``), ``boundary`` the outline agreement, and ``ncc`` the similarity above (a multiple
correlation).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi

from .affine import _wrap_deg, linear_scale, rotation_deg
from .errors import InputError
from .register import Registration, _block_mean, _boundary_f, _dice, _failed, _pad_coarse
from .schema import default

log = logging.getLogger("msifusion.register_image")

__all__ = ["register_image", "regression_similarity", "scale_ranges"]

#: Coarse principal components the similarity explains (whitened; fewer when the data have fewer).
N_COMPONENTS = 8
#: Relative step of the scale grid of the search (the refinement takes over from there).
SCALE_STEP = 0.045
#: Factor around the ratio of the tissue areas within which an unknown scale is searched.
UNKNOWN_SCALE_RANGE = 1.6
#: Gaussian sigma of a coarse pixel's footprint, in coarse px (a box of 1 px has 0.29).
FOOTPRINT_SIGMA = 0.35
#: Least fraction of the smaller of the two fields that a placement must overlap, and least
#: overlap (search pixels) per regression feature.
MIN_OVERLAP = 0.3
MIN_PIXELS_PER_FEATURE = 20
#: Ridge on the regression's feature covariance, relative to its mean variance, and its floor
#: (the features are in units of their 99th percentile): a placement whose overlap sees
#: (nearly) constant features, e.g. glass or a field's edge, explains nothing, instead of what
#: the rounding of near-zero covariances makes of it.
RIDGE = 1e-3
RIDGE_FLOOR = 1e-3
#: First compass-search steps of (dx, dy) coarse px, rotation (degrees), log scale, log aspect
#: and shear, and the fraction of them at which the search stops.
STEPS = (1.0, 1.0, 2.0, 0.04, 0.02, 0.02)
MIN_STEP_FRACTION = 1.0 / 64


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


#: Percentiles at which each channel is winsorised (a few hot or edge pixels must not be a
#: pattern of their own, and the bulk of the values must stay linear).
WINSOR_PERCENTILES = (0.5, 99.5)


def _winsorised_z(values: np.ndarray) -> np.ndarray:
    """Columns of ``values (n, c)`` clipped to their :data:`WINSOR_PERCENTILES` and
    standardised (z-scores; 0 for a constant column)."""
    lo, hi = np.percentile(values, WINSOR_PERCENTILES, axis=0)
    v = np.clip(values, lo, hi)
    return (v - v.mean(0)) / np.maximum(v.std(0), 1e-12)


def _whitened(channels: np.ndarray, valid: np.ndarray, k: int = N_COMPONENTS) -> np.ndarray:
    """The first ``k`` principal components of the ``channels (c, ny, nx)`` over ``valid``, each
    of unit variance there, 0 elsewhere: ``(k', ny, nx)``. Each channel, and each component,
    is winsorised (:func:`_winsorised_z`) so that no handful of pixels makes a pattern, and
    otherwise kept linear: a log, or robust z-scores clipped at a few MADs (a bimodal
    tissue/background channel has a small MAD), bend the partial-volume pixels at the tissue's
    edge, and the search then prefers the fine image a few per cent too large."""
    z = _winsorised_z(channels[:, valid].T.astype(np.float64))
    _, s, vt = np.linalg.svd(z, full_matrices=False)
    keep = s > 1e-6 * s[0] if s.size else s > 0
    k = int(min(k, keep.sum()))
    pcs = _winsorised_z(z @ vt[:k].T)
    out = np.zeros((k,) + valid.shape)
    out[:, valid] = pcs.T
    return out


def _fine_features(features: np.ndarray, valid: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Features for the regression: the image's features scaled to their 99th percentile, the
    tissue fraction, and the squares of the features: ``(2 k + 1, ny, nx)``, 0 off the field."""
    feats = []
    for f in features:
        top = float(np.percentile(f[valid], 99)) if valid.any() else 1.0
        feats.append(np.where(valid, f, 0.0) / (top if top > 0 else 1.0))
    feats.append((mask & valid).astype(np.float64))
    feats += [f * f for f in feats[:len(features)]]
    return np.array(feats)


def scale_ranges(coarse_valid: np.ndarray, fine_mask: np.ndarray, coarse_px_um: float,
                 fine_px_um: float, source: str, *, scale_range: float,
                 unknown_range: float = UNKNOWN_SCALE_RANGE) -> list[tuple[float, float, str]]:
    """The scales (coarse px per fine px) the search covers: ``[(lo, hi, hypothesis), ...]``.

    A pixel size from the config is trusted: +- ``scale_range`` around it. Without one, the
    ratio of the areas (the coarse section's acquired pixels against the fine tissue) within a
    factor ``unknown_range``. A pixel size the image's metadata states is searched like a
    configured one and, when the areas disagree with it by more than that factor, the areas'
    range too: microscope software records a wrong objective often enough (the real MSIght H&E
    states 0.17 um for 2.4 um pixels) for the similarity to decide between the two.
    """
    areas = math.sqrt(max(int(coarse_valid.sum()), 1) / max(int(fine_mask.sum()), 1))
    by_areas = (areas / unknown_range, areas * unknown_range, "tissue areas")
    if not (math.isfinite(fine_px_um) and fine_px_um > 0):
        return [by_areas]
    stated = fine_px_um / coarse_px_um
    known = (stated / (1 + scale_range), stated * (1 + scale_range), f"pixel size ({source})")
    if source != "image" or abs(math.log(stated / areas)) <= math.log(unknown_range):
        return [known]
    return [known, by_areas]


# --------------------------------------------------------------------------------------------
# Exhaustive search (FFT)
# --------------------------------------------------------------------------------------------


def _rotation(theta: float, mirror: bool) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    r = np.array([[c, -s], [s, c]])
    return r @ np.diag([-1.0, 1.0]) if mirror else r


def _h(m: np.ndarray) -> np.ndarray:
    return np.vstack([np.asarray(m, dtype=np.float64)[:2], [0.0, 0.0, 1.0]])


def _footprints(feats: np.ndarray, valid: np.ndarray, sigma: float) -> tuple[list, np.ndarray]:
    """Features and validity after a Gaussian of ``sigma`` fine px (a coarse pixel's footprint),
    for sampling: ``([k arrays], validity density)``."""
    den = ndi.gaussian_filter(valid.astype(np.float64), sigma, mode="constant")
    return [ndi.gaussian_filter(f, sigma, mode="constant") for f in feats], den


def _render(smoothed: list, den: np.ndarray, a: np.ndarray, shape: tuple[int, int],
            centre_f: np.ndarray, centre_c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Footprint-smoothed fine features (:func:`_footprints`) on a canvas of ``shape``: canvas
    point ``c = a (w - centre_f) + centre_c`` for fine point ``w`` (validity >= 0.9)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    w = np.linalg.inv(a) @ np.stack([xx.ravel() - centre_c[0], yy.ravel() - centre_c[1]])
    w += np.asarray(centre_f, dtype=np.float64)[:, None]
    coords = [w[1], w[0]]
    dd = ndi.map_coordinates(den, coords, order=1, cval=0.0).reshape(shape)
    ok = dd > 0.9
    out = np.empty((len(smoothed),) + shape)
    for i, sm in enumerate(smoothed):
        out[i] = ndi.map_coordinates(sm, coords, order=1, cval=0.0).reshape(shape)
    return np.where(ok, out / np.maximum(dd, 1e-9), 0.0), ok


class _Fixed:
    """The coarse side of the FFT search for one correlation shape: the FFTs of the validity,
    of the channels (k, H, W) (0 off ``valid``) and of their summed squares, and the total sum
    of squares."""

    def __init__(self, y: np.ndarray, valid: np.ndarray, shape: tuple[int, int]):
        self.shape = shape
        v = valid.astype(np.float32)
        self.fv = sfft.rfft2(v, shape)
        self.fy = sfft.rfft2((y * v).astype(np.float32), shape, axes=(-2, -1))
        self.fyy = sfft.rfft2((y * y * v).sum(0).astype(np.float32), shape)
        n = float(v.sum())
        self.total = float((y * y * v).sum() - ((y * v).sum((1, 2)) ** 2).sum() / max(n, 1))
        self.n = n


def _similarity_map(fixed: _Fixed, x: np.ndarray, ok: np.ndarray, min_n: float) -> np.ndarray:
    """Similarity (sqrt of the explained fraction of the fixed channels' total sum of squares)
    of every translation of the canvas ``x (kf, h, w)`` with validity ``ok``; -1 where the
    overlap is below ``min_n`` pixels. Index ``(i, j)``: canvas pixel (0, 0) on fixed pixel
    (i, j) (negative shifts wrap around). Float32 FFTs, batched over channels."""
    shape, kf = fixed.shape, len(x)
    v = ok.astype(np.float32)
    iu = np.triu_indices(kf)
    moving = np.concatenate([v[None], x * v, (x[iu[0]] * x[iu[1]]) * v]).astype(np.float32)
    fm = np.conj(sfft.rfft2(moving, shape, axes=(-2, -1), workers=2))
    fvm, fx, fxx = fm[0], fm[1:1 + kf], fm[1 + kf:]
    irf = lambda a: sfft.irfft2(a, shape, axes=(-2, -1), workers=2)  # noqa: E731
    n = irf(fvm * fixed.fv)
    use = n >= max(min_n, MIN_PIXELS_PER_FEATURE * (kf + 1))
    out = np.full(shape, -1.0)
    if not use.any():
        return out
    sx = irf(fx * fixed.fv)[:, use]
    sxx_u = irf(fxx * fixed.fv)[:, use]
    sy = irf(fvm[None] * fixed.fy)[:, use]
    syy = irf(fvm * fixed.fyy)[use]
    sxy = irf(fx[:, None] * fixed.fy[None])[:, :, use]          # (kf, kc, m)
    nn = n[use].astype(np.float64)
    mx, my = sx / nn, sy / nn
    sxx = np.empty((kf, kf, len(nn)))
    sxx[iu] = sxx_u
    sxx[iu[1], iu[0]] = sxx_u
    cxx = np.moveaxis(sxx / nn - mx[:, None] * mx[None], -1, 0)
    cxy = np.moveaxis(sxy / nn - mx[:, None] * my[None], -1, 0)
    lam = RIDGE * np.trace(cxx, axis1=-2, axis2=-1)[:, None, None] / kf + RIDGE_FLOOR
    expl = (cxy * np.linalg.solve(cxx + lam * np.eye(kf), cxy)).sum((-2, -1))
    vy = syy / nn - (my ** 2).sum(0)
    # the fraction of the overlap's own variance explained (at most all of it), times the
    # overlap's share of the coarse section's total
    r2 = np.clip(expl / np.maximum(vy, 1e-12), 0.0, 1.0)
    frac = np.clip(r2 * vy * nn / max(fixed.total, 1e-12), 0.0, 1.0)
    out[use] = np.where(vy > 0, np.sqrt(frac), -1.0)
    return out


def _peaks(sim: np.ndarray, count: int, sep: int) -> list[tuple[float, int, int]]:
    """The ``count`` best local maxima of a map, at least ``sep`` pixels apart."""
    out, s = [], sim.copy()
    for _ in range(count):
        i, j = np.unravel_index(int(np.argmax(s)), s.shape)
        if s[i, j] <= -1:
            break
        out.append((float(s[i, j]), int(i), int(j)))
        s[max(0, i - sep):i + sep + 1, max(0, j - sep):j + sep + 1] = -1.0
    return out


def _search(channels, cvalid, d, fine, fvalid, n_search, ranges, angles, mirrors):
    """Candidates ``(similarity, matrix fine ROI px -> coarse ROI px, mirror, scale hypothesis)``
    of the exhaustive search over the scale ``ranges`` (:func:`scale_ranges`) on coarse channels
    block-averaged by ``d`` (and whitened on that grid), with the first ``n_search``
    fine features (the linear ones and the tissue fraction: the squares wait for the
    refinement)."""
    cb = np.array([_block_mean(np.where(cvalid, c, np.nan), d)[0] for c in channels])
    vb = np.isfinite(cb).all(0)
    yb = _whitened(cb, vb)            # on the search grid: its own patterns, each counted once
    scales = [(s, label) for lo, hi, label in ranges
              for s in np.exp(np.arange(math.log(lo), math.log(hi) + 1e-9, SCALE_STEP))]
    cands = []
    for s, label in scales:
        sd = s / d                                             # search px per fine px
        b = max(1, int(math.floor(0.25 / sd)))                 # fine block ~ search px / 4
        fb = np.array([_block_mean(np.where(fvalid, f, np.nan), b)[0] for f in fine])
        fok = np.isfinite(fb).all(0)
        fb = np.where(fok, fb, 0.0)
        cw = (np.array(fok.shape[::-1], dtype=np.float64) - 1) / 2.0
        side = int(math.ceil(math.hypot(*fok.shape) * sd * b)) + 4
        canvas = (side, side)
        cc = np.array([(side - 1) / 2.0] * 2)
        shape = (vb.shape[0] + side, vb.shape[1] + side)
        fixed = _Fixed(yb, vb, shape)
        area_f = fok.sum() * (sd * b) ** 2
        min_n = MIN_OVERLAP * min(area_f, fixed.n)
        smoothed, den = _footprints(fb[:n_search], fok, FOOTPRINT_SIGMA / (sd * b))
        for theta, mirror in zip(angles, mirrors):
            a = sd * b * _rotation(theta, mirror)
            x, ok = _render(smoothed, den, a, canvas, cw, cc)
            sim = _similarity_map(fixed, x, ok, min_n)
            for value, i, j in _peaks(sim, 2, max(3, side // 8)):
                ty = i if i < vb.shape[0] else i - shape[0]
                tx = j if j < vb.shape[1] else j - shape[1]
                # fine ROI px p -> fine block w -> canvas c -> search px u -> coarse ROI px q
                w_of_p = np.array([[1 / b, 0, -(b - 1) / (2 * b)], [0, 1 / b, -(b - 1) / (2 * b)],
                                   [0, 0, 1]])
                c_of_w = _h(np.c_[a, cc - a @ cw])
                u_of_c = _h([[1, 0, tx], [0, 1, ty]])
                q_of_u = _h([[d, 0, (d - 1) / 2], [0, d, (d - 1) / 2]])
                m = (q_of_u @ u_of_c @ c_of_w @ w_of_p)[:2]
                cands.append((value, m, bool(mirror), label))
    return cands


# --------------------------------------------------------------------------------------------
# Refinement (compass search on sampled features)
# --------------------------------------------------------------------------------------------


class _Sampler:
    """One placement at the full coarse resolution: the fine features after a Gaussian of the
    footprint (for scale ``s``) sampled at the mapped coarse pixel centres and regressed.

    Calling it gives the similarity of the module docstring (the explained share of the whole
    coarse section's sum of squares: comparable between placements covering different parts
    of it); :meth:`fit` gives the R^2 within the overlap, which the refinement maximises (the
    share favours placements that grow their overlap: a fine image a few per cent too large)."""

    def __init__(self, y, yvalid, fine, fvalid, s: float):
        self.feats, self.den = _footprints(fine, fvalid, FOOTPRINT_SIGMA / s)
        yy, xx = np.nonzero(yvalid)
        self.q = np.stack([xx, yy, np.ones(len(xx))]).astype(np.float64)
        self.y = y[:, yy, xx].T                                 # (n, kc)
        self.total = float(((self.y - self.y.mean(0)) ** 2).sum())

    def _regress(self, matrix: np.ndarray) -> tuple[float, float]:
        """(explained, overlap) sums of squares of the coarse channels; (0, 0) when the overlap
        is too small."""
        p = np.linalg.inv(_h(matrix))[:2] @ self.q
        coords = [p[1], p[0]]
        dd = ndi.map_coordinates(self.den, coords, order=1, cval=0.0)
        ok = dd > 0.9
        if ok.sum() < MIN_PIXELS_PER_FEATURE * (len(self.feats) + 1):
            return 0.0, 0.0
        x = np.stack([ndi.map_coordinates(f, [c[ok] for c in coords], order=1, cval=0.0)
                      for f in self.feats], axis=1) / dd[ok, None]
        x = np.c_[x - x.mean(0), np.ones(len(x))]
        y = self.y[ok] - self.y[ok].mean(0)
        g = x.T @ x
        g += (RIDGE * np.trace(g) / len(g) + RIDGE_FLOOR * len(x)) * np.eye(len(g))
        fit = x @ np.linalg.solve(g, x.T @ y)
        return float((fit * fit).sum()), float((y * y).sum())

    def __call__(self, matrix: np.ndarray) -> float:
        explained, _ = self._regress(matrix)
        return float(math.sqrt(max(0.0, min(1.0, explained / max(self.total, 1e-12)))))

    def fit(self, matrix: np.ndarray) -> float:
        explained, overlap = self._regress(matrix)
        return explained / overlap if overlap > 0 else -1.0


def _pose(params, base: np.ndarray, centre_f: np.ndarray) -> np.ndarray:
    """``base`` perturbed about the fine centre: translation (dx, dy) coarse px, rotation (deg),
    log scale, log aspect and shear (in the fine frame)."""
    dx, dy, rot, ls, la, sh = params
    r = _rotation(math.radians(rot), False) * math.exp(ls)
    k = np.array([[math.exp(la), sh], [0.0, math.exp(-la)]])
    a = r @ base[:, :2] @ k
    qc = base[:, :2] @ centre_f + base[:, 2] + np.array([dx, dy])
    return np.c_[a, qc - a @ centre_f]


def _refine(score, base, centre_f, affine: bool, max_evals: int = 600):
    """Compass search from ``base``; returns (matrix, similarity, evaluations)."""
    n = 6 if affine else 4
    x = np.zeros(6)
    steps = np.array(STEPS, dtype=np.float64)
    best = score(_pose(x, base, centre_f))
    evals = 1
    scale = 1.0
    while scale >= MIN_STEP_FRACTION and evals < max_evals:
        moved = False
        for i in range(n):
            for sign in (1.0, -1.0):
                trial = x.copy()
                trial[i] += sign * steps[i] * scale
                value = score(_pose(trial, base, centre_f))
                evals += 1
                if value > best:
                    best, x, moved = value, trial, True
                    break
        if not moved:
            scale /= 2
    return _pose(x, base, centre_f), best, evals


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _distance(m1: np.ndarray, m2: np.ndarray, pts: np.ndarray) -> float:
    """Median distance (coarse px) between two placements of the fine points ``(3, n)``."""
    return float(np.median(np.hypot(*(m1 @ pts - m2 @ pts))))


def regression_similarity(coarse_channels: np.ndarray, coarse_valid: np.ndarray,
                          fine_features: np.ndarray, fine_valid: np.ndarray,
                          fine_mask: np.ndarray, matrix: np.ndarray) -> float:
    """The similarity of one placement (module docstring): for tests and diagnostics."""
    y = _whitened(np.asarray(coarse_channels, dtype=np.float64), coarse_valid)
    fine = _fine_features(np.asarray(fine_features, dtype=np.float64), fine_valid, fine_mask)
    s = linear_scale(matrix)
    return _Sampler(y, coarse_valid, fine, fine_valid, s)(np.asarray(matrix, dtype=np.float64))


def register_image(coarse_channels: np.ndarray, coarse_valid: np.ndarray,
                   coarse_mask: np.ndarray, coarse_px_um: float,
                   fine_features: np.ndarray, fine_valid: np.ndarray, fine_mask: np.ndarray,
                   fine_px_um: float, *, fine_px_source: str = "config",
                   model: str = default("registration.model"),
                   n_starts: int = default("registration.n_starts"),
                   mirror: bool = default("registration.mirror"),
                   min_score: float = default("registration.min_score"),
                   min_margin: float = default("registration.min_margin"),
                   min_boundary: float = default("registration.min_boundary"),
                   min_similarity: float = default("registration.min_image_similarity"),
                   scale_range: float = default("registration.scale_range"),
                   search_px: int = 80, n_refine: int = 4,
                   check_mirror: bool = True) -> Registration:
    """Register an image level (fine) onto a coarse level by regression similarity.

    Parameters
    ----------
    coarse_channels : ndarray, shape (kc, nyc, nxc)
        Component maps of the coarse section (NaN where not acquired).
    coarse_valid, coarse_mask : ndarray of bool, shape (nyc, nxc)
        Acquired pixels (all of them are explained), and the tissue mask (for the Dice).
    coarse_px_um : float
    fine_features : ndarray, shape (kf, nyf, nxf)
        The image's features (stain features or channels), NaN where not acquired.
    fine_valid, fine_mask : ndarray of bool, shape (nyf, nxf)
        Pixels of the image, and its tissue mask.
    fine_px_um : float
        The image's pixel size (um) on this grid; NaN when unknown.
    fine_px_source : str
        Where it comes from (``metadata.PixelSize.source``): ``"image"`` (the file's metadata,
        checked by the search against the tissue areas), ``"config"``, ``"config (forced)"``
        or ``"none"``; see :func:`scale_ranges`.
    model : {"rigid", "affine"}
        Rigid: rotation, translation and, as the search found it, scale; affine: also aspect
        and shear.
    scale_range : float
        Relative half-range of the scales searched around a known pixel size (0.15: +-15 %).
    min_similarity : float
        Similarity (``Registration.ncc``) that counts as evidence of a right placement.

    Returns
    -------
    Registration
        With ``details["similarity"] = "regression"``; ``scale`` is the one found.
    """
    if model not in ("rigid", "affine"):
        raise InputError(f"register_image: model must be 'rigid' or 'affine', got {model!r}")
    cvalid = np.asarray(coarse_valid, bool) & np.isfinite(coarse_channels).all(0)
    fvalid = np.asarray(fine_valid, bool) & np.isfinite(fine_features).all(0)
    fmask = np.asarray(fine_mask, bool) & fvalid
    cmask = np.asarray(coarse_mask, bool) & cvalid
    cpx, fpx = float(coarse_px_um), float(fine_px_um)
    if cvalid.sum() < 16 or fmask.sum() < 16:
        return _failed(cvalid.shape, fvalid.shape, cpx, fpx, model,
                       "too few acquired coarse pixels or fine tissue pixels to register")
    y = _whitened(np.asarray(coarse_channels, dtype=np.float64), cvalid)
    fine = _fine_features(np.asarray(fine_features, dtype=np.float64), fvalid, fmask)
    ranges = scale_ranges(cvalid, fmask, cpx, fpx, fine_px_source, scale_range=scale_range)
    d = max(1, int(math.ceil(max(cvalid.shape) / search_px)))
    angles = np.arange(n_starts) * (2 * math.pi / n_starts)
    mirrors = np.zeros(n_starts, bool)
    if mirror or check_mirror:
        angles, mirrors = np.r_[angles, angles], np.r_[mirrors, np.ones(n_starts, bool)]
    cands = _search(np.asarray(coarse_channels, dtype=np.float64), cvalid, d, fine, fvalid,
                    len(fine_features) + 1, ranges, angles, mirrors)
    if not cands:
        return _failed(cvalid.shape, fvalid.shape, cpx, fpx, model,
                       "no placement overlaps the coarse section enough")
    log.info("register_image: %d candidates (scales %s coarse px per fine px; %d rotations%s; "
             "search grid 1/%d), best %.3f", len(cands),
             ", ".join(f"{lo:.4g}-{hi:.4g} from the {label}" for lo, hi, label in ranges),
             n_starts, " and mirrors" if mirrors.any() else "", d, max(c[0] for c in cands))
    fy, fx = np.nonzero(fmask)
    centre_f = np.array([fx.mean(), fy.mean()])
    pts = np.stack([fx[::max(1, len(fx) // 2000)], fy[::max(1, len(fy) // 2000)],
                    np.ones(len(fx[::max(1, len(fx) // 2000)]))]).astype(np.float64)
    far = 3.0
    order = sorted(range(len(cands)), key=lambda i: -cands[i][0])
    keep, quota = [], {True: n_refine, False: 0 if mirror else 2}
    for i in order:
        allowed = mirror or not cands[i][2]
        if quota[allowed] > 0 and all(_distance(cands[i][1], cands[j][1], pts) > far
                                      for j in keep):
            keep.append(i)
            quota[allowed] -= 1
    refined = []
    for i in keep:
        s = linear_scale(cands[i][1])
        sampler = _Sampler(y, cvalid, fine, fvalid, s)
        m, _, evals = _refine(sampler.fit, cands[i][1], centre_f, affine=False)
        if model == "affine":
            m, _, more = _refine(sampler.fit, m, centre_f, affine=True)
            evals += more
        value = sampler(m)
        refined.append((value, m, cands[i][2], cands[i][3]))
        log.info("register_image: candidate %.3f (%s) refined to %.3f in %d evaluations",
                 cands[i][0], "mirrored" if cands[i][2] else "direct", value, evals)
    allowed = [j for j, r in enumerate(refined) if mirror or not r[2]]
    w = max(allowed, key=lambda j: refined[j][0])
    sim, matrix, mirrored, hypothesis = refined[w]
    others = [r[0] for r in refined if _distance(r[1], matrix, pts) > far]
    # relative: the similarity of a fine image that sees part of the section is that part's
    # share (0.4 for half of it), and so are the gaps
    margin = float(1.0 - max(others) / sim) if others and sim > 0 else float("nan")
    theta = rotation_deg(matrix, mirrored)
    scale = linear_scale(matrix)
    coarse = _pad_coarse(np.where(cvalid, cmask.astype(float), np.nan), cmask, 8)
    dice = _dice(coarse, fmask, fvalid, matrix, 1)
    boundary = _boundary_f(coarse, fmask, fvalid, matrix, scale)
    evidence = (math.isfinite(boundary) and boundary >= min_boundary) or sim >= min_similarity
    passed = bool(dice >= min_score and (not math.isfinite(margin) or margin >= min_margin)
                  and evidence)
    found_px = scale * cpx
    details = {"similarity": "regression", "scale_ranges": [list(r) for r in ranges],
               "scale_hypothesis": hypothesis, "fine_pixel_size_found_um": found_px,
               "fine_pixel_size_source": fine_px_source,
               "n_candidates": len(cands), "refined": [float(r[0]) for r in refined],
               "min_score": float(min_score), "min_margin": float(min_margin),
               "min_boundary": float(min_boundary), "min_ncc": float(min_similarity),
               "search_block": int(d)}
    if not math.isfinite(margin):
        margin = 1.0
    reg = Registration(
        matrix=matrix, rotation_deg=_wrap_deg(theta),
        translation_um=(float(matrix[0, 2] * cpx), float(matrix[1, 2] * cpx)), scale=scale,
        mirror=bool(mirrored), score=float(dice), ncc=float(sim), margin=margin, passed=passed,
        coarse_px_um=cpx, fine_px_um=fpx if math.isfinite(fpx) else found_px, model=model,
        boundary=boundary, coarse_shape=tuple(cvalid.shape), fine_shape=tuple(fvalid.shape),
        details=details)
    if math.isfinite(fpx) and abs(math.log(found_px / fpx)) > math.log(1 + scale_range):
        log.warning("register_image: the fine pixel size found, %.4g um, is not the %.4g um "
                    "the %s gives (x%.2f): the placement fits the %s; set pixel_size_um with "
                    "force_pixel_size: true to impose one", found_px, fpx,
                    "file" if fine_px_source == "image" else "config", found_px / fpx,
                    hypothesis)
    log.info("register_image: rotation %.2f deg, mirror %s, scale %.5f (fine pixel %.4g um), "
             "dice %.3f, boundary %.3f, similarity %.3f, margin %.3f -> %s", reg.rotation_deg,
             reg.mirror, scale, found_px, dice, boundary, sim, margin,
             "passed" if passed else "FAILED")
    return reg
