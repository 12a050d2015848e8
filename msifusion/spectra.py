"""m/z binning: a shared m/z axis per modality and sparse pixel x m/z matrices.

An :class:`MzAxis` is a sorted list of non-overlapping half-open m/z intervals
``[lower[j], upper[j])``, one per matrix column, with a representative ``centres[j]``.
A peak at m/z ``v`` goes to the column whose interval contains it; peaks in gaps are dropped.

Three ways to make an axis:

- :func:`build_axis`, centroid data: a log-spaced grid of bins ``ppm`` wide (relative width),
  histogrammed over all peaks of all files; occupied bins are merged into peaks when contiguous,
  centre = intensity-weighted mean m/z.
- :func:`build_axis`, continuous profile data sharing one m/z axis: one column per channel
  (interval bounds at the midpoints between channels); nothing is merged.
- :func:`reference_axis`: the centres of another modality (published choice: bin everything onto
  the FT-ICR axis); each peak goes to the nearest centre within +-ppm.

:func:`assemble_matrix` then streams a converted file block by block into a
``scipy.sparse.csr_matrix`` (n_pixels, n_mz) float32; it is never densified.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from .errors import InputError
from .store import ConvertedReader, atomic_output, value_rows

log = logging.getLogger("msifusion.spectra")

#: Default largest number of pixels read per block.
BLOCK_PIXELS = 16384
#: Blocks are shrunk so that they hold about this many values (m/z + intensity ~ 12 bytes each).
BLOCK_VALUES = 1 << 23
#: Largest ppm grid (number of bins) :func:`build_axis` histograms (about 20 bytes per bin).
MAX_GRID_BINS = 1 << 25
NORMALIZE = ("none", "tic", "rms")
TRANSFORM = ("none", "sqrt")
AXIS_KINDS = ("peaks", "bins", "channels", "reference")


@dataclass
class MzAxis:
    """Columns of a binned matrix: half-open m/z intervals with a centre each.

    Attributes
    ----------
    centres : ndarray, shape (n_mz,), float64
        Representative m/z of each column (increasing).
    lower, upper : ndarray, shape (n_mz,), float64
        Column ``j`` takes the peaks with ``lower[j] <= m/z < upper[j]``; intervals are sorted and
        do not overlap (``upper[j] <= lower[j + 1]``).
    ppm : float
        Tolerance the axis was built with (bin width for ``"peaks"``/``"bins"``, +- window for
        ``"reference"``).
    kind : str
        ``"peaks"`` (merged grid bins), ``"bins"`` (unmerged grid bins), ``"channels"``
        (continuous-mode channels) or ``"reference"`` (nearest reference centre within +-ppm).
    n_pixels : ndarray, shape (n_mz,), int64
        Number of pixels in which the column holds a positive intensity when the axis was built
        (zeros for a reference axis).
    """

    centres: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    ppm: float
    kind: str = "peaks"
    n_pixels: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        self.centres = np.asarray(self.centres, dtype=np.float64).ravel()
        self.lower = np.asarray(self.lower, dtype=np.float64).ravel()
        self.upper = np.asarray(self.upper, dtype=np.float64).ravel()
        n = len(self.centres)
        if self.n_pixels is None:
            self.n_pixels = np.zeros(n, np.int64)
        self.n_pixels = np.asarray(self.n_pixels, dtype=np.int64).ravel()
        if not (len(self.lower) == len(self.upper) == len(self.n_pixels) == n):
            raise ValueError("MzAxis: centres, lower, upper and n_pixels differ in length")
        if self.kind not in AXIS_KINDS:
            raise ValueError(f"MzAxis: kind {self.kind!r} is not one of {AXIS_KINDS}")
        if n and (np.any(self.lower >= self.upper) or np.any(self.upper[:-1] > self.lower[1:])):
            raise ValueError("MzAxis: intervals must be non-empty, sorted and non-overlapping")

    def __len__(self) -> int:
        return len(self.centres)

    def assign(self, mz: np.ndarray) -> np.ndarray:
        """Column index of each m/z value, -1 where it falls in no interval.

        Parameters
        ----------
        mz : ndarray, shape (n,)
            m/z values.

        Returns
        -------
        ndarray, shape (n,), int64
        """
        mz = np.asarray(mz, dtype=np.float64)
        col = np.searchsorted(self.lower, mz, side="right") - 1
        ok = col >= 0
        ok[ok] = mz[ok] < self.upper[col[ok]]
        col[~ok] = -1
        return col

    def save(self, target: h5py.Group | str | os.PathLike) -> None:
        """Write the axis into an open HDF5 group, or atomically into a new HDF5 file at a path."""
        if isinstance(target, h5py.Group):
            _write_axis(target, self)
            return
        with atomic_output(target) as tmp, h5py.File(tmp, "w") as f:
            _write_axis(f, self)

    @classmethod
    def load(cls, source: h5py.Group | str | os.PathLike) -> "MzAxis":
        """Read an axis written by :meth:`save` from an HDF5 group or file path."""
        if isinstance(source, h5py.Group):
            return _read_axis(source, getattr(source.file, "filename", "<group>"))
        path = Path(source)
        if not path.exists():
            raise InputError(f"{path}: m/z axis file not found")
        with h5py.File(path, "r") as f:
            return _read_axis(f, path)


def _write_axis(g: h5py.Group, axis: MzAxis) -> None:
    for name in ("centres", "lower", "upper", "n_pixels"):
        g.create_dataset(name, data=getattr(axis, name))
    g.attrs["ppm"] = float(axis.ppm)
    g.attrs["kind"] = axis.kind
    g.attrs["format"] = "msifusion-mzaxis"


def _read_axis(g: h5py.Group, where) -> MzAxis:
    missing = [k for k in ("centres", "lower", "upper") if k not in g]
    if missing:
        raise InputError(f"{where}: not an m/z axis (missing {', '.join(missing)})")
    kind = g.attrs.get("kind", "peaks")
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    n_pix = g["n_pixels"][:] if "n_pixels" in g else None
    return MzAxis(g["centres"][:], g["lower"][:], g["upper"][:], float(g.attrs.get("ppm", np.nan)),
                  kind, n_pix)


def mz_window(mz: np.ndarray, target: float, ppm: float) -> np.ndarray:
    """Boolean mask of the m/z values within ``target`` +- ``ppm`` (inclusive).

    Parameters
    ----------
    mz : ndarray, shape (n,)
        m/z values.
    target : float
        Centre of the window (m/z).
    ppm : float
        Half width in parts per million of ``target``.

    Returns
    -------
    ndarray, shape (n,), bool
    """
    mz = np.asarray(mz, dtype=np.float64)
    return np.abs(mz - float(target)) <= abs(float(target)) * _check_ppm(ppm) * 1e-6


def _check_ppm(ppm: float) -> float:
    ppm = float(ppm)
    if not np.isfinite(ppm) or ppm <= 0:
        raise InputError(f"ppm must be a positive number, got {ppm!r}")
    return ppm


# ---------------------------------------------------------------------------------------------
# Axis construction
# ---------------------------------------------------------------------------------------------

class _LogGrid:
    """Log-spaced bin edges ``e_i = m0 * exp(i * step)``, ``step = log1p(ppm * 1e-6)``.

    Bin ``i`` is ``[e_i, e_{i+1})``; :meth:`index` agrees exactly with :meth:`edges` (the bin index
    of a value is corrected against the edges evaluated by the same expression), so that intervals
    made from edges assign the same values to the same bins.
    """

    def __init__(self, m0: float, m1: float, ppm: float):
        self.m0 = float(m0)
        self.step = float(np.log1p(ppm * 1e-6))
        self.n_bins = int(self.index(np.array([float(m1)]))[0]) + 1

    def edges(self, i: np.ndarray) -> np.ndarray:
        return self.m0 * np.exp(np.asarray(i, dtype=np.float64) * self.step)

    def index(self, mz: np.ndarray) -> np.ndarray:
        b = np.floor(np.log(mz / self.m0) / self.step).astype(np.int64)
        b -= mz < self.edges(b)
        b += mz >= self.edges(b + 1)
        return b


def block_size(reader: ConvertedReader, block_pixels: int | None = None) -> int:
    """Pixels per block: ``block_pixels`` (default :data:`BLOCK_PIXELS`), shrunk so that a block
    holds about :data:`BLOCK_VALUES` values on average (long profile spectra)."""
    block_pixels = BLOCK_PIXELS if block_pixels is None else int(block_pixels)
    per_pixel = reader.nnz / max(1, reader.n_pixels)
    return max(1, min(block_pixels, int(BLOCK_VALUES // max(1.0, per_pixel))))


def _mz_range(readers: list[ConvertedReader], block_pixels: int) -> tuple[float, float]:
    """Smallest and largest m/z with a positive intensity over all files.

    Uses the ``mz_range`` attribute of a file when it has one instead of reading its spectra.
    """
    lo, hi = np.inf, -np.inf
    for r in readers:
        rng = r.attrs.get("mz_range")
        if rng is not None and len(rng) == 2 and np.all(np.isfinite(rng)) and rng[0] > 0:
            lo, hi = min(lo, float(rng[0])), max(hi, float(rng[1]))
            continue
        for _s, _e, _ip, mz, inten in r.iter_blocks(block_size(r, block_pixels)):
            mz = mz[inten > 0]
            if len(mz):
                lo, hi = min(lo, float(mz.min())), max(hi, float(mz.max()))
    return lo, hi


def _channel_axis_of(reader: ConvertedReader, block_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct m/z values of a continuous file and, per value, the pixels where it is positive."""
    values = np.zeros(0)
    counts = np.zeros(0, np.int64)
    for _s, _e, _ip, mz, inten in reader.iter_blocks(block_size(reader, block_pixels)):
        u, inv = np.unique(mz, return_inverse=True)
        c = np.bincount(inv, weights=(inten > 0), minlength=len(u)).astype(np.int64)
        values, inv2 = np.unique(np.concatenate([values, u]), return_inverse=True)
        counts = np.bincount(inv2, weights=np.concatenate([counts, c]), minlength=len(values))
        counts = counts.astype(np.int64)
    return values, counts


def _channel_intervals(channels: np.ndarray, ppm: float) -> tuple[np.ndarray, np.ndarray]:
    """Half-open intervals around each channel, bounded by the midpoints to its neighbours."""
    if len(channels) == 1:
        half = channels * ppm * 1e-6
        return channels - half, channels + half
    mid = 0.5 * (channels[1:] + channels[:-1])
    lower = np.concatenate([[channels[0] - (mid[0] - channels[0])], mid])
    upper = np.concatenate([mid, [channels[-1] + (channels[-1] - mid[-1])]])
    return lower, upper


def _is_centroid(reader: ConvertedReader) -> bool:
    return str(reader.attrs.get("spectrum_type", "unknown")) == "centroid"


def _is_continuous(reader: ConvertedReader) -> bool:
    return str(reader.attrs.get("mode", "processed")) == "continuous"


def build_axis(readers, ppm: float, *, min_pixels: int = 1, block_pixels: int | None = None,
               merge: bool | None = None) -> MzAxis:
    """Common m/z axis of one modality from all of its converted files.

    Parameters
    ----------
    readers : sequence of ConvertedReader or path-like
        Converted files of the modality.
    ppm : float
        Relative bin width of the log-spaced grid (parts per million); for continuous files it is
        the tolerance within which their channel axes must agree to be shared.
    min_pixels : int, default 1
        A bin (or channel) is occupied when it holds a positive intensity in at least this many
        pixels (summed over files).
    block_pixels : int, optional
        Largest number of pixels read per block (see :func:`block_size`).
    merge : bool, optional
        Merge contiguous occupied grid bins into peaks. Default: merge unless any file is
        ``spectrum_type == "profile"`` (merging would join whole profiles into one column).

    Returns
    -------
    MzAxis
        ``kind="channels"`` when every file is continuous, not centroided, and the files share one
        channel axis (equal within ``ppm``); otherwise ``"peaks"`` (merged) or ``"bins"``.

    Raises
    ------
    InputError
        No files, no positive intensity, or a grid too fine for the m/z range.
    """
    ppm = _check_ppm(ppm)
    readers = [r if isinstance(r, ConvertedReader) else ConvertedReader(r) for r in readers]
    if not readers:
        raise InputError("build_axis: no converted files given")
    min_pixels = max(1, int(min_pixels))

    if all(_is_continuous(r) and not _is_centroid(r) for r in readers):
        axis = _try_channel_axis(readers, ppm, min_pixels, block_pixels)
        if axis is not None:
            return axis
        log.warning("continuous files do not share one channel axis within %g ppm; "
                    "using unmerged %g ppm bins", ppm, ppm)
        merge = False if merge is None else merge
    if merge is None:
        merge = not any(str(r.attrs.get("spectrum_type")) == "profile" for r in readers)
    return _grid_axis(readers, ppm, min_pixels, block_pixels, merge)


def _try_channel_axis(readers, ppm, min_pixels, block_pixels) -> MzAxis | None:
    channels, counts = None, None
    for r in readers:
        values, c = _channel_axis_of(r, block_pixels)
        if channels is None:
            channels, counts = values, c
            continue
        if (len(values) != len(channels)
                or np.any(np.abs(values - channels) > channels * ppm * 1e-6)):
            return None
        counts = counts + c
    if channels is None or not len(channels):
        raise InputError(f"{readers[0].path}: no spectra")
    lower, upper = _channel_intervals(channels, ppm)
    keep = counts >= min_pixels
    if not keep.any():
        raise InputError(f"{', '.join(str(r.path) for r in readers)}: no channel is positive in "
                         f">= {min_pixels} pixels")
    log.info("channel axis: %d of %d channels kept (min_pixels=%d)", keep.sum(), len(channels),
             min_pixels)
    return MzAxis(channels[keep], lower[keep], upper[keep], ppm, "channels", counts[keep])


def _grid_axis(readers, ppm, min_pixels, block_pixels, merge) -> MzAxis:
    lo, hi = _mz_range(readers, block_pixels)
    if not np.isfinite(lo) or lo <= 0:
        raise InputError(f"{', '.join(str(r.path) for r in readers)}: no positive m/z with a "
                         "positive intensity")
    grid = _LogGrid(lo, hi, ppm)
    if grid.n_bins > MAX_GRID_BINS:
        raise InputError(f"m/z range {lo:.4f}-{hi:.4f} at {ppm} ppm needs {grid.n_bins} bins "
                         f"(limit {MAX_GRID_BINS}); use a larger ppm")
    n_pix = np.zeros(grid.n_bins, np.int64)
    i_sum = np.zeros(grid.n_bins)
    imz_sum = np.zeros(grid.n_bins)
    for r in readers:
        for start, stop, indptr, mz, inten in r.iter_blocks(block_size(r, block_pixels)):
            rows = value_rows(indptr)
            keep = (inten > 0) & (mz >= grid.m0)
            rows, mz, inten = rows[keep], mz[keep], inten[keep].astype(np.float64)
            b = np.minimum(grid.index(mz), grid.n_bins - 1)
            # m/z are sorted within each pixel: a new (pixel, bin) pair starts where either changes
            first = np.ones(len(b), bool)
            first[1:] = (b[1:] != b[:-1]) | (rows[1:] != rows[:-1])
            n_pix += np.bincount(b[first], minlength=grid.n_bins)
            i_sum += np.bincount(b, weights=inten, minlength=grid.n_bins)
            imz_sum += np.bincount(b, weights=inten * mz, minlength=grid.n_bins)
            log.debug("%s: histogrammed pixels %d-%d", r.path, start, stop)
    occupied = n_pix >= min_pixels
    if not occupied.any():
        raise InputError(f"no {ppm} ppm bin is positive in >= {min_pixels} pixels")
    idx = np.flatnonzero(occupied)
    if merge:
        # runs of consecutive occupied bins -> one peak each
        starts = np.concatenate([[0], np.flatnonzero(np.diff(idx) > 1) + 1])
        first_bin = idx[starts]
        last_bin = idx[np.concatenate([starts[1:] - 1, [len(idx) - 1]])]
        run_id = np.repeat(np.arange(len(starts)), np.diff(np.concatenate([starts, [len(idx)]])))
        tot_i = np.bincount(run_id, weights=i_sum[idx])
        tot_imz = np.bincount(run_id, weights=imz_sum[idx])
        # pixel count of a peak: the largest of its bins (a lower bound of the true count)
        counts = np.zeros(len(starts), np.int64)
        np.maximum.at(counts, run_id, n_pix[idx])
    else:
        first_bin = last_bin = idx
        tot_i, tot_imz, counts = i_sum[idx], imz_sum[idx], n_pix[idx]
    lower, upper = grid.edges(first_bin), grid.edges(last_bin + 1)
    centres = tot_imz / tot_i
    kind = "peaks" if merge else "bins"
    log.info("%s axis: %d columns from %d occupied %g ppm bins over m/z %.4f-%.4f", kind,
             len(centres), len(idx), ppm, lo, hi)
    return MzAxis(centres, lower, upper, ppm, kind, counts)


def reference_axis(ref_centres: np.ndarray, ppm: float) -> MzAxis:
    """Axis that assigns each peak to the nearest reference centre within +-``ppm``.

    Parameters
    ----------
    ref_centres : ndarray, shape (n_mz,)
        Strictly increasing m/z centres (e.g. ``/mz`` of the FT-ICR NMF file).
    ppm : float
        Tolerance: a peak at ``v`` is kept when ``|v - c| < c * ppm * 1e-6`` for its nearest ``c``.

    Returns
    -------
    MzAxis
        ``kind="reference"``; peaks farther than ``ppm`` from every centre are dropped.
    """
    ppm = _check_ppm(ppm)
    c = np.asarray(ref_centres, dtype=np.float64).ravel()
    if not len(c) or not np.all(np.isfinite(c)) or np.any(c <= 0) or np.any(np.diff(c) <= 0):
        raise InputError("reference_axis: reference m/z centres must be positive, finite and "
                         "strictly increasing")
    half = c * ppm * 1e-6
    lower, upper = c - half, c + half
    mid = 0.5 * (c[1:] + c[:-1])
    lower[1:] = np.maximum(lower[1:], mid)
    upper[:-1] = np.minimum(upper[:-1], mid)
    return MzAxis(c, lower, upper, ppm, "reference")


# ---------------------------------------------------------------------------------------------
# Matrix assembly
# ---------------------------------------------------------------------------------------------

def _block_matrix(indptr, mz, inten, axis: MzAxis) -> sp.csr_matrix:
    """One block of spectra binned onto ``axis``: CSR (rows, n_mz) float64, duplicates summed."""
    n_rows = len(indptr) - 1
    rows = value_rows(indptr)
    cols = axis.assign(mz)
    keep = (cols >= 0) & (inten != 0)
    m = sp.coo_matrix((inten[keep].astype(np.float64), (rows[keep], cols[keep])),
                      shape=(n_rows, len(axis))).tocsr()
    m.sum_duplicates()
    return m


def normalize_rows(m: sp.csr_matrix, normalize: str) -> sp.csr_matrix:
    """Scale each row in place: ``"tic"`` to unit sum, ``"rms"`` to unit root-mean-square.

    The RMS is taken over all ``n_mz`` columns (``sqrt(sum(row**2) / n_mz)``); all-zero rows stay
    zero.

    Parameters
    ----------
    m : csr_matrix, shape (n_pixels, n_mz)
    normalize : {"none", "tic", "rms"}
    """
    if normalize == "none":
        return m
    if normalize == "tic":
        scale = np.asarray(m.sum(axis=1)).ravel()
    elif normalize == "rms":
        scale = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel() / max(1, m.shape[1]))
    else:
        raise InputError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    inv = np.divide(1.0, scale, out=np.zeros_like(scale, dtype=np.float64), where=scale > 0)
    m.data *= np.repeat(inv, np.diff(m.indptr))
    return m


def iter_matrix_blocks(reader, axis: MzAxis, *, normalize: str = "none",
                       transform: str = "none", block_pixels: int | None = None, stats=None):
    """Bin the spectra of one converted file onto ``axis`` block by block.

    Parameters are those of :func:`assemble_matrix`; ``stats`` (a dict, optional) receives the
    summed intensity read (``"total"``) and kept on the axis (``"kept"``).

    Yields
    ------
    start, stop : int
        Pixels ``start:stop`` of the file.
    block : scipy.sparse.csr_matrix, shape (stop - start, n_mz), float32
    """
    if normalize not in NORMALIZE:
        raise InputError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
    if transform not in TRANSFORM:
        raise InputError(f"transform must be one of {TRANSFORM}, got {transform!r}")
    reader = reader if isinstance(reader, ConvertedReader) else ConvertedReader(reader)
    stats = {} if stats is None else stats
    stats.setdefault("kept", 0.0)
    stats.setdefault("total", 0.0)
    for start, stop, indptr, mz, inten in reader.iter_blocks(block_size(reader, block_pixels)):
        if inten.size and inten.min() < 0:
            i = int(np.searchsorted(indptr, np.flatnonzero(inten < 0)[0], side="right")) - 1
            raise InputError(f"{reader.path}: spectrum {start + i} has negative intensities")
        m = _block_matrix(indptr, mz, inten, axis)
        stats["kept"] += float(m.data.sum())
        stats["total"] += float(inten.sum(dtype=np.float64))
        m = normalize_rows(m, normalize)
        if transform == "sqrt":
            np.sqrt(m.data, out=m.data)
        log.debug("%s: binned pixels %d-%d", reader.path, start, stop)
        yield start, stop, m.astype(np.float32)


def assemble_matrix(reader, axis: MzAxis, *, normalize: str = "none", transform: str = "none",
                    block_pixels: int | None = None) -> sp.csr_matrix:
    """Bin all spectra of one converted file onto ``axis``.

    Parameters
    ----------
    reader : ConvertedReader or path-like
        Converted file.
    axis : MzAxis
        Columns.
    normalize : {"none", "tic", "rms"}
        Per-pixel scaling computed over the binned spectrum (the peaks that fall on the axis):
        ``"tic"`` divides by the row sum, ``"rms"`` by ``sqrt(sum(row**2) / n_mz)``.
    transform : {"none", "sqrt"}
        Applied after normalisation (``"sqrt"`` takes the square root of every value).
    block_pixels : int, optional
        Largest number of pixels read per block (see :func:`block_size`).

    Returns
    -------
    scipy.sparse.csr_matrix, shape (n_pixels, n_mz), float32
        Row ``i`` is the pixel ``reader.xy[i]``; peaks falling in one column are summed; peaks
        outside every column are dropped.
    """
    reader = reader if isinstance(reader, ConvertedReader) else ConvertedReader(reader)
    stats: dict = {}
    parts = [m for _s, _e, m in iter_matrix_blocks(reader, axis, normalize=normalize,
                                                   transform=transform, block_pixels=block_pixels,
                                                   stats=stats)]
    if not parts:
        return sp.csr_matrix((0, len(axis)), dtype=np.float32)
    out = sp.vstack(parts, format="csr", dtype=np.float32)
    kept, total = stats["kept"], stats["total"]
    log.info("%s: %d pixels x %d m/z, %d values, %.1f%% of the intensity on the axis",
             reader.path, out.shape[0], out.shape[1], out.nnz, 100 * kept / total if total else 0)
    return out


def measured_ion_images(reader: ConvertedReader, targets: Sequence[float], ppm: float,
                        block_pixels: int = 65536) -> np.ndarray:
    """Measured ion images: raw intensities within ``target +- ppm`` summed per pixel.

    One pass over the converted spectra, in blocks of ``block_pixels`` spectra (memory: the
    images plus one block).

    Parameters
    ----------
    reader : ConvertedReader
    targets : sequence of float
        Target m/z (T,).
    ppm : float
        Half-width of each window, ppm.

    Returns
    -------
    ndarray, shape (T, ny, nx), float64
        On the acquisition grid; NaN where no spectrum was acquired.
    """
    targets = [float(t) for t in targets]
    values = np.zeros((len(targets), reader.n_pixels))
    for start, stop, indptr, mz, inten in reader.iter_blocks(block_pixels):
        rows = value_rows(indptr)
        for i, t in enumerate(targets):
            keep = mz_window(mz, t, ppm)
            values[i, start:stop] = np.bincount(rows[keep], weights=inten[keep], minlength=stop - start)
    return np.moveaxis(reader.to_image(values.T).astype(np.float64), -1, 0)
