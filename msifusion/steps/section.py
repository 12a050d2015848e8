"""Step of the crop rule (one section of one modality: ROI, tissue mask, pixel size) and the
readers of the section maps file it writes."""

from __future__ import annotations

import logging

import h5py
import numpy as np

from ..errors import InputError
from ..metadata import PixelSize, resolve_pixel_size, working_roi
from ..schema import default
from ..store import atomic_output, plain_attr, read_nmf
from ..tissue import label_sections, propose_rois, tissue_mask_from_maps

log = logging.getLogger("msifusion.steps.section")


def crop_step(nmf_file: str, file_id: str, out: str, *, section: str, modality: str,
              roi: list[int] | str | None, imzml: str = "",
              pixel_size_um: float | None = default("modality.pixel_size_um"),
              force_pixel_size: bool = default("modality.force_pixel_size"),
              dilation_px: int = default("tissue.dilation_px"),
              min_size_px: int = default("tissue.min_size_px"), seed: int = default("seed"),
              all_tissue: bool = default("modality.all_tissue"),
              auto_index: int = 0, auto_count: int = 1, auto_margin_px: int = 2) -> None:
    """Cut one section out of a modality's component maps and compute its tissue mask.

    Parameters
    ----------
    nmf_file : str
        The modality's component maps (an NMF file; for an image level, the file of the image
        rule, whose maps carry their pixel size already decided and a tissue mask).
    roi : list of int, "auto" or None
        ``[x0, x1, y0, y1]`` (0-based, half-open, acquisition pixels; level-0 pixels of an image,
        taken onto its working grid by :func:`msifusion.metadata.working_roi`), None for the whole
        image, or ``"auto"``: the bounding box (plus ``auto_margin_px``) of the ``auto_index``-th
        of the ``auto_count`` tissue sections found in the acquisition, counted left to right
        (:func:`auto_roi`).
    pixel_size_um, force_pixel_size : float or None, bool
        The configured pixel size (um) and whether it overrides the file's; the decision is
        :func:`msifusion.metadata.resolve_pixel_size`'s, stored with its source.
    all_tissue : bool
        Every acquired pixel is tissue (``modalities.<name>.all_tissue``); else the mask the
        source gives (an image's background mask), or one found in the maps
        (:func:`msifusion.tissue.tissue_mask_from_maps`).
    """
    where = f"section {section!r}, modality {modality!r} ({imzml or file_id})"
    d = read_nmf(nmf_file)
    if file_id not in d["maps"]:
        raise InputError(f"{nmf_file}: no maps for file {file_id!r} ({where})")
    maps = d["maps"][file_id]
    attrs = d["map_attrs"][file_id]
    k, ny, nx = maps.shape
    # Tissue is told from background on the whole acquisition (which holds both), then cut out,
    # so that an ROI holding only background comes out empty instead of thresholding noise.
    if all_tissue:
        whole_mask = np.isfinite(maps).all(axis=0)
        log.info("%s: every acquired pixel is tissue (modalities.%s.all_tissue)", where, modality)
    elif file_id in d["tissue"]:
        whole_mask = d["tissue"][file_id] & np.isfinite(maps).all(axis=0)
    else:
        whole_mask = tissue_mask_from_maps(maps, dilation_px=dilation_px, min_size_px=min_size_px,
                                           seed=seed)
    if isinstance(roi, (list, tuple)) and "downsample" in attrs:
        roi = list(working_roi(roi, int(attrs["downsample"])))
        roi[1], roi[3] = min(roi[1], nx), min(roi[3], ny)
    if roi == "auto":
        roi = auto_roi(whole_mask, auto_index, max(int(auto_count), 1), margin_px=auto_margin_px,
                       where=where)
        log.info("%s: roi auto -> %d:%d,%d:%d (section %d of %d, left to right)", where, *roi,
                 auto_index + 1, auto_count)
    x0, x1, y0, y1 = roi if roi is not None else (0, nx, 0, ny)
    if x1 > nx or y1 > ny:
        raise InputError(f"{where}: roi {x0}:{x1},{y0}:{y1} lies outside the image "
                         f"({nx} x {ny} pixels, x by y)")
    crop = np.ascontiguousarray(maps[:, y0:y1, x0:x1])
    acquired = np.isfinite(crop).all(axis=0)
    if not acquired.any():
        raise InputError(f"{where}: roi {x0}:{x1},{y0}:{y1} contains no acquired spectrum "
                         "(empty section)")
    mask = whole_mask[y0:y1, x0:x1] & acquired
    if not mask.any():
        raise InputError(f"{where}: no tissue found in roi {x0}:{x1},{y0}:{y1} (empty section)")
    if "pixel_size_source" in attrs:        # decided upstream (an image level's working grid)
        px = PixelSize(float(attrs["pixel_size_um"]), str(attrs["pixel_size_source"]),
                       str(attrs.get("pixel_size_note", "")))
    else:
        px = resolve_pixel_size(attrs.get("pixel_size_um"), pixel_size_um,
                                force=force_pixel_size, where=where,
                                key=f"modalities.{modality}.pixel_size_um")
    log.info("%s: roi %d x %d pixels, %d acquired, %d tissue; pixel size %g um (%s)%s", where,
             x1 - x0, y1 - y0, acquired.sum(), mask.sum(), px.um, px.source,
             f"; {px.note}" if px.note else "")
    with atomic_output(out) as tmp, h5py.File(tmp, "w") as f:
        f["maps"] = crop.astype(np.float32)
        f["mask"] = mask
        f["acquired"] = acquired
        f["spectra"] = d["spectra"]
        f["mz"] = d["mz"]
        f.attrs.update(origin_xy=(x0, y0), pixel_size_um=float(px.um),
                       pixel_size_source=px.source, modality=modality, section=section,
                       source=str(imzml), kind="image" if "downsample" in attrs else "imzml")


def auto_roi(mask: np.ndarray, index: int, count: int, *, margin_px: int = 2,
             min_fraction: float = 0.1, where: str = "") -> tuple[int, int, int, int]:
    """ROI of one of the tissue sections of an acquisition, from its tissue mask.

    Connected tissue components of at least ``min_fraction`` of the largest one are sections
    (smaller ones are debris); they are ordered left to right (by the left edge of their box, then
    the top) and the ``index``-th one's bounding box, grown by ``margin_px``, is returned.

    Parameters
    ----------
    mask : ndarray of bool, shape (ny, nx)
        Tissue mask of the whole acquisition.
    index, count : int
        Which section, and how many the sections sheet expects in this acquisition.

    Returns
    -------
    (x0, x1, y0, y1)

    Raises
    ------
    InputError
        The mask holds a different number of sections than ``count`` (the boxes found are listed).
    """
    labels, n = label_sections(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    boxes = propose_rois(mask, margin_px)
    boxes = [b for b, size in zip(boxes, sizes) if size >= min_fraction * sizes.max()] if n else []
    boxes.sort(key=lambda b: (b[0], b[2]))
    if len(boxes) != count:
        found = ", ".join(f"{b[0]}:{b[1]},{b[2]}:{b[3]}" for b in boxes) or "none"
        raise InputError(f"{where}: roi 'auto' found {len(boxes)} tissue section(s) ({found}) but "
                         f"the sections sheet gives this file {count} section(s) with roi 'auto'; "
                         "write their ROIs as x0:x1,y0:y1")
    return boxes[index]


def read_section_maps(path: str) -> dict:
    """Read a section maps file written by :func:`crop_step`."""
    with h5py.File(path, "r") as f:
        d = {k: f[k][()] for k in ("maps", "mask", "acquired", "spectra", "mz")}
        d.update({k: plain_attr(v) for k, v in f.attrs.items()})
    return d


def total_image(d: dict) -> np.ndarray:
    """Total-ion-like image of a section maps dict: the sum of its component maps (NaN off-scan)."""
    return np.where(d["acquired"], np.nansum(d["maps"], axis=0), np.nan)


def tissue_image(d: dict) -> np.ndarray:
    """Total image with the background set to 0 (NaN off-scan), as registration input.

    Modalities differ most off tissue (a MALDI matrix gives signal there, FT-ICR gives none), so
    registration compares the tissue only.
    """
    return np.where(d["mask"], total_image(d), np.where(d["acquired"], 0.0, np.nan))
