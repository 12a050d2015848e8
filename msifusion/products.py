"""Fused products: ion images, ROI spectra, the fused HDF5 file and float TIFF images (figures are
in :mod:`msifusion.figures`).

A fused product holds component maps ``(k, ny, nx)`` on a modality's grid together with the
reference modality's component spectra ``(k, n_mz)``; the image of any m/z window is
``spectra[:, window].sum(1) @ maps`` (see ``docs/design.md``, stage 5).
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import h5py
import numpy as np

from .affine import compose, invert, transform_points
from .errors import InputError
from .spectra import mz_window
from .store import atomic_output, plain_attr

log = logging.getLogger("msifusion.products")

FORMAT = "msifusion-fused"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# ion images and spectra
# --------------------------------------------------------------------------------------------

def ion_image(spectra: np.ndarray, mz: np.ndarray, maps: np.ndarray, target_mz: float,
              ppm: float) -> np.ndarray:
    """Image of the m/z window ``target_mz +- ppm`` reconstructed from components.

    Parameters
    ----------
    spectra : ndarray, shape (k, n_mz)
        Component spectra.
    mz : ndarray, shape (n_mz,)
        m/z of the spectra columns.
    maps : ndarray, shape (k, ny, nx)
        Component maps (NaN where not acquired).
    target_mz : float
    ppm : float
        Window half-width in ppm.

    Returns
    -------
    ndarray, shape (ny, nx), float64
        ``spectra[:, window].sum(1) @ maps``; NaN where the maps are NaN.

    Raises
    ------
    InputError
        When no m/z value lies in the window (names the nearest one).
    """
    spectra = np.asarray(spectra)
    mz = np.asarray(mz, dtype=np.float64)
    maps = np.asarray(maps)
    if spectra.ndim != 2 or spectra.shape[1] != mz.shape[0] or maps.shape[0] != spectra.shape[0]:
        raise InputError(f"ion image: spectra {spectra.shape}, mz {mz.shape} and maps {maps.shape} "
                         "do not match ((k, n_mz), (n_mz,), (k, ny, nx))")
    window = mz_window(mz, target_mz, ppm)
    if not window.any():
        nearest = mz[np.argmin(np.abs(mz - target_mz))] if len(mz) else float("nan")
        raise InputError(f"ion image: no m/z within {ppm} ppm of {target_mz} "
                         f"(nearest is {nearest:.5f})")
    weights = spectra[:, window].sum(1).astype(np.float64)
    return np.tensordot(weights, maps.astype(np.float64), axes=1)


def target_flag(extra: Mapping, target_mz: float) -> float | None:
    """Cross-validated r of a fused product's target ``target_mz`` when the product flags it as
    not predictable, else None (also for an m/z the product does not score).

    ``extra`` is :func:`read_fused`'s ``extra`` (``target_mz``, ``target_predictable``,
    ``target_cv_r``), written by :func:`msifusion.steps.fuse.fuse_step`.
    """
    hit = _target_index(extra, target_mz)
    if hit is None or bool(np.asarray(extra["target_predictable"])[hit]):
        return None
    return float(np.asarray(extra["target_cv_r"])[hit])


def _target_index(extra: Mapping, target_mz: float) -> int | None:
    mzs = np.asarray(extra.get("target_mz", []), dtype=np.float64)
    hit = np.flatnonzero(np.isclose(mzs, target_mz, rtol=0, atol=1e-6))
    return int(hit[0]) if hit.size else None


def not_predictable_note(flag_r: float) -> str:
    """The line figures and the CLI add to an image of a target flagged as not predictable."""
    return f"NOT PREDICTABLE (cross-validated r {flag_r:.2f}): coarse image interpolated"


def shipped_target(extra: Mapping, target_mz: float, ppm: float) -> int | None:
    """Index of ``target_mz +- ppm`` among a product's shipped target images
    (``extra/target_image``, at the product's ``target_ppm``), or None: the image of that window
    is then reconstructed from the maps."""
    hit = _target_index(extra, target_mz)
    if hit is None or "target_image" not in extra \
            or not np.isclose(float(extra.get("target_ppm", np.nan)), ppm):
        return None
    return hit


def product_ion_image(fused: Mapping, target_mz: float, ppm: float) -> tuple[np.ndarray, float | None]:
    """Ion image of a fused product, as the product vouches for it.

    A configured target's image is the product's ``extra/target_image``: built from the measured
    ion image, with fine detail where the reduced-scale test supports it and averaging back to
    the measured image (:func:`msifusion.sharpen.sharpen_targets`); for a target flagged as not
    predictable (:func:`target_flag`) it is the measured image interpolated. Every other m/z is
    reconstructed from the maps (:func:`ion_image`; with the measured residual added back:
    :func:`msifusion.sharpen.measured_ion_image`).

    Parameters
    ----------
    fused : mapping
        :func:`read_fused` output.
    target_mz, ppm : float
        Window ``target_mz +- ppm``.

    Returns
    -------
    image : ndarray, shape (ny, nx), float64
        NaN where not acquired.
    flag_r : float or None
        The target's cross-validated r when it is flagged as not predictable, else None.
    """
    extra = fused.get("extra", {})
    flag = target_flag(extra, target_mz)
    hit = shipped_target(extra, target_mz, ppm)
    if hit is not None:
        return np.asarray(extra["target_image"][hit], dtype=np.float64), flag
    if _target_index(extra, target_mz) is not None and "target_image" in extra:
        log.warning("m/z %.4f is a target of the product at +- %g ppm, not +- %g ppm: its image is "
                    "reconstructed from the maps", target_mz, float(extra.get("target_ppm", np.nan)),
                    ppm)
    return ion_image(fused["spectra"], fused["mz"], fused["maps"], target_mz, ppm), flag


def measured_section_image(reader, fused: Mapping, target_mz: float, ppm: float) -> np.ndarray:
    """The reference's measured ion image of ``target_mz +- ppm`` over a product's section.

    Parameters
    ----------
    reader : msifusion.store.ConvertedReader
        The reference modality's converted file holding the section.
    fused : mapping
        :func:`read_fused` output (``extra/reference_origin_xy`` and ``reference_shape``: the
        section's ROI in that acquisition).

    Returns
    -------
    ndarray, shape (ny0, nx0), float64
        Raw intensities in the window summed per pixel; NaN where not acquired.
    """
    from .spectra import measured_ion_images

    extra = fused.get("extra", {})
    if "reference_origin_xy" not in extra or "reference_shape" not in extra:
        raise InputError("the fused product does not record its section's ROI in the reference "
                         "(written by an older msifusion): rerun the fuse rule")
    x0, y0 = (int(v) for v in extra["reference_origin_xy"])
    ny, nx = (int(v) for v in extra["reference_shape"])
    img = measured_ion_images(reader, [target_mz], ppm)[0][y0:y0 + ny, x0:x0 + nx]
    if img.shape != (ny, nx):
        raise InputError(f"{reader.path}: the product's section ({nx} x {ny} px at {x0}, {y0}) does "
                         f"not fit in this acquisition ({img.shape[1]} x {img.shape[0]} from there): "
                         f"is it the reference {fused.get('reference')!r}?")
    return img


def roi_mean_spectrum(spectra: np.ndarray, maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean reconstructed spectrum over the acquired pixels of a region.

    Parameters
    ----------
    spectra : ndarray, shape (k, n_mz)
    maps : ndarray, shape (k, ny, nx)
        NaN where not acquired (such pixels are left out).
    mask : ndarray of bool, shape (ny, nx)

    Returns
    -------
    ndarray, shape (n_mz,), float64
        ``mean over pixels of (maps[:, pixel] @ spectra)``.
    """
    maps = np.asarray(maps)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != maps.shape[1:]:
        raise InputError(f"ROI spectrum: mask shape {mask.shape} != map shape {maps.shape[1:]}")
    sel = mask & np.isfinite(maps).all(0)
    if not sel.any():
        raise InputError("ROI spectrum: the region contains no acquired pixel")
    weights = maps[:, sel].astype(np.float64).mean(1)
    return weights @ np.asarray(spectra, dtype=np.float64)


def region_on_grid(shape: tuple[int, int], to_reference: np.ndarray, region: np.ndarray,
                   region_to_reference: np.ndarray) -> np.ndarray:
    """Pixels of one grid whose centres fall inside a region drawn on another grid.

    Both grids are tied to the reference grid of the section by their pixel matrices (e.g. a
    fused product's ``extra/matrix_to_reference``; the identity for the reference itself).

    Parameters
    ----------
    shape : (int, int)
        ``(ny, nx)`` of the grid to fill.
    to_reference : ndarray, shape (2, 3)
        This grid's pixel ``(x, y, 1)`` -> reference pixel.
    region : ndarray of bool, shape (nyr, nxr)
        The region on its own grid.
    region_to_reference : ndarray, shape (2, 3)
        The region grid's pixel -> reference pixel.

    Returns
    -------
    ndarray of bool, shape (ny, nx)
        True where the pixel centre lies in a region pixel (nearest-pixel lookup).
    """
    region = np.asarray(region, dtype=bool)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    q = transform_points(compose(to_reference, invert(region_to_reference)),
                         np.column_stack([xx.ravel(), yy.ravel()]))
    ix, iy = np.rint(q[:, 0]).astype(np.int64), np.rint(q[:, 1]).astype(np.int64)
    inside = (ix >= 0) & (iy >= 0) & (ix < region.shape[1]) & (iy < region.shape[0])
    out = np.zeros(xx.size, dtype=bool)
    out[inside] = region[iy[inside], ix[inside]]
    return out.reshape(shape)


def region_mask(roi: Mapping, shape: tuple[int, int]) -> np.ndarray:
    """The bool mask ``(ny, nx)`` of a configured ROI (``box`` or ``mask`` file) on its grid."""
    name = roi.get("name", "roi")
    if "box" in roi:
        x0, x1, y0, y1 = (int(v) for v in roi["box"])
        if not (0 <= x0 < x1 <= shape[1] and 0 <= y0 < y1 <= shape[0]):
            raise InputError(f"roi {name!r}: box {x0}:{x1},{y0}:{y1} does not fit the "
                             f"{shape[1]} x {shape[0]} px section grid of its level (x by y)")
        out = np.zeros(shape, dtype=bool)
        out[y0:y1, x0:x1] = True
        return out
    path = roi["mask"]
    if not os.path.exists(path):
        raise InputError(f"roi {name!r}: mask file not found: {path}")
    try:
        out = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(f"roi {name!r}: {path} is not a .npy array ({err})") from err
    if out.shape != tuple(shape):
        raise InputError(f"roi {name!r}: mask {path} has shape {out.shape}, the section grid of "
                         f"its level is {tuple(shape)}")
    return out.astype(bool)


# --------------------------------------------------------------------------------------------
# fused HDF5 product
# --------------------------------------------------------------------------------------------

def product_tissue_mask(fused: Mapping) -> np.ndarray:
    """Tissue pixels of a fused product (its level's tissue mask), shape (ny, nx) bool.

    Products written before the mask was stored give their acquired pixels (with a warning).
    """
    acquired = np.isfinite(fused["maps"]).all(axis=0)
    mask = fused.get("extra", {}).get("tissue_mask")
    if mask is None:
        log.warning("fused product without a tissue mask (written by an older version): its "
                    "acquired pixels are used")
        return acquired
    return np.asarray(mask, dtype=bool) & acquired


def write_fused(path: str | os.PathLike, maps: np.ndarray, spectra: np.ndarray, mz: np.ndarray,
                *, origin_xy, pixel_size_um: float, reference: str,
                extra: Mapping | None = None) -> None:
    """Write a fused product (atomically).

    Layout: ``/maps`` float32 (k, ny, nx), ``/spectra`` float32 (k, n_mz), ``/mz`` float64
    (n_mz,); attrs ``origin_xy``, ``pixel_size_um``, ``reference``, ``format``,
    ``format_version``. ``extra`` entries that are arrays go to ``/extra/{name}``; scalars and
    strings become attributes of ``/extra``.

    Parameters
    ----------
    path : path-like
    maps : ndarray, shape (k, ny, nx)
        Reference components predicted on this modality's grid (NaN where not acquired).
    spectra : ndarray, shape (k, n_mz)
        Reference component spectra.
    mz : ndarray, shape (n_mz,)
    origin_xy : (int, int)
        ROI origin in pixels of the acquisition.
    pixel_size_um : float
    reference : str
        Name of the reference modality.
    extra : mapping, optional
        E.g. ``{"cv_r": array, "method": "ridge"}``.
    """
    maps = np.asarray(maps, dtype=np.float32)
    spectra = np.asarray(spectra, dtype=np.float32)
    mz = np.asarray(mz, dtype=np.float64)
    if maps.ndim != 3 or spectra.ndim != 2 or mz.ndim != 1 or maps.shape[0] != spectra.shape[0] \
            or spectra.shape[1] != mz.shape[0]:
        raise InputError(f"{path}: maps {maps.shape}, spectra {spectra.shape} and mz {mz.shape} do "
                         "not match ((k, ny, nx), (k, n_mz), (n_mz,))")
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        chunks = (1,) + tuple(min(s, 256) for s in maps.shape[1:]) if maps.size else None
        f.create_dataset("maps", data=maps, chunks=chunks, compression="gzip" if chunks else None,
                         compression_opts=4 if chunks else None)
        f.create_dataset("spectra", data=spectra)
        f.create_dataset("mz", data=mz)
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["origin_xy"] = np.asarray(origin_xy, dtype=np.int64).reshape(2)
        f.attrs["pixel_size_um"] = float(pixel_size_um)
        f.attrs["reference"] = str(reference)
        if extra:
            g = f.create_group("extra")
            for key, value in extra.items():
                if isinstance(value, (str, bytes, int, float, bool, np.generic)) or value is None:
                    g.attrs[key] = "" if value is None else value
                else:
                    g.create_dataset(key, data=np.asarray(value))


def read_fused(path: str | os.PathLike) -> dict:
    """Read a fused product written by :func:`write_fused`.

    Returns
    -------
    dict
        ``maps`` (k, ny, nx) float32, ``spectra`` (k, n_mz) float32, ``mz`` (n_mz,) float64,
        ``origin_xy`` (tuple of int), ``pixel_size_um`` (float), ``reference`` (str),
        ``attrs`` (all file attributes), ``extra`` (dict of arrays and attributes).
    """
    if not os.path.exists(path):
        raise InputError(f"{path}: fused product not found")
    try:
        with h5py.File(path, "r") as f:
            attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
            if attrs.get("format") != FORMAT:
                raise InputError(f"{path}: not an msifusion fused product "
                                 f"(format attribute is {attrs.get('format')!r})")
            out = {"maps": f["maps"][:], "spectra": f["spectra"][:], "mz": f["mz"][:]}
            extra = {}
            if "extra" in f:
                extra.update({k: plain_attr(v) for k, v in f["extra"].attrs.items()})
                extra.update({k: d[()] for k, d in f["extra"].items()})
    except OSError as err:
        raise InputError(f"{path}: cannot be read as HDF5 ({err})") from err
    out.update(origin_xy=tuple(int(v) for v in attrs["origin_xy"]),
               pixel_size_um=float(attrs["pixel_size_um"]), reference=str(attrs["reference"]),
               attrs=attrs, extra=extra)
    return out


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------

def save_tiff(img: np.ndarray, path: str | os.PathLike, pixel_size_um: float) -> None:
    """Write an image (ny, nx) or stack (k, ny, nx) as float32 ImageJ TIFF with its pixel size.

    The resolution tags hold ``1 / pixel_size_um`` pixels per micrometre (ImageJ unit ``um``),
    so Fiji/ImageJ show physical sizes; NaN is kept. Without a finite positive pixel size the
    file has no physical resolution (a warning is logged).
    """
    import tifffile

    img = np.asarray(img, dtype=np.float32)
    if img.ndim not in (2, 3):
        raise InputError(f"{path}: TIFF image must be (ny, nx) or (k, ny, nx), got {img.shape}")
    metadata = {"axes": "ZYX" if img.ndim == 3 else "YX"}
    kwargs = {}
    if pixel_size_um is not None and np.isfinite(pixel_size_um) and pixel_size_um > 0:
        res = 1.0 / float(pixel_size_um)
        kwargs["resolution"] = (res, res)
        metadata["unit"] = "um"
    else:
        log.warning("%s: no valid pixel size (%s); TIFF written without physical resolution",
                    path, pixel_size_um)
    with atomic_output(path) as tmp:
        tifffile.imwrite(tmp, img, imagej=True, metadata=metadata, **kwargs)
