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
import warnings

import numpy as np

from .errors import InputError
from .store import ConvertedReader, ConvertedWriter, read_nmf, value_rows, write_nmf

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

#: Most lines (groups of adjacent rows) an image is reduced to across the analysed direction.
DETECT_MAX_LINES = 128
#: Growth ratio of the moving-median windows shared by long candidate periods.
DETECT_WINDOW_RATIO = 1.1
#: Smallest tile-pattern contrast (rms of the log intensity, ~ relative gain) that counts: a
#: floor added to every variance of :func:`_period_score`, so that the tiny, locally regular
#: residuals of a noise-free smooth image do not pass for a pattern.
DETECT_MIN_CONTRAST = 0.01
#: Fraction of ``min_score`` enough along one axis when its best candidate is the period found
#: along the other axis (scan tiles are square; a gain may vary less along one axis).
DETECT_SQUARE_FRACTION = 0.5


def _line_bins(image: np.ndarray, max_lines: int = DETECT_MAX_LINES) -> np.ndarray:
    """Means of groups of adjacent rows, ``(ny, n) -> (ceil(ny / b), n)``, ``b`` the smallest
    group size leaving at most ``max_lines`` rows; NaN ignored (NaN where a group has none).
    Averaging along axis 0 keeps every structure along axis 1 and lowers the noise."""
    ny, n = image.shape
    b = -(-ny // max_lines)
    if b == 1:
        return image
    pad = np.full((-(-ny // b) * b, n), np.nan)
    pad[:ny] = image
    groups = pad.reshape(-1, b, n)
    ok = np.isfinite(groups)
    count = ok.sum(axis=1)
    total = np.where(ok, groups, 0.0).sum(axis=1)
    with np.errstate(all="ignore"):
        return np.where(count > 0, total / count, np.nan)


def _log_intensity(image: np.ndarray) -> np.ndarray:
    """``log(image)``, values below 1e-3 x the median positive value raised to it; NaN stays NaN
    (all NaN without a positive value). A multiplicative gain becomes an additive pattern of the
    same size on tissue and on background."""
    finite = np.isfinite(image)
    pos = image[finite & (image > 0)]
    if not pos.size:
        return np.full(image.shape, np.nan)
    floor = 1e-3 * float(np.median(pos))
    with np.errstate(all="ignore"):
        return np.where(finite, np.log(np.maximum(image, floor)), np.nan)


def _fill_rows(a: np.ndarray) -> np.ndarray:
    """``a (rows, n)`` with NaN replaced by linear interpolation along each row (0 in an all-NaN
    row)."""
    ok = np.isfinite(a)
    if ok.all():
        return a
    out = np.where(ok, a, 0.0)
    i = np.arange(a.shape[1])
    for r in np.flatnonzero(ok.any(axis=1) & ~ok.all(axis=1)):
        out[r] = np.interp(i, i[ok[r]], a[r, ok[r]])
    return out


def _median_window(P: int) -> int:
    """Moving-median window for period ``P``: the largest window <= ``P`` of the sequence 2, 3,
    ... in which each window is the larger of the previous one + 1 and the previous one x
    :data:`DETECT_WINDOW_RATIO` (every period up to 16 px gets its own window; longer ones share
    windows, which bounds the number of median filters)."""
    w = 2
    while True:
        nxt = max(w + 1, int(round(w * DETECT_WINDOW_RATIO)))
        if nxt > P:
            return w
        w = nxt


def _moving_median(lines: np.ndarray, w: int) -> np.ndarray:
    """Median of each window of ``w`` samples along axis 1, ``(rows, n) -> (rows, n - w + 1)``
    (window starting at sample 0, 1, ...). Windows longer than 63 samples are taken on the means
    of blocks of ``w // 32`` samples (about 32 to 63 blocks a window), which bounds the cost."""
    from scipy.ndimage import median_filter

    rows, n = lines.shape
    d = max(1, w // 32)
    if d == 1:
        return median_filter(lines, size=(1, w), mode="nearest")[:, w // 2:w // 2 + n - w + 1]
    nblk = n // d
    blocks = lines[:, :nblk * d].reshape(rows, nblk, d).mean(axis=2)
    wd = int(round(w / d))
    med = median_filter(blocks, size=(1, wd), mode="nearest")
    centre = (np.arange(n - w + 1) + w / 2) / d - 0.5            # window centre, in blocks
    return med[:, np.clip(np.round(centre).astype(int), wd // 2, nblk - wd + wd // 2)]


def _detrend_lines(lines: np.ndarray, window: int, stat: str) -> np.ndarray:
    """``lines (rows, n)`` minus their moving mean or median over ``window`` samples (axis 1).

    Windows are centred (an even window is the average of the two windows centred half a sample
    either side, so that a smooth slope leaves no residual) and shifted inside the line at its
    ends. Over exactly one period, the mean or median of a periodic pattern is a constant: the
    residual keeps the pattern, and it stays periodic for any window. The mean removes smooth
    trends exactly but smears a tissue edge over a window; the median follows edges but
    also part of a steep smooth trend. NaN stays NaN (interpolated for the filter only).
    """
    rows, n = lines.shape
    w = min(int(window), n)
    filled = _fill_rows(lines)
    if stat == "median":
        by_start = _moving_median(filled, w)
    else:
        c = np.concatenate([np.zeros((rows, 1)), np.cumsum(filled, axis=1)], axis=1)
        by_start = (c[:, w:] - c[:, :-w]) / w             # window starting at 0 .. n - w
    x = np.arange(n)
    level = by_start[:, np.clip(x - w // 2, 0, n - w)]
    if w % 2 == 0:
        level = 0.5 * (level + by_start[:, np.clip(x - w // 2 + 1, 0, n - w)])
    return lines - level


def _band_profiles(residuals: np.ndarray, n_bands: int) -> np.ndarray:
    """Medians along axis 0 of ``n_bands`` equal bands of rows, ``(n_bands, n)``, NaN ignored.

    The median across rows keeps what all rows share (the tile gain, a straight seam) and drops
    structures crossing the band obliquely (tissue edges). All-NaN positions are interpolated
    from their neighbours (0 when a band is all NaN).
    """
    out = []
    for band in np.array_split(residuals, n_bands, axis=0):
        if np.isfinite(band).all():
            p = np.median(band, axis=0)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)        # all-NaN columns
                p = np.nanmedian(band, axis=0)
        out.append(_fill_rows(p[None])[0])
    return np.array(out)


def _period_score(profiles: np.ndarray, P: int, floor: float = DETECT_MIN_CONTRAST) -> float:
    """Score of period ``P`` from band profiles ``(n_bands, n)``; ``-inf`` without 2 periods.

    Each profile is cut into its ``m = n // P`` whole periods (segments, each minus its median),
    tiles being anchored at pixel 0. Every segment is predicted by the median, position by
    position, of the OTHER periods of all bands (of all periods when there are more than 8),
    so that neither a segment's own content nor a structure that all bands hold at the same
    place counts. Per position in the period, the typical (median over segments) squared
    segment and squared prediction error are taken (plus ``floor ** 2``): a structure that a
    few segments hold (a tissue edge, a bright spot) barely counts, a narrow seam that all hold
    does. The score is ``1 - sum(error) / sum(segment)``: near 1 for a tile pattern standing out
    from the noise, about 0 or below without one.
    """
    nb, n = profiles.shape
    m = n // P
    if m < 2:
        return -np.inf
    segs = profiles[:, :m * P].reshape(nb, m, P)
    segs = segs - np.median(segs, axis=2, keepdims=True)
    if m > 8:                  # one period barely moves the median of many: skip leave-one-out
        err = segs - np.median(segs.reshape(-1, P), axis=0)
    else:
        err = np.empty_like(segs)
        for k in range(m):
            others = np.delete(segs, k, axis=1).reshape(-1, P)
            err[:, k] = segs[:, k] - np.median(others, axis=0)
    ms_seg = np.median(segs.reshape(-1, P) ** 2, axis=0) + floor ** 2
    ms_err = np.median(err.reshape(-1, P) ** 2, axis=0) + floor ** 2
    return 1.0 - float(ms_err.sum()) / float(ms_seg.sum())


def _median_profiles(lines: np.ndarray, periods: np.ndarray, n_bands: int) -> dict:
    """Band profiles of the moving-median residuals of ``lines``, by window
    (:func:`_median_window` of each period; long periods share windows)."""
    windows = sorted({_median_window(int(P)) for P in periods})
    return {w: _band_profiles(_detrend_lines(lines, w, "median"), n_bands) for w in windows}


def _period_profiles(lines: np.ndarray, P: int, n_bands: int, medians: dict
                     ) -> tuple[float, np.ndarray]:
    """Score of period ``P`` (:func:`_period_score`), the better one over the two detrendings of
    :func:`_detrend_lines` (mean over ``P``; median over :func:`_median_window`, profiles from
    :func:`_median_profiles`), and the band profiles that gave it."""
    means = _band_profiles(_detrend_lines(lines, P, "mean"), n_bands)
    scored = [(_period_score(p, P), p) for p in (means, medians[_median_window(P)])]
    return max(scored, key=lambda sp: sp[0])


def _seam_score(profiles: np.ndarray, P: int) -> float:
    """Score of period ``P`` on the first difference of band profiles ``(n_bands, n)``, without
    floor: sharp in P where the pattern has seams (steps, kinks), to place it to the pixel."""
    return _period_score(np.diff(profiles, axis=1, prepend=profiles[:, :1]), P, floor=0.0)


def _period_scores(lines: np.ndarray, periods: np.ndarray, n_bands: int
                   ) -> tuple[np.ndarray, list]:
    """Scores (:func:`_period_profiles`) of the candidate ``periods`` along axis 1 of the log
    ``lines (rows, n)`` and the band profiles that gave them (all -inf, None without a finite
    value)."""
    if not np.isfinite(lines).any():
        return np.full(len(periods), -np.inf), [None] * len(periods)
    medians = _median_profiles(lines, periods, n_bands)
    scored = [_period_profiles(lines, int(P), n_bands, medians) for P in periods]
    return np.array([sc for sc, _ in scored]), [p for _, p in scored]


def _pick_period(periods: np.ndarray, scores: np.ndarray, profiles: list, n: int,
                 min_score: float) -> int:
    """The tile period along a line of ``n`` pixels from the scores of the candidate
    ``periods`` and their band profiles (:func:`_period_scores`).

    1. Peaks: local maxima within 85 % of the best score, less those with a higher peak within
       10 % (2 px at least) of them; the smallest one is taken (multiples of the period score
       about as well as the period itself).
    2. Within 10 % of it, the best period by :func:`_seam_score`, when that reaches
       ``min_score`` (sharp seams place a smooth pattern to the pixel).
    3. When it does not divide ``n`` but a neighbour within 10 % does and scores within 85 %
       of it, the best such neighbour (a scan mosaic is whole tiles).
    """
    best = float(scores.max())
    left = np.concatenate([[-np.inf], scores[:-1]])
    right = np.concatenate([scores[1:], [-np.inf]])
    peaks = np.flatnonzero((scores >= left) & (scores >= right) & (scores >= 0.85 * best))
    reach = np.maximum(2, periods // 10)
    peaks = [i for i in peaks if not np.any((scores[peaks] > scores[i])
                                            & (np.abs(periods[peaks] - periods[i]) <= reach[i]))]
    i = peaks[0]
    near = np.flatnonzero(np.abs(periods - periods[i]) <= reach[i])
    seam = np.array([_seam_score(profiles[j], int(periods[j])) for j in near])
    if seam.max() >= min_score:
        i = near[int(np.argmax(seam))]
    if n % periods[i]:
        near = np.flatnonzero((np.abs(periods - periods[i]) <= reach[i]) & (n % periods == 0)
                              & (scores >= 0.85 * scores[i]))
        if near.size:
            i = near[int(np.argmax(scores[near]))]
    return int(periods[i])


def _axis_scores(image: np.ndarray, min_period: int, max_period: int, min_repeats: int,
                 n_bands: int, name: str) -> tuple[np.ndarray, np.ndarray, list]:
    """Candidate periods along axis 1 of ``image``, their scores and band profiles
    (:func:`_period_scores`); see :func:`detect_tile_period`."""
    n = image.shape[1]
    hi = min(max_period, n // min_repeats)
    if hi < min_period:
        raise InputError(f"detect_tile_period: the image is {n} px along {name}, too short for "
                         f"{min_repeats} periods of >= {min_period} px; set grid.tile_px to the "
                         "scan's tile size")
    periods = np.arange(min_period, hi + 1)
    lines = _log_intensity(_line_bins(image))
    scores, profiles = _period_scores(lines, periods, max(1, min(n_bands, lines.shape[0] // 4)))
    if not np.isfinite(scores).any():
        raise InputError(f"detect_tile_period: no tile periodicity along {name} between "
                         f"{min_period} and {hi} px: the image has no positive value; set "
                         "grid.tile_px to the scan's tile size")
    return periods, scores, profiles


def _square_fallback(periods: np.ndarray, scores: np.ndarray, other: int | None,
                     min_score: float) -> int | None:
    """``other`` (the period found along the other axis) when it is this axis's best candidate
    too, within 85 % of its best score and scoring at least ``DETECT_SQUARE_FRACTION *
    min_score`` (a weaker pattern along one axis of a square tile); else None."""
    if other is None or other not in periods:
        return None
    s = float(scores[periods == other][0])
    ok = s >= DETECT_SQUARE_FRACTION * min_score and s >= 0.85 * float(scores.max())
    return other if ok else None


def _axis_periods(axes: dict, min_score: float) -> dict:
    """Tile period of each axis ``{"y" | "x": (n, periods, scores, profiles)}`` (line length and
    :func:`_axis_scores`): :func:`_pick_period` where the best score reaches ``min_score``, else
    the other axis's period when :func:`_square_fallback` accepts it; axes without one are left
    out."""
    found = {name: _pick_period(periods, scores, profiles, n, min_score)
             for name, (n, periods, scores, profiles) in axes.items()
             if scores.max() >= min_score}
    for name, (_, periods, scores, _) in axes.items():
        other = found.get("x" if name == "y" else "y")
        if name not in found and _square_fallback(periods, scores, other, min_score):
            found[name] = other
    return found


def detect_tile_period(image: np.ndarray, *, min_period: int = 8, max_period: int = 256,
                       min_score: float = 0.4, min_repeats: int = 3,
                       n_bands: int = 8) -> tuple[int, int]:
    """Tile size ``(ty, tx)`` in pixels from the periodicity of the image along y and x.

    Along x (likewise y), tiles being anchored at pixel 0: the log image (a multiplicative gain
    becomes additive) is reduced to at most :data:`DETECT_MAX_LINES` rows; for each candidate
    period P, every row minus its moving mean over P, or its moving median over about P (the
    better of the two scores), removes the image's trend and keeps a P-periodic pattern
    whole; ``n_bands`` bands of rows are reduced to their median profiles (keeps what all rows
    share, such as the tile gain, drops oblique tissue edges); the profiles are cut into their
    whole periods and each period is predicted by the median of the other periods of all bands;
    the score is the fraction of the typical variance that this prediction explains, position
    by position (:func:`_period_score`), so that a structure held by a few periods (a tissue
    edge, a bright spot) barely counts. Three whole periods per axis are enough. The tile size
    is the smallest peak of the score within 85 % of the best one, placed to the pixel by the
    seams when they are sharp, and moved to a neighbour within 10 % that divides the image size
    when that one scores about as well (:func:`_pick_period`; a scan mosaic is whole tiles).
    An axis whose best score misses ``min_score`` takes the other axis's period when that is
    its best candidate too and scores at least half of ``min_score`` (:func:`_square_fallback`;
    scan tiles are square, a gain may vary less along one axis). The grid must stand out
    against the image content: a faint, smooth vignetting on a strongly textured image is not
    detected (give the tile size instead).

    Parameters
    ----------
    image : ndarray, shape (ny, nx) or (k, ny, nx)
        Non-negative image (a stack is summed over components first); NaN = not acquired.
    min_period, max_period : int
        Range of candidate periods (pixels).
    min_score : float
        Smallest score (fraction of variance explained by the repeated pattern, <= 1; about 0
        or below without a grid) accepted as a grid.
    min_repeats : int
        Periods longer than the image size divided by this are not considered.
    n_bands : int
        Number of bands the image is cut into across the direction analysed (>= 4 lines each).

    Returns
    -------
    (ty, tx) : tuple of int

    Raises
    ------
    InputError
        No periodicity in the range along y or x; the message names the best candidate period
        and its score, and asks for ``grid.tile_px``.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = weighted_total(img)
    if img.ndim != 2:
        raise InputError(f"detect_tile_period: expected an image (ny, nx), got shape {img.shape}")
    if not np.isfinite(img).any():
        raise InputError("detect_tile_period: the image has no finite pixel")
    min_score = float(min_score)
    args = (int(min_period), int(max_period), int(min_repeats), int(n_bands))
    axes = {name: (a.shape[1], *_axis_scores(a, *args, name))
            for name, a in (("y", img.T), ("x", img))}
    found = _axis_periods(axes, min_score)
    for name, (_, periods, scores, _) in axes.items():
        if name not in found:
            raise InputError(f"detect_tile_period: no tile periodicity along {name} between "
                             f"{periods[0]} and {periods[-1]} px: best candidate "
                             f"{int(periods[np.argmax(scores)])} px (score {scores.max():.2f} < "
                             f"{min_score:.2f}); set grid.tile_px to the scan's tile size")
        log.info("tile period along %s: %d px (score %.2f; best %.2f at %d px)", name,
                 found[name], float(scores[periods == found[name]][0]), float(scores.max()),
                 int(periods[np.argmax(scores)]))
    return found["y"], found["x"]


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
