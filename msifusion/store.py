"""HDF5 storage shared by all stages: atomic writes and the converted-spectra layout.

The converted layout (one file per imzML file) is a CSR matrix over the acquired pixels with
per-pixel m/z values; see ``docs/design.md``. It is read in row blocks so that no stage needs
the whole file in memory.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from .errors import InputError

FORMAT = "msifusion-converted"
FORMAT_VERSION = 2
#: Format attribute of an NMF file (:func:`write_nmf`).
NMF_FORMAT = "msifusion-nmf"
#: Number of values per HDF5 chunk of the m/z and intensity arrays.
CHUNK_VALUES = 1 << 18
#: Suffix of the temporary files of :func:`atomic_output` (``.{name}.XXXXXXXX.part``).
PART_SUFFIX = ".part"
_PART_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}" + re.escape(PART_SUFFIX) + "$")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    Parameters
    ----------
    path : path-like
        Final output path. Its parent folder is created when missing.

    Yields
    ------
    pathlib.Path
        Temporary path in the same folder (same file system, so the rename is atomic).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PART_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def remove_stale_parts(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that :func:`atomic_output` left behind in ``folder`` (recursive).

    A writer killed by SIGKILL or a node failure never reaches its clean-up; call this only while
    no writer runs (Snakemake's ``onstart``, under its working-directory lock). Returns the files
    removed.
    """
    removed = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if _PART_NAME.match(name):
                path = Path(root) / name
                path.unlink()
                removed.append(path)
    return removed


def write_converted(
    path: str | os.PathLike,
    *,
    indptr: np.ndarray,
    mz: np.ndarray,
    intensity: np.ndarray,
    xy: np.ndarray,
    z: np.ndarray | None = None,
    attrs: dict | None = None,
) -> None:
    """Write an in-memory CSR spectra set in the converted layout with per-pixel m/z (atomically).

    Parameters
    ----------
    path : path-like
        Output HDF5 file.
    indptr : ndarray, shape (n_pixels + 1,)
        Row pointers into ``mz`` / ``intensity``.
    mz : ndarray, shape (nnz,)
        m/z values, increasing within each pixel.
    intensity : ndarray, shape (nnz,)
        Intensities (counts or arbitrary units), non-negative; stored in their own dtype when it
        is a 32/64-bit float or integer, else as float32.
    xy : ndarray, shape (n_pixels, 2)
        0-based (x, y) pixel coordinates.
    z : ndarray, shape (n_pixels,), optional
        0-based z coordinates (zeros when omitted).
    attrs : dict, optional
        Metadata (``pixel_size_um``, ``source``, ``uuid``, ``mode``, ``spectrum_type``, ...).
    """
    xy = np.asarray(xy, dtype=np.int32).reshape(-1, 2)
    n = len(xy)
    intensity = np.asarray(intensity)
    dtype = intensity.dtype if intensity.dtype in INTENSITY_DTYPES else np.float32
    with ConvertedWriter(path, n_pixels=n, attrs=attrs, intensity_dtype=dtype) as w:
        w.append(np.asarray(indptr), np.asarray(mz), np.asarray(intensity))
        w.set_pixels(xy, z)


#: Intensity dtypes stored as they are (those of imzML); anything else is stored as float32.
INTENSITY_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.float64, np.int32, np.int64))


class ConvertedWriter:
    """Streaming writer of the converted layout: append blocks of spectra, then set pixel coordinates.

    Use as a context manager; the file appears at ``path`` only when the block exits without error.

    Parameters
    ----------
    path : path-like
    n_pixels : int
        Number of spectra that will be appended.
    attrs : dict, optional
        File attributes (see ``docs/design.md``).
    intensity_dtype : dtype
        Stored intensity type (the source's, so that values are kept exactly).
    mz_axis : ndarray, shape (n_mz,), optional
        Shared m/z axis of a continuous file. Spectra are then appended with channel indices
        (int32) into it instead of m/z values.
    """

    def __init__(self, path: str | os.PathLike, *, n_pixels: int, attrs: dict | None = None,
                 intensity_dtype=np.float32, mz_axis: np.ndarray | None = None):
        self.path = Path(path)
        self.n_pixels = int(n_pixels)
        self.attrs = dict(attrs or {})
        self.intensity_dtype = np.dtype(intensity_dtype)
        self.mz_axis = None if mz_axis is None else np.asarray(mz_axis, np.float64)
        self._ctx = atomic_output(self.path)
        self._f: h5py.File | None = None
        self._rows = 0
        self._nnz = 0

    def __enter__(self) -> "ConvertedWriter":
        tmp = self._ctx.__enter__()
        try:
            f = h5py.File(tmp, "w")
        except BaseException as err:
            self._ctx.__exit__(type(err), err, err.__traceback__)
            raise
        self._f = f
        g = f.create_group("spectra")
        g.create_dataset("indptr", shape=(self.n_pixels + 1,), dtype=np.int64)
        g["indptr"][0] = 0
        values = ("mz", np.float64) if self.mz_axis is None else ("mz_index", np.int32)
        if self.mz_axis is not None:
            g.create_dataset("mz_axis", data=self.mz_axis)
        for name, dtype in (values, ("intensity", self.intensity_dtype)):
            g.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype,
                             chunks=(CHUNK_VALUES,), compression="gzip", compression_opts=1,
                             shuffle=True)
        return self

    def append(self, indptr: np.ndarray, mz: np.ndarray, intensity: np.ndarray) -> None:
        """Append a block of spectra given as local CSR arrays (``indptr[0] == 0``).

        ``mz`` holds m/z values, or channel indices into ``mz_axis`` for a continuous file.
        """
        indptr = np.asarray(indptr, dtype=np.int64)
        rows = len(indptr) - 1
        if self._rows + rows > self.n_pixels:
            raise ValueError(f"{self.path}: more spectra appended than the {self.n_pixels} declared")
        g = self._f["spectra"]
        nnz = int(indptr[-1] - indptr[0])
        names = ("mz" if self.mz_axis is None else "mz_index", "intensity")
        for name, values in zip(names, (mz, intensity)):
            d = g[name]
            d.resize((self._nnz + nnz,))
            if nnz:
                d[self._nnz:] = values[indptr[0]:indptr[-1]]
        g["indptr"][self._rows + 1:self._rows + rows + 1] = indptr[1:] - indptr[0] + self._nnz
        self._rows += rows
        self._nnz += nnz

    def set_pixels(self, xy: np.ndarray, z: np.ndarray | None = None) -> None:
        """Store the 0-based (x, y) (and z) coordinates of all spectra, in append order."""
        xy = np.asarray(xy, dtype=np.int32).reshape(-1, 2)
        if len(xy) != self.n_pixels:
            raise ValueError(f"{self.path}: {len(xy)} coordinates for {self.n_pixels} spectra")
        z = np.zeros(len(xy), np.int32) if z is None else np.asarray(z, dtype=np.int32)
        g = self._f.require_group("pixels")
        g.create_dataset("xy", data=xy, chunks=True, compression="gzip", compression_opts=1)
        g.create_dataset("z", data=z, chunks=True, compression="gzip", compression_opts=1)
        shape = (int(xy[:, 1].max()) + 1, int(xy[:, 0].max()) + 1) if len(xy) else (0, 0)
        self.attrs.setdefault("image_shape", shape)

    def __exit__(self, exc_type, exc, tb) -> bool:
        f, self._f = self._f, None
        try:
            if exc_type is None:
                if self._rows != self.n_pixels:
                    raise ValueError(f"{self.path}: {self._rows} of {self.n_pixels} spectra written")
                if "pixels" not in f:
                    raise ValueError(f"{self.path}: pixel coordinates were never set")
                attrs = {"format": FORMAT, "format_version": FORMAT_VERSION,
                         "pixel_size_um": float("nan")} | self.attrs
                for key, value in attrs.items():
                    f.attrs[key] = "" if value is None else value
        except BaseException as err:
            f.close()
            self._ctx.__exit__(type(err), err, err.__traceback__)
            raise
        f.close()
        return bool(self._ctx.__exit__(exc_type, exc, tb))


class ConvertedReader:
    """Read a converted HDF5 file in row blocks.

    Parameters
    ----------
    path : path-like
        File written by :func:`msifusion.convert.convert_imzml` or :func:`write_converted`.

    Attributes
    ----------
    n_pixels : int
        Number of acquired pixels (rows).
    image_shape : tuple of int
        ``(ny, nx)`` of the acquisition grid.
    xy : ndarray, shape (n_pixels, 2)
        0-based pixel coordinates.
    pixel_size_um : float
        Pixel size in micrometres (NaN when the file has none).
    mz_axis : ndarray, shape (n_mz,), or None
        Shared m/z axis of a continuous file (values are then stored as channel indices).
    intensity_dtype : numpy.dtype
        Stored intensity type (the imzML's own).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: converted file not found")
        try:
            with h5py.File(self.path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise InputError(f"{self.path}: not an msifusion converted file "
                                     f"(format attribute is {f.attrs.get('format')!r})")
                self.attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
                self.indptr = f["spectra/indptr"][:]
                self.xy = f["pixels/xy"][:]
                self.z = f["pixels/z"][:]
                self.mz_axis = f["spectra/mz_axis"][:] if "spectra/mz_axis" in f else None
                self.intensity_dtype = f["spectra/intensity"].dtype
        except OSError as err:
            raise InputError(f"{self.path}: cannot be read as HDF5 ({err})") from err
        self.n_pixels = len(self.xy)
        self.nnz = int(self.indptr[-1])
        self.image_shape = tuple(int(v) for v in self.attrs["image_shape"])
        self.pixel_size_um = float(self.attrs.get("pixel_size_um", float("nan")))

    def iter_blocks(self, block_pixels: int = 65536, *, channels: bool = False):
        """Yield ``(start, stop, indptr, mz, intensity)`` for consecutive blocks of pixels.

        ``indptr`` has shape ``(stop - start + 1,)`` and starts at 0; memory per block is
        bounded by the block's number of values. ``mz`` holds m/z values (float64); with
        ``channels=True`` a file with a shared axis (:attr:`mz_axis`) yields channel indices into
        it instead. ``intensity`` keeps the stored dtype.
        """
        with h5py.File(self.path, "r") as f:
            shared = self.mz_axis is not None
            mz_d = f["spectra/mz_index" if shared else "spectra/mz"]
            int_d = f["spectra/intensity"]
            for start in range(0, self.n_pixels, max(1, int(block_pixels))):
                stop = min(start + int(block_pixels), self.n_pixels)
                a, b = int(self.indptr[start]), int(self.indptr[stop])
                mz = mz_d[a:b]
                if shared and not channels:
                    mz = self.mz_axis[mz]
                yield start, stop, self.indptr[start:stop + 1] - a, mz, int_d[a:b]

    def tic(self, block_pixels: int = 65536) -> np.ndarray:
        """Total ion count per pixel, shape (n_pixels,), float64."""
        out = np.zeros(self.n_pixels)
        for start, stop, indptr, _mz, inten in self.iter_blocks(block_pixels):
            rows = value_rows(indptr)
            out[start:stop] = np.bincount(rows, weights=inten, minlength=stop - start)
        return out

    def _check_cells(self) -> None:
        """Refuse pixels outside :attr:`image_shape` or sharing a grid cell with another."""
        ny, nx = self.image_shape
        x, y = self.xy[:, 0].astype(np.int64), self.xy[:, 1].astype(np.int64)
        outside = np.flatnonzero((x < 0) | (y < 0) | (x >= nx) | (y >= ny))
        if outside.size:
            i = int(outside[0])
            raise InputError(f"{self.path}: pixel {i} at (x={x[i]}, y={y[i]}) lies outside the "
                             f"image of {nx} x {ny} pixels")
        cells = y * nx + x
        order = np.argsort(cells, kind="stable")
        same = np.flatnonzero(np.diff(cells[order]) == 0)
        if same.size:
            i, j = sorted(int(k) for k in order[same[0]:same[0] + 2])
            raise InputError(f"{self.path}: pixels {i} and {j} lie on the same grid cell "
                             f"(x={x[i]}, y={y[i]}) ({same.size} in all); an image would keep "
                             "only one of them")

    def to_image(self, values: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """Scatter per-pixel ``values`` (n_pixels, ...) onto the acquisition grid (ny, nx, ...).

        Raises
        ------
        InputError
            The file holds several z planes, or several pixels on one grid cell: one image
            would silently keep only one of them.
        """
        planes = np.unique(self.z)
        if len(planes) > 1:
            raise InputError(f"{self.path}: {len(planes)} z planes; an image holds one plane "
                             "(write each plane as its own imzML)")
        self._check_cells()
        values = np.asarray(values)
        img = np.full(self.image_shape + values.shape[1:], fill, dtype=np.result_type(values, np.float32))
        img[self.xy[:, 1], self.xy[:, 0]] = values
        return img


def value_rows(indptr: np.ndarray, start: int = 0) -> np.ndarray:
    """Row of each stored value of a CSR block: ``start + i`` repeated ``indptr[i + 1] - indptr[i]``
    times, shape (indptr[-1] - indptr[0],), int64."""
    indptr = np.asarray(indptr)
    return np.repeat(np.arange(start, start + len(indptr) - 1), np.diff(indptr))


def plain_attr(value):
    """HDF5 attribute -> plain Python value (str, float, int or tuple)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return tuple(v.item() if hasattr(v, "item") else v for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------------------------
# NMF file (written by msifusion.nmf.run_nmf, read by grid removal and crop)
# ---------------------------------------------------------------------------------------------

def write_nmf(path, *, spectra: np.ndarray, mz: np.ndarray, errors: np.ndarray,
              maps: dict[str, np.ndarray], map_attrs: dict[str, dict] | None = None,
              attrs: dict | None = None, tissue: dict[str, np.ndarray] | None = None) -> None:
    """Write an NMF file (layout in ``docs/design.md``) atomically.

    Parameters
    ----------
    path : path-like
    spectra : ndarray, shape (k, n_mz)
    mz : ndarray, shape (n_mz,)
    errors : ndarray, shape (n_iter,)
    maps : dict file_id -> ndarray (k, ny, nx)
        Component maps on each file's acquisition grid, NaN where not acquired.
    map_attrs : dict file_id -> dict, optional
        Attributes of each ``/maps/{file_id}`` dataset (``source``, ``pixel_size_um``).
    attrs : dict, optional
        Root attributes (``modality``, ``rank``, ``backend``, ``seed``, ``normalize``, ...).
    tissue : dict file_id -> ndarray of bool (ny, nx), optional
        Tissue masks the source itself gives (an image level's tissue-versus-background mask),
        as ``/tissue/{file_id}``; the section maps use them instead of finding one.
    """
    map_attrs = map_attrs or {}
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("spectra", data=np.asarray(spectra, dtype=np.float32))
        f.create_dataset("mz", data=np.asarray(mz, dtype=np.float64))
        f.create_dataset("errors", data=np.asarray(errors, dtype=np.float64))
        g = f.create_group("maps")
        for fid, stack in maps.items():
            stack = np.asarray(stack, dtype=np.float32)
            chunks = (1,) + tuple(min(s, 256) for s in stack.shape[1:]) if stack.size else None
            d = g.create_dataset(fid, data=stack, chunks=chunks, compression="gzip",
                                 compression_opts=1)
            for key, value in map_attrs.get(fid, {}).items():
                d.attrs[key] = "" if value is None else value
        for fid, mask in (tissue or {}).items():
            f.create_dataset(f"tissue/{fid}", data=np.asarray(mask, dtype=bool),
                             compression="gzip", compression_opts=1)
        f.attrs["format"] = NMF_FORMAT
        for key, value in (attrs or {}).items():
            f.attrs[key] = "" if value is None else value


def read_nmf(path) -> dict:
    """Read an NMF file.

    Returns
    -------
    dict
        ``spectra`` (k, n_mz) float32, ``mz`` (n_mz,), ``errors`` (n_iter,), ``maps``
        {file_id: (k, ny, nx) float32}, ``map_attrs`` {file_id: dict}, ``attrs`` dict,
        ``tissue`` {file_id: (ny, nx) bool} (empty unless the source gave masks).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: NMF file not found")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("spectra", "mz", "errors", "maps") if k not in f]
            if missing:
                raise InputError(f"{path}: not an NMF file (missing {', '.join(missing)})")
            out = {"spectra": f["spectra"][:], "mz": f["mz"][:], "errors": f["errors"][:],
                   "maps": {}, "map_attrs": {}, "tissue": {},
                   "attrs": {k: plain_attr(v) for k, v in f.attrs.items()}}
            for fid, d in f["maps"].items():
                out["maps"][fid] = d[:]
                out["map_attrs"][fid] = {k: plain_attr(v) for k, v in d.attrs.items()}
            for fid, d in f.get("tissue", {}).items():
                out["tissue"][fid] = d[()].astype(bool)
    except OSError as err:
        raise InputError(f"{path}: cannot be read as HDF5 ({err})") from err
    k = out["spectra"].shape[0]
    for fid, stack in out["maps"].items():
        if stack.ndim != 3 or stack.shape[0] != k:
            raise InputError(f"{path}: /maps/{fid} has shape {stack.shape}, expected ({k}, ny, nx)")
    return out
