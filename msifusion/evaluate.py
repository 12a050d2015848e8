"""Accuracy against ground truth: fused ion images vs bicubic upsampling of the coarse ion image.

Used on phantom studies (``msifusion phantom`` writes ``truth/{section}.h5``). For each section, each
finer level of the chain and each target m/z, the Pearson correlation with the noise-free truth on
the tissue is computed for (a) the fused ion image and (b) the measured reference ion image
(raw spectra summed over the +-ppm window) upsampled bicubically with the TRUE transform.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from .errors import InputError
from .schema import default
from .spectra import measured_ion_images
from .store import ConvertedReader, atomic_output

log = logging.getLogger("msifusion.evaluate")

COLUMNS = ("section", "level", "pixel_size_um", "target_mz", "r_fused", "r_bicubic", "n_pixels")


def raw_ion_image(reader: ConvertedReader, target_mz: float, ppm: float,
                  block_pixels: int = 65536) -> np.ndarray:
    """Measured ion image: intensities within ``target_mz +- ppm`` summed per pixel
    (:func:`msifusion.spectra.measured_ion_images` of one target).

    Returns
    -------
    ndarray, shape (ny, nx)
        On the acquisition grid; NaN where no spectrum was acquired.
    """
    return measured_ion_images(reader, [target_mz], ppm, block_pixels)[0]


def pearson(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two images over ``mask`` (pixels finite in both)."""
    m = mask & np.isfinite(a) & np.isfinite(b)
    if m.sum() < 3:
        return float("nan")
    x, y = a[m] - a[m].mean(), b[m] - b[m].mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def bicubic_to_grid(coarse: np.ndarray, matrix: np.ndarray, fine_shape: tuple[int, int]) -> np.ndarray:
    """Sample a coarse image at the fine pixel centres mapped by ``matrix`` (fine -> coarse px), cubic.

    Unknown coarse pixels (NaN: not acquired, outside the section) take the value of the nearest
    known one before the spline, so the interpolation does not ring at the edges of the known
    region (a spline through a jump to 0 overshoots by about 10 % of the jump); fine pixels whose
    nearest coarse pixel is unknown or outside the coarse grid are NaN.

    Parameters
    ----------
    coarse : ndarray, shape (nyc, nxc)
        Coarse image; NaN where unknown.
    matrix : ndarray, shape (2, 3)
        Fine pixel (x, y, 1) -> coarse pixel (x, y).
    fine_shape : tuple
        ``(nyf, nxf)``.

    Returns
    -------
    ndarray, shape (nyf, nxf), float64
    """
    ny, nx = fine_shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    m = np.asarray(matrix, dtype=np.float64)
    xc = m[0, 0] * xx + m[0, 1] * yy + m[0, 2]
    yc = m[1, 0] * xx + m[1, 1] * yy + m[1, 2]
    img = np.asarray(coarse, dtype=np.float64)
    known = np.isfinite(img)
    if not known.any():
        return np.full(fine_shape, np.nan)
    if not known.all():
        nearest = ndimage.distance_transform_edt(~known, return_distances=False, return_indices=True)
        img = img[tuple(nearest)]
    out = ndimage.map_coordinates(img, [yc, xc], order=3, mode="nearest")
    iy, ix = np.rint(yc).astype(np.int64), np.rint(xc).astype(np.int64)
    inside = (ix >= 0) & (ix < img.shape[1]) & (iy >= 0) & (iy < img.shape[0])
    inside[inside] = known[iy[inside], ix[inside]]
    return np.where(inside, out, np.nan)


def _ion(fused: dict, target: float, ppm: float) -> np.ndarray:
    """The product's ion image as it ships (interpolated for a target flagged not predictable)."""
    from .products import product_ion_image

    return product_ion_image(fused, target, ppm)[0]


def evaluate_section(truth: str, fused: dict[str, str], reference: str, roi, *, targets=None,
                     ppm: float = default("targets.ppm")) -> list[dict]:
    """Rows of :data:`COLUMNS` for one section.

    Parameters
    ----------
    truth : str
        Ground-truth file of the section (written by :mod:`msifusion.phantom`).
    fused : dict
        ``{modality: fused product path}`` for the finer levels.
    reference : str
        Converted reference file holding the section.
    roi : sequence of int
        ``[x0, x1, y0, y1]`` of the section in the reference acquisition (empty: whole image).
    targets : list of float, optional
        Target m/z; defaults to the truth file's targets.
    """
    from .products import read_fused

    reader = ConvertedReader(reference)
    rows = []
    with h5py.File(truth, "r") as t:
        section = t.attrs["section"]
        section = section.decode() if isinstance(section, bytes) else str(section)
        truth_targets = np.asarray(t.attrs["targets_mz"], dtype=np.float64)
        for target in (truth_targets if targets is None or not len(targets) else targets):
            ti = int(np.argmin(np.abs(truth_targets - target)))
            if abs(truth_targets[ti] - target) > target * ppm * 1e-6:
                log.warning("%s: target m/z %.4f has no ground truth; skipped", truth, target)
                continue
            raw = raw_ion_image(reader, float(target), ppm)
            if roi is not None and len(roi):
                x0, x1, y0, y1 = roi
                raw = raw[y0:y1, x0:x1]
            for modality, path in fused.items():
                g = t[modality]
                true_img = g["ion_images"][ti]
                mask = g["mask"][()]
                pred = _ion(read_fused(path), float(target), ppm)
                if pred.shape != true_img.shape:
                    raise ValueError(f"{path}: fused grid {pred.shape} differs from the truth grid "
                                     f"{true_img.shape} in {truth}")
                bic = bicubic_to_grid(raw, g["matrix_to_reference"][()], true_img.shape)
                valid = mask & np.isfinite(pred) & np.isfinite(bic)
                rows.append(dict(section=section, level=modality,
                                 pixel_size_um=float(g.attrs["pixel_size_um"]),
                                 target_mz=float(target), r_fused=pearson(pred, true_img, valid),
                                 r_bicubic=pearson(bic, true_img, valid), n_pixels=int(valid.sum())))
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table of evaluation rows with a mean line per level."""
    lines = [f"{'section':<10}{'level':<12}{'px um':>7}{'target m/z':>12}{'r fused':>9}"
             f"{'r bicubic':>11}{'pixels':>9}"]
    for r in rows:
        lines.append(f"{r['section']:<10}{r['level']:<12}{r['pixel_size_um']:>7g}"
                     f"{r['target_mz']:>12.4f}{r['r_fused']:>9.3f}{r['r_bicubic']:>11.3f}"
                     f"{r['n_pixels']:>9d}")
    for level in dict.fromkeys(r["level"] for r in rows):
        sel = [r for r in rows if r["level"] == level]
        lines.append(f"{'mean':<10}{level:<12}{'':>7}{'':>12}"
                     f"{np.nanmean([r['r_fused'] for r in sel]):>9.3f}"
                     f"{np.nanmean([r['r_bicubic'] for r in sel]):>11.3f}{'':>9}")
    return "\n".join(lines)


def section_roi(section_maps: str) -> list[int]:
    """``[x0, x1, y0, y1]`` of a section maps file (``results/{section}/maps_{modality}.h5``) in its
    acquisition: the ROI as cropped, also when the sheet said ``auto``."""
    with h5py.File(section_maps, "r") as f:
        x0, y0 = (int(v) for v in f.attrs["origin_xy"])
        ny, nx = f["mask"].shape
    return [x0, x0 + nx, y0, y0 + ny]


def evaluate_study(truth: list[str], fused: list[str], reference: list[str], out: str, *,
                   sections: list[str], chain: list[str], rois: list | None = None,
                   section_maps: list[str] | None = None, targets=None,
                   ppm: float = default("targets.ppm")) -> list[dict]:
    """Evaluate every section and write a TSV table (``out``); the table is also logged.

    ``fused`` lists the products section by section in chain order (``chain[1:]`` per section).
    The sections' ROIs in the reference acquisition are ``rois`` or, when None, read from the
    reference's ``section_maps`` files (:func:`section_roi`).
    """
    finer = list(chain[1:])
    if rois is None:
        if section_maps is None or len(section_maps) != len(sections):
            raise InputError("evaluate_study: give rois or one reference section maps file per "
                             "section")
        rois = [section_roi(p) for p in section_maps]
    rows = []
    for i, section in enumerate(sections):
        paths = dict(zip(finer, fused[i * len(finer):(i + 1) * len(finer)]))
        rows += evaluate_section(truth[i], paths, reference[i], rois[i], targets=targets, ppm=ppm)
    with atomic_output(out) as tmp:
        with open(tmp, "w") as fh:
            fh.write("\t".join(COLUMNS) + "\n")
            for r in rows:
                fh.write("\t".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c])
                                   for c in COLUMNS) + "\n")
    log.info("accuracy against ground truth (Pearson r on tissue; bicubic uses the true "
             "transform):\n%s", format_table(rows))
    return rows


def read_table(path: str | Path) -> list[dict]:
    """Read a table written by :func:`evaluate_study`."""
    if not Path(path).exists():
        raise InputError(f"{path}: no evaluation table (it is written by a workflow run on a study "
                         "with 'evaluation.truth' set)")
    lines = Path(path).read_text().splitlines()
    head = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        r = dict(zip(head, line.split("\t")))
        for c in ("pixel_size_um", "target_mz", "r_fused", "r_bicubic"):
            r[c] = float(r[c])
        r["n_pixels"] = int(r["n_pixels"])
        rows.append(r)
    return rows


# --------------------------------------------------------------------------------------------
# independent check of a cross-modal placement
# --------------------------------------------------------------------------------------------

#: Parameters of a similarity perturbation, in the order of ``best_offset``.
_OFFSET_NAMES = ("dx", "dy", "rotation_deg", "scale")


def _placement_inputs(coarse_images, coarse_valid, fine_features, fine_valid, where: str):
    """Validated float64 copies: ``(T, nyc, nxc)``, ``(nyc, nxc)`` bool, ``(k, nyf, nxf)`` with NaN
    outside ``fine_valid``, ``(nyf, nxf)`` bool."""
    coarse = np.asarray(coarse_images, dtype=np.float64)
    if coarse.ndim == 2:
        coarse = coarse[None]
    fine = np.asarray(fine_features, dtype=np.float64)
    if fine.ndim == 2:
        fine = fine[None]
    if coarse.ndim != 3 or not len(coarse):
        raise InputError(f"{where}: coarse_images must be (T, ny, nx) with T >= 1, got shape "
                         f"{coarse.shape}")
    if fine.ndim != 3 or not len(fine):
        raise InputError(f"{where}: fine_features must be (k, ny, nx) with k >= 1, got shape "
                         f"{fine.shape}")
    cvalid = np.asarray(coarse_valid)
    fvalid = np.asarray(fine_valid)
    if cvalid.shape != coarse.shape[1:]:
        raise InputError(f"{where}: coarse_valid has shape {cvalid.shape}, the coarse images "
                         f"{coarse.shape[1:]}")
    if fvalid.shape != fine.shape[1:]:
        raise InputError(f"{where}: fine_valid has shape {fvalid.shape}, the fine features "
                         f"{fine.shape[1:]}")
    cvalid = cvalid.astype(bool) & np.isfinite(coarse).all(0)
    fvalid = fvalid.astype(bool) & np.isfinite(fine).all(0)
    if not cvalid.any():
        raise InputError(f"{where}: no coarse pixel is valid (coarse_valid and finite in every "
                         "image)")
    if not fvalid.any():
        raise InputError(f"{where}: no fine pixel is valid (fine_valid and finite in every "
                         "feature)")
    fine = np.where(fvalid, fine, np.nan)
    return coarse, cvalid, fine, fvalid


class _PlacementScorer:
    """The state of :func:`placement_score` that does not depend on the matrix.

    Targets are transformed once (``log1p`` of the intensity over its median on the valid coarse
    pixels, when ``log_targets``), and the spatial folds are a fixed function of the coarse grid
    (block ``(y // block_px, x // block_px)`` -> fold, a seeded permutation), so that scores of
    different placements differ by the placement only.
    """

    def __init__(self, coarse_images, coarse_valid, fine_features, fine_valid, *, folds, block_px,
                 ridge, min_coverage, quadratic, smooth_px, log_targets, supersample, seed,
                 where="placement_score"):
        coarse, cvalid, fine, fvalid = _placement_inputs(coarse_images, coarse_valid,
                                                         fine_features, fine_valid, where)
        if int(folds) < 2:
            raise InputError(f"{where}: folds must be >= 2, got {folds}")
        if int(block_px) < 1:
            raise InputError(f"{where}: block_px must be >= 1, got {block_px}")
        if not (0.0 < float(min_coverage) <= 1.0):
            raise InputError(f"{where}: min_coverage must be in (0, 1], got {min_coverage}")
        if not (float(ridge) >= 0.0):
            raise InputError(f"{where}: ridge must be >= 0, got {ridge}")
        if not (float(smooth_px) >= 0.0):
            raise InputError(f"{where}: smooth_px must be >= 0, got {smooth_px}")
        self.shape = coarse.shape[1:]
        self.valid = cvalid
        self.fine = fine
        self.fine_valid = fvalid
        self.folds = int(folds)
        self.ridge = float(ridge)
        self.min_coverage = float(min_coverage)
        self.quadratic = bool(quadratic)
        self.smooth_px = float(smooth_px)
        self.supersample = int(supersample)
        if log_targets:
            t = np.maximum(coarse, 0.0)
            scale = np.array([np.median(img[cvalid][img[cvalid] > 0]) if (img[cvalid] > 0).any()
                              else 1.0 for img in t])
            coarse = np.log1p(t / scale[:, None, None])
        self.targets = coarse.reshape(len(coarse), -1)             # (T, nyc * nxc)
        nyc, nxc = self.shape
        b = int(block_px)
        nby, nbx = -(-nyc // b), -(-nxc // b)
        rank = np.random.default_rng(seed).permutation(nby * nbx)
        yy, xx = np.mgrid[0:nyc, 0:nxc]
        self.fold = ((rank % self.folds).reshape(nby, nbx)[yy // b, xx // b]).ravel()
        ys, xs = np.nonzero(fvalid)
        self.centroid = np.array([xs.mean(), ys.mean()])           # fine px (x, y)

    def features(self, matrix):
        """Design columns ``(n_used, p)`` (standardised) and the flat indices of the used pixels."""
        from .fuse import footprint_average

        mean, cov = footprint_average(self.fine, matrix, self.shape, supersample=self.supersample)
        covered = (cov >= self.min_coverage) & np.isfinite(mean).all(0)
        use = (covered & self.valid).ravel()
        if use.sum() < 2:
            return np.empty((int(use.sum()), 0)), np.flatnonzero(use)
        feats = mean.reshape(len(mean), -1)[:, use].T                # (n, k)
        cols = [feats]
        if self.quadratic:
            z = (feats - feats.mean(0)) / np.where(feats.std(0) > 0, feats.std(0), 1.0)
            iu, ju = np.triu_indices(z.shape[1])
            cols.append(z[:, iu] * z[:, ju])
        if self.smooth_px > 0:
            w = ndimage.gaussian_filter(covered.astype(np.float64), self.smooth_px,
                                        mode="constant")
            sm = []
            for img in mean:
                blurred = ndimage.gaussian_filter(np.where(covered, img, 0.0), self.smooth_px,
                                                  mode="constant")
                with np.errstate(invalid="ignore", divide="ignore"):
                    sm.append((blurred / w).ravel()[use])
            cols.append(np.column_stack(sm))
        x = np.concatenate(cols, axis=1)
        sd = x.std(0)
        keep = sd > 1e-12 * max(float(np.abs(x).max(initial=0.0)), 1e-300)
        x = (x[:, keep] - x[:, keep].mean(0)) / sd[keep]
        return x, np.flatnonzero(use)

    def __call__(self, matrix) -> float:
        # the products below are (n, p) x (n, T) with p, T ~ 10-20: one BLAS thread is as fast,
        # and a multi-threaded tall-skinny GEMM can stall for seconds on a busy machine
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):
            return self._score(matrix)

    def _score(self, matrix) -> float:
        x, rows = self.features(matrix)
        n, p = x.shape
        if p == 0 or n < max(50, 10 * (p + 1)):
            return float("nan")
        y = self.targets[:, rows].T                                  # (n, T)
        y = y - y.mean(0)
        sst = (y * y).sum(0)
        fold = self.fold[rows]
        pred = np.full_like(y, np.nan)
        eye = np.eye(p)
        for f in range(self.folds):
            te = fold == f
            tr = ~te
            if not te.any():
                continue
            if tr.sum() < 5 * (p + 1):
                return float("nan")
            xm, ym = x[tr].mean(0), y[tr].mean(0)
            xt = x[tr] - xm
            coef = np.linalg.solve(xt.T @ xt + self.ridge * tr.sum() * eye, xt.T @ (y[tr] - ym))
            pred[te] = (x[te] - xm) @ coef + ym
        if len(np.unique(fold)) < 2:
            return float("nan")
        ok = sst > 0
        if not ok.any():
            return float("nan")
        r2 = 1.0 - ((y - pred) ** 2).sum(0)[ok] / sst[ok]
        return float(r2.mean())


def placement_score(coarse_images: np.ndarray, coarse_valid: np.ndarray,
                    fine_features: np.ndarray, fine_valid: np.ndarray, matrix: np.ndarray, *,
                    folds: int = 5, block_px: int = 8, ridge: float = 1e-3,
                    min_coverage: float = 0.9, quadratic: bool = True, smooth_px: float = 0.0,
                    log_targets: bool = True, supersample: int = 2, seed: int = 0) -> float:
    """How well a placement of a fine image on a coarse grid explains the coarse images.

    The fine features are area-averaged over each coarse pixel's footprint through ``matrix``
    (:func:`msifusion.fuse.footprint_average`); every target image is predicted from them by a
    ridge regression cross-validated over spatial blocks. The right placement explains the coarse
    images best; a shifted, rotated or scaled one pairs each coarse pixel with the wrong tissue
    and explains less. The check is independent of :mod:`msifusion.register` (no tissue masks, no
    edge features, no canonical correlation): it asks only whether the coarse values are a
    function of the fine content at the placed footprint.

    Parameters
    ----------
    coarse_images : ndarray, shape (T, nyc, nxc) or (nyc, nxc)
        Measured images of the coarse modality (ion images), NaN where not acquired.
    coarse_valid : ndarray of bool, shape (nyc, nxc)
        Coarse pixels to use (acquired, tissue); pixels NaN in any image are dropped.
    fine_features : ndarray, shape (k, nyf, nxf) or (nyf, nxf)
        Features of the fine image (e.g. optical densities of an H&E); NaN outside its field.
    fine_valid : ndarray of bool, shape (nyf, nxf)
        Fine pixels that count.
    matrix : ndarray, shape (2, 3)
        Fine pixel coords ``(x, y, 1)`` -> coarse pixel coords ``(x, y)``.
    folds : int, default 5
        Cross-validation folds.
    block_px : int, default 8
        Side, in coarse pixels, of the square blocks (anchored at coarse pixel (0, 0)) that are
        assigned to folds whole, so that a held-out pixel's neighbours are mostly held out too.
    ridge : float, default 1e-3
        Ridge penalty per training pixel on standardised columns (``X'X + ridge * n * I``).
    min_coverage : float, default 0.9
        Coarse pixels whose footprint is covered less than this by valid fine pixels are not used.
    quadratic : bool, default True
        Add the squares and pairwise products of the standardised averaged features (``k (k + 1)
        / 2`` columns), so that a monotone but non-linear response (and a tissue-type contrast
        that is a product of stains) is explained too.
    smooth_px : float, default 0
        When > 0, add a Gaussian-smoothed copy (sigma in coarse px, over the covered pixels) of
        the averaged features (``k`` columns): neighbourhood context, e.g. for a laser spot
        larger than the pixel. It also makes the score less sensitive to the placement.
    log_targets : bool, default True
        Regress ``log1p(I / median(I))`` (median over the valid coarse pixels, negative values
        clipped to 0) instead of ``I``: ion intensities are skewed and their tissue contrasts
        roughly multiplicative; dividing by the median makes the transform independent of units.
    supersample : int, default 2
        Sub-pixels per fine pixel side in the footprint averaging.
    seed : int, default 0
        Seed of the assignment of blocks to folds (fixed per coarse grid, independent of the
        placement).

    Returns
    -------
    float
        Mean over the target images of the cross-validated ``R^2`` (``1 - sum (y - y_cv)^2 /
        sum (y - mean y)^2`` over the used coarse pixels, held-out predictions of all folds
        pooled): the fraction of each image's variance that the placed fine content predicts on
        pixels it was not trained on. ``R^2`` rather than Pearson r because it counts a held-out
        prediction that is correlated but biased or mis-scaled (what extrapolation to a fold of
        unseen tissue does) as an error, and its mean over targets is a fraction of variance.
        At most 1; about 0 or below for an unrelated placement. NaN when too few coarse pixels
        are usable (fewer than ``max(50, 10 (p + 1))`` for ``p`` columns, or a single fold).
    """
    scorer = _PlacementScorer(coarse_images, coarse_valid, fine_features, fine_valid,
                              folds=folds, block_px=block_px, ridge=ridge,
                              min_coverage=min_coverage, quadratic=quadratic, smooth_px=smooth_px,
                              log_targets=log_targets, supersample=supersample, seed=seed)
    from .fuse import _check_matrix

    return scorer(_check_matrix(matrix, "placement_score"))


def perturb_matrix(matrix: np.ndarray, offset, centre_xy) -> np.ndarray:
    """Compose a placement with a similarity perturbation in the coarse frame.

    Parameters
    ----------
    matrix : ndarray, shape (2, 3)
        Fine pixel coords ``(x, y, 1)`` -> coarse pixel coords.
    offset : sequence of 4 float
        ``(dx, dy, rotation_deg, scale)``: translation in coarse px, rotation (degrees, from +x
        towards +y: clockwise on screen, where y points down; the convention of
        :func:`msifusion.affine.pose`) and isotropic scale factor (1 = none), both about
        ``centre_xy``.
    centre_xy : sequence of 2 float
        Fine pixel coords ``(x, y)`` of the centre of rotation and scale (e.g. the fine tissue
        centroid); it moves by ``(dx, dy)`` only.

    Returns
    -------
    ndarray, shape (2, 3)
        ``q -> q0 + s R (q - q0) + (dx, dy)`` applied after ``matrix``, with ``q0 = matrix(centre)``.
    """
    m = np.asarray(matrix, dtype=np.float64)
    dx, dy, rot, s = (float(v) for v in offset)
    q0 = m[:, :2] @ np.asarray(centre_xy, dtype=np.float64) + m[:, 2]
    th = np.deg2rad(rot)
    r = s * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    return np.concatenate([r @ m[:, :2], (r @ (m[:, 2] - q0) + q0 + [dx, dy])[:, None]], axis=1)


def placement_check(coarse_images: np.ndarray, coarse_valid: np.ndarray,
                    fine_features: np.ndarray, fine_valid: np.ndarray, matrix: np.ndarray, *,
                    max_shift_px: float = 3.0, max_rotation_deg: float = 4.0,
                    max_scale: float = 0.06, grid_step_px: float = 0.5,
                    steps=(0.25, 0.5, 0.01), min_steps=(1 / 16, 1 / 8, 0.0025),
                    profile_steps=(0.25, 0.5, 0.01), **score_kwargs) -> dict:
    """Search around a placement for the nearby placement that explains the coarse images best.

    The placement is perturbed by a similarity in the coarse frame (:func:`perturb_matrix`:
    translation ``dx, dy``, rotation and isotropic scale about the fine tissue centroid) within
    ``|dx|, |dy| <= max_shift_px``, ``|rotation| <= max_rotation_deg``, ``|scale - 1| <=
    max_scale``, and scored by :func:`placement_score`. Search: a grid of translations at
    ``grid_step_px`` (rotation 0, scale 1), then a compass (pattern) search over all four
    parameters from the best grid point, steps ``steps`` halved down to ``min_steps``; then
    profiles through the best point, and when a profile point beats it (a better local optimum)
    the compass search restarts there (twice at most).

    Parameters
    ----------
    coarse_images, coarse_valid, fine_features, fine_valid, matrix
        As for :func:`placement_score`.
    max_shift_px : float, default 3
        Translation bound, coarse px.
    max_rotation_deg : float, default 4
        Rotation bound, degrees.
    max_scale : float, default 0.06
        Relative scale bound (0.06: factors 0.94-1.06).
    grid_step_px : float, default 0.5
        Step of the initial translation grid, coarse px.
    steps, min_steps : sequence of 3 float
        Initial and final compass steps: translation (coarse px), rotation (deg), scale (factor).
    profile_steps : sequence of 3 float
        Steps of the profiles: translation, rotation, scale.
    **score_kwargs
        Passed to :func:`placement_score` (``folds``, ``block_px``, ``ridge``, ``min_coverage``,
        ``quadratic``, ``smooth_px``, ``log_targets``, ``supersample``, ``seed``).

    Returns
    -------
    dict
        ``score`` (at ``matrix``), ``best_score``, ``best_matrix`` (2, 3), ``best_offset``
        (``dx``, ``dy`` coarse px, ``rotation_deg``, ``scale`` factor), ``displacement_px``
        (``median``, ``max`` over the valid fine pixels of ``|matrix(p) - best_matrix(p)|``,
        coarse px), ``at_best`` (True when the best lies strictly inside the bounds: more than
        the final compass step from every edge), ``profiles`` (``{name: {"offset": (n,),
        "score": (n,)}}`` for ``dx``, ``dy``, ``rotation_deg``, ``scale``: the score along one
        parameter over its whole range, the others at the best), ``centre_xy`` (fine px, the
        centre of rotation), ``n_evaluations``, ``bounds``.
    """
    from .fuse import _check_matrix

    m0 = _check_matrix(matrix, "placement_check")
    bounds = np.array([max_shift_px, max_shift_px, max_rotation_deg, max_scale], dtype=np.float64)
    if not np.all(np.isfinite(bounds)) or np.any(bounds < 0) or max_scale >= 1:
        raise InputError(f"placement_check: bounds must be finite and >= 0 (max_scale < 1), got "
                         f"shift {max_shift_px}, rotation {max_rotation_deg}, scale {max_scale}")
    step0 = np.array([steps[0], steps[0], steps[1], steps[2]], dtype=np.float64)
    step_min = np.array([min_steps[0], min_steps[0], min_steps[1], min_steps[2]], dtype=np.float64)
    pstep = np.array([profile_steps[0], profile_steps[0], profile_steps[1], profile_steps[2]],
                     dtype=np.float64)
    if np.any(step0 <= 0) or np.any(step_min <= 0) or np.any(pstep <= 0) or grid_step_px <= 0:
        raise InputError("placement_check: steps, min_steps, profile_steps and grid_step_px must "
                         "be > 0")
    opts = dict(folds=5, block_px=8, ridge=1e-3, min_coverage=0.9, quadratic=True, smooth_px=0.0,
                log_targets=True, supersample=2, seed=0)
    unknown = set(score_kwargs) - set(opts)
    if unknown:
        raise InputError(f"placement_check: unknown option(s) {sorted(unknown)}")
    opts.update(score_kwargs)
    scorer = _PlacementScorer(coarse_images, coarse_valid, fine_features, fine_valid,
                              where="placement_check", **opts)
    centre = scorer.centroid
    # offsets are searched as (dx, dy, rotation_deg, scale - 1); lower/upper bounds
    lo, hi = -bounds, bounds
    cache: dict[tuple, float] = {}

    def score(u) -> float:
        u = np.clip(np.asarray(u, dtype=np.float64), lo, hi)
        key = tuple(np.round(u, 9))
        if key not in cache:
            s = scorer(perturb_matrix(m0, (u[0], u[1], u[2], 1.0 + u[3]), centre))
            cache[key] = s if np.isfinite(s) else -np.inf
        return cache[key]

    given = score(np.zeros(4))
    # 1. translation grid
    n = int(np.floor(max_shift_px / grid_step_px + 1e-9))
    grid = np.arange(-n, n + 1) * grid_step_px
    best_u, best = np.zeros(4), given
    for dy in grid:
        for dx in grid:
            s = score([dx, dy, 0.0, 0.0])
            if s > best:
                best_u, best = np.array([dx, dy, 0.0, 0.0]), s

    def compass(u, s):
        step = step0.copy()
        while True:
            improved = False
            for i in range(4):
                if bounds[i] == 0:
                    continue
                for sign in (1.0, -1.0):
                    cand = u.copy()
                    cand[i] = np.clip(u[i] + sign * step[i], lo[i], hi[i])
                    if cand[i] == u[i]:
                        continue
                    sc = score(cand)
                    if sc > s:
                        u, s, improved = cand, sc, True
                        break
            if not improved:
                if np.all(step <= step_min * (1 + 1e-9)):
                    return u, s
                step = np.maximum(step / 2, step_min)

    def profiles_at(u):
        out = {}
        for i, name in enumerate(_OFFSET_NAMES):
            k = int(np.floor(bounds[i] / pstep[i] + 1e-9))
            vals = np.union1d(np.arange(-k, k + 1) * pstep[i], [u[i]])
            sc = []
            for v in vals:
                cand = u.copy()
                cand[i] = v
                sc.append(score(cand))
            out[name] = (vals, np.array(sc))
        return out

    best_u, best = compass(best_u, best)
    for _ in range(3):
        prof = profiles_at(best_u)
        top = max(((prof[name][1].max(), i, prof[name][0][prof[name][1].argmax()])
                   for i, name in enumerate(_OFFSET_NAMES)), key=lambda t: t[0])
        if top[0] <= best + 1e-12:
            break
        cand = best_u.copy()
        cand[top[1]] = top[2]
        best_u, best = compass(cand, top[0])
    else:
        prof = profiles_at(best_u)

    offset = (float(best_u[0]), float(best_u[1]), float(best_u[2]), float(1.0 + best_u[3]))
    best_m = perturb_matrix(m0, offset, centre)
    ys, xs = np.nonzero(scorer.fine_valid)
    pts = np.column_stack([xs, ys]).astype(np.float64)
    d = np.hypot(*((pts @ (m0[:, :2] - best_m[:, :2]).T) + (m0[:, 2] - best_m[:, 2])).T)
    inside = bool(np.all((np.abs(best_u) < bounds - step_min * (1 - 1e-9)) | (bounds == 0)))
    profiles = {}
    for i, name in enumerate(_OFFSET_NAMES):
        vals, sc = prof[name]
        profiles[name] = {"offset": vals + (1.0 if name == "scale" else 0.0),
                          "score": np.where(np.isfinite(sc), sc, np.nan)}
    nan = lambda v: float(v) if np.isfinite(v) else float("nan")   # noqa: E731
    log.info("placement check: score %.4f at the given matrix, best %.4f at dx %.3f dy %.3f px, "
             "rotation %.3f deg, scale %.4f (%d placements scored)", nan(given), nan(best),
             *offset, len(cache))
    return {"score": nan(given), "best_score": nan(best), "best_matrix": best_m,
            "best_offset": dict(zip(_OFFSET_NAMES, offset)),
            "displacement_px": {"median": float(np.median(d)), "max": float(d.max())},
            "at_best": inside, "profiles": profiles, "centre_xy": tuple(float(v) for v in centre),
            "n_evaluations": len(cache),
            "bounds": {"max_shift_px": float(max_shift_px),
                       "max_rotation_deg": float(max_rotation_deg), "max_scale": float(max_scale)}}
