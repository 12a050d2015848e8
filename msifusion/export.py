"""imzML export: a converted dataset or a fused product written as imzML (+ ``.ibd``), atomically,
continuous on one m/z axis or processed (optionally the ``top_n`` most intense values per pixel).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import h5py
import numpy as np

from .errors import InputError
from .imzml import ImzMLStreamWriter
from .job import check_outputs
from .products import read_fused
from .store import ConvertedReader, plain_attr, value_rows

log = logging.getLogger("msifusion.export")


def _top_n(indptr: np.ndarray, mz: np.ndarray, intensity: np.ndarray, top_n: int
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the ``top_n`` most intense values of each spectrum (in m/z order; ties: lower m/z)."""
    rows = value_rows(indptr)
    order = np.lexsort((np.arange(len(rows)), -intensity.astype(np.float64), rows))
    rank = np.arange(len(rows)) - np.repeat(indptr[:-1], np.diff(indptr))
    keep = np.sort(order[rank < top_n])                   # sorted by row, then by m/z position
    counts = np.bincount(rows[keep], minlength=len(indptr) - 1)
    new = np.zeros(len(indptr), np.int64)
    np.cumsum(counts, out=new[1:])
    return new, mz[keep], intensity[keep]


def _fused_blocks(d: dict, block_values: int):
    """Yield (xy, dense spectra (n, n_mz) float32) of a fused product's pixels in blocks."""
    maps, spectra = d["maps"], d["spectra"]
    k, ny, nx = maps.shape
    flat = maps.reshape(k, -1)
    acquired = np.flatnonzero(np.isfinite(flat).all(axis=0))
    step = max(1, block_values // max(1, spectra.shape[1]))
    for s in range(0, len(acquired), step):
        px = acquired[s:s + step]
        dense = flat[:, px].T.astype(np.float32) @ spectra.astype(np.float32)
        yield np.stack([px % nx, px // nx], axis=1), dense


def export_imzml(
    source: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    mode: str = "auto",
    top_n: int | None = None,
    block_values: int = 1 << 24,
) -> dict:
    """Write a converted dataset or a fused product as imzML (+ ``.ibd``), atomically.

    Parameters
    ----------
    source : path-like
        A converted file (:mod:`msifusion.store` layout) or a fused product
        (:func:`msifusion.products.write_fused`): each pixel's spectrum is then its predicted
        component abundances times the component spectra, on the reference m/z axis.
    out_path : path-like
        The ``.imzML`` to write; the ``.ibd`` goes beside it.
    mode : {"auto", "continuous", "processed"}
        "auto": continuous when the source has one m/z axis for all pixels (a continuous
        conversion or a fused product) and no ``top_n`` is asked, else processed.
    top_n : int, optional
        Keep only the ``top_n`` most intense values of each spectrum (processed output).
    block_values : int
        Values handled per block (memory bound, about 12 bytes each).

    Returns
    -------
    dict
        ``n_pixels``, ``nnz`` (values written), ``mode``, ``clipped`` (negative predicted
        intensities set to 0, fused products only), ``seconds``.

    Raises
    ------
    InputError
        Unknown source, a continuous export asked of data without a shared m/z axis, bad
        ``top_n``, an output that would overwrite the source or the imzML (and ``.ibd``) the
        source was converted from.
    """
    t0 = time.perf_counter()
    source, out_path = Path(source), Path(out_path)
    if mode not in ("auto", "continuous", "processed"):
        raise InputError(f"export: mode must be auto, continuous or processed, not {mode!r}")
    if top_n is not None and (int(top_n) < 1 or mode == "continuous"):
        raise InputError(f"export: top_n={top_n} needs a positive number and processed output")
    if not source.is_file():
        raise InputError(f"{source}: file not found")
    try:
        with h5py.File(source, "r") as f:
            fmt, origin = (plain_attr(f.attrs.get(k, "")) for k in ("format", "source"))
    except OSError as err:
        raise InputError(f"{source}: cannot be read as HDF5 ({err})") from None
    if out_path.suffix.lower() != ".imzml":
        raise InputError(f"{out_path}: the output must end in .imzML")
    check_outputs([out_path], [source] + ([origin] if origin else []))  # the imzML converted
    seed = f"{source.name}|{mode}|{top_n}"
    nnz, clipped, n = 0, 0, 0
    if fmt == "msifusion-converted":
        r = ConvertedReader(source)
        shared = r.mz_axis is not None
        if mode == "continuous" and not shared:
            raise InputError(f"{source}: processed data has no shared m/z axis; export it as "
                             "processed (mode='processed')")
        out_mode = "continuous" if shared and top_n is None and mode != "processed" else "processed"
        z = r.z if np.any(r.z) else None
        kw = dict(mode=out_mode, mz_dtype=np.float64, intensity_dtype=r.intensity_dtype,
                  mz_axis=r.mz_axis, pixel_size_um=r.pixel_size_um,
                  spectrum_type=r.attrs.get("spectrum_type"), polarity=r.attrs.get("polarity"),
                  instrument=r.attrs.get("instrument"), uuid_seed=seed)
        per_pixel = max(1, r.nnz // max(1, r.n_pixels)) if out_mode == "processed" \
            else len(r.mz_axis)
        block_pixels = max(1, block_values // max(1, per_pixel))
        with ImzMLStreamWriter(out_path, **kw) as w:
            for start, stop, indptr, mz, inten in r.iter_blocks(block_pixels,
                                                                channels=out_mode == "continuous"):
                if out_mode == "continuous":
                    dense = np.zeros((stop - start, len(r.mz_axis)), r.intensity_dtype)
                    rows = value_rows(indptr)
                    dense[rows, mz] = inten
                    indptr = np.arange(stop - start + 1, dtype=np.int64) * len(r.mz_axis)
                    inten = dense.ravel()
                elif top_n is not None:
                    indptr, mz, inten = _top_n(indptr, mz, inten, int(top_n))
                w.add_block(indptr, mz, inten, r.xy[start:stop],
                            None if z is None else z[start:stop])
                nnz += int(indptr[-1])
            n = r.n_pixels
    elif fmt == "msifusion-fused":
        d = read_fused(source)
        out_mode = "processed" if (top_n is not None or mode == "processed") else "continuous"
        with ImzMLStreamWriter(out_path, mode=out_mode, mz_dtype=np.float64,
                               intensity_dtype=np.float32, mz_axis=d["mz"],
                               pixel_size_um=d["pixel_size_um"], spectrum_type="centroid",
                               uuid_seed=seed) as w:
            for xy, dense in _fused_blocks(d, block_values):
                neg = dense < 0
                clipped += int(neg.sum())
                dense[neg] = 0
                m = len(d["mz"])
                indptr = np.arange(len(xy) + 1, dtype=np.int64) * m
                mz = np.tile(d["mz"], len(xy))
                inten = dense.ravel()
                if top_n is not None:
                    indptr, mz, inten = _top_n(indptr, mz, inten, int(top_n))
                w.add_block(indptr, mz, inten, xy)
                nnz += int(indptr[-1])
                n += len(xy)
        if clipped:
            log.warning("%s: %d negative predicted intensities written as 0", out_path, clipped)
    else:
        raise InputError(f"{source}: neither a converted file nor a fused product "
                         f"(format attribute {fmt!r})")
    seconds = time.perf_counter() - t0
    log.info("%s: %d spectra (%s, %d values) written in %.1f s", out_path, n, out_mode, nnz,
             seconds)
    return {"n_pixels": n, "nnz": nnz, "mode": out_mode, "clipped": clipped,
            "seconds": seconds}

