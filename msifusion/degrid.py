"""ToF-SIMS scan-tile grid: detect the tile period and remove the tile pattern from image stacks.

A ToF-SIMS image is acquired as a mosaic of tiles of ``tile = (ty, tx)`` pixels, anchored at pixel
(0, 0); tiles at the right and bottom edges may be partial. Every tile carries the same
position-dependent gain (beam/analyser vignetting), which shows as a grid in every ion image.

- ``method="gain"`` (ours): flat-field correction, ``image / G`` where ``G (ty, tx)`` is the
  relative gain of each in-tile position, estimated robustly (:func:`estimate_gain`: median over
  tiles of each tile divided by its own mean, refined by alternating a smooth clean-image
  estimate with a least-squares gain, smoothed inside the tile by a window chosen by
  cross-validation over tiles), tiled over the image. Zeros stay zeros and a
  multiplicative gain is removed up to a constant factor.
- ``method="subtract"`` (published): ``image - (T - mean(T))`` tiled, with ``T`` the mean tile,
  clipped at 0.

``NaN`` pixels (not acquired) are ignored when estimating and stay ``NaN``.
"""

from __future__ import annotations

import logging

import numpy as np

from .errors import InputError
from .nmf import read_nmf, write_nmf
from .store import ConvertedReader, ConvertedWriter, value_rows

log = logging.getLogger("msifusion.degrid")

METHODS = ("gain", "subtract")
#: Smallest gain value applied (relative to the mean gain 1), protects against divisions by ~0.
MIN_GAIN = 0.05


def _tile_pair(tile) -> tuple[int, int]:
    """``tile`` as ``(ty, tx)`` (an int means a square tile)."""
    t = np.atleast_1d(np.asarray(tile)).astype(int).ravel()
    if t.size == 1:
        t = np.repeat(t, 2)
    if t.size != 2 or np.any(t < 1):
        raise InputError(f"tile must be a positive int or (ty, tx), got {tile!r}")
    return int(t[0]), int(t[1])


def _as_stack(stack: np.ndarray) -> tuple[np.ndarray, bool]:
    a = np.asarray(stack, dtype=np.float64)
    if a.ndim == 2:
        return a[None], True
    if a.ndim != 3:
        raise InputError(f"expected an image (ny, nx) or stack (k, ny, nx), got shape {a.shape}")
    return a, False


def _tiles(stack: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
    """View ``(k, nty, ntx, ty, tx)`` of the stack padded with NaN to whole tiles."""
    k, ny, nx = stack.shape
    ty, tx = tile
    nty, ntx = -(-ny // ty), -(-nx // tx)
    pad = np.full((k, nty * ty, ntx * tx), np.nan)
    pad[:, :ny, :nx] = stack
    return pad.reshape(k, nty, ty, ntx, tx).transpose(0, 1, 3, 2, 4)


def _check_fits(shape, tile, where="image"):
    ty, tx = tile
    if ty > shape[-2] or tx > shape[-1]:
        raise InputError(f"{where}: tile {ty} x {tx} px does not fit the {shape[-2]} x {shape[-1]} "
                         "px image")


def check_tile_divides(shape, tile, where: str = "image") -> None:
    """Raise :class:`InputError` unless the image ``(..., ny, nx)`` is a whole number of tiles.

    A configured tile that does not divide the acquisition is most likely the wrong tile size
    (scan mosaics are whole tiles); a detected tile may leave partial edge tiles.
    """
    ty, tx = _tile_pair(tile)
    ny, nx = shape[-2], shape[-1]
    if ny % ty or nx % tx:
        raise InputError(
            f"{where}: the configured tile {ty} x {tx} px does not divide the {ny} x {nx} px image "
            f"(remainders {ny % ty} px in y, {nx % tx} px in x); check grid.tile_px, or set it to "
            "null to detect the tile from the data")


def weighted_total(stack: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """``sum_j weights[j] * stack[j]`` ignoring NaN, NaN where every image is NaN.

    Parameters
    ----------
    stack : ndarray, shape (k, ny, nx)
    weights : ndarray, shape (k,), optional (default 1)

    Returns
    -------
    ndarray, shape (ny, nx), float64
    """
    s = np.asarray(stack, dtype=np.float64)
    w = np.ones(len(s)) if weights is None else np.asarray(weights, dtype=np.float64)
    with np.errstate(all="ignore"):
        return np.where(np.isfinite(s).any(0), np.nansum(s * w[:, None, None], axis=0), np.nan)


def _tile_repeat(pattern: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Repeat ``pattern (k, ty, tx)`` over an image of ``shape (ny, nx)`` from pixel (0, 0)."""
    k, ty, tx = pattern.shape
    reps = (1, -(-shape[0] // ty), -(-shape[1] // tx))
    return np.tile(pattern, reps)[:, :shape[0], :shape[1]]


# ---------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------

def _band_profiles(image: np.ndarray, n_bands: int) -> np.ndarray:
    """Means along axis 0 of ``n_bands`` equal bands of rows, ``(n_bands, n)``, ignoring NaN.

    All-NaN positions are interpolated from their neighbours (0 when a band is all NaN).
    """
    bands = np.array_split(np.where(np.isfinite(image), image, np.nan), n_bands, axis=0)
    out = []
    for band in bands:
        with np.errstate(all="ignore"):
            p = np.nanmean(band, axis=0)
        ok = np.isfinite(p)
        if not ok.any():
            p = np.zeros_like(p)
        elif not ok.all():
            i = np.arange(len(p))
            p = np.interp(i, i[ok], p[ok])
        out.append(p)
    return np.array(out)


def _detrend(p: np.ndarray, P: int) -> np.ndarray:
    """``p`` minus its centred moving average over ``P`` samples (windows shrink at the ends).

    A moving average over exactly one period turns a P-periodic component into a constant, so the
    trend is removed while the periodic component survives whole.
    """
    n = len(p)
    c = np.concatenate([[0.0], np.cumsum(p)])
    lo = np.clip(np.arange(n) - P // 2, 0, n)
    hi = np.clip(lo + P, 0, n)
    lo = np.clip(hi - P, 0, n)
    return p - (c[hi] - c[lo]) / (hi - lo)


def _period_scores(profiles: np.ndarray, periods: np.ndarray) -> np.ndarray:
    """Periodicity score of band profiles ``(n_bands, n)`` for each candidate period P.

    Each band profile is detrended (:func:`_detrend`) and cut into its whole periods; the score is
    the mean Pearson correlation between all pairs of these segments (all bands together). A
    tile grid repeats in every period of every band (score near 1); image content does not
    (score near 0).
    """
    n = profiles.shape[1]
    scores = np.full(len(periods), -np.inf)
    for i, P in enumerate(periods):
        m = n // P
        segs = np.concatenate([_detrend(p, P)[:m * P].reshape(m, P) for p in profiles])
        segs = segs - segs.mean(axis=1, keepdims=True)
        norms = np.linalg.norm(segs, axis=1)
        segs = segs[norms > 0] / norms[norms > 0, None]
        q = len(segs)
        if q < 2:
            continue
        total = segs.sum(axis=0)
        scores[i] = (float(total @ total) - q) / (q * (q - 1))
    return scores


def _detect_1d(image: np.ndarray, min_period: int, max_period: int, min_score: float,
               min_repeats: int, n_bands: int, name: str) -> int:
    """Period along axis 1 of ``image``; see :func:`detect_tile_period`."""
    n = image.shape[1]
    hi = min(max_period, n // min_repeats)
    if hi < min_period:
        raise InputError(f"detect_tile_period: the image is {n} px along {name}, too short for "
                         f"{min_repeats} periods of >= {min_period} px")
    periods = np.arange(min_period, hi + 1)
    # the first difference suppresses smooth image content and sharpens tile seams
    profiles = np.diff(_band_profiles(image, max(1, min(n_bands, image.shape[0] // 4))), axis=1)
    scores = _period_scores(profiles, periods)
    best = float(scores.max())
    if not np.isfinite(best) or best < min_score:
        raise InputError(f"detect_tile_period: no tile periodicity along {name} between "
                         f"{min_period} and {hi} px (best score {best:.2f} < {min_score})")
    # multiples of the period score about as well as the period itself, and so may its
    # neighbours for smooth gain patterns: take the smallest local maximum close to the best
    left = np.concatenate([[-np.inf], scores[:-1]])
    right = np.concatenate([scores[1:], [-np.inf]])
    peak = (scores >= left) & (scores >= right) & (scores >= 0.85 * best)
    P = int(periods[peak][0])
    log.info("tile period along %s: %d px (score %.2f; best %.2f at %d px)", name, P,
             float(scores[periods == P][0]), best, int(periods[np.argmax(scores)]))
    return P


def detect_tile_period(image: np.ndarray, *, min_period: int = 8, max_period: int = 256,
                       min_score: float = 0.4, min_repeats: int = 3,
                       n_bands: int = 4) -> tuple[int, int]:
    """Tile size ``(ty, tx)`` in pixels from the periodicity of the image along y and x.

    Along x (likewise y): the image is cut into ``n_bands`` bands of rows; the first difference
    of each band's column-mean profile is detrended with a moving average over the candidate
    period and cut into periods; the score of the period is the mean correlation between all
    these segments (autocorrelation at the lag of the period, pooled over bands and repeats).
    The tile size is the smallest local maximum of the score within 85 % of the best score.
    The grid must stand out against the image content: a faint, smooth vignetting on a strongly
    textured image is not detected (give the tile size instead).

    Parameters
    ----------
    image : ndarray, shape (ny, nx) or (k, ny, nx)
        Image (a stack is summed over components first); NaN = not acquired.
    min_period, max_period : int
        Range of candidate periods (pixels).
    min_score : float
        Smallest score (mean correlation between periods, -1..1) accepted as a grid.
    min_repeats : int
        Periods longer than the image size divided by this are not considered.
    n_bands : int
        Number of bands the image is cut into across the direction analysed.

    Returns
    -------
    (ty, tx) : tuple of int

    Raises
    ------
    InputError
        No periodicity in the range along y or x.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = weighted_total(img)
    if img.ndim != 2:
        raise InputError(f"detect_tile_period: expected an image (ny, nx), got shape {img.shape}")
    if not np.isfinite(img).any():
        raise InputError("detect_tile_period: the image has no finite pixel")
    args = (int(min_period), int(max_period), float(min_score), int(min_repeats), int(n_bands))
    ty = _detect_1d(img.T, *args, "y")
    tx = _detect_1d(img, *args, "x")
    return ty, tx


# ---------------------------------------------------------------------------------------------
# Tile pattern and removal
# ---------------------------------------------------------------------------------------------

def mean_tile(stack: np.ndarray, tile, weights: np.ndarray | None = None) -> np.ndarray:
    """Mean over all tiles of each in-tile position.

    Parameters
    ----------
    stack : ndarray, shape (k, ny, nx) or (ny, nx)
        Images; NaN pixels are ignored.
    tile : int or (ty, tx)
        Tile size in pixels (tiles anchored at pixel (0, 0); edge tiles may be partial).
    weights : ndarray, shape (ny, nx), optional
        Non-negative pixel weights (e.g. a tissue mask) of a weighted mean.

    Returns
    -------
    ndarray, shape (k, ty, tx), float64
        NaN at positions without any finite, positively weighted pixel.
    """
    s, _ = _as_stack(stack)
    tile = _tile_pair(tile)
    _check_fits(s.shape, tile)
    w = np.ones(s.shape[1:]) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != s.shape[1:]:
        raise InputError(f"mean_tile: weights shape {w.shape} differs from image {s.shape[1:]}")
    t = _tiles(s, tile)                                    # (k, nty, ntx, ty, tx)
    wt = _tiles(w[None], tile)[0]                          # (nty, ntx, ty, tx)
    valid = np.isfinite(t) & (np.nan_to_num(wt) > 0)
    num = np.where(valid, t * wt, 0).sum(axis=(1, 2))
    den = np.where(valid, wt, 0).sum(axis=(1, 2))
    with np.errstate(all="ignore"):
        return np.where(den > 0, num / den, np.nan)


#: Name of :func:`mean_tile` in ``docs/design.md``.
tile_profile = mean_tile


def _median_gain(t: np.ndarray, whole: np.ndarray) -> np.ndarray:
    """Median over tiles of each tile divided by its own mean; ``t (nty, ntx, ty, tx)`` -> (ty, tx).

    Only whole tiles are used when there are any; NaN where fewer than 3 tiles have a value.
    """
    ty, tx = t.shape[2:]
    t = t[whole] if whole.any() else t.reshape(-1, ty, tx)
    with np.errstate(all="ignore"):
        tmean = (np.nansum(t, axis=(1, 2), keepdims=True)
                 / np.isfinite(t).sum(axis=(1, 2), keepdims=True))
        norm = np.where(tmean > 0, t / tmean, np.nan)
        n_valid = np.isfinite(norm).sum(axis=0)
        norm[:, n_valid == 0] = 1.0                      # nanmedian warns on all-NaN columns
        g = np.nanmedian(norm, axis=0) if len(norm) else np.full((ty, tx), np.nan)
    return np.where((n_valid >= 3) & np.isfinite(g), g, np.nan)


def _normalise_gain(g: np.ndarray) -> np.ndarray:
    """Gain scaled to mean 1 over its finite positive values; other positions 1; floor MIN_GAIN."""
    ok = np.isfinite(g) & (g > 0)
    out = np.ones_like(g)
    if ok.any():
        out[ok] = g[ok] / g[ok].mean()
    return np.maximum(out, MIN_GAIN)


#: Candidate gain-smoothing windows (fractions of the tile) tried by ``gain_smooth="auto"``.
GAIN_SMOOTH_LEVELS = (0.0, 0.25, 0.5, 0.75, 0.9)


def estimate_gain(stack: np.ndarray, tile, mask: np.ndarray | None = None, *,
                  smooth: float = 1 / 8, gain_smooth: float | str = "auto", n_iter: int = 20,
                  rtol: float = 1e-4) -> np.ndarray:
    """Relative gain ``G`` of each in-tile position under the model ``image = clean * G`` (tiled).

    Start: the median over (whole) tiles of each tile divided by its own mean. Refinement, a few
    alternating steps: ``clean`` = Gaussian smoothing (sigma = ``smooth`` * tile, NaN-aware) of
    ``image / G``; ``G`` = least-squares ratio of ``image`` to ``clean`` pooled over all tiles
    per position, then smoothed inside the tile (Savitzky-Golay, quadratic, windows of
    ``gain_smooth`` * tile; no wrap-around, so steps at the tile seams survive, and quadratic
    vignetting passes unchanged). The smoothing of ``clean`` suppresses the tile frequencies in
    it, so the tile pattern ends up in ``G`` while image structure, which is not tile-periodic,
    averages out over tiles; smoothing ``G`` removes what is left of image texture and counting
    noise in it (few tiles). ``G`` is normalised to mean 1 and clipped below
    at :data:`MIN_GAIN`; positions without data get 1.

    How much to smooth ``G`` depends on the pattern (a smooth vignetting takes a wide window,
    a sharp one a narrow window) and on how much texture the tiles leave in the mean tile:
    ``gain_smooth="auto"`` chooses the window by cross-validation over tiles
    (:func:`select_gain_smooth`).

    Parameters
    ----------
    stack : ndarray, shape (k, ny, nx) or (ny, nx)
        Non-negative images, NaN = not acquired.
    tile : int or (ty, tx)
        Tile size in pixels.
    mask : ndarray of bool, shape (ny, nx), optional
        Pixels used for the estimate (default: all finite pixels).
    smooth : float
        Gaussian sigma of the clean-image estimate as a fraction of the tile size.
    gain_smooth : float or "auto"
        Savitzky-Golay window of the gain smoothing as a fraction of the tile size (0: none);
        ``"auto"``: chosen per image among :data:`GAIN_SMOOTH_LEVELS` by cross-validation.
    n_iter : int
        Maximum number of refinement steps (0: the median estimate only).
    rtol : float
        Stop refining when no gain value changes by more than this.

    Returns
    -------
    ndarray, shape (k, ty, tx), float64
    """
    s, _ = _as_stack(stack)
    tile = _tile_pair(tile)
    _check_fits(s.shape, tile)
    valid = _valid_pixels(s, mask, "estimate_gain")
    out = np.ones((len(s),) + tile)
    for j in range(len(s)):
        if not valid[j].any():
            continue
        level = gain_smooth
        if isinstance(gain_smooth, str):
            if gain_smooth != "auto":
                raise InputError(f"gain_smooth must be a number or 'auto', got {gain_smooth!r}")
            level = select_gain_smooth(s[j], tile, valid[j], smooth=smooth, n_iter=n_iter,
                                       rtol=rtol)
        out[j] = _fit_gain(s[j], valid[j], tile, smooth, float(level), n_iter, rtol)
    return out


def _valid_pixels(s: np.ndarray, mask, where: str) -> np.ndarray:
    """Finite pixels of the stack ``(k, ny, nx)`` inside ``mask (ny, nx)``."""
    valid = np.isfinite(s)
    if mask is not None:
        mask = np.asarray(mask, bool)
        if mask.shape != s.shape[1:]:
            raise InputError(f"{where}: mask shape {mask.shape} differs from image {s.shape[1:]}")
        valid &= mask
    return valid


def _fit_gain(image: np.ndarray, valid: np.ndarray, tile: tuple[int, int], smooth: float,
              gain_smooth: float, n_iter: int, rtol: float,
              pool: np.ndarray | None = None) -> np.ndarray:
    """Gain ``(ty, tx)`` of one image ``(ny, nx)`` from its ``valid`` pixels; see
    :func:`estimate_gain`. ``pool`` (bool, ``(ny, nx)``, default ``valid``) restricts the tiles
    pooled into the gain; the clean image is still estimated from all valid pixels."""
    from scipy.ndimage import gaussian_filter

    ny, nx = image.shape
    ty, tx = tile
    nty, ntx = -(-ny // ty), -(-nx // tx)
    whole = np.zeros((nty, ntx), bool)
    whole[:ny // ty, :nx // tx] = True
    sigma = (max(smooth * ty, 0.5), max(smooth * tx, 0.5))
    pool = valid if pool is None else pool & valid
    obs = np.where(valid, image, 0.0)
    g = _normalise_gain(_median_gain(_tiles(np.where(pool, image, np.nan)[None], tile)[0], whole))
    weight = gaussian_filter(valid.astype(np.float64), sigma, mode="nearest")
    it, change = -1, np.nan
    for it in range(int(n_iter)):
        G = _tile_repeat(g[None], (ny, nx))[0]
        with np.errstate(all="ignore"):
            clean = gaussian_filter(obs / G, sigma, mode="nearest") / weight
        clean = np.where(pool & np.isfinite(clean), clean, 0.0)   # pool lies within valid
        num = _tile_sums(obs * clean, tile)
        den = _tile_sums(clean * clean, tile)
        with np.errstate(all="ignore"):
            g_new = _normalise_gain(np.where(den > 0, num / den, np.nan))
        if gain_smooth > 0:
            g_new = _normalise_gain(_smooth_gain(g_new, gain_smooth))
        change = float(np.max(np.abs(g_new - g)))
        g = g_new
        if change < rtol:
            break
    log.debug("gain: %d refinement steps, last change %.2g", it + 1, change)
    return g


def _checkerboard(shape: tuple[int, int], tile: tuple[int, int]) -> np.ndarray:
    """Bool ``(ny, nx)``: one colour of a checkerboard of tile blocks (2 x 2 tiles when each
    colour gets at least 2 whole blocks, single tiles otherwise), for splitting the tiles in two.
    """
    ny, nx = shape
    ty, tx = tile
    block = 2 if (ny // (2 * ty)) * (nx // (2 * tx)) >= 4 else 1
    by, bx = np.arange(ny) // (block * ty), np.arange(nx) // (block * tx)
    return (by[:, None] + bx[None, :]) % 2 == 0


def select_gain_smooth(image: np.ndarray, tile, mask: np.ndarray | None = None, *,
                       levels=GAIN_SMOOTH_LEVELS, smooth: float = 1 / 8, n_iter: int = 20,
                       rtol: float = 1e-4) -> float:
    """Gain-smoothing window chosen by two-fold cross-validation over the tiles.

    The tiles are split into the two colours A and B of a checkerboard (of 2 x 2-tile blocks, so
    that texture straddling neighbouring tiles does not leak into both halves). For each candidate
    window, the smoothed gain from A is compared with the unsmoothed gain from B and vice versa;
    the unsmoothed gain of the other half is the true gain plus independent texture noise, so the
    mean squared difference is smallest, up to a constant, for the window closest to the true
    gain. Too little smoothing keeps texture, too much bends a sharp pattern.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Non-negative image, NaN = not acquired.
    tile : int or (ty, tx)
        Tile size in pixels.
    mask : ndarray of bool, shape (ny, nx), optional
        Pixels used (default all finite pixels).
    levels : sequence of float
        Candidate windows (fractions of the tile, 0 = none).
    smooth, n_iter, rtol
        As in :func:`estimate_gain`.

    Returns
    -------
    float
        The chosen window (the first level when the image has fewer than 2 tiles per half).
    """
    img = np.asarray(image, dtype=np.float64)
    tile = _tile_pair(tile)
    _check_fits(img.shape, tile)
    valid = _valid_pixels(img[None], mask, "select_gain_smooth")[0]
    a = _checkerboard(img.shape, tile)
    halves = (valid & a, valid & ~a)
    if (img.shape[0] // tile[0]) * (img.shape[1] // tile[1]) < 4 or not all(h.any() for h in
                                                                              halves):
        return float(levels[0])
    raw = [_fit_gain(img, valid, tile, smooth, 0.0, n_iter, rtol, pool=h) for h in halves]
    scores = []
    for level in levels:
        fits = [raw_h if level == 0 else
                _fit_gain(img, valid, tile, smooth, float(level), n_iter, rtol, pool=h)
                for raw_h, h in zip(raw, halves)]
        scores.append(float(((fits[0] - raw[1]) ** 2).sum() + ((fits[1] - raw[0]) ** 2).sum()))
    best = float(levels[int(np.argmin(scores))])
    log.info("gain smoothing chosen by cross-validation over tiles: %.2f of the tile (scores %s)",
             best, ", ".join(f"{v:.3g}" for v in scores))
    return best


def _smooth_gain(g: np.ndarray, fraction: float, polyorder: int = 2) -> np.ndarray:
    """Savitzky-Golay smoothing of a gain tile ``(ty, tx)`` along both axes.

    Windows span ``fraction`` of the tile (odd, at least ``polyorder + 3`` samples); polynomials
    up to ``polyorder`` per axis, including at the tile borders, pass unchanged.
    """
    from scipy.signal import savgol_filter

    for axis in (0, 1):
        n = g.shape[axis]
        w = int(round(fraction * n)) | 1
        w = max(w, polyorder + 3 if (polyorder + 3) % 2 else polyorder + 4)
        if w <= n:
            g = savgol_filter(g, w, polyorder, axis=axis, mode="interp")
    return g


def _tile_sums(image: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
    """Sum over all tiles of each in-tile position, ``(ny, nx)`` -> ``(ty, tx)`` (NaN as 0)."""
    t = _tiles(np.nan_to_num(image)[None], tile)[0]
    return np.nansum(t, axis=(0, 1))


def remove_grid(stack: np.ndarray, tile, method: str = "gain", mask: np.ndarray | None = None, *,
                per_component: bool = True, component_weights: np.ndarray | None = None,
                gain_smooth: float | str = "auto") -> np.ndarray:
    """Remove the tile pattern from every image of a stack.

    Parameters
    ----------
    stack : ndarray, shape (k, ny, nx) or (ny, nx)
        Non-negative images; NaN = not acquired (kept NaN).
    tile : int or (ty, tx)
        Tile size in pixels, anchored at pixel (0, 0).
    method : {"gain", "subtract"}
        ``"gain"``: divide by the robust normalised mean tile (:func:`estimate_gain`).
        ``"subtract"`` (published): subtract the mean tile minus its global mean, clip at 0.
    mask : ndarray of bool, shape (ny, nx), optional
        Pixels used to estimate the pattern (e.g. tissue); the correction applies everywhere.
    per_component : bool, default True
        ``"gain"`` only: estimate one gain per image; otherwise one shared gain from the
        weighted sum of the images (the physical gain is common to all ions). ``"subtract"``
        always works per image.
    component_weights : ndarray, shape (k,), optional
        Weights of the sum used by the shared gain (default 1; for NMF maps the row sums of the
        spectra, so that the sum is the reconstructed total ion image).
    gain_smooth : float or "auto"
        ``"gain"`` only, see :func:`estimate_gain`; with ``per_component``, ``"auto"`` chooses one
        window for all images, by cross-validation on their weighted sum.

    Returns
    -------
    ndarray, same shape as ``stack``, float32
    """
    if method not in METHODS:
        raise InputError(f"degrid method must be one of {METHODS}, got {method!r}")
    s, single = _as_stack(stack)
    tile = _tile_pair(tile)
    _check_fits(s.shape, tile)
    shape = s.shape[1:]
    if method == "subtract":
        w = None if mask is None else np.asarray(mask, dtype=np.float64)
        T = mean_tile(s, tile, weights=w)                                # (k, ty, tx)
        with np.errstate(all="ignore"):
            dev = np.nan_to_num(T - np.nanmean(T, axis=(1, 2), keepdims=True))
        out = s - _tile_repeat(dev, shape)
        out = np.where(np.isnan(s), np.nan, np.maximum(out, 0))
    else:
        cw = np.ones(len(s)) if component_weights is None else np.asarray(component_weights,
                                                                          dtype=np.float64)
        if cw.shape != (len(s),):
            raise InputError(f"component_weights has shape {cw.shape}, expected ({len(s)},)")
        total = weighted_total(s, cw)
        if per_component:
            level = select_gain_smooth(total, tile, mask) if gain_smooth == "auto" else gain_smooth
            G = estimate_gain(s, tile, mask, gain_smooth=level)
        else:
            G = np.repeat(estimate_gain(total, tile, mask, gain_smooth=gain_smooth), len(s), axis=0)
        out = s / _tile_repeat(G, shape)
    out = out.astype(np.float32)
    return out[0] if single else out


def _periodic_component(img: np.ndarray) -> np.ndarray:
    """Periodic part of the periodic + smooth decomposition (Moisan 2011).

    Removes the jumps between opposite image borders that an FFT treats as edges (the cross
    through the spectrum), which would otherwise put power on the harmonic lattice's axes.
    """
    ny, nx = img.shape
    v = np.zeros_like(img)
    v[0, :] += img[-1, :] - img[0, :]
    v[-1, :] += img[0, :] - img[-1, :]
    v[:, 0] += img[:, -1] - img[:, 0]
    v[:, -1] += img[:, 0] - img[:, -1]
    q = np.arange(ny)[:, None]
    r = np.arange(nx)[None, :]
    den = 2 * np.cos(2 * np.pi * q / ny) + 2 * np.cos(2 * np.pi * r / nx) - 4
    den[0, 0] = 1.0
    s_hat = np.fft.fft2(v) / den
    s_hat[0, 0] = 0.0
    return img - np.real(np.fft.ifft2(s_hat))


def grid_energy(image: np.ndarray, tile) -> float:
    """Fraction of the image's spectral power at the tile harmonics, DC excluded.

    The image is cropped to whole tiles from pixel (0, 0) (so that every harmonic ``(i / ty,
    j / tx)`` falls on an FFT bin), NaN pixels are set to the mean, the mean is subtracted, the
    smooth component of the periodic + smooth decomposition (Moisan 2011) is removed (border
    jumps), and the power at the harmonic lattice (any ``(i, j) != (0, 0)``) is divided by the
    total power.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
    tile : int or (ty, tx)

    Returns
    -------
    float
        In [0, 1]; about ``1 / (ty * tx)`` for white noise, near 1 for a pure tile pattern.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise InputError(f"grid_energy: expected an image (ny, nx), got shape {img.shape}")
    ty, tx = _tile_pair(tile)
    _check_fits(img.shape, (ty, tx))
    nty, ntx = img.shape[0] // ty, img.shape[1] // tx
    img = img[:nty * ty, :ntx * tx]
    finite = np.isfinite(img)
    if not finite.any():
        return 0.0
    img = np.where(finite, img, img[finite].mean())
    img = _periodic_component(img - img.mean())
    power = np.abs(np.fft.fft2(img)) ** 2
    total = float(power.sum())
    if total <= 0:
        return 0.0
    lattice = float(power[::nty, ::ntx].sum())            # DC is ~0 after mean removal
    return lattice / total


def degrid_nmf_file(in_path, out_path, *, tile, method: str = "gain",
                    per_component: bool = False, min_period: int = 8,
                    max_period: int = 256, report: dict | None = None
                    ) -> dict[str, tuple[int, int]]:
    """Remove the tile grid from every map stack of an NMF file; write the same layout.

    Parameters
    ----------
    in_path, out_path : path-like
        NMF file (``results/nmf/{modality}.h5``) and its corrected twin
        (``results/nmf/{modality}.degrid.h5``).
    tile : int, (ty, tx) or None
        Tile size in pixels; ``None`` detects it per file with :func:`detect_tile_period` on the
        reconstructed total ion image.
    method, per_component
        See :func:`remove_grid` (with ``per_component=False`` one gain per file is estimated from
        the maps weighted by the spectra's row sums).
    min_period, max_period : int
        Detection range when ``tile`` is None.
    report : dict, optional
        Filled with, per file id: ``tile``, ``method``, ``stage``, ``energy_before``,
        ``energy_after`` (:func:`grid_energy` of the total image), the total images ``before``
        / ``after`` (ny, nx) and ``pixel_size_um``.

    Returns
    -------
    dict file_id -> (ty, tx)
        Tile used for each file.

    Raises
    ------
    InputError
        A configured tile that does not divide an image; no periodicity found when detecting.
    """
    nmf = read_nmf(in_path)
    weights = nmf["spectra"].astype(np.float64).sum(axis=1)
    maps, tiles = {}, {}
    for fid, stack in nmf["maps"].items():
        where = f"{in_path}: /maps/{fid}"
        if tile is None:
            try:
                t = detect_tile_period(weighted_total(stack, weights), min_period=min_period,
                                       max_period=max_period)
            except InputError as err:
                raise InputError(f"{where}: {err}") from err
        else:
            t = _tile_pair(tile)
            check_tile_divides(stack.shape, t, where)
        _check_fits(stack.shape, t, where)
        total_before = weighted_total(stack, weights)
        maps[fid] = remove_grid(stack, t, method, per_component=per_component,
                                component_weights=weights)
        total_after = weighted_total(maps[fid], weights)
        before, after = grid_energy(total_before, t), grid_energy(total_after, t)
        log.info("%s: tile %s, %s correction, grid energy of the total image %.4f -> %.4f",
                 where, t, method, before, after)
        tiles[fid] = t
        if report is not None:
            report[fid] = {"tile": list(t), "method": method, "stage": "after_nmf",
                           "energy_before": before, "energy_after": after,
                           "before": total_before, "after": total_after,
                           "pixel_size_um": float(nmf["map_attrs"][fid].get("pixel_size_um",
                                                                            np.nan))}
    map_attrs = {fid: dict(a, tile=tiles[fid]) for fid, a in nmf["map_attrs"].items()}
    attrs = dict(nmf["attrs"], degrid_method=method, degrid_per_component=bool(per_component),
                 degrid_source=str(in_path))
    write_nmf(out_path, spectra=nmf["spectra"], mz=nmf["mz"], errors=nmf["errors"], maps=maps,
              map_attrs=map_attrs, attrs=attrs)
    return tiles


# ----------------------------------------------------------------------------------------------
# Before NMF: the converted (sparse) spectra, row by row
# ----------------------------------------------------------------------------------------------

def _mz_block_edges(reader: ConvertedReader, mz_blocks: int) -> np.ndarray:
    """Edges (mz_blocks + 1,) splitting the file's m/z range into log-equal blocks."""
    lo, hi = (float(v) for v in reader.attrs.get("mz_range", (np.nan, np.nan)))
    if mz_blocks <= 1 or not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi):
        return np.array([-np.inf, np.inf])
    edges = np.geomspace(lo, hi, int(mz_blocks) + 1)
    edges[0], edges[-1] = -np.inf, np.inf
    return edges


def _block_images(reader: ConvertedReader, edges: np.ndarray, block_pixels: int) -> np.ndarray:
    """Summed intensity of each m/z block at each pixel, (n_blocks, ny, nx), NaN where not
    acquired (one streaming pass; nothing dense in m/z)."""
    nb = len(edges) - 1
    sums = np.zeros((reader.n_pixels, nb))
    for start, stop, indptr, mz, inten in reader.iter_blocks(block_pixels):
        rows = value_rows(indptr)
        b = np.clip(np.searchsorted(edges, mz, side="right") - 1, 0, nb - 1)
        sums[start:stop] = np.bincount(rows * nb + b, weights=inten.astype(np.float64),
                                       minlength=(stop - start) * nb).reshape(stop - start, nb)
    return np.moveaxis(reader.to_image(sums), -1, 0)


def degrid_converted(in_path, out_path, *, tile, method: str = "gain", mz_blocks: int = 1,
                     block_pixels: int = 65536, min_period: int = 8, max_period: int = 256,
                     report: dict | None = None) -> tuple[int, int]:
    """Flat-field the tile gain out of a converted file, value by value (never dense).

    The gain of each in-tile position (:func:`estimate_gain`) is estimated from the summed image
    of each of ``mz_blocks`` log-equal m/z blocks (one pass), then every stored intensity is
    divided by the gain of its pixel's in-tile position and m/z block (second pass). Zeros stay
    zeros; memory holds one row block plus ``mz_blocks`` images.

    Parameters
    ----------
    in_path, out_path : path-like
        Converted files (layout of :mod:`msifusion.store`); the output keeps the layout, with
        float32 (or the input's float64) intensities.
    tile : int, (ty, tx) or None
        Tile size in pixels (must divide the image); None detects it from the total image.
    method : {"gain"}
        ``"subtract"`` is refused here: subtracting a mean tile from every m/z would fill the
        zeros (use it after NMF, on the component maps).
    mz_blocks : int
        Number of m/z blocks with their own gain (1: one gain for all m/z).
    block_pixels : int
        Pixels read per block.
    report : dict, optional
        Filled with ``tile``, ``method``, ``stage``, ``energy_before``, ``energy_after``,
        ``before`` / ``after`` total images, ``gains`` (mz_blocks, ty, tx) and
        ``pixel_size_um``.

    Returns
    -------
    (ty, tx)
        The tile used.
    """
    if method != "gain":
        raise InputError(f"{in_path}: grid removal before NMF supports method 'gain' only "
                         f"('{method}' would fill the zeros of every m/z image); use "
                         "grid.stage: after_nmf for the published 'subtract'")
    if int(mz_blocks) < 1:
        raise InputError(f"{in_path}: mz_blocks must be >= 1, got {mz_blocks}")
    reader = ConvertedReader(in_path)
    edges = _mz_block_edges(reader, int(mz_blocks))
    images = _block_images(reader, edges, block_pixels)           # (B, ny, nx)
    total = np.where(np.isnan(images).all(axis=0), np.nan, np.nansum(images, axis=0))
    if tile is None:
        try:
            t = detect_tile_period(total, min_period=min_period, max_period=max_period)
        except InputError as err:
            raise InputError(f"{in_path}: {err}") from err
    else:
        t = _tile_pair(tile)
        check_tile_divides(total.shape, t, str(in_path))
    _check_fits(total.shape, t, str(in_path))
    ty, tx = t
    gains = np.stack([np.asarray(estimate_gain(img, t)).reshape(t) if np.nansum(img) > 0
                      else np.ones(t) for img in images])           # (B, ty, tx)
    inv = 1.0 / np.maximum(gains, MIN_GAIN)
    out_dtype = np.float64 if reader.intensity_dtype == np.float64 else np.float32
    attrs = dict(reader.attrs, degrid_method=method, degrid_tile=t, degrid_mz_blocks=int(mz_blocks),
                 degrid_source=str(in_path))
    shared = reader.mz_axis is not None
    with ConvertedWriter(out_path, n_pixels=reader.n_pixels, attrs=attrs,
                         intensity_dtype=out_dtype, mz_axis=reader.mz_axis) as w:
        for start, stop, indptr, mz, inten in reader.iter_blocks(block_pixels, channels=shared):
            rows = value_rows(indptr, start)
            x, y = reader.xy[rows, 0], reader.xy[rows, 1]
            mz_values = reader.mz_axis[mz] if shared else mz
            b = np.clip(np.searchsorted(edges, mz_values, side="right") - 1, 0, len(gains) - 1)
            w.append(indptr, mz, (inten * inv[b, y % ty, x % tx]).astype(out_dtype))
        w.set_pixels(reader.xy, reader.z)
    after_images = images * inv[:, np.arange(total.shape[0])[:, None] % ty,
                                np.arange(total.shape[1])[None, :] % tx]
    after = np.where(np.isnan(after_images).all(axis=0), np.nan, np.nansum(after_images, axis=0))
    before_e, after_e = grid_energy(total, t), grid_energy(after, t)
    log.info("%s: tile %s, gain correction in %d m/z block(s), grid energy of the total image "
             "%.4f -> %.4f", in_path, t, len(gains), before_e, after_e)
    if report is not None:
        report.update(tile=list(t), method=method, stage="before_nmf", mz_blocks=len(gains),
                      energy_before=before_e, energy_after=after_e, before=total, after=after,
                      gains=gains, pixel_size_um=reader.pixel_size_um)
    return t
