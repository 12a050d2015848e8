"""Microscopy images as a level of the fusion chain: header, pixel size, bounded-memory reads,
stain features and tissue masks.

A microscopy image (bright-field H&E or fluorescence) is the finest level of a fusion chain. It
is read in four steps, none of which holds a whole slide in memory:

1. :func:`read_image_info` parses the header only (TIFF / BigTIFF / OME-TIFF with tifffile,
   PNG / JPEG with pillow): level-0 shape ``(ny, nx)``, channels, stored dtype, kind
   (``"brightfield"`` or ``"fluorescence"``), the shapes of the pyramid levels and the physical
   pixel size (um) with a note saying where it came from or why the metadata was ignored.
2. :func:`choose_downsample` picks an integer factor for a pixel budget (and a target pixel size).
3. :func:`read_image` returns the ``downsample`` x ``downsample`` block means of level 0 as
   ``(ny // downsample, nx // downsample, c)`` float32, read from the coarsest pyramid level whose
   reduction factor divides ``downsample``, in horizontal bands of tiles or strips whose size is
   bounded by ``memory_mb``.
4. :func:`stain_features` (optical density, hematoxylin, eosin; or background-subtracted
   fluorescence channels) and :func:`background_mask` (True on tissue) on the returned array.

Pyramids are recognised in two forms: tifffile series ``levels`` (OME or tifffile SubIFD
pyramids), and further pages of decreasing size with the same channels and dtype, either in the
SubIFDs of the first page or flagged reduced-resolution (``NewSubfileType`` bit 0). Such a page
counts as a level only when its shape is an integer reduction of level 0 (``round(n0 / r)``,
``floor`` or ``ceil`` on both axes for one integer ``r >= 2``); a thumbnail of another aspect or
channel count is not a level.

Memory of a TIFF read (beyond the output array): one band of decoded segments of the chosen level
in its stored dtype (at most half of ``memory_mb`` and 64 MB when more than one segment row fits),
the compressed bytes of a window of ``2 x workers`` segments, the segments being decoded, float64
block sums of a few output rows (at most 4 MB, or one level row) and the file's segment tables. It
is estimated before reading, and the read is refused when one band of one segment row does not
fit in ``memory_mb``. PNG / JPEG are decoded whole by pillow (JPEG at 1/2, 1/4 or 1/8 scale when
that divides the factor). On the benchmark slide (40,000 x 30,000 RGB, JPEG tiles 512) the read
at factor 17 from level 0 took 7.6 s of CPU (15 s wall on a shared 2-core machine) with a peak of
120 MB above the interpreter at ``memory_mb=256``; at factor 20 from the /4 level, 0.9 s
(``benchmarks/bench_image.py``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError
from .tissue import _log_image, otsu_threshold, remove_small_components

log = logging.getLogger("msifusion.image")

__all__ = ["ImageInfo", "read_image_info", "choose_downsample", "read_image", "stain_features",
           "background_mask", "SUPPORTED_EXTENSIONS"]

#: File name endings read by this module (case-insensitive; ``.ome.tif`` ends in ``.tif``).
SUPPORTED_EXTENSIONS = (".tif", ".tiff", ".btf", ".png", ".jpg", ".jpeg")
_TIFF_EXT = (".tif", ".tiff", ".btf")
#: Stored sample types accepted.
DTYPES = ("uint8", "uint16", "float32", "float64")
#: A pixel size (um) from TIFF/PNG/JPEG resolution tags above this is a screen or print default.
MAX_TAG_PIXEL_UM = 50.0
#: X and Y pixel sizes differing by more than this fraction are anisotropic (ignored).
ANISOTROPY_RTOL = 0.01
#: A pyramid level is used when its reduction factor is within this fraction of an integer.
LEVEL_RTOL = 0.005
#: Optical-density contrast between Otsu's classes below which a bright-field field is uniform.
MIN_OD_CONTRAST = 0.05
#: Ratio of Otsu's class means (background-subtracted signal) below which a fluorescence field
#: is uniform.
MIN_FLUO_CONTRAST = 2.0
#: Largest chroma ``(max - min) / max`` of the glass level's RGB for it to count as glass.
MAX_GLASS_CHROMA = 0.15
#: OME ``UnitsLength`` symbols -> factor to micrometres (the OME schema's default is um).
_UNIT_TO_UM = {"m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3, "µm": 1.0, "μm": 1.0, "um": 1.0,
               "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
               "nm": 1e-3, "pm": 1e-6, "å": 1e-4, "angstrom": 1e-4, "in": 25400.0,
               "inch": 25400.0}
#: Series axes read as channels (S: samples; C: channels; E: lambda; I, Q: unnamed planes).
_CHANNEL_AXES = "SCEIQ"
_PHOTOMETRIC_RGB = (2, 6)  # RGB, YCbCr (JPEG-compressed YCbCr decodes to RGB)
_JPEG = {6, 7, 34892, 33007}
_MB = float(1 << 20)


@dataclass(frozen=True)
class ImageInfo:
    """Header of a microscopy image (no pixel data decoded).

    Attributes
    ----------
    path : str
    shape : tuple of int
        ``(ny, nx)`` of the full-resolution level 0, pixels.
    channels : int
        Channels :func:`read_image` returns: 3 for RGB and RGBA colour images (an alpha channel
        is dropped), else the number of fluorescence channels (1 for gray).
    dtype : str
        Numpy dtype name of the stored samples (``"uint8"``, ``"uint16"``, ``"float32"``,
        ``"float64"``).
    kind : str
        ``"brightfield"`` (RGB/RGBA colour image) or ``"fluorescence"`` (1..n channels, gray
        included).
    levels : tuple of (int, int)
        ``(ny, nx)`` of every pyramid level, level 0 first (length 1 without a pyramid).
    pixel_size_um : float or None
        Level-0 pixel size (um) from the file's metadata; None when absent or not credible.
    pixel_size_note : str
        One short sentence: where the value came from, or why the metadata was ignored.
    channel_names : tuple of str
        ``("red", "green", "blue")`` for bright-field; the OME channel names, else
        ``"channel_{i}"``, for fluorescence.
    """

    path: str
    shape: tuple[int, int]
    channels: int
    dtype: str
    kind: str
    levels: tuple[tuple[int, int], ...]
    pixel_size_um: float | None
    pixel_size_note: str
    channel_names: tuple[str, ...]


# --------------------------------------------------------------------------------------------------
# TIFF layout: which pages and samples make each level
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Part:
    """A run of channels stored together: a page (contig samples) or one sample plane of a page."""

    page: object          # tifffile TiffPage or TiffFrame
    plane: int | None     # sample plane of a planar-separate page, None for contig samples
    keep: int             # samples kept (leading samples; alpha dropped)


@dataclass(frozen=True)
class _Level:
    shape: tuple[int, int]
    parts: tuple[_Part, ...]


def _keyframe(page):
    return getattr(page, "keyframe", None) or page


def _page_parts(page, path: Path, where: str) -> tuple[list[_Part], int, bool]:
    """The parts of one page, its channels and whether it is a colour (RGB) page."""
    kf = _keyframe(page)
    photometric = int(kf.photometric)
    spp = int(kf.samplesperpixel)
    if int(getattr(kf, "imagedepth", 1)) > 1:
        raise InputError(f"{path}: {where} is a volume (image depth {kf.imagedepth}); z-stacks "
                         "are not supported, give one plane")
    if photometric == 3:
        raise InputError(f"{path}: {where} is a palette-colour TIFF; not supported (convert it "
                         "to RGB)")
    if photometric not in (1, 2, 6) or (photometric in _PHOTOMETRIC_RGB and spp < 3):
        name = getattr(kf.photometric, "name", str(photometric))
        raise InputError(f"{path}: {where} has photometric interpretation {name}; only RGB, "
                         "YCbCr (JPEG) and min-is-black gray are supported")
    colour = photometric in _PHOTOMETRIC_RGB
    keep = 3 if colour else spp  # extra samples of an RGB page (alpha) are dropped
    if colour and spp > 3:
        log.info("%s: %s has %d samples per pixel; extra sample(s) (alpha) dropped", path, where,
                 spp)
    if spp > 1 and int(kf.planarconfig) == 2:
        parts = [_Part(page, s, 1) for s in range(keep)]
    else:
        parts = [_Part(page, None, keep)]
    return parts, keep, colour


def _check_dtype(dtype, path: Path, where: str) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise InputError(f"{path}: {where} stores samples of type {name}; only "
                         f"{', '.join(DTYPES)} are supported")
    return name


def _level_from_pages(pages: Sequence, path: Path, where: str):
    """(_Level, channels, colour, dtype) of a level made of ``pages`` (one per channel group)."""
    parts: list[_Part] = []
    channels = 0
    colours = set()
    dtypes = set()
    shapes = set()
    for page in pages:
        if page is None:
            raise InputError(f"{path}: {where} has a missing page")
        kf = _keyframe(page)
        p_parts, n, colour = _page_parts(page, path, where)
        parts += p_parts
        channels += n
        colours.add(colour)
        dtypes.add(_check_dtype(kf.dtype, path, where))
        shapes.add((int(kf.imagelength), int(kf.imagewidth)))
    if len(shapes) != 1 or len(dtypes) != 1 or len(colours) != 1:
        raise InputError(f"{path}: {where} mixes pages of different shapes, dtypes or colour "
                         f"models ({sorted(shapes)}, {sorted(dtypes)})")
    return _Level(shapes.pop(), tuple(parts)), channels, colours.pop(), dtypes.pop()


def _series_pages(series, path: Path) -> list:
    """Pages of a series after checking its axes (Z or T planes refused)."""
    axes, shape = series.axes, series.shape
    for ax, n in zip(axes, shape):
        if ax == "Z" and n > 1:
            raise InputError(f"{path}: a z-stack ({n} Z planes); give a single plane")
        if ax == "T" and n > 1:
            raise InputError(f"{path}: a time series ({n} T planes); give a single time point")
        if ax not in "YX" + _CHANNEL_AXES and n > 1:
            raise InputError(f"{path}: axis '{ax}' of size {n} (series axes {axes}, shape "
                             f"{tuple(shape)}); only Y, X and channels are supported")
    if any(ax in "IQ" for ax in axes):
        log.info("%s: %d unnamed image planes (axes %s) read as channels", path,
                 int(np.prod([n for a, n in zip(axes, shape) if a in "IQ"])), axes)
    return list(series.pages)


def _integer_reduction(shape0: tuple[int, int], shape: tuple[int, int]) -> int | None:
    """Integer r >= 2 with ``shape`` = ``shape0 / r`` rounded (round, floor or ceil), both axes."""
    (ny0, nx0), (ny, nx) = shape0, shape
    if ny < 1 or nx < 1 or ny >= ny0 or nx >= nx0:
        return None
    r = int(round(nx0 / nx))
    if r < 2:
        return None
    for n0, n in ((ny0, ny), (nx0, nx)):
        if n not in (n0 // r, -(-n0 // r), int(round(n0 / r))):
            if abs(n0 / n - r) > LEVEL_RTOL * r:
                return None
    return r


def _tiff_layout(tif, path: Path):
    """Levels of the main image of an open TiffFile, plus (channels, colour, dtype, series)."""
    if not tif.series:
        raise InputError(f"{path}: unreadable or corrupt TIFF (no image found)")
    # the main image: the largest series (the first among equals)
    sizes = [int(np.prod(s.shape)) for s in tif.series]
    series = tif.series[sizes.index(max(sizes))]
    pages = _series_pages(series, path)
    level0, channels, colour, dtype = _level_from_pages(pages, path, "level 0")
    if colour and channels != 3:
        raise InputError(f"{path}: {channels // 3} RGB planes in one image; give one colour image")
    levels = [level0]
    seen = {getattr(p, "offset", None) for p in pages}
    candidates: list[tuple[list, bool]] = []  # (pages, trusted: part of the series' own levels)
    for lev in list(getattr(series, "levels", []))[1:]:
        candidates.append((list(lev.pages), True))
    if series.kind != "ome":  # OME pyramids are series levels; other OME series are other images
        # reduced-resolution copies outside the series' levels: other series flagged reduced or
        # stored in the SubIFDs of the first page, and single such pages
        sub_offsets = set(getattr(_keyframe(pages[0]), "subifds", None) or ())

        def reduced(page) -> bool:
            return (bool(int(getattr(_keyframe(page), "subfiletype", 0)) & 1)
                    or getattr(page, "offset", None) in sub_offsets)

        for other in tif.series:
            if other is not series and other.pages and reduced(other.pages[0]):
                try:
                    candidates.append((_series_pages(other, path), False))
                except InputError:
                    continue
        if len(pages) == 1:
            singles = list(getattr(_keyframe(pages[0]), "pages", None) or ())
            singles += [tif.pages[i] for i in range(1, min(len(tif.pages), 64))]
            candidates += [([p], False) for p in singles if p is not None and reduced(p)]
    for cand_pages, trusted in candidates:
        if any(p is None for p in cand_pages) or getattr(cand_pages[0], "offset", 0) in seen:
            continue
        try:
            lev, ch, col, dt = _level_from_pages(cand_pages, path, "a pyramid level")
        except InputError as exc:
            if trusted:
                log.info("%s: a series level is not read (%s)", path, exc)
            continue
        r = _integer_reduction(level0.shape, lev.shape)
        if ch != channels or col != colour or dt != dtype or r is None:
            if trusted:
                log.info("%s: series level %s x %s is not an integer reduction with the same "
                         "channels; not used", path, *lev.shape)
            continue
        if any(lev.shape == other.shape for other in levels):
            continue
        seen.add(getattr(cand_pages[0], "offset", None))
        levels.append(lev)
    levels.sort(key=lambda lv: -lv.shape[1])
    return levels, channels, colour, dtype, series


# --------------------------------------------------------------------------------------------------
# Pixel size
# --------------------------------------------------------------------------------------------------

def _unit_factor(unit: str) -> float | None:
    u = unit.strip().replace("\\u00B5", "µ").replace("\\u00b5", "µ")
    return _UNIT_TO_UM.get(u) or _UNIT_TO_UM.get(u.lower())


def _isotropic(x: float, y: float, source: str) -> tuple[float | None, str]:
    if not (math.isfinite(x) and math.isfinite(y)) or x <= 0 or y <= 0:
        return None, f"{source} gives a non-positive pixel size ({x:g} x {y:g} um); ignored"
    if abs(x - y) > ANISOTROPY_RTOL * max(x, y):
        return None, (f"{source} gives anisotropic pixels ({x:.4g} x {y:.4g} um, more than "
                      f"{100 * ANISOTROPY_RTOL:g} % apart); ignored")
    return x, ""


def _ome_pixels(xml: str | None):
    """The first ``Pixels`` element of OME-XML; None when absent, unparsable or with a DOCTYPE."""
    if not xml or "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        return None  # no entity is ever expanded
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    return next((el for el in root.iter() if el.tag.rpartition("}")[2] == "Pixels"), None)


def _ome_pixel_size(xml: str, shape: tuple[int, int]) -> tuple[float | None, str, bool]:
    """Pixel size from OME-XML ``Pixels PhysicalSizeX/Y``: (um or None, note, final).

    ``final`` is False when the OME states no usable size and the TIFF tags may be tried.
    """
    pixels = _ome_pixels(xml)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None, "the OME-XML states no PhysicalSizeX (or does not parse)", False
    try:
        size = (int(pixels.get("SizeY", shape[0])), int(pixels.get("SizeX", shape[1])))
    except ValueError:
        size = (-1, -1)
    if size != tuple(shape):
        return None, (f"OME Pixels SizeY x SizeX {size[0]} x {size[1]} differ from the image "
                      f"({shape[0]} x {shape[1]}), its PhysicalSize ignored"), False
    values = []
    for axis in ("X", "Y"):
        raw = pixels.get(f"PhysicalSize{axis}")
        if raw is None:
            continue
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        factor = _unit_factor(unit)
        if factor is None:
            return None, f"OME PhysicalSize{axis}Unit '{unit}' is not a length unit read here", True
        try:
            values.append(float(raw) * factor)
        except ValueError:
            return None, f"OME PhysicalSize{axis} '{raw}' is not a number", True
    x = values[0]
    y = values[1] if len(values) > 1 else x
    um, note = _isotropic(x, y, "OME PhysicalSizeX/Y")
    if um is None:
        return None, note, True
    unit = pixels.get("PhysicalSizeXUnit", "µm")
    return um, f"OME PhysicalSizeX = {float(pixels.get('PhysicalSizeX')):g} {unit}", True


def _resolution_pixel_size(xres: float | None, yres: float | None, unit: int,
                           source: str) -> tuple[float | None, str]:
    """Pixel size from resolution tags in pixels per inch (unit 2) or per centimetre (unit 3)."""
    if xres is None or xres <= 0:
        return None, "no pixel size in the metadata"
    yres = xres if yres is None or yres <= 0 else yres
    if unit == 1:
        return None, f"{source} ResolutionUnit is NONE: no physical pixel size"
    per = {2: (25400.0, "dpi"), 3: (10000.0, "px/cm")}.get(unit)
    if per is None:
        return None, f"{source} ResolutionUnit {unit} is unknown; ignored"
    x, y = per[0] / xres, per[0] / yres
    um, note = _isotropic(x, y, f"{source} resolution")
    if um is None:
        return None, note
    if um > MAX_TAG_PIXEL_UM:
        return None, (f"{source} resolution {xres:g} {per[1]} ({um:.1f} um/px) is a screen "
                      "default, ignored")
    return um, f"{source} resolution {xres:g} {per[1]}"


def _rational(tag) -> float | None:
    if tag is None:
        return None
    v = tag.value
    if isinstance(v, tuple):
        return v[0] / v[1] if len(v) == 2 and v[1] else None
    return float(v)


def _tiff_pixel_size(tif, page, shape: tuple[int, int]) -> tuple[float | None, str]:
    """Pixel size (um) of level 0: OME-XML, else ImageJ unit, else TIFF resolution tags."""
    notes = []
    if getattr(tif, "is_ome", False) and tif.ome_metadata:
        um, note, final = _ome_pixel_size(tif.ome_metadata, shape)
        if final:
            return um, note
        notes.append(note)
    kf = _keyframe(page)
    tags = kf.tags
    xres, yres = _rational(tags.get("XResolution")), _rational(tags.get("YResolution"))
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF 6: default inch
    ij = getattr(tif, "imagej_metadata", None) or {}
    if unit == 1 and ij.get("unit") and xres:
        factor = _unit_factor(str(ij["unit"]))
        if factor is not None:
            yr = yres if yres else xres
            um, note = _isotropic(factor / xres, factor / yr, "ImageJ")
            if um is None:
                return None, note
            return um, f"ImageJ unit '{ij['unit']}' with TIFF resolution {xres:g} px/unit"
    um, note = _resolution_pixel_size(xres, yres, unit, "TIFF")
    if um is None and notes:
        note = f"{notes[0]}; {note}"
    return um, note


def _ome_channel_names(tif, channels: int) -> tuple[str, ...] | None:
    pixels = _ome_pixels(tif.ome_metadata if getattr(tif, "is_ome", False) else None)
    if pixels is None:
        return None
    names = [el.get("Name", "") for el in pixels if el.tag.rpartition("}")[2] == "Channel"]
    if len(names) == channels and all(names):
        return tuple(names)
    return None


# --------------------------------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------------------------------

def _check_path(path) -> tuple[Path, str]:
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: image not found")
    if not path.is_file():
        raise InputError(f"{path}: {'is a directory, ' if path.is_dir() else ''}not a file")
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise InputError(f"{path}: unknown image extension '{path.suffix}'; supported: "
                         f"{', '.join(SUPPORTED_EXTENSIONS)}")
    return path, ext


@contextlib.contextmanager
def _open_tiff(path: Path) -> Iterator:
    """An open ``tifffile.TiffFile`` (InputError when it cannot be opened). tifffile's own
    warnings are kept out of the job logs meanwhile: on OME files whose XML it cannot map onto
    the pages (e.g. planar OME metadata over interleaved RGB pages) it warns at every opening and
    falls back to the TIFF pages, which is what is read here."""
    import tifffile

    quiet = logging.getLogger("tifffile")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:  # tifffile raises many types on a corrupt file
            raise InputError(f"{path}: unreadable or corrupt TIFF ({type(exc).__name__}: "
                             f"{exc})") from exc
        with tif:
            yield tif
    finally:
        quiet.setLevel(level)


def _names(colour: bool, channels: int, ome: tuple[str, ...] | None) -> tuple[str, ...]:
    if colour:
        return ("red", "green", "blue")
    return ome or tuple(f"channel_{i}" for i in range(channels))


def _check_size(path: Path, shape: tuple[int, int]) -> None:
    if shape[0] < 2 or shape[1] < 2:
        raise InputError(f"{path}: image of {shape[0]} x {shape[1]} pixels; at least 2 x 2 "
                         "needed")


def _tiff_info(path: Path) -> ImageInfo:
    with _open_tiff(path) as tif:
        try:
            levels, channels, colour, dtype, series = _tiff_layout(tif, path)
            shape = levels[0].shape
            _check_size(path, shape)
            um, note = _tiff_pixel_size(tif, levels[0].parts[0].page, shape)
            names = _names(colour, channels, _ome_channel_names(tif, channels))
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{path}: unreadable or corrupt TIFF ({type(exc).__name__}: "
                             f"{exc})") from exc
    return ImageInfo(str(path), shape, channels, dtype, "brightfield" if colour else "fluorescence",
                     tuple(lv.shape for lv in levels), um, note, names)


#: Pillow modes -> (colour, channels, dtype) of what read_image returns.
_PIL_MODES = {"RGB": (True, 3, "uint8"), "RGBA": (True, 3, "uint8"), "RGBX": (True, 3, "uint8"),
              "P": (True, 3, "uint8"), "PA": (True, 3, "uint8"), "YCbCr": (True, 3, "uint8"),
              "L": (False, 1, "uint8"), "LA": (False, 1, "uint8"),
              "I;16": (False, 1, "uint16"), "I;16B": (False, 1, "uint16"),
              "I;16L": (False, 1, "uint16"), "F": (False, 1, "float32")}


def _open_pil(path: Path):
    from PIL import Image

    try:
        im = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: {exc}; convert it to a tiled TIFF") from exc
    except Exception as exc:
        raise InputError(f"{path}: unreadable or corrupt image ({type(exc).__name__}: {exc})") \
            from exc
    if im.format not in ("PNG", "JPEG", "MPO"):
        im.close()
        raise InputError(f"{path}: a {im.format} file; PNG and JPEG are read with pillow, other "
                         "formats as TIFF")
    if im.mode not in _PIL_MODES:
        im.close()
        raise InputError(f"{path}: pillow image mode {im.mode} is not supported (RGB, RGBA, "
                         "palette, 8/16-bit gray)")
    rawmode = im.tile[0].args if im.tile else None
    rawmode = rawmode[0] if isinstance(rawmode, tuple) else rawmode
    if im.mode.startswith("RGB") and isinstance(rawmode, str) and ";16" in rawmode:
        im.close()
        raise InputError(f"{path}: 16-bit colour PNG; pillow reads it as 8 bits only, convert it "
                         "to TIFF")
    return im


def _pil_info(path: Path) -> ImageInfo:
    im = _open_pil(path)
    with im:
        colour, channels, dtype = _PIL_MODES[im.mode]
        shape = (int(im.size[1]), int(im.size[0]))
        _check_size(path, shape)
        source = "PNG pHYs" if im.format == "PNG" else "JPEG JFIF"
        dpi = im.info.get("dpi")
        if dpi:
            um, note = _resolution_pixel_size(float(dpi[0]), float(dpi[1]), 2, source)
        else:
            um, note = None, "no pixel size in the metadata"
        if im.mode in ("RGBA", "LA", "PA"):
            log.info("%s: alpha channel dropped", path)
    return ImageInfo(str(path), shape, channels, dtype, "brightfield" if colour else "fluorescence",
                     (shape,), um, note, _names(colour, channels, None))


def read_image_info(path) -> ImageInfo:
    """Header of a microscopy image: shape, channels, dtype, kind, pyramid levels, pixel size.

    Reads the header only (no pixel data is decoded), so it takes milliseconds even for a
    40,000 x 30,000 slide.

    Parameters
    ----------
    path : path-like
        TIFF / BigTIFF / OME-TIFF (``.tif``, ``.tiff``, ``.btf``), PNG or JPEG.

    Returns
    -------
    ImageInfo

    Raises
    ------
    InputError
        The file is missing or not a file, has an unknown extension, is unreadable or corrupt,
        holds more than one Z or T plane, is smaller than 2 x 2 pixels, or stores a dtype other
        than uint8 / uint16 / float32 / float64.

    Notes
    -----
    RGB stored with samples last (contig) or as planes (planar) and RGB(A) PNG / JPEG are
    ``"brightfield"`` with 3 channels; gray and multichannel images (e.g. ``CYX`` pages of an
    OME-TIFF) are ``"fluorescence"``.

    The pixel size comes, in this order, from OME-XML ``Pixels PhysicalSizeX/Y`` (unit
    ``PhysicalSizeXUnit``, default um; nm, mm, cm, m, in, ... converted), from an ImageJ
    description ``unit`` (ImageJ stores pixels per unit with ResolutionUnit NONE), or from the
    TIFF XResolution/YResolution tags with ResolutionUnit inch (``25400 / dpi`` um) or centimetre
    (``10000 / dpcm`` um); for PNG / JPEG from pHYs / JFIF density. X and Y more than 1 % apart
    give None (anisotropic). ResolutionUnit NONE carries no physical size, and a resolution-tag
    pixel larger than 50 um is a screen or print default (72, 96, 300 dpi ...): None. An OME
    value is reported as stated (a wrong objective recorded by the acquisition software cannot
    be refuted from the header; the registration checks plausibility).
    """
    path, ext = _check_path(path)
    if ext in _TIFF_EXT:
        info = _tiff_info(path)
    else:
        info = _pil_info(path)
    log.debug("%s: %s x %s, %d channel(s) %s, %s, levels %s, pixel %s um (%s)", path,
              *info.shape, info.channels, info.dtype, info.kind, info.levels,
              info.pixel_size_um, info.pixel_size_note)
    return info


def choose_downsample(info: ImageInfo, *, max_pixels: int, pixel_size_um: float | None = None,
                      target_um: float | None = None) -> int:
    """Integer downsampling factor for a pixel budget and, optionally, a target pixel size.

    ``f_pixels = ceil(sqrt(ny * nx / max_pixels))`` is the smallest factor with
    ``(ny / f) * (nx / f) <= max_pixels``; with both ``pixel_size_um`` and ``target_um`` the
    factor is ``max(f_pixels, floor(target_um / pixel_size_um))``, i.e. as coarse as the target
    allows without exceeding it (``f * pixel_size_um <= target_um``). A pixel coarser than the
    target is chosen only when ``max_pixels`` demands it. Always >= 1.

    Parameters
    ----------
    info : ImageInfo
    max_pixels : int
        Largest number of output pixels ``(ny / f) * (nx / f)``.
    pixel_size_um : float, optional
        Level-0 pixel size (um), e.g. ``info.pixel_size_um`` or a configured value.
    target_um : float, optional
        Pixel size (um) wanted, e.g. a fraction of the coarser modality's pixel.

    Returns
    -------
    int

    >>> info = ImageInfo("x", (1000, 2000), 3, "uint8", "brightfield", ((1000, 2000),), None,
    ...                  "", ())
    >>> choose_downsample(info, max_pixels=500_000), choose_downsample(info, max_pixels=10**7,
    ...     pixel_size_um=0.5, target_um=2.2)
    (2, 4)
    """
    if max_pixels < 1:
        raise ValueError(f"choose_downsample: max_pixels must be >= 1, got {max_pixels}")
    ny, nx = info.shape
    f = max(1, math.ceil(math.sqrt(ny * nx / max_pixels)))
    while (ny / f) * (nx / f) > max_pixels:  # guard against rounding of the square root
        f += 1
    if pixel_size_um and target_um and pixel_size_um > 0 and target_um > 0:
        f = max(f, int(math.floor(target_um / pixel_size_um * (1 + 1e-9))))
    return _pyramid_factor(info, f)


#: A factor may grow by this much to become a multiple of a pyramid level's reduction.
PYRAMID_SLACK = 1.25


def _pyramid_factor(info: ImageInfo, f: int) -> int:
    """``f`` rounded up to a multiple of the reduction of the coarsest pyramid level that allows
    it within :data:`PYRAMID_SLACK` (reading a level 4 x coarser decodes 16 x fewer pixels: a
    40,000 x 30,000 slide read at 20 from its /4 level instead of at 17 from level 0 takes 0.9 s
    instead of 15 s); ``f`` itself when no level does.

    >>> info = ImageInfo("x", (30000, 40000), 3, "uint8", "brightfield",
    ...                  ((30000, 40000), (7500, 10000), (1875, 2500)), None, "", ())
    >>> _pyramid_factor(info, 17), _pyramid_factor(info, 30), _pyramid_factor(info, 3)
    (20, 32, 3)
    """
    best_r = 1
    for shape in info.levels[1:]:
        r = _integer_reduction(info.shape, shape)
        if r is not None and best_r < r <= f:
            g = r * -(-f // r)
            if g <= PYRAMID_SLACK * f and _pick_level(info, g)[1] >= r:
                best_r = r
    return best_r * -(-f // best_r)


# --------------------------------------------------------------------------------------------------
# Bounded-memory reading
# --------------------------------------------------------------------------------------------------

class _BlockMeans:
    """Accumulates block means of ``d`` x ``d`` blocks of a run of channels, band by band.

    Level rows are summed in float64 over each block's ``d`` rows, then over its ``d`` columns,
    a few output rows at a time so that the float64 temporaries stay below ``tmp_bytes`` (or one
    level row, when that is larger).
    """

    def __init__(self, out: np.ndarray, d: int, c0: int, c1: int, tmp_bytes: float = 4 * _MB):
        self.out, self.d, self.c0, self.c1 = out, d, c0, c1
        self.ny_out, self.nx_out = out.shape[:2]
        self.acc = np.zeros((self.nx_out, d, c1 - c0), dtype=np.float64)
        self.rows_needed = self.ny_out * d
        row = self.nx_out * d * (c1 - c0) * 8
        self.chunk = max(1, int(tmp_bytes // row))  # output rows per float64 temporary

    def _store(self, yo: int, sums: np.ndarray) -> None:
        """Write ``sums`` (m, nx_out, d, c) of whole block rows as means of output rows yo..."""
        s = sums[:, :, 0].copy()
        for j in range(1, self.d):
            s += sums[:, :, j]
        s /= self.d * self.d
        self.out[yo:yo + s.shape[0], :, self.c0:self.c1] = s

    def add(self, y0: int, band: np.ndarray) -> bool:
        """Add level rows ``y0 .. y0 + len(band)`` (band: rows, nx, c); False once all are in."""
        d, nxo = self.d, self.nx_out
        y1 = min(y0 + band.shape[0], self.rows_needed)
        band = band[:max(0, y1 - y0), :nxo * d]
        y = y0
        while y < y1:
            yo = y // d
            if y % d == 0 and y1 - y >= d:  # whole block rows, a chunk of output rows at a time
                m = min((y1 - y) // d, self.chunk)
                blk = band[y - y0:y - y0 + m * d]
                if d == 1:
                    self.out[yo:yo + m, :, self.c0:self.c1] = blk
                else:
                    self._store(yo, blk.reshape(m, d, nxo, d, -1).sum(axis=1, dtype=np.float64))
                y += m * d
                continue
            ye = min((yo + 1) * d, y1)  # part of a block row: accumulate
            self.acc += band[y - y0:ye - y0].reshape(ye - y, nxo, d, -1).sum(axis=0,
                                                                             dtype=np.float64)
            if ye == (yo + 1) * d:
                self._store(yo, self.acc[None])
                self.acc[:] = 0.0
            y = ye
        return y1 < self.rows_needed


def _part_geometry(part: _Part, level: _Level):
    """(segment rows, segments per row, plane offset, raw) of a part: how it is cut into bands."""
    kf = _keyframe(part.page)
    ny, nx = level.shape
    if kf.is_tiled:
        th, tw = int(kf.tilelength), int(kf.tilewidth)
        ntx = -(-nx // tw)
        nty = -(-ny // th)
        per_plane = nty * ntx
        return th, ntx, (part.plane or 0) * per_plane, False
    rps = min(int(kf.rowsperstrip) or ny, ny)
    nstrips = -(-ny // rps)
    raw = int(kf.compression) == 1 and int(getattr(kf, "fillorder", 1)) == 1 \
        and int(kf.bitspersample) % 8 == 0
    return rps, 1, (part.plane or 0) * nstrips, raw


def _tmp_bytes(memory_mb: float) -> float:
    """Cap of the float64 block-sum temporaries of :class:`_BlockMeans`."""
    return min(4 * _MB, memory_mb * _MB / 8)


def _segment_bytes(part: _Part, level: _Level) -> int:
    """Bytes of one decoded segment (a full tile, or a strip) of a part."""
    kf = _keyframe(part.page)
    seg_rows = _part_geometry(part, level)[0]
    seg_samples = 1 if part.plane is not None else int(kf.samplesperpixel)
    width = int(kf.tilewidth) if kf.is_tiled else level.shape[1]
    return seg_rows * width * seg_samples * np.dtype(kf.dtype).itemsize


def _threaded(part: _Part, level: _Level) -> bool:
    """Decode in threads only segments large enough to pay for it."""
    return _workers() > 1 and _segment_bytes(part, level) >= 256 << 10


def _part_plan(part: _Part, level: _Level, d: int, memory_mb: float):
    """(rows per band, bytes one band needs, raw) of a part.

    The bytes: the decoded band in the stored dtype (kept samples); the compressed bytes of a
    window of ``2 x workers`` segments; the decoded segments in flight (twice each: a codec's
    output and its reshaped copy); and the float64 block sums (accumulator and temporaries of
    :class:`_BlockMeans`, at least one level row); plus the file's segment tables.
    """
    kf = _keyframe(part.page)
    ny, nx = level.shape
    item = np.dtype(kf.dtype).itemsize
    seg_rows, ntx, _first, raw = _part_geometry(part, level)
    seg_samples = 1 if part.plane is not None else int(kf.samplesperpixel)
    row8 = (nx // d) * d * part.keep * 8
    header = 80 * len(part.page.dataoffsets)  # the segment offsets and byte counts as Python ints
    sums = row8 + 1.5 * max(row8, _tmp_bytes(memory_mb)) + header
    budget = min(memory_mb * _MB * 0.5, 64 * _MB)
    if raw:
        per_row = nx * seg_samples * item
        rows = int(max(1, min(ny, (budget - sums) // per_row)))
        return rows, rows * per_row + sums, raw
    seg_bytes = _segment_bytes(part, level)
    max_count = int(np.max(part.page.databytecounts, initial=0))
    n_seg_rows = -(-ny // seg_rows)
    window = 2 * _workers()

    def need(k: int) -> float:
        n = min(window, k * ntx)
        decoding = (n if _threaded(part, level) else 1) * 2 * seg_bytes
        return k * seg_rows * nx * part.keep * item + n * max_count + decoding + sums

    lo, hi = 1, n_seg_rows  # largest k (segment rows per band) within the budget, at least 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if need(mid) <= budget else (lo, mid - 1)
    return lo * seg_rows, need(lo), raw


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _iter_bands(part: _Part, level: _Level, rows: int, stop: int, raw: bool, pool,
                byteorder: str, path: Path) -> Iterator[tuple[int, np.ndarray]]:
    """``(y0, band (rows, nx, keep))`` of one part, top to bottom, until level row ``stop``.

    Uncompressed strips are read row range by row range (any strip size); tiles and compressed
    strips by whole segment rows, a window of ``2 x workers`` segments decoded at a time.
    """
    page = part.page
    kf = _keyframe(page)
    ny, nx = level.shape
    fh = page.parent.filehandle
    seg_rows, ntx, first, _ = _part_geometry(part, level)
    offsets, counts = page.dataoffsets, page.databytecounts
    if raw:
        seg_samples = 1 if part.plane is not None else int(kf.samplesperpixel)
        dtype = np.dtype(kf.dtype).newbyteorder(byteorder)
        row_bytes = nx * seg_samples * dtype.itemsize
        for y0 in range(0, min(ny, stop), rows):
            y1 = min(y0 + rows, ny)
            band = np.empty((y1 - y0, nx, seg_samples), dtype=dtype)
            y = y0
            while y < y1:
                k = y // seg_rows
                ye = min((k + 1) * seg_rows, y1)
                start, n = (y - k * seg_rows) * row_bytes, (ye - y) * row_bytes
                rows_view = band[y - y0:ye - y0].reshape(-1).view(np.uint8)
                with fh.lock:
                    fh.seek(offsets[first + k] + start)
                    got = fh.readinto(rows_view) if start + n <= counts[first + k] else 0
                if got != n:
                    raise InputError(f"{path}: strip {first + k} is truncated")
                y = ye
            yield y0, band[..., :part.keep]
            del band  # before the next band is allocated
        return

    tw = int(kf.tilewidth) if kf.is_tiled else nx
    decodeargs = {"_fullsize": bool(kf.is_tiled)}
    if int(kf.compression) in _JPEG:
        decodeargs["jpegtables"] = getattr(page, "jpegtables", None) or kf.jpegtables
        decodeargs["jpegheader"] = kf.jpegheader
    decode = kf.decode
    keep = part.keep
    window_size = 2 * _workers()
    threaded = _threaded(part, level)

    def work(item):
        data, index = item
        try:
            seg, _, _ = decode(data, index, **decodeargs)
        except Exception as exc:
            raise InputError(f"{path}: segment {index} does not decode ({type(exc).__name__}: "
                             f"{exc})") from exc
        return index, seg

    for y0 in range(0, min(ny, stop), rows):
        y1 = min(y0 + rows, ny)
        band = np.zeros((y1 - y0, nx, keep), dtype=np.dtype(kf.dtype))
        r0, r1 = y0 // seg_rows, -(-y1 // seg_rows)
        idx = iter([first + r * ntx + c for r in range(r0, r1) for c in range(ntx)])
        while True:  # a window of segments in flight at a time
            window = []
            for i in itertools.islice(idx, window_size):
                if counts[i] > 0:
                    with fh.lock:
                        fh.seek(offsets[i])
                        window.append((fh.read(counts[i]), i))
                else:
                    window.append((None, i))
            if not window:
                break
            results = pool.map(work, window) if threaded else map(work, window)
            for index, seg in results:
                if seg is None:
                    continue  # empty segment: zeros
                r, c = divmod(index - first, ntx)
                ys, xs = r * seg_rows - y0, c * tw
                h = min(seg.shape[1], y1 - y0 - ys, ny - r * seg_rows)
                w = min(seg.shape[2], nx - xs)
                band[ys:ys + h, xs:xs + w] = seg[0, :h, :w, :keep]
            del window, results
        yield y0, band
        del band  # before the next band is allocated


def _pick_level(info: ImageInfo, downsample: int) -> tuple[int, int]:
    """(level index, its integer reduction r) of the coarsest level usable for ``downsample``."""
    ny0, nx0 = info.shape
    ny_out, nx_out = ny0 // downsample, nx0 // downsample
    best, best_r = 0, 1
    for i, (ny, nx) in enumerate(info.levels[1:], start=1):
        r = int(round(nx0 / nx))
        if r < 2 or downsample % r:
            continue
        exact = (ny in (ny0 // r, -(-ny0 // r)) and nx in (nx0 // r, -(-nx0 // r)))
        near = abs(nx0 / nx - r) <= LEVEL_RTOL * r and abs(ny0 / ny - r) <= LEVEL_RTOL * r
        dd = downsample // r
        if (exact or near) and ny >= ny_out * dd and nx >= nx_out * dd and r > best_r:
            best, best_r = i, r
    return best, best_r


def _read_tiff(path: Path, info: ImageInfo, downsample: int, memory_mb: float) -> np.ndarray:
    with _open_tiff(path) as tif:
        levels, channels, colour, dtype, _ = _tiff_layout(tif, path)
        if tuple(lv.shape for lv in levels) != info.levels or channels != info.channels:
            raise InputError(f"{path}: the file does not match the ImageInfo given (levels "
                             f"{tuple(lv.shape for lv in levels)} vs {info.levels}); re-read it")
        li, r = _pick_level(info, downsample)
        level = levels[li]
        d = downsample // r
        ny_out, nx_out = info.shape[0] // downsample, info.shape[1] // downsample
        plans = [_part_plan(part, level, d, memory_mb) for part in level.parts]
        need = max(p[1] for p in plans)
        if need > memory_mb * _MB:
            part = level.parts[int(np.argmax([p[1] for p in plans]))]
            kf = _keyframe(part.page)
            seg = (f"tiles of {kf.tilelength} x {kf.tilewidth}" if kf.is_tiled
                   else f"strips of {min(int(kf.rowsperstrip), level.shape[0])} rows")
            raise InputError(f"{path}: reading level {li} ({level.shape[0]} x {level.shape[1]}, "
                             f"{seg}) at downsample {downsample} needs {need / _MB:.1f} MB for "
                             f"one band of segments and one row of output blocks; memory_mb="
                             f"{memory_mb:g} is too small")
        log.info("%s: level %d (%d x %d, reduction %d) block-averaged by %d -> %d x %d x %d; "
                 "%.1f MB per band", path, li, *level.shape, r, d, ny_out, nx_out, channels,
                 need / _MB)
        out = np.empty((ny_out, nx_out, channels), dtype=np.float32)
        stop = ny_out * d
        c0 = 0
        with ThreadPoolExecutor(_workers()) as pool:
            for part, (rows, _need, raw) in zip(level.parts, plans):
                acc = _BlockMeans(out, d, c0, c0 + part.keep, _tmp_bytes(memory_mb))
                for y0, band in _iter_bands(part, level, rows, stop, raw, pool, tif.byteorder,
                                            path):
                    more = acc.add(y0, band)
                    del band
                    if not more:
                        break
                c0 += part.keep
    return out


def _read_pil(path: Path, info: ImageInfo, downsample: int, memory_mb: float) -> np.ndarray:
    im = _open_pil(path)
    with im:
        scale = 1
        if im.format in ("JPEG", "MPO"):
            scale = next((s for s in (8, 4, 2) if downsample % s == 0), 1)
            if scale > 1:
                w, h = im.size
                im.draft(im.mode, (-(-w // scale), -(-h // scale)))
                scale = int(round(w / im.size[0]))
                if downsample % scale:
                    raise InputError(f"{path}: JPEG draft scaled by {w / im.size[0]:g}, not a "
                                     f"divisor of downsample {downsample}")
        convert = im.mode in ("P", "PA", "YCbCr", "RGBX")  # to RGB(A) first: one more copy
        bands = {"P": 3, "PA": 4}.get(im.mode, len(im.getbands()))
        item = np.dtype(info.dtype).itemsize
        decoded = im.size[0] * im.size[1] * max(bands, 1) * item
        need = ((3 if convert else 2) * decoded  # pillow's buffer(s) and the numpy array
                + (im.size[0] // max(1, downsample // scale)) * info.channels * 16)
        if need > memory_mb * _MB:
            raise InputError(f"{path}: pillow decodes the whole image ({im.size[1]} x "
                             f"{im.size[0]} x {bands} {info.dtype} after JPEG scaling by "
                             f"{scale}): needs {need / _MB:.1f} MB, memory_mb={memory_mb:g}")
        try:
            if convert:
                im = im.convert("RGBA" if im.mode == "PA" else "RGB")
            arr = np.asarray(im)
        except Exception as exc:
            raise InputError(f"{path}: unreadable or corrupt image ({type(exc).__name__}: "
                             f"{exc})") from exc
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = arr[:, :, :info.channels]
    d = downsample // scale
    ny_out, nx_out = info.shape[0] // downsample, info.shape[1] // downsample
    out = np.empty((ny_out, nx_out, info.channels), dtype=np.float32)
    if arr.shape[0] < ny_out * d or arr.shape[1] < nx_out * d:
        raise InputError(f"{path}: decoded image {arr.shape[:2]} smaller than expected")
    _BlockMeans(out, d, 0, info.channels, _tmp_bytes(memory_mb)).add(0, arr)
    log.info("%s: decoded by pillow (scale 1/%d) and block-averaged by %d -> %d x %d x %d",
             path, scale, d, ny_out, nx_out, info.channels)
    return out


def read_image(path, downsample: int = 1, *, memory_mb: float = 512.0,
               info: ImageInfo | None = None) -> np.ndarray:
    """Block means of a microscopy image at an integer downsampling, in bounded memory.

    Parameters
    ----------
    path : path-like
    downsample : int
        Block size ``f`` >= 1 (level-0 pixels): each output pixel is the mean of an ``f`` x ``f``
        block of level-0 pixels (anti-aliased; never strided sampling). A partial last block row
        or column is dropped.
    memory_mb : float
        Peak memory (MB) allowed beyond the output array.
    info : ImageInfo, optional
        :func:`read_image_info` of ``path`` (read again when not given).

    Returns
    -------
    ndarray of float32, shape (ny // f, nx // f, c)
        Values in the file's units (uint8 stays 0-255). Planar RGB and ``CYX`` channel pages come
        out channels last; an alpha channel is dropped.

    Raises
    ------
    InputError
        As :func:`read_image_info`; when one band of tiles or strips and one row of output
        blocks need more than ``memory_mb`` (the message names the file, the level, the MB
        needed and ``memory_mb``); for PNG / JPEG when the decoded image exceeds ``memory_mb``.

    Notes
    -----
    The read uses pyramid level L when its reduction ``r = nx0 / nx_L`` is within 0.5 % of an
    integer (or its shape is the floor/ceil of ``n0 / r``) dividing ``f``: that level is
    block-averaged by ``f / r``, which equals the level-0 block mean when the level holds exact
    ``r`` x ``r`` means, and approximates it otherwise. TIFF levels are read in horizontal bands
    of whole tile rows (or strips; uncompressed strips by row ranges), decoded in a few threads,
    and summed in float64 into the output. A JPEG is decoded by pillow at 1/2, 1/4 or 1/8 scale
    (DCT scaling, close to a block mean) when that divides ``f``; a PNG is decoded whole.
    """
    downsample = int(downsample)
    if downsample < 1:
        raise ValueError(f"read_image: downsample must be >= 1, got {downsample}")
    path, ext = _check_path(path)
    info = info or read_image_info(path)
    if info.shape[0] // downsample < 1 or info.shape[1] // downsample < 1:
        raise InputError(f"{path}: downsample {downsample} leaves no pixel of the "
                         f"{info.shape[0]} x {info.shape[1]} image")
    if ext in _TIFF_EXT:
        return _read_tiff(path, info, downsample, memory_mb)
    return _read_pil(path, info, downsample, memory_mb)


# --------------------------------------------------------------------------------------------------
# Stain features and tissue mask
# --------------------------------------------------------------------------------------------------

def _check_image(image: np.ndarray, kind: str) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim != 3:
        raise ValueError(f"expected an image (ny, nx, c), got shape {img.shape}")
    if kind == "brightfield":
        if img.shape[2] != 3:
            raise ValueError(f"a bright-field image has 3 channels (RGB), got {img.shape[2]}")
    elif kind != "fluorescence":
        raise ValueError(f"kind must be 'brightfield' or 'fluorescence', got {kind!r}")
    return img


def _sample(values: np.ndarray, max_n: int = 1 << 21) -> np.ndarray:
    """A deterministic strided subsample of the rows of ``values`` (n, c) for percentiles."""
    step = max(1, values.shape[0] // max_n)
    return values[::step]


def _glass_level(rgb: np.ndarray) -> tuple[np.ndarray, bool]:
    """Per-channel glass level I0 (99th percentile) and whether it looks like glass.

    Glass is bright and neutral: chroma ``(max - min) / max`` of I0 at most
    :data:`MAX_GLASS_CHROMA`. When the brightest pixels are coloured, the field holds (almost) no
    glass; I0 is then neutral at the level of its brightest channel.
    """
    i0 = np.percentile(_sample(rgb.reshape(-1, 3)), 99, axis=0).astype(np.float64)
    top = float(i0.max())
    if not top > 0:
        return np.ones(3), False
    glass = (top - float(i0.min())) / top <= MAX_GLASS_CHROMA
    if not glass:
        i0 = np.full(3, top)
    return np.maximum(i0, 1e-12), glass


#: Least glass fraction of a bright-field field for a spatially varying glass level (flat field).
MIN_GLASS_FRACTION = 0.05
#: Largest number of glass pixels the flat-field fit uses (a deterministic subsample).
FLAT_FIELD_SAMPLES = 200_000


#: Degree of the polynomial surface (in x and y) of the flat field: 4 follows a cos^4-like
#: vignetting that darkens the corners by 40 % to within 1 %.
FLAT_FIELD_DEGREE = 4


def _poly_terms(u: np.ndarray, v: np.ndarray, degree: int = FLAT_FIELD_DEGREE) -> list:
    """The monomials ``u^i v^j`` (``i + j <= degree``) of the flat-field surface, as arrays
    broadcast from ``u`` and ``v``."""
    return [u ** i * v ** j for i in range(degree + 1) for j in range(degree + 1 - i)]


def _glass_field(rgb: np.ndarray, smooth_px: float = 1.5) -> tuple[np.ndarray, bool]:
    """The glass level I0 of a bright-field image, per pixel where the field shows enough glass.

    Microscope illumination is rarely flat: on the real MSIght H&E the glass reads 0.07 optical
    density at the centre and 0.2 in the corners against one global level, which a colour
    deconvolution turns into hematoxylin on empty glass. Starting from the global level
    (:func:`_glass_level`), pixels below Otsu's threshold of the (lightly smoothed) optical
    density are glass candidates; ``log I`` of each channel is fitted over them by a polynomial
    surface of degree :data:`FLAT_FIELD_DEGREE` in x and y (least squares, refitted once without
    the candidates more than three robust deviations darker than the surface: pale tissue), and
    I0 is that surface.

    Returns
    -------
    i0 : ndarray of float32, shape (ny, nx, 3), or shape (3,)
        The per-pixel glass level, or the global one when the field holds less than
        :data:`MIN_GLASS_FRACTION` of glass, or none (``glass`` False).
    glass : bool
        Whether the field shows glass (:func:`_glass_level`).
    """
    i0, glass = _glass_level(rgb)
    if not glass:
        return i0, False
    ny, nx, _ = rgb.shape
    od = -np.log10(_transmittance(rgb, i0)).sum(axis=2)
    work = ndi.gaussian_filter(od, smooth_px, mode="nearest") if smooth_px > 0 else od
    cand = work <= otsu_threshold(_sample(work.reshape(-1, 1)))
    del od, work
    if cand.mean() < MIN_GLASS_FRACTION:
        return i0, True
    yy, xx = np.nonzero(cand)
    step = max(1, yy.size // FLAT_FIELD_SAMPLES)
    yy, xx = yy[::step], xx[::step]
    a = np.stack(_poly_terms(xx / max(nx - 1, 1) - 0.5, yy / max(ny - 1, 1) - 0.5), axis=1)
    logs = np.log(np.maximum(rgb[yy, xx].astype(np.float64), 1.0))
    keep = np.ones(len(yy), dtype=bool)
    for _ in range(2):
        coef = np.linalg.lstsq(a[keep], logs[keep], rcond=None)[0]        # (6, 3)
        resid = logs - a @ coef
        spread = 1.4826 * np.median(np.abs(resid[keep]), axis=0) + 1e-6
        keep = (resid > -3.0 * spread).all(axis=1)
    terms = _poly_terms((np.arange(nx) / max(nx - 1, 1) - 0.5)[None],
                        (np.arange(ny) / max(ny - 1, 1) - 0.5)[:, None])
    field = np.empty((ny, nx, 3), dtype=np.float32)
    for c in range(3):
        field[..., c] = np.exp(sum(k * t for k, t in zip(coef[:, c], terms)))
    return np.maximum(field, 1e-12), True


def _transmittance(rgb: np.ndarray, i0: np.ndarray) -> np.ndarray:
    """``I / I0`` clipped to [1/255, 1], float32 (ny, nx, 3); ``i0`` (3,) or (ny, nx, 3)."""
    t = rgb.astype(np.float32) / i0.astype(np.float32)
    return np.clip(t, 1.0 / 255.0, 1.0, out=t)


def stain_features(image: np.ndarray, kind: str, *, channel_names: Sequence[str] | None = None
                   ) -> tuple[np.ndarray, tuple[str, ...]]:
    """Non-negative stain features of a microscopy image, ~0 on background.

    Parameters
    ----------
    image : ndarray, shape (ny, nx, c)
        As returned by :func:`read_image` (values in the file's units).
    kind : {"brightfield", "fluorescence"}
    channel_names : sequence of str, optional
        Fluorescence channel names (``ImageInfo.channel_names``); default ``"channel_{i}"``.

    Returns
    -------
    features : ndarray of float32, shape (k, ny, nx)
    names : tuple of str

    Notes
    -----
    Bright-field (k = 3): ``"optical_density"``, ``sum over RGB of -log10(I / I0)``, with I0 the
    per-channel glass level (99th percentile, made a smooth surface over the glass when the
    illumination is uneven, :func:`_glass_field`; neutral at the brightest channel's level when
    the brightest pixels are coloured, i.e. no glass in the field) and ``I / I0`` clipped to
    [1/255, 1]; ``"hematoxylin"`` and ``"eosin"``, the colour deconvolution (Ruifrok and
    Johnston 2001) of the optical densities onto the slide's own stain vectors
    (:func:`stain_vectors`, Macenko et al. 2009; the third vector is their cross product, the
    residual), clipped at 0 (glass maps to 0). All dimensionless (log10 optical density).

    Fluorescence (k = c): each channel minus its background level (1st percentile), clipped at
    0, in the file's units.
    """
    img = _check_image(image, kind)
    ny, nx, c = img.shape
    if kind == "brightfield":
        i0, _ = _glass_field(img)
        od = -np.log10(_transmittance(img, i0))                        # (ny, nx, 3)
        vectors = stain_vectors(_sample(od.reshape(-1, 3)))
        unmix = np.linalg.inv(np.vstack([vectors, np.cross(vectors[0], vectors[1])]))
        feats = np.empty((3, ny, nx), dtype=np.float32)
        feats[0] = od.sum(axis=2)
        conc = od.reshape(-1, 3) @ unmix.astype(np.float32)[:, :2]
        feats[1:] = conc.T.reshape(2, ny, nx)
        np.maximum(feats, 0.0, out=feats)
        return feats, ("optical_density", "hematoxylin", "eosin")
    names = tuple(channel_names) if channel_names is not None else tuple(
        f"channel_{i}" for i in range(c))
    if len(names) != c:
        raise ValueError(f"stain_features: {len(names)} channel names for {c} channels")
    bg = np.percentile(_sample(img.reshape(-1, c)), 1, axis=0)
    feats = np.empty((c, ny, nx), dtype=np.float32)
    for i in range(c):
        np.subtract(img[..., i], np.float32(bg[i]), out=feats[i], casting="unsafe")
    np.maximum(feats, 0.0, out=feats)
    return feats, names


#: Stain vectors of scikit-image's ``rgb2hed`` (Ruifrok and Johnston 2001): hematoxylin, eosin;
#: the fallback of :func:`stain_vectors`.
RUIFROK_HE = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
#: Optical density (log10, summed over RGB) below which a pixel does not inform the stain vectors.
STAIN_MIN_OD = 0.15
#: Fewest stained pixels, and smallest angle (degrees) between the two extreme stain directions,
#: for the slide's own stain vectors.
STAIN_MIN_PIXELS = 500
STAIN_MIN_ANGLE_DEG = 3.0


def stain_vectors(od: np.ndarray, percentile: float = 1.0) -> np.ndarray:
    """The hematoxylin and eosin optical-density vectors of a bright-field slide (Macenko et al.
    2009, "A method for normalizing histology slides for quantitative analysis").

    Pixels with an optical density (summed over RGB) of at least :data:`STAIN_MIN_OD` are
    projected onto the plane of their two principal directions; the directions at the
    ``percentile`` and ``100 - percentile`` of their angles in that plane are the two stains, the
    one absorbing red more is hematoxylin (blue-purple), the other eosin (pink). Falls back to
    :data:`RUIFROK_HE` (scikit-image's ``rgb2hed``) with fewer than :data:`STAIN_MIN_PIXELS`
    stained pixels or two directions closer than :data:`STAIN_MIN_ANGLE_DEG`.

    Parameters
    ----------
    od : ndarray, shape (n, 3)
        Optical densities ``-log10(I / I0)`` of RGB pixels.

    Returns
    -------
    ndarray, shape (2, 3)
        Unit vectors, hematoxylin first, non-negative components.
    """
    od = np.asarray(od, dtype=np.float64).reshape(-1, 3)
    fallback = RUIFROK_HE / np.linalg.norm(RUIFROK_HE, axis=1, keepdims=True)
    stained = od[od.sum(axis=1) >= STAIN_MIN_OD]
    if len(stained) < STAIN_MIN_PIXELS:
        return fallback
    _, vecs = np.linalg.eigh(np.cov(stained.T))
    plane = vecs[:, [2, 1]]                       # the two largest principal directions
    plane *= np.sign(plane.sum(axis=0, keepdims=True) + 1e-12)   # pointing into OD > 0
    proj = stained @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [percentile, 100 - percentile])
    if np.degrees(hi - lo) < STAIN_MIN_ANGLE_DEG:
        return fallback
    v = np.stack([plane @ [np.cos(a), np.sin(a)] for a in (lo, hi)])
    v = np.clip(v, 0.0, None)             # an absorbance is not negative (rounding at the rim)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return v if v[0, 0] >= v[1, 0] else v[::-1]


def _clean_mask(mask: np.ndarray, hole_frac: float = 0.01, object_frac: float = 0.0005):
    """Fill holes smaller than ``hole_frac`` of the image, drop objects below ``object_frac``."""
    n = mask.size
    holes = ~mask & ~remove_small_components(~mask, max(1, int(round(hole_frac * n))),
                                             connectivity=1)
    mask = mask | holes
    return remove_small_components(mask, max(1, int(round(object_frac * n))))


def background_mask(image: np.ndarray, kind: str, *, smooth_px: float = 1.5) -> np.ndarray:
    """Tissue mask of a microscopy image: True on TISSUE, False on background.

    Named for what it separates: tissue from background (glass for bright-field, dark for
    fluorescence). ``True`` = tissue.

    Parameters
    ----------
    image : ndarray, shape (ny, nx, c)
        As returned by :func:`read_image`.
    kind : {"brightfield", "fluorescence"}
    smooth_px : float
        Gaussian sigma (pixels) of the light smoothing before thresholding.

    Returns
    -------
    ndarray of bool, shape (ny, nx)
        True on tissue.

    Notes
    -----
    Bright-field: Otsu's threshold (``msifusion.tissue.otsu_threshold``) on the smoothed total
    optical density against the glass level (flat-fielded, :func:`_glass_field`). A field whose
    brightest pixels are coloured holds no glass: all tissue. When Otsu's two classes differ by less than
    :data:`MIN_OD_CONTRAST` (OD 0.05) in mean optical density the field is uniform and at the
    glass level (its brightest pixels are neutral): no tissue. Fluorescence: Otsu on the log of
    the summed background-subtracted channels; when the upper class's mean signal is less than
    :data:`MIN_FLUO_CONTRAST` times the lower class's, the field is uniform: all tissue (a dark
    field cannot be told from a uniformly stained one without a reference). Then holes smaller
    than 1 % of the image are filled and objects smaller than 0.05 % removed.
    """
    img = _check_image(image, kind)
    ny, nx, _ = img.shape
    if kind == "brightfield":
        i0, glass = _glass_field(img, smooth_px)
        if not glass:
            log.info("background_mask: the brightest pixels are coloured (no glass): all tissue")
            return np.ones((ny, nx), dtype=bool)
        od = -np.log10(_transmittance(img, i0)).sum(axis=2)
        work = ndi.gaussian_filter(od, smooth_px, mode="nearest") if smooth_px > 0 else od
        t = otsu_threshold(_sample(work.reshape(-1, 1)))
        upper = work > t
        lo = float(work[~upper].mean()) if (~upper).any() else 0.0
        hi = float(work[upper].mean()) if upper.any() else lo
        if hi - lo < MIN_OD_CONTRAST:
            log.info("background_mask: OD contrast %.3f < %g at the glass level: no tissue",
                     hi - lo, MIN_OD_CONTRAST)
            return np.zeros((ny, nx), dtype=bool)
        return _clean_mask(upper)
    feats, _ = stain_features(img, kind)
    total = feats.sum(axis=0, dtype=np.float64)
    del feats
    if not total.max() > 0:
        return np.ones((ny, nx), dtype=bool)
    work = _log_image(total, np.ones(total.shape, dtype=bool))
    if smooth_px > 0:
        work = ndi.gaussian_filter(work, smooth_px, mode="nearest")
    t = otsu_threshold(_sample(work.reshape(-1, 1)))
    upper = work > t
    if not upper.any() or upper.all():
        return np.ones((ny, nx), dtype=bool)
    ratio = float(total[upper].mean()) / max(float(total[~upper].mean()), 1e-12)
    if ratio < MIN_FLUO_CONTRAST:
        log.info("background_mask: fluorescence contrast %.2f < %g: uniform field, all tissue",
                 ratio, MIN_FLUO_CONTRAST)
        return np.ones((ny, nx), dtype=bool)
    return _clean_mask(upper)
