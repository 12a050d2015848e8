"""Chained fusion: predict the reference modality's component maps at a finer modality's pixels.

Level 0 is the reference (coarse pixels, e.g. FT-ICR) with its component maps ``(k0, ny0, nx0)``;
level ``i > 0`` is a finer modality with its own component maps ``(ki, nyi, nxi)`` and a
registration matrix ``(2, 3)`` that maps level-``i`` ROI pixel coordinates ``(x, y, 1)`` to
level-``i-1`` ROI pixel coordinates. Pixel centres lie at integer coordinates; a pixel covers
``[x - 0.5, x + 0.5] x [y - 0.5, y + 0.5]``.

A model ``coarse target ~ f(fine features)`` is trained on coarse pixels: the fine features are
computed on the fine grid and then area-averaged over each coarse pixel's true footprint
(:func:`footprint_average`). Because the averaging is linear, a linear model trained on the
averaged features applies unchanged to the fine pixels. ``method="cca"`` is the published
approach (scikit-learn CCA on the fine component maps); ``method="ridge"`` (the default) uses
multi-scale features (:func:`multiscale_features`) and a penalty chosen by spatial-block
cross-validation (the largest penalty within ``alpha_se`` standard errors of the best).
``consistency=True`` then corrects the prediction so
that its footprint averages reproduce the measured coarse values (iterative back-projection of the
coarse residual, bilinear by default), which keeps the coarse information the fine modality does
not explain.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping, Sequence

import numpy as np
import scipy.sparse as sp
from scipy import ndimage

from .errors import InputError
from .schema import default

log = logging.getLogger("msifusion.fuse")

#: Default ridge penalties, per training pixel, for features in units of their fine-grid std.
DEFAULT_ALPHAS = tuple(np.logspace(-8, 2, 21))
#: ``consistency="auto"``: component k keeps the fraction ``1 - max(cv_r_k, 0) ** CONSISTENCY_POWER``
#: of the consistency correction (cv_r 0.95: 0.34; 0.99: 0.08; 0.8: 0.83); measured best among
#: 2, 4 and 8 on the phantoms of ``benchmarks/bench_fusion.py``.
CONSISTENCY_POWER = 8


@dataclass
class FusionResult:
    """Prediction of the coarse target's components on the fine grid.

    Attributes
    ----------
    pred : ndarray, shape (k0, nyf, nxf), float32
        Predicted target maps on the fine grid; finite where the fine modality was acquired,
        NaN elsewhere.
    cv_r : ndarray, shape (k0,)
        Pearson r per target component between held-out (spatial-block cross-validated)
        predictions and the coarse target on the training pixels (NaN for a constant component).
    residual : ndarray, shape (k0, nyc, nxc), float32
        Held-out residual ``target - cross-validated prediction`` on the coarse training pixels
        (a per-pixel uncertainty map); NaN on pixels not used for training.
    info : dict
        Diagnostics: ``method``, ``n_train``, ``n_features``, ``coverage`` (nyc, nxc),
        ``train_mask`` (nyc, nxc), ``folds``, ``block_px``, ``alpha`` (ridge, per component),
        ``n_components`` (cca), ``consistency_iterations``, ``consistency_max_abs``.
    """

    pred: np.ndarray
    cv_r: np.ndarray
    residual: np.ndarray
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# footprint averaging
# --------------------------------------------------------------------------------------------

def _check_matrix(matrix, level: str) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (2, 3) or not np.all(np.isfinite(m)):
        raise InputError(f"{level}: registration matrix must be a finite (2, 3) array, got "
                         f"shape {m.shape}")
    if abs(np.linalg.det(m[:, :2])) < 1e-12:
        raise InputError(f"{level}: registration matrix is singular")
    return m


def _footprint_operator(fine_shape, matrix, coarse_shape, supersample: int,
                        valid: np.ndarray | None = None) -> sp.csr_matrix:
    """Sparse area-overlap operator from fine pixels to coarse pixels.

    Each fine pixel is split into ``supersample x supersample`` sub-pixels whose centres are
    mapped through ``matrix``; a sub-pixel contributes its area (in coarse pixel units) to the
    coarse pixel containing its mapped centre.

    Parameters
    ----------
    fine_shape, coarse_shape : tuple of int
        ``(ny, nx)`` of the fine and coarse grids.
    matrix : ndarray, shape (2, 3)
        Fine pixel coords ``(x, y, 1)`` -> coarse pixel coords ``(x, y)``.
    supersample : int
        Sub-pixels per fine pixel side.
    valid : ndarray of bool, shape fine_shape, optional
        Fine pixels that count (others get no column entries).

    Returns
    -------
    scipy.sparse.csr_matrix, shape (nyc * nxc, nyf * nxf)
        ``P[c, f]`` = area of fine pixel ``f`` inside coarse pixel ``c`` as a fraction of the coarse
        pixel's area. ``P @ ones`` is the coverage of each coarse pixel.
    """
    nyf, nxf = fine_shape
    nyc, nxc = coarse_shape
    s = int(supersample)
    if s < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    m = np.asarray(matrix, dtype=np.float64)
    area = abs(np.linalg.det(m[:, :2])) / s ** 2
    cols = (np.flatnonzero(valid.ravel()) if valid is not None
            else np.arange(nyf * nxf)).astype(np.int64)
    yf, xf = np.divmod(cols, nxf)
    offsets = (np.arange(s) + 0.5) / s - 0.5
    shape = (nyc * nxc, nyf * nxf)
    op = sp.csr_matrix(shape, dtype=np.float64)
    for dy in offsets:
        for dx in offsets:
            x = xf + dx
            y = yf + dy
            cu = np.floor(m[0, 0] * x + m[0, 1] * y + m[0, 2] + 0.5).astype(np.int64)
            cv = np.floor(m[1, 0] * x + m[1, 1] * y + m[1, 2] + 0.5).astype(np.int64)
            ok = (cu >= 0) & (cu < nxc) & (cv >= 0) & (cv < nyc)
            weights = np.full(int(ok.sum()), area)
            op = op + sp.csr_matrix((weights, (cv[ok] * nxc + cu[ok], cols[ok])), shape=shape)
    op.sum_duplicates()
    return op


def footprint_average(fine_stack: np.ndarray, matrix: np.ndarray, coarse_shape,
                      *, supersample: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Area-average fine-grid maps inside each coarse pixel's footprint.

    Parameters
    ----------
    fine_stack : ndarray, shape (k, nyf, nxf) or (nyf, nxf)
        Fine maps; NaN marks pixels that were not acquired (a pixel counts only when all ``k``
        values are finite).
    matrix : ndarray, shape (2, 3)
        Fine ROI pixel coords ``(x, y, 1)`` -> coarse ROI pixel coords ``(x, y)``.
    coarse_shape : tuple of int
        ``(nyc, nxc)``.
    supersample : int, default 4
        Each fine pixel is split into ``supersample x supersample`` sub-pixels mapped through
        ``matrix``; exact for axis-aligned grids whose pixel edges coincide.

    Returns
    -------
    mean : ndarray, shape (k, nyc, nxc) (or (nyc, nxc) for a 2-D input), float64
        Area-weighted mean of the acquired fine pixels inside each coarse pixel; NaN where none.
    coverage : ndarray, shape (nyc, nxc), float64
        Fraction (0-1) of each coarse pixel's area covered by acquired fine pixels.
    """
    stack = np.asarray(fine_stack, dtype=np.float64)
    squeeze = stack.ndim == 2
    if squeeze:
        stack = stack[None]
    if stack.ndim != 3:
        raise InputError(f"footprint_average: fine_stack must be (k, ny, nx), got shape "
                         f"{stack.shape}")
    m = _check_matrix(matrix, "footprint_average")
    coarse_shape = tuple(int(v) for v in coarse_shape)
    valid = np.isfinite(stack).all(0)
    op = _footprint_operator(stack.shape[1:], m, coarse_shape, supersample, valid)
    mean, coverage = _apply_average(op, np.where(valid, stack, 0.0).reshape(len(stack), -1).T)
    mean = mean.T.reshape((len(stack),) + coarse_shape)
    coverage = coverage.reshape(coarse_shape)
    return (mean[0] if squeeze else mean), coverage


def _apply_average(op: sp.csr_matrix, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(op @ values) / coverage``, NaN where coverage is 0.

    Returns ``mean (n_coarse, k)`` and the coverage clipped to 1, ``(n_coarse,)``.
    """
    cov = np.asarray(op.sum(axis=1)).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (op @ values) / cov[:, None]
    mean[cov <= 0] = np.nan
    return mean, np.minimum(cov, 1.0)


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------

def _iter_features(maps: np.ndarray, scales_px: Sequence[float]) -> Iterator[np.ndarray]:
    """Yield the multi-scale feature images one by one (scale-major, then component), float64."""
    valid = np.isfinite(maps).all(0)
    weight = valid.astype(np.float64)
    for scale in scales_px:
        if scale == 0:
            for comp in maps:
                yield np.where(valid, comp, np.nan).astype(np.float64)
            continue
        norm = ndimage.gaussian_filter(weight, float(scale), mode="constant")
        for comp in maps:
            blurred = ndimage.gaussian_filter(np.where(valid, comp, 0.0).astype(np.float64),
                                              float(scale), mode="constant")
            with np.errstate(invalid="ignore", divide="ignore"):
                blurred /= norm
            blurred[~valid] = np.nan
            yield blurred


def _check_scales(scales_px) -> tuple[float, ...]:
    scales = tuple(float(s) for s in scales_px)
    if not scales or any(not np.isfinite(s) or s < 0 for s in scales):
        raise InputError(f"scales_px must be non-negative numbers, got {scales_px!r}")
    return scales


def multiscale_features(maps: np.ndarray,
                        scales_px: Sequence[float] = default("fusion.scales_px")) -> np.ndarray:
    """Component maps plus NaN-aware Gaussian-blurred copies, as neighbourhood context.

    Parameters
    ----------
    maps : ndarray, shape (k, ny, nx)
        Component maps; NaN where not acquired.
    scales_px : sequence of float
        Gaussian sigmas in pixels of ``maps``; 0 means the maps themselves.

    Returns
    -------
    ndarray, shape (k * len(scales_px), ny, nx), float32
        Scale-major order: all ``k`` components at ``scales_px[0]``, then at ``scales_px[1]``, ...
        Blurring is normalised by the blurred acquisition mask (acquired pixels only contribute);
        NaN where not acquired.
    """
    maps = np.asarray(maps)
    if maps.ndim != 3:
        raise InputError(f"maps must be (k, ny, nx), got shape {maps.shape}")
    scales = _check_scales(scales_px)
    out = np.empty((maps.shape[0] * len(scales),) + maps.shape[1:], dtype=np.float32)
    for i, feat in enumerate(_iter_features(maps, scales)):
        out[i] = feat
    return out


# --------------------------------------------------------------------------------------------
# cross-validation helpers
# --------------------------------------------------------------------------------------------

def _spatial_folds(yx: np.ndarray, n_folds: int, seed: int) -> tuple[np.ndarray, int]:
    """Assign training pixels to folds by square spatial blocks.

    Parameters
    ----------
    yx : ndarray, shape (n, 2)
        Coarse pixel coordinates of the training pixels.

    Returns
    -------
    fold : ndarray, shape (n,), int
        Fold index ``0 .. n_folds_used - 1`` per pixel.
    block : int
        Block side in coarse pixels.
    """
    n = len(yx)
    block = max(1, int(np.sqrt(n / (5.0 * n_folds))))
    while True:
        keys = (yx[:, 0] // block) * (int(yx[:, 1].max()) // block + 1) + yx[:, 1] // block
        uniq, inverse = np.unique(keys, return_inverse=True)
        if len(uniq) >= 4 * n_folds or block == 1:
            break
        block = max(1, block // 2)
    rng = np.random.default_rng(seed)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[rng.permutation(len(uniq))] = np.arange(len(uniq))
    n_used = max(2, min(n_folds, len(uniq)))
    return (rank % n_used)[inverse], block


def _pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Column-wise Pearson r of (n, k) arrays; NaN for a constant column."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(0) / den
    return np.where(den > 0, r, np.nan)


def _feature_scale(sd: np.ndarray) -> np.ndarray:
    """Feature standard deviations with (near-)constant features mapped to ``inf`` (coef 0)."""
    sd = np.asarray(sd, dtype=np.float64)
    return np.where(sd > 1e-12 * max(float(sd.max(initial=0.0)), 1e-300), sd, np.inf)


def _ridge_path(x_tr, y_tr, x_te, alphas, sd) -> np.ndarray:
    """Held-out ridge predictions for all penalties.

    Features are centred on the training rows and divided by ``sd`` (their standard deviation on
    the fine grid), so that the penalty acts on the fine-scale size of each term.

    Returns
    -------
    ndarray, shape (n_alpha, n_te, k)
    """
    mu = x_tr.mean(0)
    y_mu = y_tr.mean(0)
    u, s, vt = np.linalg.svd((x_tr - mu) / sd, full_matrices=False)
    uty = u.T @ (y_tr - y_mu)
    xv = ((x_te - mu) / sd) @ vt.T
    n = len(x_tr)
    out = np.empty((len(alphas), len(x_te), y_tr.shape[1]))
    for i, alpha in enumerate(alphas):
        d = s / (s ** 2 + alpha * n)
        out[i] = xv @ (d[:, None] * uty) + y_mu
    return out


def _ridge_fit(x, y, alpha_per_target, sd) -> tuple[np.ndarray, np.ndarray]:
    """Ridge as in :func:`_ridge_path`; returns raw-feature ``coef (p, k)``, ``intercept (k,)``."""
    mu = x.mean(0)
    y_mu = y.mean(0)
    u, s, vt = np.linalg.svd((x - mu) / sd, full_matrices=False)
    uty = u.T @ (y - y_mu)
    n = len(x)
    coef = np.empty((x.shape[1], y.shape[1]))
    for t, alpha in enumerate(alpha_per_target):
        d = s / (s ** 2 + alpha * n)
        coef[:, t] = vt.T @ (d * uty[:, t])
    coef /= sd[:, None]
    return coef, y_mu - mu @ coef


def _select_alpha(paths, y, fold, n_folds, n_se: float = 1.0) -> np.ndarray:
    """Index of the chosen penalty per target from held-out predictions.

    Parameters
    ----------
    paths : ndarray, shape (n_alpha, n, k)
        Held-out predictions for increasing penalties.
    y : ndarray, shape (n, k)
    fold : ndarray, shape (n,)
    n_se : float
        The largest penalty whose MSE is within ``n_se`` standard errors (across folds) of the
        minimum (0: the lowest cross-validated MSE; 1: the "one-standard-error rule").
        Coarse-pixel cross-validation cannot see fine-scale overfitting (terms that nearly vanish
        under footprint averaging get large coefficients when the penalty is tiny), so a more
        regular model than the best one is preferred.

    Returns
    -------
    ndarray, shape (k,), int
    """
    err = (paths - y[None]) ** 2
    per_fold = np.stack([err[:, fold == f].mean(1) for f in range(n_folds)], axis=1)
    mean = per_fold.mean(1)                                        # (n_alpha, k)
    best = mean.argmin(0)
    if n_se <= 0:
        return best
    se = per_fold.std(1, ddof=1) / np.sqrt(n_folds)
    k = np.arange(y.shape[1])
    ok = mean <= (mean[best, k] + n_se * se[best, k])[None]
    return len(paths) - 1 - np.argmax(ok[::-1], axis=0)


def _make_cca(n_components: int):
    from sklearn.cross_decomposition import CCA
    return CCA(n_components=n_components, scale=True, max_iter=1000)


def _fit_predict_cca(x_tr, y_tr, x_te, n_components: int) -> np.ndarray:
    import warnings
    model = _make_cca(n_components)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning on near-degenerate folds
        model.fit(x_tr, y_tr)
        return np.asarray(model.predict(x_te)).reshape(len(x_te), -1)


# --------------------------------------------------------------------------------------------
# fusion
# --------------------------------------------------------------------------------------------

def _box_backprojection(op_rows: sp.csr_matrix) -> sp.csr_matrix:
    """Box back-projection: each fine pixel gets the overlap-weighted mean of coarse residuals.

    ``op_rows`` is the footprint operator restricted to the constrained coarse pixels,
    shape (n_cons, n_fine); returns shape (n_fine, n_cons).
    """
    bt = op_rows.T.tocsr()
    rs = np.asarray(bt.sum(axis=1)).ravel()
    inv = np.divide(1.0, rs, out=np.zeros_like(rs), where=rs > 0)
    return (sp.diags(inv) @ bt).tocsr()


def _bilinear_backprojection(fine_idx, fine_shape, matrix, coarse_shape, rows) -> sp.csr_matrix:
    """Bilinear back-projection: coarse residuals interpolated at the fine pixel centres.

    Interpolation weights on the four surrounding coarse pixels are renormalised over those in
    ``rows`` (the constrained coarse pixels); fine pixels with none of them get no correction.

    Returns
    -------
    csr_matrix, shape (len(fine_idx), len(rows))
    """
    nyc, nxc = coarse_shape
    col_of = np.full(nyc * nxc, -1, dtype=np.int64)
    col_of[rows] = np.arange(len(rows))
    yf, xf = np.divmod(fine_idx.astype(np.int64), fine_shape[1])
    u = matrix[0, 0] * xf + matrix[0, 1] * yf + matrix[0, 2]
    v = matrix[1, 0] * xf + matrix[1, 1] * yf + matrix[1, 2]
    u0, v0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = u - u0, v - v0
    r_all, c_all, w_all = [], [], []
    for du, dv, w in ((0, 0, (1 - fu) * (1 - fv)), (1, 0, fu * (1 - fv)),
                      (0, 1, (1 - fu) * fv), (1, 1, fu * fv)):
        cu, cv = u0 + du, v0 + dv
        ok = (cu >= 0) & (cu < nxc) & (cv >= 0) & (cv < nyc)
        col = np.full(len(u), -1, dtype=np.int64)
        col[ok] = col_of[cv[ok] * nxc + cu[ok]]
        ok = col >= 0
        ok &= w > 0
        r_all.append(np.flatnonzero(ok)); c_all.append(col[ok]); w_all.append(w[ok])
    b = sp.csr_matrix((np.concatenate(w_all), (np.concatenate(r_all), np.concatenate(c_all))),
                      shape=(len(fine_idx), len(rows)))
    rs = np.asarray(b.sum(axis=1)).ravel()
    inv = np.divide(1.0, rs, out=np.zeros_like(rs), where=rs > 0)
    return (sp.diags(inv) @ b).tocsr()


def _consistency_operators(op: sp.csr_matrix, cov: np.ndarray, rows: np.ndarray, fine_idx: np.ndarray,
                           fine_shape, matrix: np.ndarray, coarse_shape,
                           backprojection: str = "bilinear") -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """The averaging ``a`` and back-projection ``b`` of :func:`_enforce_consistency`.

    Parameters
    ----------
    op : csr_matrix, shape (n_coarse, len(fine_idx))
        Footprint operator (:func:`_footprint_operator` restricted to the valid fine pixels).
    cov : ndarray, shape (n_coarse,)
        Its row sums (unclipped coverage).
    rows : ndarray of int
        The constrained coarse pixels (flat indices).
    fine_idx : ndarray of int
        Flat indices of the valid fine pixels.
    backprojection : {"bilinear", "box"}
        See :func:`fuse_pair`.

    Returns
    -------
    a : csr_matrix, shape (len(rows), len(fine_idx))
        Footprint average onto the constrained pixels (rows sum to 1).
    b : csr_matrix, shape (len(fine_idx), len(rows))
    """
    a = (sp.diags(1.0 / cov[rows]) @ op[rows]).tocsr()
    b = (_box_backprojection(op[rows]) if backprojection == "box" else
         _bilinear_backprojection(fine_idx, fine_shape, matrix, coarse_shape, rows))
    return a, b


def _enforce_consistency(pred_flat, a, b, target_rows, *, max_iter=200, rtol=1e-4):
    """Iterative back-projection so that the footprint averages of ``pred_flat`` match the target.

    Parameters
    ----------
    pred_flat : ndarray, shape (n_fine_valid, k)
        Prediction on the valid fine pixels (a corrected copy is returned).
    a : sparse matrix, shape (n_cons, n_fine_valid)
        Footprint averaging onto the constrained coarse pixels (rows sum to 1).
    b : sparse matrix, shape (n_fine_valid, n_cons)
        Back-projection of coarse residuals onto fine pixels.
    target_rows : ndarray, shape (n_cons, k)
        Measured coarse values on the constrained pixels.

    Returns
    -------
    pred : ndarray, shape (n_fine_valid, k)
    n_iter : int
    max_abs_residual : float
    """
    pred = pred_flat.copy()
    scale = float(np.abs(target_rows - target_rows.mean(0)).max(initial=0.0)) or 1.0
    r = target_rows - a @ pred
    best_norm, best = np.linalg.norm(r), (pred.copy(), 0, r)
    it = 0
    while it < max_iter and np.abs(r).max(initial=0.0) > rtol * scale:
        pred += b @ r
        r = target_rows - a @ pred
        it += 1
        norm = np.linalg.norm(r)
        if norm < best_norm:
            best_norm, best = norm, (pred.copy(), it, r)
        elif norm > 2 * best_norm:           # diverging: keep the best iterate
            log.warning("consistency iteration diverged at step %d; keeping step %d", it, best[1])
            break
    pred, it, r = best
    if np.abs(r).max(initial=0.0) > rtol * scale:
        log.warning("consistency not reached after %d iterations (max |residual| %.3g)",
                    it, np.abs(r).max(initial=0.0))
    return pred, it, float(np.abs(r).max(initial=0.0))


@dataclass
class _Pairs:
    """Training pairs of one fusion step (internal)."""

    op: sp.csr_matrix          # (n_coarse, n_fine_valid) footprint operator
    cov: np.ndarray            # (n_coarse,) unclipped coverage
    fine_idx: np.ndarray       # (n_fine_valid,) flat indices of acquired fine pixels
    rows: np.ndarray           # (n_train,) flat indices of the training coarse pixels
    x: np.ndarray              # (n_train, p) footprint-averaged fine features
    y: np.ndarray              # (n_train, k0) coarse target
    feat_sd: np.ndarray        # (p,) standard deviation of each feature on the fine grid


def _training_pairs(target, mask, fine, matrix, scales, *, min_coverage, supersample,
                    level) -> _Pairs:
    """Footprint-average the fine features into the coarse pixels and select the training rows."""
    k0 = target.shape[0]
    coarse_shape = target.shape[1:]
    fine_valid = np.isfinite(fine).all(0)
    fine_idx = np.flatnonzero(fine_valid)
    op = _footprint_operator(fine.shape[1:], matrix, coarse_shape, supersample, fine_valid)
    op = op[:, fine_idx].tocsr()
    cov = np.asarray(op.sum(axis=1)).ravel()
    # one fine feature image in memory at a time
    n_feat = fine.shape[0] * len(scales)
    x = np.empty((op.shape[0], n_feat))
    feat_sd = np.zeros(n_feat)
    for j, feat in enumerate(_iter_features(fine, scales)):
        values = feat.ravel()[fine_idx]
        x[:, j] = op @ values
        if len(values):
            feat_sd[j] = values.std()
    with np.errstate(invalid="ignore", divide="ignore"):
        x /= cov[:, None]
    train = (mask & (np.minimum(cov, 1.0).reshape(coarse_shape) >= min_coverage)
             & np.isfinite(target).all(0)).ravel() & np.isfinite(x).all(1)
    rows = np.flatnonzero(train)
    return _Pairs(op=op, cov=cov, fine_idx=fine_idx, rows=rows, x=x[rows],
                  y=target.reshape(k0, -1).T[rows], feat_sd=feat_sd)


def _rows_needed(n_features: int) -> int:
    """Training coarse pixels needed for ``n_features`` features (two per feature)."""
    return max(2 * (n_features + 1), 10)


def _scales_that_fit(pairs: _Pairs, k: int, scales: tuple, *, min_coverage: float,
                     level: str, n_tissue: int = -1) -> tuple[_Pairs, tuple]:
    """Keep the features the training pixels can support: all ``scales`` when there are enough
    coarse pixels (:func:`_rows_needed`), else the finest ones (a small section with many
    components), with a warning; with too few pixels for even one scale, an error.

    The features are scale-major (``k`` components per scale), so dropping the coarsest scales
    is a column slice.
    """
    n = len(pairs.rows)
    fit = max((s for s in range(1, len(scales) + 1) if _rows_needed(k * s) <= n), default=0)
    if fit == 0:
        covered = int((pairs.cov >= min_coverage).sum())
        raise InputError(f"{level}: only {n} coarse pixels are both tissue in the coarser "
                         f"level's tissue mask ({n_tissue} pixels) and covered >= "
                         f"{min_coverage:.0%} by acquired fine pixels ({covered} pixels); "
                         f"{_rows_needed(k)} needed for {k} features. When the mask is the "
                         "cause (few tissue pixels: a field that is all tissue), set "
                         "modalities.<name>.all_tissue; when the coverage is, check the "
                         "registration and the overlap of the fields of view; or lower the "
                         "finer modality's nmf.rank")
    if fit < len(scales):
        log.warning("%s: %d training coarse pixels support %d of the %d feature scales "
                     "(%d components each; %d pixels needed for all): scales %s px used",
                     level, n, fit, len(scales), k, _rows_needed(k * len(scales)),
                     list(scales[:fit]))
        pairs = replace(pairs, x=pairs.x[:, :k * fit], feat_sd=pairs.feat_sd[:k * fit])
    return pairs, tuple(scales[:fit])


def _ridge_cv(pairs: _Pairs, fold, n_folds, alphas, alpha_se, fine, scales, level):
    """Cross-validated ridge; returns (held-out predictions (n_train, k0), fine prediction
    (n_fine_valid, k0), chosen alphas (k0,))."""
    x, y = pairs.x, pairs.y
    k0 = y.shape[1]
    sd = _feature_scale(pairs.feat_sd)
    paths = np.empty((len(alphas),) + y.shape)
    for f in range(n_folds):
        te = fold == f
        paths[:, te] = _ridge_path(x[~te], y[~te], x[te], alphas, sd)
    best = _select_alpha(paths, y, fold, n_folds, n_se=alpha_se)
    oof = paths[best, :, np.arange(k0)].T
    edge = (best == 0) | (best == len(alphas) - 1)
    if np.any(edge):
        log.warning("%s: ridge penalty at the edge of the grid for components %s",
                    level, np.flatnonzero(edge).tolist())
    coef, intercept = _ridge_fit(x, y, alphas[best], sd)
    pred_t = np.repeat(intercept[:, None], len(pairs.fine_idx), axis=1)   # (k0, n_valid)
    for j, feat in enumerate(_iter_features(fine, scales)):
        values = feat.ravel()[pairs.fine_idx]
        for t in range(k0):
            pred_t[t] += coef[j, t] * values
    return oof, pred_t.T, alphas[best]


def _cca_cv(pairs: _Pairs, fold, n_folds, n_components, fine):
    """Cross-validated CCA (the published method); returns (held-out predictions (n_train, k0),
    fine prediction (n_fine_valid, k0))."""
    oof = np.empty_like(pairs.y)
    for f in range(n_folds):
        te = fold == f
        oof[te] = _fit_predict_cca(pairs.x[~te], pairs.y[~te], pairs.x[te], n_components)
    x_fine = fine.reshape(fine.shape[0], -1)[:, pairs.fine_idx].T.astype(np.float64)
    return oof, _fit_predict_cca(pairs.x, pairs.y, x_fine, n_components)


def fuse_pair(coarse_target: np.ndarray, coarse_mask: np.ndarray | None, fine_maps: np.ndarray,
              matrix: np.ndarray, *, method: str = default("fusion.method"),
              n_components: int | None = None,
              scales_px: Sequence[float] = default("fusion.scales_px"),
              alphas: Sequence[float] = DEFAULT_ALPHAS, alpha_se: float = default("fusion.alpha_se"),
              consistency: bool | str = default("fusion.consistency"),
              backprojection: str = "bilinear", min_coverage: float = default("fusion.min_coverage"),
              supersample: int = 4,
              n_folds: int = 5, seed: int = 0, level: str = "fine level") -> FusionResult:
    """Predict the coarse target's component maps on the fine grid.

    Training pairs: the fine features are computed on the fine grid, then area-averaged over
    each coarse pixel's footprint (:func:`footprint_average`); rows are the coarse pixels inside
    ``coarse_mask`` with coverage >= ``min_coverage`` and a finite target. The fitted linear
    model is applied to the fine-grid features (averaging is linear, so the two commute).

    Parameters
    ----------
    coarse_target : ndarray, shape (k0, nyc, nxc)
        Maps to predict (reference components, or the previous level's prediction); NaN where
        unknown.
    coarse_mask : ndarray of bool, shape (nyc, nxc), or None
        Coarse pixels allowed for training (e.g. the tissue mask); None = all finite pixels.
    fine_maps : ndarray, shape (k1, nyf, nxf)
        The finer modality's component maps; NaN where not acquired.
    matrix : ndarray, shape (2, 3)
        Fine ROI pixel coords ``(x, y, 1)`` -> coarse ROI pixel coords ``(x, y)``.
    method : {"ridge", "cca"}
        ``"ridge"``: ridge regression on the multi-scale features of ``fine_maps``, each feature
        divided by its standard deviation on the fine grid (so the penalty limits fine-scale
        amplitude), one penalty per target component chosen by spatial-block cross-validation.
        ``"cca"``: the published method, scikit-learn ``CCA(n_components)`` fitted with
        X = footprint-averaged ``fine_maps`` (no multi-scale features), Y = target, then
        ``predict`` on the fine pixels.
    n_components : int, optional
        CCA components (default ``min(k0, k1)``); ignored by ridge.
    scales_px : sequence of float
        Gaussian sigmas (fine pixels) of the ridge features, see :func:`multiscale_features`.
    alphas : sequence of float
        Ridge penalties per training pixel (loss ``mean squared error + alpha * |coef|^2`` with
        coefficients in units of the fine-grid feature standard deviation).
    alpha_se : float
        Penalty selection, see :func:`_select_alpha`: the largest penalty whose cross-validated
        MSE is within ``alpha_se`` standard errors of the best one (0: the best one). Coarse-pixel
        validation cannot see fine-scale overfitting; 0.25 measured best on phantoms and the real
        cube (``benchmarks/bench_fusion.py``).
    consistency : bool or "auto"
        Correct the prediction by iterative back-projection of the coarse residual so that its
        footprint averages reproduce the target on the training pixels (to ``1e-4`` of the
        target's range, at most 200 iterations). ``"auto"``: apply to each target component
        the fraction ``1 - max(cv_r, 0) ** CONSISTENCY_POWER`` of that correction, so that what
        the fine modality explains (high cross-validated r) keeps its fine-scale prediction and
        what it does not explain is brought back to the measured coarse values.
    backprojection : {"bilinear", "box"}
        How a coarse residual is spread onto fine pixels: bilinear interpolation at the fine pixel
        centres (smooth, default) or the overlap-weighted footprint (blocky).
    min_coverage : float
        Coarse pixels need at least this fraction of their area covered by acquired fine pixels to
        be used for training (partially covered pixels mix in tissue the fine modality never saw).
    supersample : int
        Sub-pixels per fine pixel side for the footprints.
    n_folds : int
        Cross-validation folds; folds are made of square blocks of coarse pixels.
    seed : int
        Seed of the assignment of blocks to folds.
    level : str
        Name of the fine level used in error messages and logs.

    Returns
    -------
    FusionResult
        ``pred`` (k0, nyf, nxf) float32, ``cv_r`` (k0,), ``residual`` (k0, nyc, nxc), ``info``.

    Raises
    ------
    InputError
        Bad shapes or parameters, or fewer usable training pixels than
        ``max(2 * (n_features + 1), 10)`` (e.g. no overlap between the two fields of view).
    """
    target = np.asarray(coarse_target, dtype=np.float64)
    fine = np.asarray(fine_maps)
    if target.ndim != 3:
        raise InputError(f"{level}: coarse target must be (k0, ny, nx), got shape {target.shape}")
    if fine.ndim != 3:
        raise InputError(f"{level}: fine maps must be (k1, ny, nx), got shape {fine.shape}")
    coarse_shape = target.shape[1:]
    mask = (np.ones(coarse_shape, dtype=bool) if coarse_mask is None
            else np.asarray(coarse_mask, dtype=bool))
    if mask.shape != coarse_shape:
        raise InputError(f"{level}: coarse mask shape {mask.shape} != target shape {coarse_shape}")
    if method not in ("ridge", "cca"):
        raise InputError(f"{level}: unknown fusion method {method!r} (use 'ridge' or 'cca')")
    if backprojection not in ("box", "bilinear"):
        raise InputError(f"{level}: unknown back-projection {backprojection!r} "
                         "(use 'bilinear' or 'box')")
    if consistency not in (True, False, "auto"):
        raise InputError(f"{level}: consistency must be true, false or 'auto', got {consistency!r}")
    if not (np.isfinite(alpha_se) and alpha_se >= 0):
        raise InputError(f"{level}: alpha_se must be a number >= 0, got {alpha_se!r}")
    m = _check_matrix(matrix, level)
    scales = _check_scales(scales_px) if method == "ridge" else (0.0,)
    alphas = np.sort(np.asarray(alphas, dtype=np.float64).ravel())
    if method == "ridge" and (alphas.size == 0 or np.any(alphas <= 0)):
        raise InputError(f"{level}: alphas must be positive, got {alphas}")
    k0, k1 = target.shape[0], fine.shape[0]
    if method == "cca":
        nc = int(n_components) if n_components is not None else min(k0, k1)
        if not 1 <= nc <= min(k0, k1):
            raise InputError(f"{level}: n_components={nc} must be in 1..min(k0, k1)={min(k0, k1)}")

    pairs = _training_pairs(target, mask, fine, m, scales, min_coverage=min_coverage,
                            supersample=supersample, level=level)
    n_tissue = int(mask.sum()) if mask is not None else int(np.isfinite(target).all(0).sum())
    pairs, scales = _scales_that_fit(pairs, k1, scales, min_coverage=min_coverage, level=level,
                                     n_tissue=n_tissue)
    rows = pairs.rows
    fold, block = _spatial_folds(np.column_stack(np.divmod(rows, coarse_shape[1])), n_folds, seed)
    n_used = int(fold.max()) + 1
    log.info("%s: %s on %d coarse pixels, %d features, %d folds of %d-px blocks",
             level, method, len(rows), pairs.x.shape[1], n_used, block)
    train_mask = np.zeros(coarse_shape, dtype=bool)
    train_mask.flat[rows] = True
    info = {"method": method, "n_train": len(rows), "n_features": pairs.x.shape[1],
            "scales_px": scales, "coverage": np.minimum(pairs.cov, 1.0).reshape(coarse_shape),
            "train_mask": train_mask, "folds": n_used, "block_px": block,
            "consistency_iterations": 0, "consistency_max_abs": float("nan")}
    if method == "ridge":
        oof, pred_flat, info["alpha"] = _ridge_cv(pairs, fold, n_used, alphas, alpha_se, fine,
                                                  scales, level)
    else:
        info["n_components"] = nc
        oof, pred_flat = _cca_cv(pairs, fold, n_used, nc, fine)
    cv_r = _pearson(oof, pairs.y)
    log.info("%s: cross-validated r per component %s", level, np.round(cv_r, 3).tolist())

    if consistency:
        a, b = _consistency_operators(pairs.op, pairs.cov, rows, pairs.fine_idx, fine.shape[1:], m,
                                      coarse_shape, backprojection)
        plain = pred_flat
        pred_flat, n_it, max_abs = _enforce_consistency(pred_flat, a, b, pairs.y)
        if consistency == "auto":
            share = 1.0 - np.clip(np.nan_to_num(cv_r, nan=0.0), 0.0, 1.0) ** CONSISTENCY_POWER
            pred_flat = plain + (pred_flat - plain) * share[None, :]
            info["consistency_share"] = share
        info["consistency_iterations"] = n_it
        info["consistency_max_abs"] = max_abs
        log.info("%s: consistency after %d iterations, max |residual| %.3g", level, n_it, max_abs)

    pred = np.full((k0, fine.shape[1] * fine.shape[2]), np.nan, dtype=np.float32)
    pred[:, pairs.fine_idx] = pred_flat.T
    residual = np.full((k0, coarse_shape[0] * coarse_shape[1]), np.nan, dtype=np.float32)
    residual[:, rows] = (pairs.y - oof).T
    return FusionResult(pred=pred.reshape((k0,) + fine.shape[1:]), cv_r=cv_r,
                        residual=residual.reshape((k0,) + coarse_shape), info=info)


def fuse_chain(levels: Sequence, matrices: Sequence[np.ndarray], *,
               masks: Sequence[np.ndarray | None] | None = None,
               names: Sequence[str] | None = None, **kw) -> list[FusionResult]:
    """Chained fusion: each level's prediction is the target of the next finer level.

    Parameters
    ----------
    levels : sequence of ndarray or of dict
        ``levels[0]`` = reference component maps ``(k0, ny0, nx0)``; ``levels[i]`` = component maps
        of the ``i``-th finer modality ``(ki, nyi, nxi)``, NaN where not acquired. A level may
        instead be a dict with ``"maps"`` and optionally ``"mask"`` (bool (ny, nx) training mask
        on that grid) and ``"name"``.
    matrices : sequence of ndarray, shape (2, 3) each, ``len(levels) - 1`` of them
        ``matrices[i - 1]`` maps level-``i`` pixel coords to level-``i-1`` pixel coords.
    masks : sequence of (bool array or None), optional
        Training mask on each level's grid (only ``masks[:-1]`` are used; overrides the dicts'
        ``"mask"``); None = all pixels with a finite target.
    names : sequence of str, optional
        Level names for messages (default: the dicts' ``"name"`` or ``"level i"``).
    **kw
        Passed to :func:`fuse_pair`.

    Returns
    -------
    list of FusionResult
        ``len(levels) - 1`` results; ``results[i - 1].pred`` is the reference components predicted
        on level ``i``'s grid.
    """
    if len(levels) < 2:
        raise InputError("fuse_chain needs the reference level and at least one finer level")
    if len(matrices) != len(levels) - 1:
        raise InputError(f"fuse_chain: {len(levels)} levels need {len(levels) - 1} matrices, "
                         f"got {len(matrices)}")
    dicts = [lv if isinstance(lv, Mapping) else {"maps": lv} for lv in levels]
    if any("maps" not in d for d in dicts):
        raise InputError("fuse_chain: a level given as a dict needs a 'maps' entry")
    names = (list(names) if names is not None
             else [str(d.get("name", f"level {i}")) for i, d in enumerate(dicts)])
    masks = list(masks) if masks is not None else [d.get("mask") for d in dicts]
    if len(names) != len(levels) or len(masks) != len(levels):
        raise InputError(f"fuse_chain: {len(levels)} levels but {len(names)} names and "
                         f"{len(masks)} masks")
    target = np.asarray(dicts[0]["maps"])
    results = []
    for i in range(1, len(levels)):
        log.info("chain step %d/%d: %s -> %s", i, len(levels) - 1, names[i - 1], names[i])
        res = fuse_pair(target, masks[i - 1], dicts[i]["maps"], matrices[i - 1], level=names[i],
                        **kw)
        results.append(res)
        target = res.pred
    return results
