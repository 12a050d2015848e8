"""Demo data with ground truth: a multi-section, three-modality MSI study written as imzML.

The generator draws brain-like tissue sections on a fine canvas (micrometres, section frame),
defines molecular species as abundance maps over that canvas and "acquires" every section with up
to three instruments, each with its own pixel size, rotation and shift:

* the **reference** (FT-ICR-like, chain[0]): coarse pixels, all sections side by side in ONE file
  at different rotations (like a published run holding 19 sections); centroided lipids (m/z
  600-900) with isotope patterns, +-2 ppm mass errors, a smooth multiplicative TIC field, Poisson
  counts and sparse noise peaks;
* a **MALDI-like** modality (chain[1]): one file per section covering the section plus a margin;
  centroided, ~20 ppm calibration error plus jitter, DHB matrix peaks everywhere on the slide,
  most of the reference species plus its own, never the reference-only species;
* a **ToF-SIMS-like** modality (chain[2]): one ~1 x 1 mm field of view per section, placed beside
  the lobe so that it holds a piece of the tissue edge, the lobe and the cortex; continuous
  unit-mass spectra m/z 1-200 that are linear mixes of the shared species maps plus its own ions
  (Na+, K+, substrate), low Poisson counts, a multiplicative tile-gain grid anchored at pixel
  (0, 0) and no pixel size in the file.

Options of :func:`generate_study` make a study unlike the demo, as a new user's would be: other
pixel sizes (``pixel_size_um``; every length of the preset scales alike, so pixel counts and run
time stay the preset's, see :func:`scaled_preset`), another ToF-SIMS field size
(``tof_field_px``), a ToF-SIMS file that states its pixel size (``state_tof_pixel_size``) and
species m/z shifted by ``mz_shift`` Da (targets included). Their defaults give the preset's study,
byte for byte.

Each pixel value is the abundance averaged over the pixel's footprint (supersampled; pixels
rotated and shifted with respect to the section frame), so structures finer than a pixel blur as
they would on a real instrument: smooth anatomical regions are seen by all modalities, fine lines
(15-30 um) and dots (20-40 um) only by the finer ones.

Outputs of :func:`generate_study` (paths under ``outdir``)::

    imzml/{chain[0]}_sections.imzML/.ibd     all sections, reference modality
    imzml/{chain[1]}_{section}.imzML/.ibd    one per section
    imzml/{chain[2]}_{section}.imzML/.ibd    one per section
    sections.tsv                             section, modality, imzml, roi
    truth/{section}.h5                       noise-free reference ion images on every grid

Truth ion images are in units of expected reference counts per pixel (before the TIC field and
noise): for a pixel of any modality, the reference signal that a reference pixel with the same
footprint-averaged composition would give, summed over the +-ppm window of each target.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from .errors import InputError
from .store import atomic_output

log = logging.getLogger("msifusion.phantom")

#: m/z difference between the monoisotopic peak and its M+1 isotope (13C - 12C).
ISOTOPE_SPACING = 1.003355
#: DHB matrix ions ([M+H-H2O]+, [M+H]+, [M+Na]+, [2M+H-2H2O]+), m/z, relative intensity, carbons.
DHB_PEAKS = ((137.0233, 1.0, 7), (155.0339, 0.55, 7), (177.0158, 0.35, 7), (273.0394, 0.3, 14))
#: Target m/z of the demo study (monoisotopic [M+H]+ / adduct ions of the reference species).
#: The last one (PC 34:1 [M+K]+) is seen ONLY by the reference modality.
DEMO_TARGETS = [760.5851, 734.5694, 731.6062, 856.5827, 798.5410]
#: The reference-only target of :data:`DEMO_TARGETS`.
REFERENCE_ONLY_MZ = 798.5410
#: Half width (ppm) of the m/z window of each target in the truth ion images.
DEMO_PPM = 5.0
#: ToF-SIMS unit-mass axis (continuous imzML: the same for every pixel).
TOF_MZ = np.arange(1.0, 201.0)
#: Modality kinds by position in the chain.
KINDS = ("reference", "maldi", "tofsims")
#: Structure maps drawn on the section canvas (all multiplied by the tissue indicator) plus the
#: derived "offtissue" (1 - tissue), which is added after footprint averaging.
STRUCTURES = ("tissue", "cortex", "core", "lobe", "gradient", "lines_a", "dots_a", "lines_b",
              "nucleus", "dots_b", "rim", "k_field", "offtissue")

# Hydrocarbon fragment envelope common to all lipids in ToF-SIMS (unit mass -> weight).
_TOF_GENERIC = {1: 0.3, 12: 0.1, 13: 0.1, 14: 0.1, 15: 0.5, 27: 0.6, 29: 0.5, 41: 1.0, 43: 0.9,
                55: 0.8, 57: 0.6, 67: 0.4, 69: 0.5, 81: 0.3, 83: 0.25, 95: 0.2}


@dataclasses.dataclass(frozen=True)
class Species:
    """One ion species of the phantom.

    Attributes
    ----------
    name : str
        Human-readable label.
    mz : float or None
        Monoisotopic m/z of the intact ion (None for ions seen only as ToF-SIMS fragments).
    weights : dict
        Abundance map = sum of ``weight * structure`` over :data:`STRUCTURES` names.
    scale : tuple of float
        Expected counts per pixel at unit abundance for (reference, maldi, tofsims); 0 = not seen.
    tof_channels : dict
        ToF-SIMS unit mass -> weight of the species' specific fragments (lipids also give the
        generic hydrocarbon envelope).
    """

    name: str
    mz: float | None
    weights: dict
    scale: tuple
    tof_channels: dict = dataclasses.field(default_factory=dict)


SPECIES = (
    Species("PC 34:1 [M+H]+", 760.5851, {"cortex": 1.0, "lines_a": 1.2, "tissue": 0.15},
            (1500, 400, 60), {184: 1.0, 86: 0.5, 61: 0.6}),
    Species("PC 32:0 [M+H]+", 734.5694, {"core": 1.0, "dots_a": 1.5, "tissue": 0.1},
            (1200, 300, 50), {184: 1.0, 86: 0.5, 73: 0.7}),
    Species("SM 36:1 [M+H]+", 731.6062, {"lobe": 0.8, "lines_b": 1.5},
            (1000, 250, 50), {184: 0.8, 86: 0.3, 109: 0.7}),
    Species("PC 40:6 [M+Na]+", 856.5827, {"gradient": 0.7, "dots_a": 1.0},
            (900, 225, 40), {184: 0.6, 147: 0.8, 121: 0.5}),
    Species("PC 38:6 [M+H]+", 806.5694, {"lobe": 0.5, "lines_a": 0.8, "cortex": 0.3},
            (800, 275, 40), {184: 0.8, 91: 0.7, 135: 0.6}),
    Species("PE 38:4 [M+H]+", 768.5538, {"core": 0.6, "gradient": 0.5},
            (700, 225, 40), {142: 0.8, 124: 0.5, 161: 0.5}),
    Species("PC 36:1 [M+K]+", 826.5723, {"cortex": 0.6, "dots_a": 0.6},
            (600, 175, 30), {184: 0.5, 175: 0.6, 189: 0.5}),
    Species("PC 36:4 [M+H]+", 782.5694, {"tissue": 1.0},
            (1000, 325, 50), {184: 0.7, 86: 0.4, 79: 0.5}),
    Species("HexCer 42:2 [M+H]+", 810.6797, {"core": 1.2},
            (500, 0, 40), {60: 0.6, 85: 0.5, 199: 0.3}),
    # seen only by the reference: its fine dots exist in no other modality
    Species("PC 34:1 [M+K]+", REFERENCE_ONLY_MZ, {"nucleus": 1.0, "dots_b": 1.5, "tissue": 0.1},
            (900, 0, 0)),
    # MALDI-only lipids
    Species("SM 34:1 [M+H]+", 703.5749, {"lines_a": 0.8, "core": 0.3}, (0, 300, 0)),
    Species("PC 32:0 [M+K]+", 772.5253, {"cortex": 0.5, "dots_a": 0.5}, (0, 200, 0)),
    # ToF-SIMS-only ions
    Species("Na+", None, {"rim": 1.0, "offtissue": 0.15}, (0, 0, 40), {23: 1.0}),
    Species("K+", None, {"k_field": 1.0}, (0, 0, 30), {39: 1.0}),
    Species("substrate Si+", None, {"offtissue": 1.0, "tissue": 0.03}, (0, 0, 60),
            {28: 1.0, 44: 0.2, 45: 0.3}),
)


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of a phantom study (all lengths in micrometres).

    Attributes
    ----------
    section_um : (float, float)
        Width and height of the ellipse the tissue outline is built on.
    canvas_um : float
        Pixel size of the fine canvas the abundance maps are drawn on.
    pixel_um : (float, float, float)
        Pixel sizes of the reference, MALDI-like and ToF-SIMS-like acquisitions.
    margin_um : (float, float)
        Margin around the section of the reference ROI and of the MALDI-like acquisition.
    tof_fov_um : float
        Side of the square ToF-SIMS field of view.
    tof_depth_um : float
        Depth inside the tissue of the field-of-view centre (so the field includes an edge).
    line_widths_um : tuple of float
        Widths of the three cortex-parallel fine lines.
    stripe_widths_um : (float, float)
        Range of widths of the fine stripes across the lobe.
    stripe_spacing_um : float
        Spacing of the stripes across the lobe.
    dot_diameter_um : (float, float)
        Range of fine-dot diameters.
    n_dots : (int, int)
        Number of shared fine dots and of reference-only fine dots per section.
    length_scale : float
        Factor on the built-in lengths of the drawing and of the instrument models (smooth
        edges of the regions, salt rim, TIC-field wavelengths): 1 for the shipped presets; a
        preset scaled by :func:`scaled_preset` carries its scale factor.
    """

    section_um: tuple
    canvas_um: float
    pixel_um: tuple
    margin_um: tuple
    tof_fov_um: float
    tof_depth_um: float
    line_widths_um: tuple
    stripe_widths_um: tuple
    stripe_spacing_um: float
    dot_diameter_um: tuple
    n_dots: tuple
    length_scale: float = 1.0


PRESETS = {
    "demo": Preset(section_um=(2600.0, 1800.0), canvas_um=2.0, pixel_um=(80.0, 20.0, 5.0),
                   margin_um=(100.0, 150.0), tof_fov_um=1000.0, tof_depth_um=320.0,
                   line_widths_um=(15.0, 22.0, 30.0), stripe_widths_um=(15.0, 25.0),
                   stripe_spacing_um=90.0, dot_diameter_um=(20.0, 40.0), n_dots=(220, 60)),
    "small": Preset(section_um=(2000.0, 1400.0), canvas_um=2.5, pixel_um=(100.0, 25.0, 10.0),
                    margin_um=(100.0, 75.0), tof_fov_um=1000.0, tof_depth_um=160.0,
                    line_widths_um=(20.0, 28.0, 36.0), stripe_widths_um=(20.0, 30.0),
                    stripe_spacing_um=90.0, dot_diameter_um=(25.0, 45.0), n_dots=(50, 15)),
}


def scaled_preset(preset: Preset, pixel_size_um) -> Preset:
    """``preset`` with other pixel sizes and every length scaled alike (same pixel counts).

    Every length of ``preset`` (section, margins, ToF-SIMS field of view and its depth, lines,
    stripes, dots, the built-in edge widths via :attr:`Preset.length_scale`) is multiplied by
    ``s = pixel_size_um[0] / preset.pixel_um[0]``, so that a study keeps about the preset's pixel
    counts (exactly for modalities whose pixel keeps its ratio to the reference pixel). The canvas
    pixel becomes ``s * preset.canvas_um``, or finer where the finest acquisition pixel is
    relatively finer than in the preset: the canvas keeps at least the preset's ratio
    ``canvas_um / min(pixel_um)``, so that footprint averages resolve the finest pixels.

    Parameters
    ----------
    preset : Preset
    pixel_size_um : sequence of 3 float
        Pixel sizes (um) of the reference, MALDI-like and ToF-SIMS-like acquisitions, coarse to
        fine (non-increasing). Relative to the reference, a finer modality's pixel may be at most
        2 times finer than in ``preset`` (at most 4 times its pixel count and canvas pixels).

    Returns
    -------
    Preset
        With ``length_scale`` = ``s`` times the preset's.

    Raises
    ------
    InputError
        Bad ``pixel_size_um``.
    """
    try:
        px = tuple(float(v) for v in pixel_size_um)
    except (TypeError, ValueError):
        raise InputError(f"phantom pixel_size_um must be 3 numbers (um), not {pixel_size_um!r}")
    if len(px) != 3 or isinstance(pixel_size_um, (str, bytes)):
        raise InputError(f"phantom pixel_size_um must be 3 numbers (um) for reference, MALDI-like "
                         f"and ToF-SIMS-like, not {pixel_size_um!r}")
    if not all(math.isfinite(v) and v > 0 for v in px):
        raise InputError(f"phantom pixel_size_um must be finite and positive, not {px}")
    if not px[0] >= px[1] >= px[2]:
        raise InputError(f"phantom pixel_size_um must run coarse to fine (reference >= MALDI-like "
                         f">= ToF-SIMS-like), not {px}")
    for k in (1, 2):
        lo = 0.5 * preset.pixel_um[k] / preset.pixel_um[0]
        if px[k] / px[0] < lo * (1 - 1e-9):
            raise InputError(f"phantom pixel_size_um {px}: the {KINDS[k]} pixel may be at most 2x "
                             f"finer relative to the reference than the preset's "
                             f"({preset.pixel_um[k]:g} of {preset.pixel_um[0]:g} um), i.e. >= "
                             f"{lo * px[0]:g} um")
    s = px[0] / preset.pixel_um[0]
    canvas = min(s * preset.canvas_um, min(px) * preset.canvas_um / min(preset.pixel_um))

    def scale(v):
        return tuple(s * x for x in v)

    return dataclasses.replace(
        preset, section_um=scale(preset.section_um), canvas_um=canvas, pixel_um=px,
        margin_um=scale(preset.margin_um), tof_fov_um=s * preset.tof_fov_um,
        tof_depth_um=s * preset.tof_depth_um, line_widths_um=scale(preset.line_widths_um),
        stripe_widths_um=scale(preset.stripe_widths_um),
        stripe_spacing_um=s * preset.stripe_spacing_um,
        dot_diameter_um=scale(preset.dot_diameter_um), length_scale=s * preset.length_scale)


# ------------------------------------------------------------------------------------ imzML writer
def write_imzml(path, xy: np.ndarray, indptr: np.ndarray, mz: np.ndarray | None,
                intensity: np.ndarray, *, mode: str, mz_axis: np.ndarray | None = None,
                pixel_size_um: float | None = None, spectrum_type: str = "centroid",
                polarity: str = "positive", uuid_key: str | None = None,
                block_pixels: int = 4096) -> Path:
    """Write CSR spectra as an imzML/ibd pair (atomically) with
    :class:`msifusion.imzml.ImzMLStreamWriter`, ``block_pixels`` spectra at a time.

    Parameters
    ----------
    path : path-like
        Output ``.imzML`` path; the ``.ibd`` is written beside it.
    xy : ndarray, shape (n_pixels, 2)
        0-based (x, y) pixel coordinates of the rows (written 1-based).
    indptr : ndarray, shape (n_pixels + 1,)
        Row pointers into ``mz`` / ``intensity``.
    mz : ndarray, shape (nnz,), or None
        m/z values, increasing within each row (float64); None in ``"continuous"`` mode.
    intensity : ndarray, shape (nnz,)
        Intensities (written as float32); in ``"continuous"`` mode ``len(mz_axis)`` per row.
    mode : {"continuous", "processed"}
        imzML storage mode.
    mz_axis : ndarray, shape (n_mz,), optional
        The shared axis of a continuous file.
    pixel_size_um : float, optional
        Written as IMS "pixel size x/y" in the scan settings; omitted when None.
    spectrum_type : {"centroid", "profile"}
    polarity : {"positive", "negative"}
    uuid_key : str, optional
        The file UUID is derived from this string (default: the file name); equal inputs give
        byte-identical files.
    block_pixels : int
        Spectra written per block.

    Returns
    -------
    pathlib.Path
        The ``.imzML`` path.
    """
    from .imzml import ImzMLStreamWriter

    path = Path(path)
    if path.suffix.lower() != ".imzml":
        raise InputError(f"{path}: imzML output path must end with .imzML")
    if mode not in ("continuous", "processed"):
        raise InputError(f"{path}: mode must be 'continuous' or 'processed', not {mode!r}")
    xy = np.asarray(xy, dtype=np.int64).reshape(-1, 2)
    indptr = np.asarray(indptr, dtype=np.int64)
    n = len(indptr) - 1
    if n < 1 or n != len(xy):
        raise ValueError(f"{path}: {n} spectra for {len(xy)} coordinates")
    with ImzMLStreamWriter(path, mode=mode, mz_dtype=np.float64, intensity_dtype=np.float32,
                           mz_axis=mz_axis, pixel_size_um=pixel_size_um,
                           spectrum_type=spectrum_type, polarity=polarity,
                           uuid_seed=uuid_key) as w:
        for s in range(0, n, max(1, int(block_pixels))):
            e = min(n, s + int(block_pixels))
            a, b = indptr[s], indptr[e]
            w.add_block(indptr[s:e + 1] - a, None if mz is None else mz[a:b], intensity[a:b],
                        xy[s:e])
    return path


# ------------------------------------------------------------------------------ section geometry
@dataclasses.dataclass
class _Outline:
    """Star-shaped, asymmetric tissue outline in the section frame (um, origin at the centre)."""

    half_axes: tuple
    harmonics: tuple          # ((k, amplitude, phase), ...)
    lobe: tuple               # (angle rad, relative amplitude, angular width rad)
    notch: tuple              # (angle rad, relative depth, angular width rad)

    def radius(self, theta: np.ndarray) -> np.ndarray:
        """Boundary radius (um) along direction ``theta`` (rad; x right, y down)."""
        a, b = self.half_axes
        c, s = np.cos(theta), np.sin(theta)
        r = a * b / np.sqrt((b * c) ** 2 + (a * s) ** 2)
        mod = 1.0
        for k, amp, ph in self.harmonics:
            mod = mod + amp * np.cos(k * theta + ph)
        for (ang, amp, width), sign in ((self.lobe, 1.0), (self.notch, -1.0)):
            d = (theta - ang + np.pi) % (2 * np.pi) - np.pi
            mod = mod + sign * amp * np.exp(-0.5 * (d / width) ** 2)
        return r * mod

    def polygon(self, n: int = 1440) -> np.ndarray:
        """Boundary points, shape (n, 2), (x, y) in um."""
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        r = self.radius(t)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)

    def point(self, theta: float, depth: float) -> np.ndarray:
        """Point at ``depth`` um inside the boundary along direction ``theta``; shape (2,)."""
        r = float(self.radius(np.asarray(theta))) - depth
        return np.array([r * math.cos(theta), r * math.sin(theta)])


def _random_outline(rng: np.random.Generator, preset: Preset) -> _Outline:
    """Brain-like outline: an ellipse with a lobe on one side and a notch on top, mildly varied."""
    w, h = preset.section_um
    harmonics = ((2, 0.03 * rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)),
                 (3, 0.05 * rng.uniform(0.7, 1.3), 0.4 + rng.normal(0, 0.2)),
                 (5, 0.012 * rng.uniform(0.5, 1.5), rng.uniform(0, 2 * np.pi)))
    lobe = (2.75 + rng.normal(0, 0.05), 0.20 + rng.normal(0, 0.01), 0.28)
    notch = (-1.25 + rng.normal(0, 0.05), 0.22 + rng.normal(0, 0.01), 0.07)
    return _Outline((w / 2, h / 2), harmonics, lobe, notch)


@dataclasses.dataclass
class _Canvas:
    """Fine raster in the section frame; pixel (r, c) is centred at (x0 + c step, y0 + r step)."""

    x0: float
    y0: float
    step: float
    shape: tuple

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Broadcastable coordinates X (1, W) and Y (H, 1) in um, float32."""
        ny, nx = self.shape
        x = (self.x0 + self.step * np.arange(nx)).astype(np.float32)[None, :]
        y = (self.y0 + self.step * np.arange(ny)).astype(np.float32)[:, None]
        return x, y

    def window(self, lo: np.ndarray, hi: np.ndarray):
        """Index slices and coordinates of the canvas pixels with centres in [lo, hi] (um)."""
        c0 = max(0, int(math.floor((lo[0] - self.x0) / self.step)))
        c1 = min(self.shape[1], int(math.ceil((hi[0] - self.x0) / self.step)) + 1)
        r0 = max(0, int(math.floor((lo[1] - self.y0) / self.step)))
        r1 = min(self.shape[0], int(math.ceil((hi[1] - self.y0) / self.step)) + 1)
        if c1 <= c0 or r1 <= r0:
            return None
        x = (self.x0 + self.step * np.arange(c0, c1))[None, :]
        y = (self.y0 + self.step * np.arange(r0, r1))[:, None]
        return (slice(r0, r1), slice(c0, c1)), x, y


def _ramp(z):
    """Smooth step from 0 (z <= -0.5) to 1 (z >= 0.5)."""
    t = np.clip(np.asarray(z, dtype=np.float32) + 0.5, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _stamp(canvas: _Canvas, out: np.ndarray, p0: np.ndarray, p1: np.ndarray,
           half_width: np.ndarray, edge: float) -> None:
    """Draw capsules (segments p0-p1 thickened by ``half_width``) into ``out`` (max-combined).

    Parameters
    ----------
    p0, p1 : ndarray, shape (n, 2)
        Segment end points in um (equal for discs).
    half_width : ndarray, shape (n,)
        Half widths (radii) in um.
    edge : float
        Width (um) of the smooth edge.
    """
    for a, b, hw in zip(p0, p1, half_width):
        reach = hw + edge
        win = canvas.window(np.minimum(a, b) - reach, np.maximum(a, b) + reach)
        if win is None:
            continue
        sl, x, y = win
        d = b - a
        ll = float(d @ d)
        if ll > 0:
            t = np.clip(((x - a[0]) * d[0] + (y - a[1]) * d[1]) / ll, 0.0, 1.0)
        else:
            t = 0.0
        dist = np.hypot(x - a[0] - t * d[0], y - a[1] - t * d[1])
        np.maximum(out[sl], _ramp((hw - dist) / edge), out=out[sl])


def _polyline(points: np.ndarray):
    """Consecutive segments (p0, p1) of a polyline given as points (n, 2)."""
    return points[:-1], points[1:]


def _random_points_inside(rng, outline: _Outline, n: int, min_depth: float,
                          centre=(0.0, 0.0), radii=None) -> np.ndarray:
    """``n`` uniform random points inside the tissue (deeper than ``min_depth`` um), optionally
    restricted to an ellipse (``centre``, ``radii``); shape (n, 2)."""
    a, b = outline.half_axes
    out = []
    for _ in range(1000):
        if sum(len(o) for o in out) >= n:
            break
        if radii is None:
            p = rng.uniform([-1.4 * a, -1.4 * b], [1.4 * a, 1.4 * b], size=(4 * n, 2))
        else:
            p = np.asarray(centre) + rng.uniform(-1, 1, size=(4 * n, 2)) * np.asarray(radii)
            p = p[(((p - centre) / radii) ** 2).sum(1) <= 1]
        rho, th = np.hypot(p[:, 0], p[:, 1]), np.arctan2(p[:, 1], p[:, 0])
        out.append(p[outline.radius(th) - rho > min_depth])
    return np.concatenate(out)[:n]


def _draw_section(rng: np.random.Generator, outline: _Outline, preset: Preset
                  ) -> tuple[_Canvas, np.ndarray]:
    """Draw the structure maps of one section.

    Returns
    -------
    canvas : _Canvas
    stack : ndarray, shape (len(STRUCTURES) - 1, H, W), float32
        Maps in [0, 1] (all but the derived "offtissue"), each already multiplied by the tissue.
    """
    step = preset.canvas_um
    ls = float(preset.length_scale)                                   # built-in lengths (um)
    poly = outline.polygon()
    pad = 8 * step
    lo, hi = poly.min(0) - pad, poly.max(0) + pad
    shape = (int(math.ceil((hi[1] - lo[1]) / step)) + 1, int(math.ceil((hi[0] - lo[0]) / step)) + 1)
    canvas = _Canvas(float(lo[0]), float(lo[1]), step, shape)
    X, Y = canvas.grid()
    rho = np.hypot(X, Y)
    theta = np.arctan2(Y, X)
    depth = (outline.radius(theta) - rho).astype(np.float32)          # um inside the boundary
    a, b = outline.half_axes
    small = min(a, b)
    maps = {}
    tissue = _ramp(depth / step)
    maps["tissue"] = tissue

    # lobe (cerebellum-like): disc near the tip of the lobe bump
    lobe_angle = outline.lobe[0]
    r_lobe = 0.4 * small
    lobe_c = outline.point(lobe_angle, 1.0 * r_lobe)
    lobe = _ramp((r_lobe - np.hypot(X - lobe_c[0], Y - lobe_c[1])) / (40.0 * ls))
    maps["lobe"] = lobe
    # cortex-like outer band, outside the lobe
    cortex_depth = 0.2 * small
    maps["cortex"] = _ramp((cortex_depth - depth) / (40.0 * ls)) * (1.0 - lobe)
    # white-matter-like curved band
    t = np.linspace(np.deg2rad(200), np.deg2rad(335), 90) + rng.normal(0, 0.03)
    core_pts = np.stack([0.05 * a + 0.55 * a * np.cos(t), 0.30 * b + 0.55 * b * np.sin(t)], 1)
    core = np.zeros(shape, np.float32)
    p0, p1 = _polyline(core_pts)
    _stamp(canvas, core, p0, p1, np.full(len(p0), 0.08 * b), 40.0 * ls)
    maps["core"] = core
    # smooth gradient across the section
    u = np.array([math.cos(0.4), math.sin(0.4)])
    maps["gradient"] = 0.15 + 0.85 * np.clip(((X * u[0] + Y * u[1]) / a + 1) / 2, 0, 1)
    # fine lines parallel to the boundary (cortical layers), each over its own angular span
    lines = np.zeros(shape, np.float32)
    for k, width in enumerate(preset.line_widths_um):
        d = cortex_depth * (0.3 + 0.25 * k) + rng.normal(0, 3.0 * ls)
        start = lobe_angle + 0.7 + rng.uniform(0, 0.6)
        span = rng.uniform(2.6, 4.0)
        th = np.linspace(start, start + span, max(20, int(span * a / (15.0 * ls))))
        r = outline.radius(th) - d
        p0, p1 = _polyline(np.stack([r * np.cos(th), r * np.sin(th)], 1))
        _stamp(canvas, lines, p0, p1, np.full(len(p0), width / 2), step)
    maps["lines_a"] = lines
    # fine stripes across the lobe (folia-like)
    stripes = np.zeros(shape, np.float32)
    normal = np.array([math.cos(lobe_angle + 0.3), math.sin(lobe_angle + 0.3)])
    along = np.array([-normal[1], normal[0]])
    n_half = int(0.85 * r_lobe // preset.stripe_spacing_um)
    offs = (preset.stripe_spacing_um * np.arange(-n_half, n_half + 1)
            + rng.uniform(-10.0 * ls, 10.0 * ls))
    half_len = 0.9 * np.sqrt(np.clip(r_lobe ** 2 - offs ** 2, 0, None))
    keep = half_len > 0
    offs, half_len = offs[keep], half_len[keep]
    centres = lobe_c + offs[:, None] * normal
    widths = rng.uniform(*preset.stripe_widths_um, size=len(offs))
    ends = half_len[:, None] * along
    _stamp(canvas, stripes, centres - ends, centres + ends, widths / 2, step)
    maps["lines_b"] = stripes
    # fine dots everywhere in the tissue
    dots = np.zeros(shape, np.float32)
    pts = _random_points_inside(rng, outline, preset.n_dots[0], preset.dot_diameter_um[1])
    _stamp(canvas, dots, pts, pts, rng.uniform(*preset.dot_diameter_um, size=len(pts)) / 2, step)
    maps["dots_a"] = dots
    # reference-only: a smooth nucleus plus its own fine dots
    nc, nr = np.array([-0.28 * a, 0.28 * b]), np.array([0.22 * a, 0.17 * b])
    q = np.hypot((X - nc[0]) / nr[0], (Y - nc[1]) / nr[1])
    maps["nucleus"] = _ramp((1.0 - q) / 0.35)
    dots_b = np.zeros(shape, np.float32)
    pts = _random_points_inside(rng, outline, preset.n_dots[1], preset.dot_diameter_um[1],
                                centre=nc, radii=1.5 * nr)
    _stamp(canvas, dots_b, pts, pts, rng.uniform(*preset.dot_diameter_um, size=len(pts)) / 2, step)
    maps["dots_b"] = dots_b
    # ToF-SIMS-only: salt rim at the edge, potassium field
    maps["rim"] = _ramp((35.0 * ls - depth) / (10.0 * ls))
    u2 = np.array([math.cos(2.0), math.sin(2.0)])
    maps["k_field"] = 0.3 + 0.7 * np.clip(((X * u2[0] + Y * u2[1]) / b + 1) / 2, 0, 1)

    names = STRUCTURES[:-1]
    stack = np.empty((len(names),) + shape, np.float32)
    for i, name in enumerate(names):
        stack[i] = maps[name] if name == "tissue" else np.broadcast_to(maps[name], shape) * tissue
    return canvas, stack


# ----------------------------------------------------------------------------- acquisition geometry
def _rotation(phi: float) -> np.ndarray:
    c, s = math.cos(phi), math.sin(phi)
    return np.array([[c, -s], [s, c]])


def _affine(px: float, phi: float, t: np.ndarray) -> np.ndarray:
    """(2, 3) matrix: file pixel (x, y, 1) -> section um, ``sec = px R(phi) (x, y) + t``."""
    return np.hstack([px * _rotation(phi), np.asarray(t, float).reshape(2, 1)])


def _compose_inverse(a_ref: np.ndarray, a_mod: np.ndarray) -> np.ndarray:
    """(2, 3) matrix taking (x, y, 1) of ``a_mod``'s pixels to ``a_ref``'s pixels."""
    lin = np.linalg.solve(a_ref[:, :2], a_mod)
    lin[:, 2] -= np.linalg.solve(a_ref[:, :2], a_ref[:, 2])
    return lin


def _placement(rng, outline: _Outline, px: float, margin: float):
    """Rotation, extent and section-centre offset of an acquisition covering the whole section.

    Returns ``(phi, (nx, ny), c)`` where ``c`` (um) is the section centre in the acquisition frame
    relative to pixel (0, 0) of the covering rectangle.
    """
    phi = rng.uniform(0, 2 * np.pi)
    q = outline.polygon() @ _rotation(phi)          # R^T p for every row p
    lo, hi = q.min(0), q.max(0)
    n = np.ceil((hi - lo + 2 * margin) / px).astype(int) + 2
    c = -lo + margin + rng.uniform(0, px, size=2)
    return phi, (int(n[0]), int(n[1])), c


# ------------------------------------------------------------------------------ footprint sampling
def _footprint_average(canvas: _Canvas, stack: np.ndarray, affine: np.ndarray, xy: np.ndarray,
                       n_sub: int, chunk_points: int = 1 << 21) -> np.ndarray:
    """Average the structure maps over the square footprints of pixels.

    Parameters
    ----------
    stack : ndarray, shape (K, H, W)
        Structure maps on ``canvas``.
    affine : ndarray, shape (2, 3)
        File pixel (x, y, 1) -> section um.
    xy : ndarray, shape (n, 2)
        Pixel coordinates; footprint of a pixel is [x - 0.5, x + 0.5] x [y - 0.5, y + 0.5].
    n_sub : int
        Supersampling per axis.

    Returns
    -------
    ndarray, shape (n, K + 1), float32
        Footprint averages of the maps plus the derived "offtissue" column (1 - tissue).
    """
    k = stack.shape[0]
    out = np.zeros((len(xy), k + 1), np.float32)
    o = (np.arange(n_sub) + 0.5) / n_sub - 0.5
    ox, oy = (g.ravel() for g in np.meshgrid(o, o))
    per = max(1, chunk_points // len(ox))
    for s in range(0, len(xy), per):
        blk = xy[s:s + per].astype(np.float64)
        x = (blk[:, :1] + ox[None]).ravel()
        y = (blk[:, 1:] + oy[None]).ravel()
        u = affine[0, 0] * x + affine[0, 1] * y + affine[0, 2]
        v = affine[1, 0] * x + affine[1, 1] * y + affine[1, 2]
        coords = np.stack([(v - canvas.y0) / canvas.step, (u - canvas.x0) / canvas.step])
        for i in range(k):
            vals = ndimage.map_coordinates(stack[i], coords, order=1, mode="constant", cval=0.0)
            out[s:s + len(blk), i] = vals.reshape(len(blk), -1).mean(1)
    out[:, k] = 1.0 - out[:, 0]
    return out


def _n_sub(px: float, canvas_um: float) -> int:
    return max(2, int(math.ceil(px / (1.5 * canvas_um))))


# ------------------------------------------------------------------------------ spectra models
def _weights(species: list[Species]) -> np.ndarray:
    """(n_species, len(STRUCTURES)) structure weights."""
    w = np.zeros((len(species), len(STRUCTURES)))
    for i, sp in enumerate(species):
        for name, val in sp.weights.items():
            w[i, STRUCTURES.index(name)] = val
    return w


def _isotopes(mz: float, n_carbon: int | None = None) -> list[tuple[float, float]]:
    """(m/z, relative intensity) of M, M+1, M+2 from the carbon number (estimated from the mass)."""
    nc = n_carbon if n_carbon is not None else round(mz / 18.0)
    r1 = 0.0108 * nc
    r2 = 0.5 * r1 * r1 + 0.01
    return [(mz, 1.0), (mz + ISOTOPE_SPACING, r1), (mz + 2 * ISOTOPE_SPACING, r2)]


def _species_isotopes(sp: Species, mz_shift: float = 0.0) -> list[tuple[float, float]]:
    """Isotope peaks of ``sp`` at its m/z plus ``mz_shift`` (Da); the pattern (carbon number)
    stays that of the unshifted ion, so a shift changes nothing but the masses."""
    return _isotopes(sp.mz + mz_shift, round(sp.mz / 18.0))


def _peak_table(species: list[Species], kind: int, mz_shift: float = 0.0):
    """Peaks of the species seen by modality ``kind`` (m/z shifted by ``mz_shift`` Da):
    mz (p,), species index (p,), counts (p,)."""
    mz, idx, rel = [], [], []
    for i, sp in enumerate(species):
        if sp.mz is None or sp.scale[kind] <= 0:
            continue
        for m, r in _species_isotopes(sp, mz_shift):
            mz.append(m)
            idx.append(i)
            rel.append(r * sp.scale[kind])
    return np.array(mz), np.array(idx, int), np.array(rel)


def _protected_mz(mz_shift: float = 0.0) -> np.ndarray:
    """Sorted m/z of every modelled peak, species shifted by ``mz_shift`` Da (noise peaks keep
    away from them)."""
    mz = [m for sp in SPECIES if sp.mz is not None for m, _ in _species_isotopes(sp, mz_shift)]
    mz += [m for m0, _, nc in DHB_PEAKS for m, _ in _isotopes(m0, nc)]
    return np.sort(np.array(mz))


def _noise_mz(rng, n: int, lo: float, hi: float, avoid_ppm: float = 150.0,
              mz_shift: float = 0.0) -> np.ndarray:
    """``n`` uniform m/z in [lo, hi] at least ``avoid_ppm`` away from every modelled peak (species
    shifted by ``mz_shift`` Da)."""
    protected = _protected_mz(mz_shift)
    mz = rng.uniform(lo, hi, size=n)
    for _ in range(100):
        j = np.clip(np.searchsorted(protected, mz), 1, len(protected) - 1)
        near = np.minimum(np.abs(mz - protected[j - 1]), np.abs(mz - protected[j]))
        bad = near < mz * avoid_ppm * 1e-6
        if not bad.any():
            break
        mz[bad] = rng.uniform(lo, hi, size=int(bad.sum()))
    return mz


def _smooth_field(rng, xy_um: np.ndarray, amplitude: float, length_um: float,
                  n_waves: int = 4) -> np.ndarray:
    """Smooth multiplicative field in [1 - amplitude, 1 + amplitude] at points ``xy_um`` (n, 2)."""
    f = np.zeros(len(xy_um))
    for _ in range(n_waves):
        ang = rng.uniform(0, 2 * np.pi)
        lam = rng.uniform(1.0, 2.5) * length_um
        k = 2 * np.pi / lam * np.array([math.cos(ang), math.sin(ang)])
        f += np.cos(xy_um @ k + rng.uniform(0, 2 * np.pi))
    f /= max(np.abs(f).max(), 1e-12)
    return 1.0 + amplitude * f


def _centroid_spectra(rng, expected: np.ndarray, peak_mz: np.ndarray, *, min_count: int,
                      ppm_pixel: np.ndarray, ppm_peak_sd: float, ppm_clip: float | None,
                      noise_rate: float, noise_range: tuple, noise_mean: float,
                      mz_shift: float = 0.0):
    """Poisson-sample centroided spectra and assemble them as CSR.

    Parameters
    ----------
    expected : ndarray, shape (n_pixels, n_peaks)
        Expected counts of each modelled peak.
    peak_mz : ndarray, shape (n_peaks,)
        True m/z of the peaks.
    ppm_pixel : ndarray, shape (n_pixels,)
        Mass error (ppm) common to a pixel's peaks; each peak adds N(0, ``ppm_peak_sd``).
    ppm_clip : float or None
        Clip total errors to +-``ppm_clip``.
    noise_rate, noise_range, noise_mean
        Noise peaks per pixel (1 + Poisson(noise_rate)), their m/z range and mean intensity.
    mz_shift : float
        Shift (Da) of the species' m/z; noise peaks keep away from the shifted peaks.

    Returns
    -------
    indptr (n_pixels + 1,), mz (nnz,), intensity (nnz,) float32 with m/z sorted within pixels.
    """
    n = len(expected)
    counts = rng.poisson(expected)
    rows, cols = np.nonzero(counts >= min_count)
    err = ppm_pixel[rows] + rng.normal(0, ppm_peak_sd, size=len(rows))
    if ppm_clip is not None:
        err = np.clip(err, -ppm_clip, ppm_clip)
    mz = peak_mz[cols] * (1 + err * 1e-6)
    inten = counts[rows, cols].astype(np.float32)
    n_noise = 1 + rng.poisson(noise_rate, size=n)
    nrows = np.repeat(np.arange(n), n_noise)
    nmz = _noise_mz(rng, len(nrows), *noise_range, mz_shift=mz_shift)
    ninten = np.round(1 + rng.exponential(noise_mean, size=len(nrows))).astype(np.float32)
    rows = np.concatenate([rows, nrows])
    mz = np.concatenate([mz, nmz])
    inten = np.concatenate([inten, ninten])
    order = np.lexsort((mz, rows))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    return indptr, mz[order], inten[order]


def _tof_fragments(species: list[Species]) -> np.ndarray:
    """(n_species, 200) ToF-SIMS fragment distributions (rows sum to 1; zero for unseen species)."""
    f = np.zeros((len(species), len(TOF_MZ)))
    generic = np.zeros(len(TOF_MZ))
    for m, w in _TOF_GENERIC.items():
        generic[m - 1] = w
    generic /= generic.sum()
    for i, sp in enumerate(species):
        if sp.scale[2] <= 0:
            continue
        spec = np.zeros(len(TOF_MZ))
        for m, w in sp.tof_channels.items():
            spec[m - 1] = w
        spec /= spec.sum()
        f[i] = spec if sp.mz is None else 0.5 * generic + 0.5 * spec
    return f


def tile_gain_pattern(tile_px: int) -> np.ndarray:
    """Multiplicative gain of one ToF-SIMS tile, shape (tile_px, tile_px), values in [0.7, 1.3].

    Vignetting (bright centre, dark corners) plus a ramp along x, the same in every tile.
    """
    c = (np.arange(tile_px) - (tile_px - 1) / 2) / max(tile_px / 2, 1)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    g = 0.6 * (1 - (xx ** 2 + yy ** 2) / 2) + 0.4 * (xx + 1) / 2
    g = (g - g.min()) / max(g.max() - g.min(), 1e-12)
    return 0.7 + 0.6 * g


# ------------------------------------------------------------------------------ study
def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _grid_xy(nx: int, ny: int) -> np.ndarray:
    """Row-major 0-based (x, y) of an nx x ny rectangle, shape (nx * ny, 2)."""
    yy, xx = np.mgrid[0:ny, 0:nx]
    return np.stack([xx.ravel(), yy.ravel()], 1)


def _check_args(outdir, preset, seed, chain, tile_px, n_sections) -> tuple:
    if preset not in PRESETS:
        raise InputError(f"phantom preset {preset!r} unknown; choose one of {sorted(PRESETS)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"phantom seed must be a non-negative integer, not {seed!r}")
    chain = tuple(str(c) for c in chain)
    if not 1 <= len(chain) <= 3:
        raise InputError(f"phantom chain must name 1 to 3 modalities, not {list(chain)}")
    if len(set(chain)) != len(chain):
        raise InputError(f"phantom chain names must be distinct: {list(chain)}")
    for c in chain:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", c):
            raise InputError(f"phantom chain name {c!r} must be a letter followed by letters, "
                             f"digits, '_' or '-'")
    if not isinstance(tile_px, (int, np.integer)) or tile_px < 2:
        raise InputError(f"phantom tile_px must be an integer >= 2, not {tile_px!r}")
    if not isinstance(n_sections, (int, np.integer)) or not 1 <= n_sections <= 99:
        raise InputError(f"phantom n_sections must be an integer in 1..99, not {n_sections!r}")
    return Path(outdir), PRESETS[preset], chain


#: Range of :func:`generate_study`'s ``mz_shift`` (Da): the lipids (m/z 700-860) stay above the
#: DHB matrix peaks (m/z 137-277) and below m/z 1900.
MZ_SHIFT_RANGE = (-300.0, 1000.0)
#: Least distance (ppm) a (shifted) target keeps from every other modelled peak.
MIN_TARGET_SEPARATION_PPM = 300.0


def target_separation_ppm(mz_shift: float = 0.0) -> float:
    """Least distance (ppm) between a target (shifted by ``mz_shift`` Da) and any other modelled
    peak: species isotopes (shifted alike) and DHB matrix isotopes (not shifted)."""
    peaks = _protected_mz(mz_shift)
    gaps = []
    for t in np.asarray(DEMO_TARGETS) + mz_shift:
        d = np.abs(peaks - t)
        gaps.append(d[d > t * 1e-9].min() / t * 1e6)
    return float(min(gaps))


def _check_options(p: Preset, pixel_size_um, tof_field_px, state_tof_pixel_size, mz_shift
                   ) -> tuple:
    """Validate :func:`generate_study`'s study options; return (preset, tof_field_px,
    state_tof_pixel_size, mz_shift) normalised (the preset scaled to ``pixel_size_um``)."""
    if pixel_size_um is not None:
        p = scaled_preset(p, pixel_size_um)
    if tof_field_px is not None:
        if isinstance(tof_field_px, (bool, np.bool_)) or \
                not isinstance(tof_field_px, (int, np.integer)) or not 8 <= tof_field_px <= 4000:
            raise InputError(f"phantom tof_field_px must be an integer in 8..4000 (ToF-SIMS "
                             f"pixels), not {tof_field_px!r}")
        tof_field_px = int(tof_field_px)
    if not isinstance(state_tof_pixel_size, (bool, np.bool_)):
        raise InputError(f"phantom state_tof_pixel_size must be True or False, not "
                         f"{state_tof_pixel_size!r}")
    if isinstance(mz_shift, (bool, np.bool_)) or not isinstance(mz_shift, (int, float, np.integer,
                                                                           np.floating)):
        raise InputError(f"phantom mz_shift must be a number (Da), not {mz_shift!r}")
    mz_shift = float(mz_shift)
    lo, hi = MZ_SHIFT_RANGE
    if not (math.isfinite(mz_shift) and lo <= mz_shift <= hi):
        raise InputError(f"phantom mz_shift must lie in [{lo:g}, {hi:g}] Da, not {mz_shift!r}")
    gap = target_separation_ppm(mz_shift)
    if gap < MIN_TARGET_SEPARATION_PPM:
        raise InputError(f"phantom mz_shift {mz_shift:g} Da brings a target within {gap:.0f} ppm "
                         f"of another modelled peak (at least {MIN_TARGET_SEPARATION_PPM:g})")
    return p, tof_field_px, bool(state_tof_pixel_size), mz_shift


@dataclasses.dataclass
class _Acquisition:
    """One section as seen by one modality.

    Attributes
    ----------
    affine : ndarray, shape (2, 3)
        File pixel (x, y, 1) -> section frame (um).
    roi : tuple of int
        ``(x0, x1, y0, y1)`` of the section in the file's pixels (half-open).
    foot : ndarray, shape (n_roi_pixels, len(STRUCTURES)), optional
        Footprint averages of the structure maps over the ROI pixels (row-major).
    path : Path, optional
        imzML file holding it.
    """

    affine: np.ndarray
    roi: tuple
    foot: np.ndarray | None = None
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx) of the ROI."""
        return (self.roi[3] - self.roi[2], self.roi[1] - self.roi[0])

    def roi_affine(self) -> np.ndarray:
        """(2, 3) matrix: ROI pixel (x, y, 1) -> section frame (um)."""
        a = self.affine.copy()
        a[:, 2] += a[:, :2] @ np.array([self.roi[0], self.roi[2]], dtype=float)
        return a


def _layout(seed: int, p: Preset, outlines: list[_Outline], n_kinds: int,
            tof_field_px: int | None = None):
    """Place every section in every acquisition.

    Parameters
    ----------
    tof_field_px : int, optional
        Side of the ToF-SIMS field of view in its pixels (default ``p.tof_fov_um`` / pixel). The
        depth of the field centre inside the tissue scales with the field's side (as
        ``p.tof_depth_um`` to ``p.tof_fov_um``), so that the field holds the preset's mix of
        tissue and slide.

    Returns
    -------
    acq : dict
        ``(section index, kind) -> _Acquisition`` (without footprints).
    ref_shape : (int, int)
        (ny, nx) of the reference file holding all sections side by side.
    """
    acq = {}
    # reference: all sections side by side in one file, each with its own rotation
    px = p.pixel_um[0]
    border, gap, x0 = 2, 3, 2
    for si, outline in enumerate(outlines):
        phi, (nx, ny), c = _placement(_rng(seed, 2, si, 0), outline, px, p.margin_um[0])
        y0 = border + int(_rng(seed, 2, si, 9).integers(0, 3))
        # sec = R (px (x, y) - px (x0, y0) - c)
        shift = px * np.array([x0, y0]) + c
        acq[si, 0] = _Acquisition(_affine(px, phi, -_rotation(phi) @ shift),
                                  (x0, x0 + nx, y0, y0 + ny))
        x0 += nx + gap
    ref_shape = (max(a.roi[3] for (_, k), a in acq.items()) + border, x0 - gap + border)
    # MALDI-like: whole section plus margin, own rotation
    for si, outline in enumerate(outlines if n_kinds > 1 else []):
        px = p.pixel_um[1]
        phi, (nx, ny), c = _placement(_rng(seed, 2, si, 1), outline, px, p.margin_um[1])
        acq[si, 1] = _Acquisition(_affine(px, phi, -_rotation(phi) @ c), (0, nx, 0, ny))
    # ToF-SIMS-like: square field of view whose centre lies tof_depth_um inside the tissue beside
    # the lobe, so that it holds a piece of the edge, of the lobe and of the cortex
    for si, outline in enumerate(outlines if n_kinds > 2 else []):
        px = p.pixel_um[2]
        if tof_field_px is None:
            n, depth = int(round(p.tof_fov_um / px)), p.tof_depth_um
        else:
            n = int(tof_field_px)
            depth = p.tof_depth_um * (n * px) / p.tof_fov_um
        rng = _rng(seed, 2, si, 2)
        phi = rng.uniform(0, 2 * np.pi)
        theta = outline.lobe[0] + rng.choice([-1.0, 1.0]) * rng.uniform(0.3, 0.6)
        centre = outline.point(theta, depth)
        half = px * (n - 1) / 2
        t = centre - _rotation(phi) @ np.array([half, half])
        acq[si, 2] = _Acquisition(_affine(px, phi, t), (0, n, 0, n))
    return acq, ref_shape


#: Limits of a valid ToF-SIMS field: (least, most) fraction of its area on tissue, most of the
#: section's tissue it may hold, most of its area outside the MALDI-like acquisition. The shipped
#: presets give 0.53-0.85 on tissue, 0.18-0.29 of the tissue and 0-0.26 outside the MALDI-like
#: acquisition (its slide corners: the MALDI-like acquisition covers the section plus a margin).
TOF_FIELD_LIMITS = (0.2, 0.95, 0.9, 0.5)


def _inside(outline: _Outline, q: np.ndarray) -> np.ndarray:
    """Whether section-frame points ``q`` (n, 2) (um) lie inside the tissue outline."""
    return outline.radius(np.arctan2(q[:, 1], q[:, 0])) > np.hypot(q[:, 0], q[:, 1])


def _in_rect(a: _Acquisition, q: np.ndarray) -> np.ndarray:
    """Whether section-frame points ``q`` (n, 2) (um) lie in the pixel footprints of ``a``."""
    xy = (q - a.affine[:, 2]) @ np.linalg.inv(a.affine[:, :2]).T
    ny, nx = a.shape
    return np.all((xy >= -0.5) & (xy <= np.array([nx, ny]) - 0.5), axis=1)


def _tof_field_fractions(outline: _Outline, tof: _Acquisition, maldi: _Acquisition | None = None,
                        n_samples: int = 64) -> tuple[float, float, float]:
    """Describe a ToF-SIMS field of view from the outline (``n_samples``^2 points per area).

    Returns
    -------
    on_tissue : float
        Fraction of the field's area on tissue.
    share : float
        Fraction of the section's tissue inside the field.
    outside_maldi : float
        Fraction of the field's area outside the MALDI-like acquisition (0 without ``maldi``).
    """
    u = (np.arange(n_samples) + 0.5) / n_samples
    ny, nx = tof.shape
    g = np.stack(np.meshgrid(u * nx - 0.5, u * ny - 0.5), -1).reshape(-1, 2)
    field = g @ tof.affine[:, :2].T + tof.affine[:, 2]
    poly = outline.polygon()
    lo, hi = poly.min(0), poly.max(0)
    sec = lo + (hi - lo) * np.stack(np.meshgrid(u, u), -1).reshape(-1, 2)
    sec = sec[_inside(outline, sec)]
    outside = 0.0 if maldi is None else float(1.0 - _in_rect(maldi, field).mean())
    return float(_inside(outline, field).mean()), float(_in_rect(tof, sec).mean()), outside


def _check_tof_field(outline: _Outline, tof: _Acquisition, maldi: _Acquisition | None,
                     section: str) -> None:
    """The ToF-SIMS field must hold tissue and slide (an edge), only part of the section, and lie
    mostly inside the MALDI-like acquisition (all its tissue does: that one covers the section).

    Raises
    ------
    InputError
        Naming ``tof_field_px`` / ``pixel_size_um`` (the field's size in um).
    """
    on, share, outside = _tof_field_fractions(outline, tof, maldi)
    lo_on, hi_on, hi_share, hi_out = TOF_FIELD_LIMITS
    log.debug("phantom: %s ToF-SIMS field %s px: %.2f on tissue, %.2f of the tissue, %.2f outside "
              "the MALDI-like acquisition", section, tof.shape, on, share, outside)
    if not (lo_on <= on <= hi_on and share <= hi_share and outside <= hi_out):
        side = tof.shape[0] * math.hypot(*tof.affine[:, 0])
        raise InputError(
            f"phantom tof_field_px / pixel_size_um: the {tof.shape[0]} px ({side:g} um) ToF-SIMS "
            f"field of section {section} does not fit the section: {on:.2f} of it on tissue "
            f"(need {lo_on:g}-{hi_on:g}), {share:.2f} of the tissue in it (at most {hi_share:g}), "
            f"{outside:.2f} outside the MALDI-like acquisition (at most {hi_out:g}); choose a "
            f"smaller field")


#: ``response="nonlinear"``: exponent of each species' abundance in the finer modalities (its
#: ion yield saturates or grows faster than linearly: no linear mixing of the finer modality's
#: components then gives the reference's species maps), drawn per species from this range.
NONLINEAR_EXPONENTS = (0.5, 1.6)
#: ``response="nonlinear"``: ion suppression in the finer modalities: every species' signal is
#: divided by ``1 + total abundance / SUPPRESSION_ABUNDANCE`` (a crowded pixel ionises worse).
SUPPRESSION_ABUNDANCE = 1.0
RESPONSES = ("linear", "nonlinear")


def _response(abund: np.ndarray, response: str, seed: int) -> np.ndarray:
    """Abundances (n, n_species) as a finer modality sees them: unchanged (``"linear"``), or
    raised to a per-species exponent and suppressed by the pixel's total (``"nonlinear"``)."""
    if response == "linear":
        return abund
    expo = _rng(seed, 7).uniform(*NONLINEAR_EXPONENTS, size=abund.shape[1])
    out = np.power(np.clip(abund, 0.0, None), expo)
    return out / (1.0 + abund.sum(axis=1, keepdims=True) / SUPPRESSION_ABUNDANCE)


def _reference_spectra(rng, foot: np.ndarray, xy: np.ndarray, px: float, *,
                       length_scale: float = 1.0, mz_shift: float = 0.0):
    """Centroided reference spectra (CSR) of pixels with structure footprints ``foot`` (n, S);
    TIC-field wavelengths scale with ``length_scale``, species m/z and noise range shift by
    ``mz_shift`` Da."""
    mz_pk, sp_pk, rel_pk = _peak_table(list(SPECIES), 0, mz_shift)
    abund = foot @ _weights(list(SPECIES)).T                          # (n, n_species)
    tic = (_smooth_field(rng, xy * px, 0.35, 1500.0 * length_scale)
           * np.exp(rng.normal(0, 0.05, size=len(xy))))
    return _centroid_spectra(rng, abund[:, sp_pk] * rel_pk * tic[:, None], mz_pk, min_count=3,
                             ppm_pixel=rng.normal(0, 0.6, size=len(xy)), ppm_peak_sd=0.5,
                             ppm_clip=2.0, noise_rate=5.0,
                             noise_range=(600.0 + mz_shift, 900.0 + mz_shift), noise_mean=8.0,
                             mz_shift=mz_shift)


def _maldi_spectra(rng, foot: np.ndarray, xy: np.ndarray, px: float, *,
                   length_scale: float = 1.0, mz_shift: float = 0.0, response: str = "linear",
                   seed: int = 0):
    """Centroided MALDI-like spectra (CSR) and the calibration error (ppm) of the acquisition;
    TIC-field wavelengths scale with ``length_scale``, species m/z shift by ``mz_shift`` Da (the
    DHB matrix peaks do not; the noise range reaches 1000 Da + a positive shift)."""
    mz_pk, sp_pk, rel_pk = _peak_table(list(SPECIES), 1, mz_shift)
    mat = [(m, 250.0 * r0 * r) for m0, r0, nc in DHB_PEAKS for m, r in _isotopes(m0, nc)]
    mat_mz, mat_rel = (np.array(v) for v in zip(*mat))
    abund = _response(foot @ _weights(list(SPECIES)).T, response, seed)
    tic = (_smooth_field(rng, xy * px, 0.25, 1200.0 * length_scale)
           * np.exp(rng.normal(0, 0.2, size=len(xy))))
    # matrix everywhere on the slide, suppressed on tissue, crystal-to-crystal variation
    matrix = (1.0 - 0.7 * foot[:, 0]) * np.exp(rng.normal(0, 0.35, size=len(xy)))
    expected = np.hstack([abund[:, sp_pk] * rel_pk * tic[:, None], matrix[:, None] * mat_rel])
    cal = rng.uniform(15.0, 25.0) * rng.choice([-1.0, 1.0])
    csr = _centroid_spectra(rng, expected, np.concatenate([mz_pk, mat_mz]), min_count=1,
                            ppm_pixel=cal + rng.normal(0, 3.0, size=len(xy)), ppm_peak_sd=1.5,
                            ppm_clip=None, noise_rate=8.0,
                            noise_range=(100.0, 1000.0 + max(mz_shift, 0.0)), noise_mean=5.0,
                            mz_shift=mz_shift)
    return csr, cal


def _tofsims_counts(rng, foot: np.ndarray, xy: np.ndarray, tile_px: int, *,
                    response: str = "linear", seed: int = 0) -> np.ndarray:
    """Unit-mass ToF-SIMS counts (n, 200) float32 with the tile-gain grid anchored at (0, 0)."""
    species = list(SPECIES)
    frag = _tof_fragments(species) * np.array([sp.scale[2] for sp in species])[:, None]
    gain = tile_gain_pattern(tile_px)[xy[:, 1] % tile_px, xy[:, 0] % tile_px]
    expected = (_response(foot @ _weights(species).T, response, seed) @ frag + 0.02) * gain[:, None]
    return rng.poisson(expected).astype(np.float32)


def _truth_weights(targets: np.ndarray, ppm: float, mz_shift: float = 0.0) -> np.ndarray:
    """(T, n_species): reference counts per unit abundance within +-ppm of each target (species
    m/z shifted by ``mz_shift`` Da, like the targets)."""
    mz_pk, sp_pk, rel_pk = _peak_table(list(SPECIES), 0, mz_shift)
    w = np.zeros((len(targets), len(SPECIES)))
    for ti, t in enumerate(targets):
        hit = np.abs(mz_pk - t) <= t * ppm * 1e-6
        np.add.at(w[ti], sp_pk[hit], rel_pk[hit])
    return w


def _write_truth(path: Path, section: str, chain: tuple, acqs: list[_Acquisition],
                 p: Preset, outdir: Path, mz_shift: float = 0.0) -> dict:
    """Write ``truth/{section}.h5``; return {modality: rotation (deg) relative to the reference}.

    Targets are :data:`DEMO_TARGETS` shifted by ``mz_shift`` Da; pixel sizes those of ``p``.
    """
    targets = np.array(DEMO_TARGETS, dtype=np.float64) + mz_shift
    to_ion = _weights(list(SPECIES)).T @ _truth_weights(targets, DEMO_PPM, mz_shift).T  # (S, T)
    a_ref = acqs[0].roi_affine()
    rotations = {}
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["section"] = section
        f.attrs["reference"] = chain[0]
        f.attrs["targets_mz"] = targets
        f.attrs["ppm"] = DEMO_PPM
        f.attrs["reference_only_mz"] = REFERENCE_ONLY_MZ + mz_shift
        for k, a in enumerate(acqs):
            ion = (a.foot @ to_ion).T.reshape((len(targets),) + a.shape)
            matrix = _compose_inverse(a_ref, a.roi_affine())
            g = f.create_group(chain[k])
            g.create_dataset("ion_images", data=ion.astype(np.float32), compression="gzip",
                             compression_opts=1)
            g.create_dataset("matrix_to_reference", data=matrix)
            g.create_dataset("mask", data=(a.foot[:, 0] > 0.5).reshape(a.shape))
            g.attrs["origin_xy"] = np.array([a.roi[0], a.roi[2]], dtype=np.int64)
            g.attrs["pixel_size_um"] = float(p.pixel_um[k])
            g.attrs["file"] = a.path.relative_to(outdir).as_posix()
            rotations[chain[k]] = math.degrees(math.atan2(matrix[1, 0], matrix[0, 0]))
            g.attrs["rotation_deg_to_reference"] = rotations[chain[k]]
    return rotations


def generate_study(outdir, *, preset: str = "demo", seed: int = 0,
                   chain=("fticr", "maldi", "tofsims"), tile_px: int = 40,
                   n_sections: int = 2, pixel_size_um=None, tof_field_px: int | None = None,
                   state_tof_pixel_size: bool = False, mz_shift: float = 0.0,
                   response: str = "linear") -> dict:
    """Write a phantom multi-section multimodal MSI study with ground truth.

    Parameters
    ----------
    outdir : path-like
        Study folder (created): ``imzml/``, ``sections.tsv``, ``truth/``.
    preset : {"demo", "small"}
        Sizes (see :data:`PRESETS`): "demo" for the README demo, "small" for tests (~1 s).
    seed : int
        Everything is a deterministic function of ``seed`` (byte-identical files).
    chain : sequence of str
        Modality names, coarse to fine; by position: reference (FT-ICR-like), MALDI-like,
        ToF-SIMS-like. One to three names (letters, digits, ``_``, ``-``).
    tile_px : int
        ToF-SIMS tile size (pixels) of the multiplicative gain grid anchored at pixel (0, 0).
    n_sections : int
        Number of tissue sections (ids ``s01``, ``s02``, ...).
    pixel_size_um : sequence of 3 float, optional
        Pixel sizes (um) of the reference, MALDI-like and ToF-SIMS-like acquisitions instead of
        the preset's, e.g. ``(8, 2, 1)``. Every length of the preset scales by (new reference
        pixel / preset reference pixel), so the study keeps about the preset's pixel counts,
        run time and file sizes (see :func:`scaled_preset` for the rules).
    tof_field_px : int, optional
        Side of the square ToF-SIMS field of view in ToF-SIMS pixels (default: the preset's
        ``tof_fov_um`` / pixel), e.g. 120 with ``tile_px=40`` for 3 x 3 tiles. Its centre lies
        inside the tissue at a depth proportional to its side (as in the preset). The field must
        hold both tissue and slide (a tissue edge), at most 90 % of the section's tissue, and lie
        at least half inside the MALDI-like acquisition (:data:`TOF_FIELD_LIMITS`) in every
        section: InputError otherwise.
    state_tof_pixel_size : bool
        Write the ToF-SIMS pixel size into its imzML files (by default they state none, unlike
        the other modalities).
    mz_shift : float
        Offset (Da) added to the m/z of every species in the reference and MALDI-like spectra
        and to the targets; the DHB matrix peaks and the ToF-SIMS unit-mass channels stay. Within
        [-300, 1000] Da, so the lipids stay above the matrix peaks and every target keeps at least
        300 ppm from any other modelled peak.
    response : {"linear", "nonlinear"}
        How the finer modalities respond to the species' abundances: linearly (the reference's
        species maps are then linear mixtures of their components, the assumption of the
        fusion's regression), or ``"nonlinear"``: per species a power law
        (:data:`NONLINEAR_EXPONENTS`) and ion suppression by the pixel's total abundance
        (:data:`SUPPRESSION_ABUNDANCE`); the reference and the truth stay linear.

    Returns
    -------
    dict
        Summary: ``outdir``, ``sections_sheet``, ``sections``, ``chain``, ``kinds`` (modality ->
        reference|maldi|tofsims), ``reference``, ``targets_mz``, ``ppm``, ``reference_only_mz``,
        ``targets`` (name, mz, reference_only), ``pixel_size_um`` per modality, ``species`` per
        modality, ``files`` (section -> modality -> imzML path), ``shapes`` (imzML file name ->
        (ny, nx)), ``rois`` (section -> modality -> roi text), ``truth`` (section -> path),
        ``rotation_deg`` (section -> modality -> rotation relative to the reference), ``tile_px``,
        ``seed``, ``preset``, ``seconds``; and what describes the options: ``tof_field_px``
        (None without a ToF-SIMS-like modality), ``mz_shift`` (Da), ``states_pixel_size``
        (modality -> whether its imzML states its pixel size), ``canvas_um`` and
        ``length_scale`` (the lengths' factor with respect to the named preset).

    Raises
    ------
    InputError
        A bad argument (the message names it).
    """
    t_start = time.perf_counter()
    outdir, p, chain = _check_args(outdir, preset, seed, chain, tile_px, n_sections)
    if response not in RESPONSES:
        raise InputError(f"phantom: response must be one of {RESPONSES}, got {response!r}")
    tile_px, n_sections, seed = int(tile_px), int(n_sections), int(seed)
    p, tof_field_px, state_tof_pixel_size, mz_shift = _check_options(
        p, pixel_size_um, tof_field_px, state_tof_pixel_size, mz_shift)
    imz_dir = outdir / "imzml"
    sections = [f"s{i + 1:02d}" for i in range(n_sections)]
    key = f"msifusion-phantom:{preset}:{seed}"
    if len(chain) < 3 or tof_field_px == int(round(p.tof_fov_um / p.pixel_um[2])):
        tof_field_px = None                                       # the preset's own field
    # a study that differs from the preset's gets its own file UUIDs
    options = {"px": ",".join(f"{v:g}" for v in p.pixel_um) if p != PRESETS[preset] else None,
               "tof": tof_field_px, "state": state_tof_pixel_size or None,
               "shift": mz_shift or None, "response": None if response == "linear" else response}
    if any(v is not None for v in options.values()):
        key += ":" + ":".join(f"{k}={v}" for k, v in options.items() if v is not None)

    # outlines and layout first: a ToF-SIMS field that does not fit fails before the drawing
    rngs = [_rng(seed, 1, si) for si in range(n_sections)]
    outlines = [_random_outline(rng, p) for rng in rngs]
    acq, ref_shape = _layout(seed, p, outlines, len(chain), tof_field_px)
    if len(chain) > 2:
        for si, sec in enumerate(sections):
            _check_tof_field(outlines[si], acq[si, 2], acq[si, 1], sec)
    canvases = []
    for si, sec in enumerate(sections):
        canvases.append(_draw_section(rngs[si], outlines[si], p))
        log.info("phantom: drew section %s (canvas %s px at %g um)", sec, canvases[-1][0].shape,
                 p.canvas_um)
    for (si, k), a in acq.items():
        xy = _grid_xy(a.shape[1], a.shape[0]) + [a.roi[0], a.roi[2]]
        a.foot = _footprint_average(*canvases[si], a.affine, xy, _n_sub(p.pixel_um[k], p.canvas_um))
    del canvases

    # reference: one file, sections side by side, off-section pixels hold slide only
    xy = _grid_xy(ref_shape[1], ref_shape[0])
    foot = np.zeros((len(xy), len(STRUCTURES)), np.float32)
    foot[:, STRUCTURES.index("offtissue")] = 1.0
    for si in range(n_sections):
        x0, x1, y0, y1 = acq[si, 0].roi
        foot[(xy[:, 0] >= x0) & (xy[:, 0] < x1) & (xy[:, 1] >= y0) & (xy[:, 1] < y1)] = \
            acq[si, 0].foot
    csr = _reference_spectra(_rng(seed, 3, 0, 0), foot, xy, p.pixel_um[0],
                             length_scale=p.length_scale, mz_shift=mz_shift)
    path = imz_dir / f"{chain[0]}_sections.imzML"
    write_imzml(path, xy, *csr, mode="processed", pixel_size_um=p.pixel_um[0],
                spectrum_type="centroid", uuid_key=f"{key}:{path.name}")
    log.info("phantom: wrote %s (%d pixels, %d peaks)", path, len(xy), csr[0][-1])
    shapes = {path.name: ref_shape}
    for si in range(n_sections):
        acq[si, 0].path = path
    # finer modalities: one file per section
    for (si, k), a in sorted(acq.items()):
        if k == 0:
            continue
        rng = _rng(seed, 3, si, k)
        xy = _grid_xy(a.shape[1], a.shape[0])
        a.path = imz_dir / f"{chain[k]}_{sections[si]}.imzML"
        if k == 1:
            csr, cal = _maldi_spectra(rng, a.foot, xy, p.pixel_um[1],
                                      length_scale=p.length_scale, mz_shift=mz_shift,
                                      response=response, seed=seed)
            write_imzml(a.path, xy, *csr, mode="processed", pixel_size_um=p.pixel_um[1],
                        spectrum_type="centroid", uuid_key=f"{key}:{a.path.name}")
            log.info("phantom: wrote %s (%d pixels, %d peaks, calibration %+.1f ppm)", a.path,
                     len(xy), csr[0][-1], cal)
        else:
            counts = _tofsims_counts(rng, a.foot, xy, tile_px, response=response, seed=seed)
            write_imzml(a.path, xy, np.arange(len(xy) + 1) * len(TOF_MZ), None, counts.ravel(),
                        mode="continuous", mz_axis=TOF_MZ,
                        pixel_size_um=p.pixel_um[2] if state_tof_pixel_size else None,
                        spectrum_type="profile", uuid_key=f"{key}:{a.path.name}")
            log.info("phantom: wrote %s (%d pixels, mean %.0f counts per pixel)", a.path, len(xy),
                     counts.sum(1).mean())
        shapes[a.path.name] = a.shape

    # sections sheet
    sheet = outdir / "sections.tsv"
    lines = ["section\tmodality\timzml\troi"]
    rois = {sec: {} for sec in sections}
    for si, sec in enumerate(sections):
        for k, name in enumerate(chain):
            x0, x1, y0, y1 = acq[si, k].roi
            rois[sec][name] = f"{x0}:{x1},{y0}:{y1}" if k == 0 else "*"
            lines.append(f"{sec}\t{name}\t{acq[si, k].path.relative_to(outdir).as_posix()}"
                         f"\t{rois[sec][name]}")
    with atomic_output(sheet) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")

    # ground truth
    truth, rotations = {}, {}
    for si, sec in enumerate(sections):
        path = outdir / "truth" / f"{sec}.h5"
        rotations[sec] = _write_truth(path, sec, chain, [acq[si, k] for k in range(len(chain))],
                                      p, outdir, mz_shift)
        truth[sec] = str(path)

    seconds = time.perf_counter() - t_start
    log.info("phantom: study %s written in %.1f s", outdir, seconds)
    by_mz = {sp.mz: sp.name for sp in SPECIES if sp.mz is not None}
    states = {name: k < 2 or state_tof_pixel_size for k, name in enumerate(chain)}
    return {
        "outdir": str(outdir),
        "sections_sheet": str(sheet),
        "sections": sections,
        "chain": list(chain),
        "kinds": {name: KINDS[k] for k, name in enumerate(chain)},
        "reference": chain[0],
        "targets_mz": [float(t + mz_shift) for t in DEMO_TARGETS],
        "ppm": DEMO_PPM,
        "reference_only_mz": REFERENCE_ONLY_MZ + mz_shift,
        "targets": [{"mz": float(t + mz_shift), "name": by_mz[t],
                     "reference_only": t == REFERENCE_ONLY_MZ} for t in DEMO_TARGETS],
        "pixel_size_um": {name: float(p.pixel_um[k]) for k, name in enumerate(chain)},
        "species": {name: [sp.name for sp in SPECIES if sp.scale[k] > 0]
                    for k, name in enumerate(chain)},
        "files": {sec: {name: str(acq[si, k].path) for k, name in enumerate(chain)}
                  for si, sec in enumerate(sections)},
        "shapes": shapes,
        "rois": rois,
        "truth": truth,
        "rotation_deg": rotations,
        "tile_px": tile_px,
        "tof_field_px": acq[0, 2].shape[0] if len(chain) > 2 else None,
        "mz_shift": mz_shift, "response": response,
        "states_pixel_size": states,
        "canvas_um": float(p.canvas_um),
        "length_scale": float(p.length_scale),
        "seed": seed,
        "preset": preset,
        "seconds": seconds,
    }
