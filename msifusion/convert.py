"""Stage 1: imzML -> HDF5 conversion into the converted layout of :mod:`msifusion.store` (the way
back is :mod:`msifusion.export`).

Conversion validates everything that can be checked without the intensities first (header,
``.ibd`` present, UUID, checksum, the spectrum index: positions, offsets and lengths inside the
``.ibd``, m/z and intensity lengths, duplicate positions), then streams the ``.ibd`` in blocks of
``block_bytes`` into a :class:`msifusion.store.ConvertedWriter`, checking each block (non-finite or
negative intensities, m/z order). Memory is bounded by the blocks and the spectrum index (64 bytes
per spectrum), not by the file size. Values are kept exactly: m/z as float64 (a widening of any
imzML type), intensities in the file's own data type.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import numpy as np

from .errors import InputError
from .imzml import (BLOCK_BYTES, CHUNK_BYTES, SpectrumIndex, find_ibd, iter_spectra,
                    read_imzml_header, read_index)
from .job import check_outputs
from .metadata import resolve_pixel_size
from .store import ConvertedWriter, value_rows

log = logging.getLogger("msifusion.convert")

__all__ = ["convert_imzml", "read_imzml_header"]


# --------------------------------------------------------------------------------------------------
# Validation before reading intensities
# --------------------------------------------------------------------------------------------------

def _check_uuid(imzml_path: Path, ibd_path: Path, uuid: str | None) -> None:
    """Compare the imzML's UUID with the first 16 bytes of the ``.ibd``."""
    with open(ibd_path, "rb") as fh:
        head = fh.read(16)
    if len(head) < 16:
        raise InputError(f"{ibd_path}: only {len(head)} bytes long; truncated (no 16-byte UUID)")
    if uuid is None:
        log.warning("%s: no universally unique identifier (IMS:1000080); cannot check that %s "
                    "belongs to it", imzml_path, ibd_path.name)
        return
    if head.hex() != uuid:
        raise InputError(f"{imzml_path}: UUID mismatch: the imzML states {uuid} but {ibd_path.name} "
                         f"starts with {head.hex()}; the two files do not belong together")


def _check_checksum(ibd_path: Path, header: dict) -> None:
    """Verify the ``.ibd`` SHA-1 (IMS:1000091) and/or MD5 (IMS:1000090) declared in the header."""
    for key, algo in (("sha1", hashlib.sha1), ("md5", hashlib.md5)):
        expected = header.get(key)
        if not expected:
            continue
        h = algo()
        with open(ibd_path, "rb") as fh:
            while chunk := fh.read(1 << 23):
                h.update(chunk)
        if h.hexdigest() != expected:
            raise InputError(f"{ibd_path}: {key.upper()} checksum mismatch (imzML states {expected}, "
                             f"file has {h.hexdigest()}); the file is corrupt or truncated")


def _beyond(size: int, offsets: np.ndarray, lengths: np.ndarray, encoded: np.ndarray,
            itemsize: int, compression: str) -> np.ndarray:
    """Mask of the arrays that do not lie inside an ``.ibd`` of ``size`` bytes, computed without
    integer overflow (a length of 2^61 values of 8 bytes wraps int64 to 0)."""
    room = size - np.minimum(offsets, size)                 # bytes from each offset to the end
    if compression == "none":
        long = lengths > room // itemsize
    else:
        long = encoded > room
    return (offsets < 0) | (lengths < 0) | (offsets > size) | long


def _check_index(path: Path, ibd_path: Path, index: SpectrumIndex) -> tuple[np.ndarray, np.ndarray]:
    """Validate the spectrum index against the ``.ibd``.

    Returns
    -------
    xy : ndarray, shape (n, 2), int32
        0-based (x, y) per spectrum.
    z : ndarray, shape (n,), int32
        0-based z per spectrum.
    """
    n = index.n
    if n == 0:
        raise InputError(f"{path}: the file contains zero spectra")
    for label, dtype in (("m/z", index.mz_dtype), ("intensity", index.int_dtype)):
        if dtype.kind not in "fi" or dtype.itemsize not in (4, 8):
            raise InputError(f"{path}: {label} arrays are {dtype}; imzML allows 32/64-bit float "
                             "or integer")
    bad = np.flatnonzero(index.mz_length != index.int_length)
    if bad.size:
        i = int(bad[0])
        raise InputError(f"{path}: spectrum {i}: m/z array length {index.mz_length[i]} differs "
                         f"from intensity array length {index.int_length[i]} ({bad.size} spectra "
                         "affected)")
    size = ibd_path.stat().st_size
    for label, kind, offsets, lengths, encoded, dtype, comp in (
            ("m/z", "mz", index.mz_offset, index.mz_length, index.mz_encoded, index.mz_dtype,
             index.mz_compression),
            ("intensity", "intensity", index.int_offset, index.int_length, index.int_encoded,
             index.int_dtype, index.int_compression)):
        if comp != "none" and np.any(encoded < 0):
            i = int(np.flatnonzero(encoded < 0)[0])
            raise InputError(f"{path}: spectrum {i}: compressed {label} array without an external "
                             "encoded length (IMS:1000104)")
        bad = np.flatnonzero(_beyond(size, offsets, lengths, encoded, dtype.itemsize, comp))
        if bad.size:
            i = int(bad[0])
            stored = int(encoded[i]) if comp != "none" else int(lengths[i]) * dtype.itemsize
            hint = ""
            if comp == "none" and encoded[i] >= 0 and encoded[i] != stored:
                hint = (f"; its encoded length (IMS:1000104) is {encoded[i]} bytes, not "
                        f"{lengths[i]} x {dtype.itemsize}: is the data type ({dtype}) wrong?")
            raise InputError(f"{ibd_path}: spectrum {i}: {label} array at offset {offsets[i]} with "
                             f"{lengths[i]} values ends at byte {int(offsets[i]) + stored}, beyond "
                             f"the end of the file ({size} bytes); the .ibd is truncated "
                             f"({bad.size} spectra affected){hint}")
        if comp == "none":
            odd = np.flatnonzero((encoded >= 0) & (encoded != lengths * dtype.itemsize))
            if odd.size:
                log.warning("%s: %d %s arrays state an encoded length that differs from their "
                            "length x %d bytes (first: spectrum %d); the lengths are used",
                            path, odd.size, label, dtype.itemsize, int(odd[0]))
    coords = index.coords
    bad = np.flatnonzero((coords < 1).any(axis=1))
    if bad.size:
        i = int(bad[0])
        raise InputError(f"{path}: spectrum {i}: position {tuple(coords[i].tolist())} is below 1; "
                         "imzML positions are 1-based")
    if coords.max() > np.iinfo(np.int32).max:
        raise InputError(f"{path}: pixel positions exceed the int32 range")
    order = np.lexsort(coords.T[::-1])
    same = np.flatnonzero((np.diff(coords[order], axis=0) == 0).all(axis=1))
    if same.size:
        i, j = sorted((int(order[same[0]]), int(order[same[0] + 1])))
        x, y, z = coords[i].tolist()
        raise InputError(f"{path}: spectra {i} and {j} have the same position (x={x}, y={y}, z={z}) "
                         f"({same.size} duplicates in all)")
    return (coords[:, :2] - 1).astype(np.int32), (coords[:, 2] - 1).astype(np.int32)


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------

def _row_of(indptr: np.ndarray, k: int) -> int:
    return int(np.searchsorted(indptr, k, side="right") - 1)


def _check_values(path: Path, first: int, indptr: np.ndarray, mz_of, intensity: np.ndarray
                  ) -> None:
    """Refuse non-finite or negative intensities; ``mz_of(k)`` gives the m/z of value ``k``."""
    if intensity.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(intensity))
        if bad.size:
            k = int(bad[0])
            raise InputError(f"{path}: spectrum {first + _row_of(indptr, k)}: non-finite intensity "
                             f"{intensity[k]} at m/z {mz_of(k)}")
    bad = np.flatnonzero(intensity < 0)
    if bad.size:
        k = int(bad[0])
        raise InputError(f"{path}: spectrum {first + _row_of(indptr, k)}: negative intensity "
                         f"{intensity[k]} at m/z {mz_of(k)}")


def _check_mz(path: Path, first: int, indptr: np.ndarray, mz: np.ndarray,
              where: str = "") -> None:
    """Refuse non-finite and non-positive m/z values (naming the spectrum of the first)."""
    for bad, problem in ((~np.isfinite(mz), "non-finite m/z value"),
                         (mz <= 0, "m/z value {} is not positive")):
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise InputError(f"{path}: spectrum {first + _row_of(indptr, k)}: "
                             f"{problem.format(mz[k])}{where}")


def _sort_rows(path: Path, first: int, indptr: np.ndarray, mz: np.ndarray, intensity: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """Check m/z values (finite) and sort them within each spectrum where they are not increasing.

    Returns m/z (float64), intensities and the number of spectra that had to be sorted.
    A non-finite or non-positive m/z is refused (:func:`_check_mz`).
    """
    mz = mz.astype(np.float64, copy=False)
    _check_mz(path, first, indptr, mz)
    if mz.size < 2:
        return mz, intensity, 0
    down = np.diff(mz) < 0
    down[indptr[1:-1][indptr[1:-1] > 0] - 1] = False       # steps between two spectra
    if not down.any():
        return mz, intensity, 0
    rows = value_rows(indptr)
    n_sorted = len(np.unique(rows[1:][down]))
    order = np.lexsort((mz, rows))
    return mz[order], intensity[order], n_sorted


def _check_planes(path: Path, z: np.ndarray, max_planes: int | None) -> None:
    """Refuse more than ``max_planes`` z planes (a 3-D imzML): never merged silently."""
    planes = np.unique(z)
    if max_planes is not None and len(planes) > max_planes:
        raise InputError(f"{path}: {len(planes)} z planes (z = {', '.join(str(p + 1) for p in planes[:5])}"
                         f"{', ...' if len(planes) > 5 else ''}); msifusion images one 2-D plane per "
                         "file: write each plane as its own imzML (one sheet row each)")


#: A stated image size above ``_SIZE_FACTOR`` x the positions reached + ``_SIZE_MARGIN`` pixels is
#: not believed (a typo in "max count of pixels" would otherwise size every image of the file).
_SIZE_FACTOR, _SIZE_MARGIN = 2, 16


def _image_shape(path: Path, xy: np.ndarray, stated: tuple[int, int] | None) -> tuple[int, int]:
    """(ny, nx) of the acquisition grid: the larger of the stated size ("max count of pixels
    y/x") and the positions reached, so that a last row or column that was not acquired still
    belongs to the grid the ROIs refer to; a stated size far above the positions (more than
    twice them plus 16) is replaced by the positions, with a warning."""
    reached = (int(xy[:, 1].max()) + 1, int(xy[:, 0].max()) + 1)
    if stated is None:
        return reached
    if any(d > h for d, h in zip(reached, stated)):
        log.warning("%s: positions reach %s (ny, nx) beyond the stated max count of pixels %s",
                    path, reached, stated)
    shape = []
    for axis, d, h in zip("yx", reached, stated):
        if h > _SIZE_FACTOR * d + _SIZE_MARGIN:
            log.warning("%s: the stated max count of pixels %s (%d) is far above the positions "
                        "reached (%d); the grid is sized by the positions", path, axis, h, d)
            h = d
        shape.append(max(d, h))
    return tuple(shape)


def _shared_axis(path: Path, ibd_path: Path, index: SpectrumIndex, mode: str
                 ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The shared m/z axis of a continuous file (all spectra point at one m/z array), sorted, and
    the permutation that sorted it (None when already increasing); (None, None) otherwise."""
    if mode != "continuous" or not (np.all(index.mz_offset == index.mz_offset[0])
                                    and np.all(index.mz_length == index.mz_length[0])):
        if mode == "continuous":
            log.info("%s: continuous file whose spectra have their own m/z arrays; stored with "
                     "per-pixel m/z", path)
        return None, None
    _s, _e, _ip, axis, _i = next(iter_spectra(ibd_path, index.subset(slice(0, 1))))
    axis = axis.astype(np.float64)
    _check_mz(path, 0, np.array([0, axis.size]), axis, " in the shared m/z array")
    if axis.size > 1 and np.any(np.diff(axis) < 0):
        perm = np.argsort(axis, kind="stable")
        return axis[perm], perm
    return axis, None


def convert_imzml(
    imzml_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    pixel_size_um: float | None = None,
    block_bytes: int = BLOCK_BYTES,
    chunk_bytes: int = CHUNK_BYTES,
    verify_checksum: bool = True,
    full_xml_check: bool = False,
    threads: int = 2,
    max_z_planes: int | None = None,
) -> dict:
    """Convert one imzML/ibd pair into the converted HDF5 layout (see ``docs/design.md``).

    Continuous files keep one shared m/z axis and store the non-zero intensities with channel
    indices into it; processed files store every (m/z, intensity) pair of every spectrum. Pixels
    that were not acquired are absent, never zero spectra. No output file is left behind on any
    error.

    Parameters
    ----------
    imzml_path : path-like
        The ``.imzML`` file; its ``.ibd`` must lie beside it with the same stem.
    out_path : path-like
        Output HDF5 file (written atomically).
    pixel_size_um : float, optional
        Pixel size in um, used only when the file states none (the file's value wins; a
        disagreement > 1 % is logged). NaN is stored when neither is known.
    block_bytes : int
        ``.ibd`` bytes read per block (memory is about 5x this).
    chunk_bytes : int
        XML bytes scanned per chunk by the spectrum index (see :func:`msifusion.imzml.read_index`).
    verify_checksum : bool
        Verify the ``.ibd`` SHA-1 / MD5 when the imzML declares one (reads the ``.ibd`` once more).
    full_xml_check : bool
        Index with the full XML parser (checks the well-formedness of the whole spectrum list;
        several times slower than the default vectorised scan).
    threads : int
        Threads of the XML scan.
    max_z_planes : int, optional
        Refuse a file with more z planes than this, right after the index (before the binary
        data is read); None keeps every plane (``z`` is stored per pixel).

    Returns
    -------
    dict
        ``n_pixels``, ``nnz``, ``image_shape`` (ny, nx), ``pixel_size_um``, ``mode``,
        ``spectrum_type``, ``n_sorted`` (spectra whose m/z had to be sorted), ``index_method``,
        ``seconds``.

    Raises
    ------
    InputError
        Missing/unreadable/hostile/non-imzML input, missing ``.ibd``, UUID mismatch, truncated
        ``.ibd``, m/z and intensity lengths that differ, duplicate positions, zero spectra,
        checksum mismatch, unsupported compression, a non-finite/negative intensity or a
        non-finite/non-positive m/z (with its spectrum index), all spectra empty, an output that
        would overwrite the input or cannot be written.
    """
    t0 = time.perf_counter()
    path = Path(imzml_path)
    header = read_imzml_header(path)
    ibd_path = find_ibd(path)
    check_outputs([out_path], [path, ibd_path])
    _check_uuid(path, ibd_path, header["uuid"])
    if header["compression"]:
        raise InputError(f"{path}: binary arrays use {header['compression']!r}; only "
                         "uncompressed and zlib-compressed imzML are supported")
    if header["n_spectra"] == 0:
        raise InputError(f"{path}: the file contains zero spectra (spectrumList count is 0)")
    index = read_index(path, header, chunk_bytes=chunk_bytes, threads=threads,
                       method="general" if full_xml_check else "auto")
    log.info("%s: %d spectra indexed in %.1f s (%s)", path, index.n, time.perf_counter() - t0,
             index.method)
    xy, z = _check_index(path, ibd_path, index)
    _check_planes(path, z, max_z_planes)
    if verify_checksum:
        _check_checksum(ibd_path, header)
    n = index.n
    mode = header["mode"]
    if mode is None:
        mode = "continuous" if np.all(index.mz_offset == index.mz_offset[0]) else "processed"
        log.warning("%s: no continuous/processed mode (IMS:1000030/31) stated; looks %s",
                    path, mode)
    spectrum_type = header["spectrum_type"] or "unknown"
    decided = resolve_pixel_size(header["pixel_size_um"], pixel_size_um, where=str(path),
                                 required=False)
    if decided.note:
        log.warning("%s: %s", path, decided.note)
    elif decided.source == "none":
        log.warning("%s: no pixel size in the file and none given; stored as NaN", path)
    px = decided.um
    image_shape = _image_shape(path, xy, header["image_shape"])
    axis, perm = _shared_axis(path, ibd_path, index, mode)
    attrs = {
        "source": str(path),
        "uuid": header["uuid"] or "",
        "mode": mode,
        "spectrum_type": spectrum_type,
        "polarity": header["polarity"] or "unknown",
        "instrument": header["instrument"] or "unknown",
        "pixel_size_um": px,
        "image_shape": image_shape,
        "mz_dtype": index.mz_dtype.name,
    }
    log.info("%s: converting %d spectra (%s, %s) to %s", path, n, mode, spectrum_type, out_path)
    n_sorted, nnz, n_signal = 0, 0, 0
    mz_lo, mz_hi = np.inf, -np.inf
    last_log = time.perf_counter()
    with ConvertedWriter(out_path, n_pixels=n, attrs=attrs, intensity_dtype=index.int_dtype,
                         mz_axis=axis) as writer:
        for start, stop, indptr, mz, inten in iter_spectra(ibd_path, index, block_bytes=block_bytes,
                                                           read_mz=axis is None):
            if axis is not None:
                n_mz = len(axis)
                dense = inten.reshape(stop - start, n_mz)
                if perm is not None:
                    dense = dense[:, perm]
                    n_sorted += stop - start
                _check_values(path, start, indptr, lambda k: axis[k % n_mz], dense.ravel())
                nonzero = dense != 0
                indptr = np.zeros(stop - start + 1, np.int64)
                np.cumsum(nonzero.sum(axis=1), out=indptr[1:])
                flat = np.flatnonzero(nonzero)
                writer.append(indptr, (flat % n_mz).astype(np.int32), dense.ravel()[flat])
                nnz += len(flat)
                n_signal += len(flat)
            else:
                mz, inten, k = _sort_rows(path, start, indptr, mz, inten)
                _check_values(path, start, indptr, lambda k: mz[k], inten)
                n_sorted += k
                if mz.size:
                    mz_lo, mz_hi = min(mz_lo, float(mz.min())), max(mz_hi, float(mz.max()))
                writer.append(indptr, mz, inten)
                nnz += mz.size
                n_signal += int(np.count_nonzero(inten))
            if time.perf_counter() - last_log > 10:
                log.info("%s: %d / %d spectra converted", path, stop, n)
                last_log = time.perf_counter()
        if n_signal == 0:
            raise InputError(f"{path}: all {n} spectra are empty (no value with a non-zero "
                             "intensity); nothing to convert")
        writer.set_pixels(xy, z)
        if axis is not None and axis.size:
            mz_lo, mz_hi = float(axis[0]), float(axis[-1])
        writer.attrs["mz_range"] = ((mz_lo, mz_hi) if np.isfinite(mz_lo)
                                    else (float("nan"), float("nan")))
    if n_sorted:
        log.warning("%s: m/z values were not increasing in %d of %d spectra; sorted them",
                    path, n_sorted, n)
    seconds = time.perf_counter() - t0
    log.info("%s: %d spectra, %d values written to %s in %.1f s", path, n, nnz, out_path, seconds)
    return {"n_pixels": n, "nnz": nnz, "image_shape": image_shape, "pixel_size_um": px,
            "mode": mode, "spectrum_type": spectrum_type, "n_sorted": n_sorted,
            "index_method": index.method, "seconds": seconds}
