"""Reference placement of the real MALDI / H&E pair of ``msight_prostate`` by the ion images alone.

The pair (``/work/shared/data/real/msight_prostate``): a MALDI peptide image of a prostate section
(274 x 163 grid at 25 um, 33,035 spectra inside a hand-drawn polygon, 422 centroid channels of a
continuous axis) and the H&E of the same section (2560 x 1920 RGB; its OME pixel size, 0.17 um, is
wrong: the true one is about 2.5 um). Nothing here uses :mod:`msifusion.register`: the placement is
the one that maximises :func:`msifusion.evaluate.placement_score`, the spatially cross-validated
R^2 with which the H&E (placed) predicts the 20 most intense ion images, so that it can serve as an
independent reference for registration changes.

Steps
-----
1. Convert the imzML (``msifusion convert``) into ``--out`` (kept: rerunning skips it); the 20
   channels of largest total intensity as images (the file is continuous centroid: a channel is
   exactly one centroid m/z, no ppm window needed).
2. H&E features at level 0, block-averaged (mean, anti-aliased) by 2 (the ~5 um grid of the
   reference matrix) and by 4 (the ~10 um grid of the searches): haematoxylin, eosin and DAB-residual
   (``skimage.color.rgb2hed``), mean optical density ``-log10(I / I0)`` (``I0`` the 99th percentile
   of each channel: the glass), and the fractions of glass-like (OD < 0.04: lumens, tears) and
   dense (OD > 0.2) level-0 pixels. Averaging after the per-pixel thresholds keeps sub-footprint
   texture (a coarse pixel half lumen, half epithelium is not a pale coarse pixel).
3. Global search (rotation -25..25 deg, H&E level-0 pixel 2.2-3.2 um, every translation where the
   H&E field covers at least 40 % of the MALDI region): for every rotation (2.5 deg steps) and
   scale (3 % steps) the H&E features are footprint-averaged onto a canvas at the MALDI spacing
   and, for all translations at once (FFT moments over the overlap, masked), the linear R^2 with
   which they explain the leading principal components of the log ion images (a cheap surrogate
   of the score: no cross-validation, integer shifts) at 50 um (the MALDI block-averaged x2).
   The best distinct surrogate peaks (placements more than 6 MALDI px apart somewhere on the
   field) are scored with ``placement_score`` and the best ``--refine`` of them refined locally
   (``placement_check`` on the 10 um features; starts that end on an optimum found before merge
   into it): the best optimum and the distinct runner-ups. The best is checked again on the 5 um
   features (``placement_check``, +-3 px, +-4 deg, +-6 %), where its profiles are taken, plus
   wide sweeps (+-12 px, +-15 deg, +-20 %).
4. The same search with the MALDI coarsened x4 (100 um: block means of the 25 um images, a 100 um
   pixel valid where all 16 are acquired); is its optimum within one 100 um pixel of the 25 um one?
5. Local consistency: the best translation of each tile of a 3 x 3 split of the H&E field (rest
   of the placement fixed): a rigid placement fits if the tiles agree.

Writes ``reference_placement.json`` (matrices for the level-0 and the downsample-2 H&E grids,
H&E pixel -> MALDI 25 um pixel, pixel centres at integers), ``reference_placement.png`` (QC
overlay) and ``reference_placement_profiles.png`` under ``--out``.

Usage::

    python benchmarks/msight_reference.py [--out benchmarks/out/msight] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.fft as sfft
from scipy import ndimage

from msifusion.affine import compose, invert, pose, transform_points
from msifusion.evaluate import (_PlacementScorer, perturb_matrix, placement_check,
                                 placement_score)
from msifusion.fuse import footprint_average
from msifusion.store import ConvertedReader, atomic_output, value_rows

DATA = Path("/work/shared/data/real/msight_prostate")
IMZML = DATA / "prostate_example.imzML"
HE = DATA / "prostate_he_example.tif"
MSI_UM = 25.0
N_TARGETS = 20
FEATURES = ("haematoxylin", "eosin", "dab_residual", "od", "glass_fraction", "dense_fraction")
#: placement_score options used throughout (quadratic terms of the 6 features: 27 columns)
SCORE = dict(folds=5, ridge=1e-3, min_coverage=0.9, quadratic=True, smooth_px=0.0,
             log_targets=True, seed=0)
ROT_RANGE = (-25.0, 25.0)
PX_RANGE_UM = (2.2, 3.2)          # H&E level-0 pixel size


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------

def channel_images(path: Path, top: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``top`` channels of largest total intensity as images (top, ny, nx), NaN where not
    acquired; their m/z (top,); the TIC image (ny, nx)."""
    r = ConvertedReader(path)
    x = np.zeros((r.n_pixels, len(r.mz_axis)))
    for start, _stop, indptr, ch, inten in r.iter_blocks(channels=True):
        np.add.at(x, (value_rows(indptr, start), ch.astype(np.int64)), inten)
    order = np.argsort(x.sum(0))[::-1][:top]
    imgs = np.stack([r.to_image(x[:, j]) for j in order]).astype(np.float64)
    return imgs, r.mz_axis[order], r.to_image(r.tic()).astype(np.float64)


def block_mean(a: np.ndarray, d: int) -> np.ndarray:
    """Mean over ``d x d`` blocks of the last two axes (trailing rows/columns that do not fill a
    block are dropped: pixel ``i`` of the result is centred at ``d i + (d - 1) / 2``)."""
    ny, nx = a.shape[-2] // d * d, a.shape[-1] // d * d
    a = a[..., :ny, :nx]
    return a.reshape(a.shape[:-2] + (ny // d, d, nx // d, d)).mean(axis=(-3, -1))


def block_mean_valid(imgs: np.ndarray, d: int) -> np.ndarray:
    """NaN-aware block mean: NaN unless all ``d x d`` pixels are finite."""
    return block_mean(imgs, d)          # a NaN anywhere in the block makes the mean NaN


def downsample_matrix(d: int) -> np.ndarray:
    """Level-0 pixel coords -> coords of the grid block-averaged by ``d`` (2, 3)."""
    return np.array([[1.0 / d, 0.0, -(d - 1) / (2 * d)], [0.0, 1.0 / d, -(d - 1) / (2 * d)]])


def he_features(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """H&E features (6, ny0, nx0) at level 0 (float32) and the RGB image (ny0, nx0, 3) uint8."""
    import tifffile
    from skimage.color import rgb2hed

    rgb = tifffile.imread(path)
    i0 = np.percentile(rgb.reshape(-1, 3), 99, axis=0).astype(np.float64)
    od = -np.log10(np.clip(rgb / i0, 1e-3, 1.0)).mean(-1)
    hed = rgb2hed(rgb)
    feats = np.stack([hed[..., 0], hed[..., 1], hed[..., 2], od, od < 0.04, od > 0.2]).astype(np.float32)
    return feats, rgb


# --------------------------------------------------------------------------------------------
# global search: FFT surrogate over all translations
# --------------------------------------------------------------------------------------------

def rot_scale(theta_deg: float, s: float) -> np.ndarray:
    th = np.deg2rad(theta_deg)
    return s * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])


def canvas(fine: np.ndarray, a: np.ndarray):
    """Footprint-average ``fine`` (k, ny, nx) onto a canvas at the coarse spacing through the
    linear part ``a`` (2, 2), translated so that the field starts near (0, 0); returns the averaged
    features, the coverage and the fine -> canvas matrix (2, 3)."""
    ny, nx = fine.shape[1:]
    corners = np.array([[-0.5, -0.5], [nx - 0.5, -0.5], [-0.5, ny - 0.5], [nx - 0.5, ny - 0.5]])
    q = corners @ a.T
    t0 = 0.5 - q.min(0)
    shape = (int(np.ceil(q[:, 1].max() + t0[1] + 0.5)), int(np.ceil(q[:, 0].max() + t0[0] + 0.5)))
    m = np.concatenate([a, t0[:, None]], 1)
    mean, cov = footprint_average(fine, m, shape, supersample=1)
    return mean, cov, m


class Surrogate:
    """Linear R^2 of coarse targets on canvas features for every integer translation (FFT).

    For a translation ``t``, canvas pixel ``(u, v)`` lies on coarse pixel ``(u + tx, v + ty)``.
    Over the overlap of the coarse valid region and the canvas coverage, the moments (counts,
    sums, cross products) are circular cross-correlations of zero-padded images; the R^2 of target
    ``j`` is ``c_j' C^-1 c_j / var_j`` (``C`` the features' covariance, ``c_j`` their covariance with
    the target), summed over targets weighted by their variance.
    """

    def __init__(self, targets: np.ndarray, valid: np.ndarray, pad_shape, workers: int = 2):
        self.pad = tuple(int(v) for v in pad_shape)
        self.workers = workers
        f = np.where(valid, targets, 0.0)
        self.fm = self._f(valid.astype(np.float64))
        self.ff = [self._f(x) for x in f]
        self.ff2 = [self._f(x * x) for x in f]
        self.n_valid = int(valid.sum())

    def _f(self, x):
        return sfft.rfft2(x, s=self.pad, workers=self.workers)

    def _i(self, x):
        return sfft.irfft2(x, s=self.pad, workers=self.workers)

    def surface(self, g: np.ndarray, w: np.ndarray, min_overlap: float = 0.4,
                ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
        """R^2 (pad shape; NaN where the overlap is below ``min_overlap`` of the valid region)
        and the overlap fraction."""
        w = w.astype(np.float64)
        g = np.where(w > 0, g, 0.0)
        g = (g - (g * w).sum((1, 2), keepdims=True) / w.sum()) * w
        g /= np.sqrt((g * g).sum((1, 2)) / w.sum())[:, None, None]
        k = len(g)
        fw = np.conj(self._f(w))
        fg = [np.conj(self._f(x)) for x in g]
        n_all = self._i(self.fm * fw)
        idx = np.flatnonzero(n_all.ravel() >= min_overlap * self.n_valid)
        n = n_all.ravel()[idx]

        def take(x):
            return self._i(x).ravel()[idx]

        sg = np.stack([take(self.fm * fg[a]) for a in range(k)]) / n
        cmat = np.empty((len(idx), k, k))
        for a, b in zip(*np.triu_indices(k)):
            v = take(self.fm * np.conj(self._f(g[a] * g[b]))) / n - sg[a] * sg[b]
            cmat[:, a, b] = v
            cmat[:, b, a] = v
        cmat += (ridge * np.trace(cmat, axis1=1, axis2=2) / k)[:, None, None] * np.eye(k)
        cs = np.empty((len(idx), k, len(self.ff)))
        var = np.zeros(len(idx))
        for j, (ff, ff2) in enumerate(zip(self.ff, self.ff2)):
            sf = take(ff * fw) / n
            var += take(ff2 * fw) / n - sf * sf
            for a in range(k):
                cs[:, a, j] = take(ff * fg[a]) / n - sf * sg[a]
        num = (np.linalg.solve(cmat, cs) * cs).sum((1, 2))
        out = np.full(int(np.prod(self.pad)), np.nan)
        out[idx] = num / var
        return out.reshape(self.pad), n_all / self.n_valid

    def shift(self, iy: int, ix: int) -> tuple[int, int]:
        """Surface index -> translation ``(tx, ty)``."""
        ty = iy if iy < self.pad[0] // 2 else iy - self.pad[0]
        tx = ix if ix < self.pad[1] // 2 else ix - self.pad[1]
        return tx, ty


def leading_components(imgs: np.ndarray, valid: np.ndarray, n: int) -> np.ndarray:
    """Principal component images (n, ny, nx) of the standardised log ion images."""
    y = np.log1p(np.maximum(imgs[:, valid], 0) /
                 np.array([np.median(i[valid][i[valid] > 0]) for i in imgs])[:, None]).T
    y = (y - y.mean(0)) / y.std(0)
    u, s, _ = np.linalg.svd(y, full_matrices=False)
    out = np.zeros((n,) + valid.shape)
    out[:, valid] = (u[:, :n] * s[:n]).T
    return out


def field_corners(shape) -> np.ndarray:
    ny, nx = shape
    return np.array([[0, 0], [nx - 1, 0], [0, ny - 1], [nx - 1, ny - 1], [(nx - 1) / 2, (ny - 1) / 2]],
                    dtype=np.float64)


def distinct(cands: list[dict], corners: np.ndarray, min_px: float, limit: int) -> list[dict]:
    """Greedy non-maximum suppression of candidates (sorted by ``score``, best first): a candidate
    is kept when its matrix places some field corner more than ``min_px`` from every kept one."""
    kept = []
    for c in cands:
        if all(corner_distance(c["matrix"], k["matrix"], corners) > min_px for k in kept):
            kept.append(c)
            if len(kept) == limit:
                break
    return kept


def surrogate_search(imgs, valid, fine, to_grid, *, rotations, scales_um, fine_um_per_px,
                     coarse_um, n_pc=6, workers=2, log=print) -> list[dict]:
    """Surrogate peaks over rotation x scale x translation.

    ``fine`` (k, ny, nx) features on a grid whose pixel is ``fine_um_per_px`` level-0 pixels;
    ``coarse_um`` the spacing of ``imgs``; ``to_grid`` maps the pixels of ``imgs`` to the grid
    the candidates' matrices are returned on (2, 3). Returns candidates (dicts: ``score`` (surrogate),
    ``rotation_deg``, ``px_um`` (H&E level 0), ``matrix`` (fine -> target grid), ``overlap``),
    best first.
    """
    pcs = leading_components(imgs, valid, n_pc)
    biggest = max(scales_um) * fine_um_per_px / coarse_um * np.hypot(*fine.shape[1:]) + 2
    pad = tuple(int(sfft.next_fast_len(int(np.ceil(s + biggest)))) for s in valid.shape)
    sur = Surrogate(pcs, valid, pad, workers=workers)
    cands = []
    t0 = time.perf_counter()
    for rot in rotations:
        for um in scales_um:
            g, cov, m = canvas(fine, rot_scale(rot, um * fine_um_per_px / coarse_um))
            r2, overlap = sur.surface(g, cov >= 0.9)
            r2f = np.where(np.isfinite(r2), r2, -1.0)
            peaks = (r2f == ndimage.maximum_filter(r2f, 5, mode="wrap")) & (r2f > 0)
            for i in np.flatnonzero(peaks.ravel()):
                tx, ty = sur.shift(*np.unravel_index(i, r2.shape))
                mm = m.copy()
                mm[:, 2] += (tx, ty)
                cands.append(dict(score=float(r2f.ravel()[i]), rotation_deg=float(rot),
                                  px_um=float(um), overlap=float(overlap.ravel()[i]),
                                  matrix=compose(mm, to_grid)))
        log(f"  surrogate rotation {rot:+6.1f} deg done ({time.perf_counter() - t0:.0f} s, best "
            f"so far {max(c['score'] for c in cands):.4f})")
    cands.sort(key=lambda c: -c["score"])
    return cands


# --------------------------------------------------------------------------------------------
# placements
# --------------------------------------------------------------------------------------------

def describe(m_ds2: np.ndarray, ds: int = 2) -> dict:
    """Physical description of a ds-2 H&E -> MALDI 25 um matrix."""
    m0 = compose(downsample_matrix(ds), m_ds2)
    p = pose(m0, 1.0, MSI_UM)
    return {"px_um": float(MSI_UM * p["scale"]), "rotation_deg": float(p["rotation_deg"]),
            "translation_px": [float(m0[0, 2]), float(m0[1, 2])], "mirror": p["mirror"]}


def to_coarse(m: np.ndarray, d: int) -> np.ndarray:
    """A matrix onto the 25 um grid -> onto the grid block-averaged by ``d``."""
    return compose(m, downsample_matrix(d))


def profile_widths(profiles: dict, px_um: float) -> dict:
    """Per parameter: the offsets (from the best) where the score has fallen by 1 % and 5 % of its
    peak, interpolated on each side (None beyond the profile), in the parameter's unit (and um
    for translations)."""
    out = {}
    for name, p in profiles.items():
        x, y = np.asarray(p["offset"], float), np.asarray(p["score"], float)
        i = int(np.nanargmax(y))
        res = {}
        for frac in (0.01, 0.05):
            level = y[i] * (1 - frac)
            sides = []
            for step in (-1, 1):
                j = i
                while 0 <= j + step < len(y) and y[j + step] > level:
                    j += step
                if not 0 <= j + step < len(y):
                    sides.append(None)
                    continue
                x0, x1, y0, y1 = x[j], x[j + step], y[j], y[j + step]
                sides.append(float(abs(x0 + (level - y0) * (x1 - x0) / (y1 - y0) - x[i])))
            res[f"drop_{int(frac * 100)}pct"] = sides
            if name in ("dx", "dy"):
                res[f"drop_{int(frac * 100)}pct_um"] = [None if s is None else s * px_um for s in sides]
        out[name] = res
    return out


def jsonable(o):
    if isinstance(o, dict):
        return {k: jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return jsonable(o.tolist())
    if isinstance(o, (np.floating, float)):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    return o


def search(imgs, valid, f4, fv4, *, coarse_d: int, block_px: int, n_refine: int, log,
           workers: int, surrogate_d: int) -> dict:
    """Global search on the MALDI block-averaged by ``coarse_d`` (1: 25 um); the surrogate on the
    MALDI block-averaged by ``surrogate_d`` (a multiple of ``coarse_d``). Matrices returned map the
    ds-4 H&E grid to the ``coarse_d`` grid."""
    coarse_um = MSI_UM * coarse_d
    s_imgs = block_mean_valid(imgs, surrogate_d)
    s_valid = np.isfinite(s_imgs).all(0)
    c_imgs = block_mean_valid(imgs, coarse_d)
    c_valid = np.isfinite(c_imgs).all(0)
    lo, hi = PX_RANGE_UM
    rotations = np.arange(ROT_RANGE[0], ROT_RANGE[1] + 1e-9, 2.5)
    scales = lo * 1.03 ** np.arange(int(np.floor(np.log(hi / lo) / np.log(1.03))) + 2)
    scales = scales[scales <= hi * 1.015]
    # the surrogate works on the surrogate grid; its matrices are carried to the coarse grid
    sur_to_coarse = invert(downsample_matrix(surrogate_d // coarse_d))
    t = time.perf_counter()
    cands = surrogate_search(s_imgs, s_valid, f4, sur_to_coarse, rotations=rotations,
                             scales_um=scales, fine_um_per_px=4.0,
                             coarse_um=MSI_UM * surrogate_d, workers=workers, log=log)
    t_sur = time.perf_counter() - t
    corners = field_corners(f4.shape[1:])
    top = distinct(cands, corners, 150.0 / coarse_um, 12)      # 150 um apart somewhere
    log(f"  {len(cands)} surrogate peaks, {len(top)} distinct kept ({t_sur:.0f} s, "
        f"{len(rotations)} rotations x {len(scales)} scales)")
    scorer = _PlacementScorer(c_imgs, c_valid, f4, fv4, block_px=block_px, supersample=2, **SCORE)
    for c in top:
        c["placement_score"] = scorer(c["matrix"])
    top.sort(key=lambda c: -(c["placement_score"] if np.isfinite(c["placement_score"]) else -9))
    for c in top:
        log(f"    surrogate {c['score']:.4f}  score {c['placement_score']:.4f}  rotation "
            f"{c['rotation_deg']:+6.1f}  px {c['px_um']:.3f} um  overlap {c['overlap']:.2f}")
    # quick local refinement of the best candidates; starts that converge to an optimum already
    # found (a field corner within 100 um) merge into it
    quick = dict(max_shift_px=3.0, max_rotation_deg=4.0, max_scale=0.06, grid_step_px=1.0,
                 steps=(0.5, 1.0, 0.02), min_steps=(0.125, 0.25, 0.005),
                 profile_steps=(1.0, 2.0, 0.03), block_px=block_px, supersample=1, **SCORE)
    same = 100.0 / coarse_um
    optima = []
    for c in top[:n_refine]:
        t = time.perf_counter()
        r = placement_check(c_imgs, c_valid, f4, fv4, c["matrix"], **quick)
        hit = [o for o in optima if corner_distance(r["best_matrix"], o["matrix"], corners) < same]
        log(f"    refined {c['placement_score']:.4f} -> {r['best_score']:.4f}  offset "
            f"{_fmt_offset(r['best_offset'])}  at_best {r['at_best']}  "
            f"({r['n_evaluations']} placements, {time.perf_counter() - t:.0f} s)"
            + ("  = an optimum found before" if hit else ""))
        if hit:
            hit[0]["starts"] += 1
            if r["best_score"] > hit[0]["score"]:
                hit[0].update(matrix=r["best_matrix"], score=r["best_score"], at_best=r["at_best"])
            continue
        optima.append(dict(matrix=r["best_matrix"], score=r["best_score"], at_best=r["at_best"],
                           start=c, starts=1))
    cover = np.ones(f4.shape[1:])
    for o in optima:
        o.update(describe(compose(invert(ds4_to(2)), compose(o["matrix"],
                                                             invert(downsample_matrix(coarse_d))))))
        cov = footprint_average(cover, o["matrix"], c_valid.shape, supersample=1)[1]
        o["overlap"] = float(((cov >= 0.9) & c_valid).sum() / c_valid.sum())
        o["search_edge"] = [name for name, hit in (
            ("rotation", abs(abs(o["rotation_deg"]) - ROT_RANGE[1]) < 1.5 or
             abs(o["rotation_deg"]) > ROT_RANGE[1]),
            ("pixel size", o["px_um"] < lo * 1.015 or o["px_um"] > hi / 1.015),
            ("overlap", o["overlap"] < 0.45)) if hit]
    optima.sort(key=lambda o: -o["score"])
    return dict(candidates=top, optima=optima, surrogate_seconds=t_sur, n_peaks=len(cands),
                coarse_imgs=c_imgs, coarse_valid=c_valid)


def ds4_to(d: int) -> np.ndarray:
    """ds-4 H&E pixel coords -> ds-``d`` pixel coords (2, 3)."""
    return compose(invert(downsample_matrix(4)), downsample_matrix(d))


def corner_distance(m1: np.ndarray, m2: np.ndarray, corners: np.ndarray) -> float:
    """Largest distance between where two matrices put the field corners (and centre)."""
    return float(np.abs(transform_points(m1, corners) - transform_points(m2, corners)).max())


def _fmt_offset(o: dict) -> str:
    return (f"dx {o['dx']:+.3f} dy {o['dy']:+.3f} px, rot {o['rotation_deg']:+.3f} deg, "
            f"scale {o['scale']:.4f}")


def local_shifts(imgs, valid, f, fv, m, n: int = 3, block_px: int = 8) -> list[dict]:
    """Best translation (+-5 px) of each tile of an ``n x n`` split of the fine field."""
    ny, nx = fv.shape
    out = []
    for i in range(n):
        for j in range(n):
            tile = np.zeros_like(fv)
            tile[i * ny // n:(i + 1) * ny // n, j * nx // n:(j + 1) * nx // n] = True
            tile &= fv
            r = placement_check(imgs, valid, f, tile, m, max_shift_px=5.0, max_rotation_deg=0.0,
                                max_scale=0.0, grid_step_px=1.0, steps=(0.5, 0.5, 0.01),
                                min_steps=(0.125, 0.5, 0.01), profile_steps=(1.0, 0.5, 0.01),
                                block_px=block_px, supersample=1, **SCORE)
            ys, xs = np.nonzero(tile)
            c = transform_points(m, np.array([[xs.mean(), ys.mean()]]))[0]
            cov = footprint_average(np.where(tile, 1.0, np.nan), m, valid.shape,
                                    supersample=1)[1]
            out.append(dict(tile=(i, j), centre_px=c.tolist(), score=r["score"],
                            n_pixels=int(((cov >= 0.9) & valid).sum()),
                            best_score=r["best_score"], dx=r["best_offset"]["dx"],
                            dy=r["best_offset"]["dy"], at_best=r["at_best"]))
    return out


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------

def warp_he(rgb: np.ndarray, m0: np.ndarray, shape, up: int, box=None) -> np.ndarray:
    """The level-0 H&E RGB resampled (bilinear) on the MALDI grid refined ``up`` times."""
    ny, nx = shape
    x0, x1, y0, y1 = box if box is not None else (0, nx, 0, ny)
    inv = invert(m0)
    yy, xx = np.mgrid[y0 * up:y1 * up, x0 * up:x1 * up] / up - (up - 1) / (2 * up)
    x = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    y = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    out = np.stack([ndimage.map_coordinates(rgb[..., c].astype(np.float32), [y, x], order=1,
                                            cval=np.nan) for c in range(3)], -1)
    return out / 255.0


def qc_figure(path, rgb, m0, imgs, mzs, tic, valid, title):
    """H&E placed on the MALDI grid, a checkerboard, the TIC with the H&E outline, and a zoom on
    the glands: H&E, a lumen-secretion ion image and a stroma ion image with the lumen outline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ny, nx = tic.shape
    ext = (-0.5, nx - 0.5, ny - 0.5, -0.5)

    def od_of(he):
        return -np.log10(np.clip(np.nan_to_num(he, nan=1.0).mean(-1) / 0.86, 1e-3, 1.0))

    def logimg(a):
        return np.log1p(np.maximum(a, 0) / np.nanmedian(a))

    def centres(n, up, start):
        return (np.arange(n) - (up - 1) / 2) / up + start

    up = 4
    he = warp_he(rgb, m0, (ny, nx), up)
    inside = np.isfinite(he).all(-1)
    ods = ndimage.gaussian_filter(od_of(he), 1.5)
    i_nod = int(np.argmin(np.abs(mzs - 1217.39)))
    i_gl = int(np.argmin(np.abs(mzs - 1150.29)))
    fig, ax = plt.subplots(2, 3, figsize=(30, 17))
    a = ax[0, 0]
    a.imshow(np.where(inside[..., None], np.clip(np.nan_to_num(he), 0, 1), 1.0), extent=ext)
    a.contour(np.arange(nx), np.arange(ny), valid.astype(float), levels=[0.5], colors="k",
              linewidths=1.0)
    a.set_title("H&E placed on the MALDI 25 um grid (black: the MALDI region)")
    a = ax[0, 1]
    cb = ((np.arange(ny * up)[:, None] // (12 * up) + np.arange(nx * up)[None] // (12 * up)) % 2
          ).astype(bool)
    g = logimg(imgs[i_nod])
    g = np.clip((g - np.nanpercentile(g, 1)) / (np.nanpercentile(g, 99) - np.nanpercentile(g, 1)),
                0, 1)
    ion = plt.get_cmap("magma")(np.nan_to_num(np.repeat(np.repeat(g, up, 0), up, 1)))[..., :3]
    ion[~np.repeat(np.repeat(valid, up, 0), up, 1)] = 1.0
    mix = np.where((cb & inside)[..., None], np.clip(np.nan_to_num(he), 0, 1), ion)
    a.imshow(mix, extent=ext)
    a.set_title(f"checkerboard (300 um squares): H&E / MALDI m/z {mzs[i_nod]:.2f} (stroma)")
    a = ax[0, 2]
    a.imshow(logimg(tic), extent=ext, cmap="gray")
    a.contour(centres(nx * up, up, 0), centres(ny * up, up, 0), np.where(inside, ods, np.nan),
              levels=[0.05], colors="r", linewidths=0.5)
    a.set_title("MALDI TIC (log) with the H&E glass / lumen outline (red)")
    box = (160, 220, 45, 105)
    zup = 8
    zoom = warp_he(rgb, m0, (ny, nx), zup, box)
    zo = ndimage.gaussian_filter(od_of(zoom), 2.0)
    zx, zy = centres(zo.shape[1], zup, box[0]), centres(zo.shape[0], zup, box[2])
    zext = (box[0] - 0.5, box[1] - 0.5, box[3] - 0.5, box[2] - 0.5)
    ax[1, 0].imshow(np.clip(np.nan_to_num(zoom, nan=1.0), 0, 1), extent=zext)
    ax[1, 0].set_title("zoom: H&E (glands; lumens white)")
    for a, i, what in ((ax[1, 1], i_gl, "bright in the gland lumens"),
                       (ax[1, 2], i_nod, "stroma")):
        a.imshow(logimg(imgs[i]), extent=ext, cmap="magma")
        a.contour(zx, zy, zo, levels=[0.05], colors="c", linewidths=0.9)
        a.set_xlim(zext[0], zext[1])
        a.set_ylim(zext[2], zext[3])
        a.set_title(f"zoom: MALDI m/z {mzs[i]:.2f} ({what}), cyan: H&E lumen outline")
    for a in ax.flat:
        a.grid(True, color="y", lw=0.4, alpha=0.6)
    fig.suptitle(title, fontsize=16)
    fig.tight_layout()
    fig.savefig(path, dpi=55)
    plt.close(fig)


def profiles_figure(path, profiles: dict, best: dict, ext: dict, title: str):
    """Score profiles of ``placement_check`` (drawn relative to its best offset ``best``) and the
    wide sweeps ``ext`` (already relative to the best)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    units = {"dx": "coarse px (25 um)", "dy": "coarse px (25 um)", "rotation_deg": "deg",
             "scale": "scale factor"}
    for a, name in zip(ax, ("dx", "dy", "rotation_deg", "scale")):
        if name in ext:
            a.plot(ext[name]["offset"], ext[name]["score"], "-", color="0.6", label="wide sweep")
        off = np.asarray(profiles[name]["offset"], float)
        off = off / best[name] if name == "scale" else off - best[name]
        a.plot(off, profiles[name]["score"], "o-", ms=3, label="placement_check")
        a.set_xlabel(f"{name} from the best ({units[name]})")
        a.set_ylabel("placement score (mean CV R^2)")
        a.grid(True, alpha=0.4)
    ax[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "msight"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--refine", type=int, default=8,
                    help="distinct surrogate candidates refined locally")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    timings = {}

    def log(msg):
        print(msg, flush=True)

    # 1. MALDI
    t = time.perf_counter()
    conv = out / "prostate_example.h5"
    if not conv.exists():
        subprocess.run([sys.executable, "-m", "msifusion", "convert", str(IMZML), str(conv)],
                       check=True, stdout=subprocess.DEVNULL)
    imgs, mzs, tic = channel_images(conv, N_TARGETS)
    valid = np.isfinite(tic) & np.isfinite(imgs).all(0)
    timings["maldi_s"] = time.perf_counter() - t
    log(f"MALDI {tic.shape[1]} x {tic.shape[0]} px at {MSI_UM:g} um, {int(valid.sum())} acquired; "
        f"{N_TARGETS} most intense channels m/z {', '.join(f'{v:.2f}' for v in mzs)} "
        f"({timings['maldi_s']:.1f} s)")

    # 2. H&E
    t = time.perf_counter()
    f0, rgb = he_features(HE)
    f2 = block_mean(f0, 2).astype(np.float64)
    f4 = block_mean(f0, 4).astype(np.float64)
    del f0
    fv2 = np.ones(f2.shape[1:], bool)
    fv4 = np.ones(f4.shape[1:], bool)
    timings["he_s"] = time.perf_counter() - t
    log(f"H&E {rgb.shape[1]} x {rgb.shape[0]} px; features {', '.join(FEATURES)} at ds 2 "
        f"{f2.shape[2]} x {f2.shape[1]} and ds 4 {f4.shape[2]} x {f4.shape[1]} "
        f"({timings['he_s']:.1f} s)")

    # 3. global search at 25 um (surrogate at 50 um), final check on the 5 um features
    log("\n== global search, MALDI 25 um (surrogate at 50 um) ==")
    t = time.perf_counter()
    s25 = search(imgs, valid, f4, fv4, coarse_d=1, block_px=8, n_refine=args.refine, log=log,
                 workers=args.threads, surrogate_d=2)
    timings["search_25um_s"] = time.perf_counter() - t
    m2 = compose(invert(ds4_to(2)), s25["optima"][0]["matrix"])          # ds2 -> 25 um
    t = time.perf_counter()
    final = placement_check(imgs, valid, f2, fv2, m2, max_shift_px=3.0, max_rotation_deg=4.0,
                            max_scale=0.06, block_px=8, supersample=1, **SCORE)
    timings["final_check_s"] = time.perf_counter() - t
    m2 = final["best_matrix"]
    m0 = compose(downsample_matrix(2), m2)
    desc = describe(m2)
    log(f"final check on the 5 um features: {final['score']:.4f} -> {final['best_score']:.4f}, "
        f"offset {_fmt_offset(final['best_offset'])}, at_best {final['at_best']} "
        f"({final['n_evaluations']} placements, {timings['final_check_s']:.0f} s)")
    corners2 = field_corners(f2.shape[1:])
    runner = []
    for o in s25["optima"][1:]:
        mc = compose(invert(ds4_to(2)), o["matrix"])
        runner.append(dict(score=float(placement_score(imgs, valid, f2, fv2, mc, block_px=8,
                                                       supersample=1, **SCORE)),
                           score_ds4=o["score"], px_um=o["px_um"], rotation_deg=o["rotation_deg"],
                           overlap=o["overlap"], search_edge=o["search_edge"],
                           local_at_best=o["at_best"], starts=o["starts"],
                           max_corner_distance_px=corner_distance(mc, m2, corners2),
                           matrix_ds2=mc))
    runner.sort(key=lambda r: -r["score"])
    # wide sweeps through the best: the score far from it
    t = time.perf_counter()
    scorer2 = _PlacementScorer(imgs, valid, f2, fv2, block_px=8, supersample=1, **SCORE)
    wide = {}
    for i, (name, vals) in enumerate((("dx", np.arange(-12, 12.1, 1.0)),
                                      ("dy", np.arange(-12, 12.1, 1.0)),
                                      ("rotation_deg", np.arange(-15, 15.1, 1.5)),
                                      ("scale", np.arange(0.8, 1.201, 0.025)))):
        sc = []
        for v in vals:
            off = [0.0, 0.0, 0.0, 1.0]
            off[i] = v
            sc.append(scorer2(perturb_matrix(m2, off, scorer2.centroid)))
        wide[name] = {"offset": vals, "score": np.array(sc)}
    timings["wide_sweeps_s"] = time.perf_counter() - t
    widths = profile_widths(final["profiles"], MSI_UM)

    # 4. local consistency
    t = time.perf_counter()
    tiles = local_shifts(imgs, valid, f4, fv4, compose(ds4_to(2), m2))
    timings["tiles_s"] = time.perf_counter() - t

    # 5. x4 (100 um)
    log("\n== global search, MALDI coarsened x4 (100 um; surrogate at 100 um) ==")
    t = time.perf_counter()
    s100 = search(imgs, valid, f4, fv4, coarse_d=4, block_px=4, n_refine=args.refine, log=log,
                  workers=args.threads, surrogate_d=4)
    c100 = s100["coarse_imgs"], s100["coarse_valid"]
    chk100 = placement_check(*c100, f4, fv4, s100["optima"][0]["matrix"], max_shift_px=1.5,
                             max_rotation_deg=4.0, max_scale=0.06, grid_step_px=0.25,
                             steps=(0.125, 0.5, 0.01), block_px=4, supersample=2, **SCORE)
    timings["search_100um_s"] = time.perf_counter() - t
    best100 = chk100["best_matrix"]                                        # ds4 -> 100 um
    ref100 = compose(compose(ds4_to(2), m2), downsample_matrix(4))        # 25 um optimum
    pts = np.argwhere(fv4)[:, ::-1].astype(np.float64)
    d100 = np.hypot(*(transform_points(best100, pts) - transform_points(ref100, pts)).T)
    sc100_at_ref = placement_score(*c100, f4, fv4, ref100, block_px=4, supersample=2, **SCORE)
    desc100 = describe(compose(invert(ds4_to(2)), compose(best100, invert(downsample_matrix(4)))))
    corners4 = field_corners(f4.shape[1:])
    runner100 = [dict(score=o["score"], px_um=o["px_um"], rotation_deg=o["rotation_deg"],
                      overlap=o["overlap"], search_edge=o["search_edge"],
                      max_corner_distance_px=corner_distance(o["matrix"], best100, corners4))
                 for o in s100["optima"][1:]]
    timings["total_s"] = time.perf_counter() - t_all

    # report
    log("\n== reference placement (H&E pixel (x, y, 1) -> MALDI 25 um pixel (x, y)) ==")
    log(f"matrix, H&E ds-2 grid:   {np.array2string(m2, precision=6, suppress_small=True)}")
    log(f"matrix, H&E level 0:     {np.array2string(m0, precision=6, suppress_small=True)}")
    log(f"H&E pixel {desc['px_um']:.4f} um (level 0; {2 * desc['px_um']:.3f} um at ds 2), "
        f"rotation {desc['rotation_deg']:+.3f} deg, H&E level-0 pixel (0, 0) at MALDI px "
        f"({desc['translation_px'][0]:.2f}, {desc['translation_px'][1]:.2f}); mirror "
        f"{desc['mirror']}")
    log(f"score {final['best_score']:.4f} (mean spatially cross-validated R^2 of the "
        f"{N_TARGETS} ion images; given {final['score']:.4f})")
    for i, r in enumerate(runner[:3]):
        log(f"runner-up {i + 1}: score {r['score']:.4f} ({r['score_ds4']:.4f} on 10 um features), "
            f"px {r['px_um']:.3f} um, rotation {r['rotation_deg']:+.2f} deg, overlap "
            f"{r['overlap']:.2f}, {r['max_corner_distance_px']:.0f} px from the best; on the "
            f"search's edge: {', '.join(r['search_edge']) or 'no'}")
    log(f"({len(s25['optima'])} distinct optima from {min(args.refine, len(s25['candidates']))} "
        f"refined starts; {s25['optima'][0]['starts']} starts converged to the best)")
    log("profiles (placement_check on the 5 um features, offset:score):")
    for name, p in final["profiles"].items():
        log(f"  {name:13s} " + " ".join(f"{o:+.4g}:{s:.4f}" for o, s in zip(p["offset"], p["score"])))
    log("wide sweeps (offset:score):")
    for name, p in wide.items():
        log(f"  {name:13s} " + " ".join(f"{o:+.4g}:{s:.3f}" for o, s in zip(p["offset"], p["score"])))
    log("score drop widths (distance from the best, each side, where the score is 1 % / 5 % "
        "below its peak):")
    for name, w in widths.items():
        log(f"  {name:13s} " + "  ".join(
            f"{k} " + "/".join("-" if v is None else f"{v:.3g}" for v in vals)
            for k, vals in w.items()))
    log("local consistency (3 x 3 tiles of the H&E field; best translation of each, 25 um px):")
    for tl in tiles:
        log(f"  tile {tl['tile']} at MALDI ({tl['centre_px'][0]:.0f}, {tl['centre_px'][1]:.0f}): "
            f"dx {tl['dx']:+.2f} dy {tl['dy']:+.2f}  score {tl['score']:.3f} -> "
            f"{tl['best_score']:.3f}  ({tl['n_pixels']} MALDI px)")
    log(f"x4 (100 um): best score {chk100['best_score']:.4f}, H&E px {desc100['px_um']:.3f} um, "
        f"rotation {desc100['rotation_deg']:+.2f} deg; its optimum lies {np.median(d100):.2f} "
        f"(median) / {d100.max():.2f} (max) 100-um px from the 25 um optimum "
        f"({'within' if d100.max() <= 1.0 else 'NOT within'} 1 px); score at the 25 um optimum "
        f"{sc100_at_ref:.4f}; runner-ups " + ", ".join(
            f"{r['score']:.4f} (edge: {', '.join(r['search_edge']) or 'no'})" for r in runner100[:3]))
    log("timings (s): " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in timings.items()))

    # JSON + figures
    result = {
        "description": "Reference placement of prostate_he_example.tif on prostate_example.imzML "
                       "found by maximising msifusion.evaluate.placement_score (benchmarks/"
                       "msight_reference.py). Matrices map H&E pixel coords (x, y, 1) to MALDI 25 "
                       "um pixel coords (x, y), pixel centres at integers, 0-based.",
        "matrix_level0": m0, "matrix_ds2": m2,
        "ds2_grid": "H&E block-averaged 2 x 2 (mean): ds-2 pixel i is centred at level-0 2 i + 0.5",
        "he_pixel_um_level0": desc["px_um"], "rotation_deg": desc["rotation_deg"],
        "mirror": desc["mirror"], "level0_origin_at_maldi_px": desc["translation_px"],
        "score": final["best_score"], "score_options": dict(SCORE, block_px=8, supersample=1),
        "features": FEATURES, "targets_mz": mzs, "final_check": {
            "score_at_start": final["score"], "best_offset": final["best_offset"],
            "displacement_px": final["displacement_px"], "at_best": final["at_best"],
            "profiles": final["profiles"], "bounds": final["bounds"]},
        "profile_widths": widths, "wide_sweeps": wide, "runner_ups": runner,
        "local_tiles": tiles,
        "x4": {"matrix_ds4_to_100um": best100, "best_score": chk100["best_score"],
               "px_um": desc100["px_um"], "rotation_deg": desc100["rotation_deg"],
               "distance_to_25um_optimum_100um_px": {"median": float(np.median(d100)),
                                                     "max": float(d100.max())},
               "score_at_25um_optimum": sc100_at_ref, "profiles": chk100["profiles"],
               "runner_ups": runner100},
        "timings_s": timings,
    }
    with atomic_output(out / "reference_placement.json") as tmp:
        Path(tmp).write_text(json.dumps(jsonable(result), indent=1))
    qc_figure(out / "reference_placement.png", rgb, m0, imgs, mzs, tic, valid,
              f"reference placement: H&E pixel {desc['px_um']:.3f} um, rotation "
              f"{desc['rotation_deg']:+.2f} deg, score {final['best_score']:.4f}")
    profiles_figure(out / "reference_placement_profiles.png", final["profiles"],
                    final["best_offset"], wide,
                    "placement score around the reference placement (MALDI 25 um, H&E 5 um)")
    log(f"wrote {out / 'reference_placement.json'}, {out / 'reference_placement.png'}, "
        f"{out / 'reference_placement_profiles.png'} ({time.perf_counter() - t_all:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
