"""Registration of an image level (microscopy) onto MSI: phantoms rendered as RGB stains with
known transforms, for scale (known, wrong, unknown), mirror, partial overlap and refusal."""

from __future__ import annotations

import math

import numpy as np
import pytest

from msifusion.image import background_mask, stain_features
from msifusion.register_image import register_image, scale_ranges

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


class Tissue:
    """A section in physical coordinates (um): an elliptical tissue with three tissue types
    (regions with sharp borders, like glands and stroma, from thresholded random fields),
    ``types(x, y) -> (3, n)`` in [0, 1], 0 off the tissue."""

    def __init__(self, seed: int = 0, size_um: float = 1200.0):
        rng = np.random.default_rng(seed)
        self.size = size_um
        self.blobs = [(rng.uniform(0.1, 0.9, (14, 2)) * size_um, rng.uniform(40, 120, 14))
                      for _ in range(3)]

    def types(self, x, y):
        c = self.size / 2
        inside = ((x - c) / (0.42 * self.size)) ** 2 + ((y - 0.9 * c) / (0.3 * self.size)) ** 2 < 1
        out = []
        for centres, widths in self.blobs:
            v = sum(np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * w * w))
                    for (cx, cy), w in zip(centres, widths))
            out.append(inside / (1 + np.exp(-(v - 0.5) / 0.05)))
        return np.array(out), inside


def coarse_msi(tissue: Tissue, px_um: float, shape, seed: int = 1):
    """Coarse MSI component maps (6, ny, nx): nonlinear mixtures of the tissue types averaged
    over each pixel (4 x 4 sub-points), with noise; all pixels acquired (a rectangle)."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    sub = (np.arange(4) + 0.5) / 4 - 0.5
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    acc = 0
    for dy in sub:
        for dx in sub:
            t, inside = tissue.types((xx + dx + 0.5) * px_um, (yy + dy + 0.5) * px_um)
            chans = [t[0] ** 0.7, t[1] ** 2, np.sqrt(t[2]) * (1 - 0.5 * t[0]), t[0] * t[1],
                     0.3 * inside + 0.2 * t[2], 0.1 + 0.0 * t[0]]
            acc = acc + np.array(chans)
    maps = acc / 16
    return maps + 0.03 * rng.standard_normal(maps.shape)


def stained_image(tissue: Tissue, matrix_um, shape, *, mirror=False, seed: int = 2):
    """An H&E-like RGB image (ny, nx, 3): pixel (x, y) of the image sees the physical point
    ``matrix_um @ (x, y, 1)``; hematoxylin from type 0, eosin from type 1 and 2, glass off the
    tissue."""
    from skimage.color import rgb_from_hed

    rng = np.random.default_rng(seed)
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(float)
    if mirror:
        xx = nx - 1 - xx
    m = np.asarray(matrix_um, dtype=float)
    px = m[0, 0] * xx + m[0, 1] * yy + m[0, 2]
    py = m[1, 0] * xx + m[1, 1] * yy + m[1, 2]
    t, inside = tissue.types(px, py)
    h = 0.6 * t[0] + 0.05 * inside
    e = 0.5 * t[1] + 0.3 * t[2] + 0.15 * inside
    od = h[..., None] * rgb_from_hed[0] + e[..., None] * rgb_from_hed[1]
    rgb = 235.0 * 10 ** (-od) + rng.normal(0, 2.0, (ny, nx, 3))
    return np.clip(rgb, 0, 255).astype(np.float32)


def pose_um(theta_deg: float, px_um: float, origin_um) -> np.ndarray:
    """Image pixel -> physical um: rotation by theta, pixel size, origin of pixel (0, 0)."""
    t = math.radians(theta_deg)
    r = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]) * px_um
    return np.c_[r, origin_um]


def fine_to_coarse(m_um: np.ndarray, coarse_px_um: float, mirror_nx: int | None = None):
    """The true registration matrix: fine ROI px -> coarse ROI px (coarse pixel centres at
    integers, pixel (i, j) covering [i, i + 1) coarse px in um / px)."""
    m = np.vstack([m_um, [0, 0, 1]])
    if mirror_nx is not None:
        m = m @ np.array([[-1, 0, mirror_nx - 1], [0, 1, 0], [0, 0, 1]])
    to_c = np.array([[1 / coarse_px_um, 0, -0.5], [0, 1 / coarse_px_um, -0.5], [0, 0, 1]])
    return (to_c @ m)[:2]


def case(*, theta=17.0, fine_px=4.0, coarse_px=40.0, fine_shape=(240, 300), origin=(160, 80),
         mirror=False, seed=0, coarse_shape=(30, 30)):
    tissue = Tissue(seed)
    maps = coarse_msi(tissue, coarse_px, coarse_shape, seed + 1)
    m_um = pose_um(theta, fine_px, origin)
    rgb = stained_image(tissue, m_um, fine_shape, mirror=mirror, seed=seed + 2)
    feats, _ = stain_features(rgb, "brightfield")
    mask = background_mask(rgb, "brightfield")
    truth = fine_to_coarse(m_um, coarse_px, fine_shape[1] if mirror else None)
    cvalid = np.ones(coarse_shape, bool)
    yy, xx = np.mgrid[0:coarse_shape[0], 0:coarse_shape[1]]
    ctissue = tissue.types((xx + 0.5) * coarse_px, (yy + 0.5) * coarse_px)[1]
    return dict(coarse=(maps, cvalid, ctissue, coarse_px),
                fine=(feats, np.ones(mask.shape, bool), mask), truth=truth)


def error_px(reg, truth, fine_shape):
    yy, xx = np.mgrid[0:fine_shape[0]:6, 0:fine_shape[1]:6]
    p = np.stack([xx.ravel(), yy.ravel(), np.ones(xx.size)])
    return float(np.max(np.hypot(*(reg.matrix @ p - truth @ p))))


def run(c, fine_px, source="config", **kw):
    kw.setdefault("n_starts", 24)
    return register_image(*c["coarse"], *c["fine"], fine_px, fine_px_source=source, **kw)


def test_known_scale_rigid_and_a_wrong_pixel_size_recovered_by_affine():
    c = case()
    reg = run(c, 4.0, model="rigid")
    assert reg.passed, reg.details
    assert error_px(reg, c["truth"], (240, 300)) < 0.35
    assert abs(reg.rotation_deg - 17.0) < 1.0 and not reg.mirror
    # the config's pixel size 10 % wrong: the search covers +-15 %, the scale comes out right
    reg = run(c, 4.4, model="affine")
    assert reg.passed and abs(reg.scale * 40.0 / 4.0 - 1) < 0.02, reg.scale * 40.0
    assert error_px(reg, c["truth"], (240, 300)) < 0.5


def test_unknown_scale_found_from_the_tissue_areas():
    c = case(theta=-32.0, fine_px=3.0, fine_shape=(300, 380), origin=(180, 260))
    reg = run(c, float("nan"), source="none")
    assert reg.passed, reg.details
    assert abs(reg.details["fine_pixel_size_found_um"] / 3.0 - 1) < 0.02
    assert reg.details["scale_hypothesis"] == "tissue areas"
    assert error_px(reg, c["truth"], (300, 380)) < 0.5


def test_file_metadata_contradicted_by_the_tissue_areas_is_searched_both_ways():
    """An image stating 0.3 um for 3 um pixels (a wrong objective in the metadata): both
    hypotheses are searched, the placement fits the areas' one."""
    c = case(theta=-32.0, fine_px=3.0, fine_shape=(300, 380), origin=(180, 260))
    cvalid, mask = c["coarse"][1], c["fine"][2]
    ranges = scale_ranges(cvalid, mask, 40.0, 0.3, "image", scale_range=0.15)
    assert [r[2] for r in ranges] == ["pixel size (image)", "tissue areas"]
    assert [r[2] for r in scale_ranges(cvalid, mask, 40.0, 0.3, "config", scale_range=0.15)] \
        == ["pixel size (config)"]
    reg = run(c, 0.3, source="image")
    assert reg.passed and reg.details["scale_hypothesis"] == "tissue areas"
    assert abs(reg.details["fine_pixel_size_found_um"] / 3.0 - 1) < 0.02


def test_mirrored_section():
    c = case(mirror=True, theta=40.0)
    reg = run(c, 4.0, mirror=True)
    assert reg.passed and reg.mirror
    assert error_px(reg, c["truth"], (240, 300)) < 0.5
    refused = run(c, 4.0, mirror=False)       # a mirrored section fits better: ambiguous
    assert not refused.passed and refused.margin < 0.05


def test_partial_overlap_image_smaller_than_the_msi_region():
    """The image sees about half of the tissue (a field smaller than the MSI region)."""
    c = case(fine_shape=(160, 190), origin=(250, 250), theta=8.0)
    reg = run(c, 4.0, n_starts=36)
    assert reg.passed, reg.details
    assert error_px(reg, c["truth"], (160, 190)) < 0.5


def test_unrelated_image_is_refused_with_every_failing_criterion():
    from msifusion.steps.register import failed_criteria

    c = case()
    other = case(seed=7)
    reg = register_image(*c["coarse"], *other["fine"], 4.0, n_starts=24)
    assert not reg.passed
    failed = failed_criteria(reg.to_json())
    assert failed and all("(registration." in f for f in failed), failed
