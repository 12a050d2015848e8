"""Tests of msifusion.tissue: masks, sections, ROIs, soft masks."""

from __future__ import annotations

import numpy as np
import pytest

from msifusion.tissue import (
    interleaving,
    label_sections,
    otsu_threshold,
    propose_rois,
    remove_small_components,
    soft_mask,
    tissue_mask,
    tissue_mask_from_maps,
)
from test_register import REAL_TOFSIMS, real_split, textured_field


def _disk(shape, cx, cy, r):
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def _section_image(seed=0):
    """Disk of tissue (radius 20) with a hole, a debris speck, noise and a non-acquired corner."""
    rng = np.random.default_rng(seed)
    shape = (64, 80)
    tissue = _disk(shape, 40, 30, 20)
    hole = _disk(shape, 45, 28, 4)
    img = np.where(tissue, 10.0, 0.3) * (1 + 0.05 * rng.standard_normal(shape))
    img[hole] = 0.3  # a hole enclosed by tissue (e.g. a vessel)
    img[5:7, 70:72] = 10.0  # 4-pixel debris
    img[55:, :6] = np.nan  # not acquired
    return img, tissue


def test_tissue_mask_otsu_fill_holes_and_debris():
    img, tissue = _section_image()
    m = tissue_mask(img, dilation_px=0, smooth_px=0)
    assert m.dtype == bool and m.shape == img.shape
    np.testing.assert_array_equal(m, tissue)  # hole filled, debris removed, exact disk
    assert not m[np.isnan(img)].any()


def test_tissue_mask_dilation_grows_by_one_ring():
    img, tissue = _section_image()
    m0 = tissue_mask(img, dilation_px=0)
    m1 = tissue_mask(img, dilation_px=1)
    ring = m1 & ~m0
    assert m0.sum() < m1.sum() and not (m0 & ~m1).any()
    # every added pixel touches the original mask; the ring is about one perimeter long
    from scipy import ndimage as ndi

    assert not (ring & ~ndi.binary_dilation(m0, np.ones((3, 3)))).any()
    assert 0.8 * 2 * np.pi * 20 < ring.sum() < 1.6 * 2 * np.pi * 20


def test_tissue_mask_small_objects_kept_when_allowed():
    img, tissue = _section_image()
    m = tissue_mask(img, dilation_px=0, min_size_px=1, smooth_px=0)
    assert m[5:7, 70:72].all() and m.sum() == tissue.sum() + 4


def test_smoothing_tames_pixel_noise_without_moving_the_edge():
    rng = np.random.default_rng(1)
    tissue = _disk((64, 80), 40, 30, 20)
    counts = rng.poisson(np.where(tissue, 3.0, 0.4)).astype(float)  # sparse counts, many zeros
    agree_smooth = (tissue_mask(counts, dilation_px=0) == tissue).mean()
    agree_raw = (tissue_mask(counts, dilation_px=0, smooth_px=0) == tissue).mean()
    assert agree_smooth > 0.98 and agree_raw < agree_smooth
    # noiseless: smoothing the log image leaves the edge in place (up to curvature: a few pixels)
    clean = np.where(tissue, 10.0, 0.3)
    m = tissue_mask(clean, dilation_px=0, smooth_px=2.0)
    assert (m != tissue).sum() <= 8 and abs(int(m.sum()) - int(tissue.sum())) <= 8


def test_otsu_threshold_centred_and_close_to_skimage():
    from skimage.filters import threshold_otsu

    assert otsu_threshold(np.r_[np.zeros(50), np.full(50, 10.0)]) == pytest.approx(5.0)
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(0, 1, 3000), rng.normal(5, 1, 2000)])
    width = (v.max() - v.min()) / 256
    assert abs(otsu_threshold(v) - threshold_otsu(v)) <= 2 * width


def test_tissue_mask_fixed_threshold_is_exact():
    img = np.array([[0.0, 1.0, 2.0], [3.0, np.nan, 5.0]])
    m = tissue_mask(img, threshold=1.5, dilation_px=0, fill_holes=False, min_size_px=1)
    np.testing.assert_array_equal(m, [[False, False, True], [True, False, True]])


def test_log_scale_is_robust_to_hot_spots():
    """Plain Otsu splits hot spots from everything else; on the log image it finds the tissue."""
    img, tissue = _section_image()
    img[tissue & _disk(img.shape, 30, 30, 2)] = 5000.0  # a few hot pixels inside the tissue
    m_log = tissue_mask(img, dilation_px=0, smooth_px=0)
    m_lin = tissue_mask(img, dilation_px=0, log_scale=False, min_size_px=1, smooth_px=0)
    assert (m_log == tissue).mean() > 0.999
    assert m_lin.sum() < 0.75 * tissue.sum()  # the threshold lands inside the tissue intensities


@pytest.mark.parametrize("img", [np.full((8, 8), 3.0), np.full((8, 8), np.nan)])
def test_tissue_mask_empty_when_no_contrast(img):
    m = tissue_mask(img)
    assert m.shape == (8, 8) and not m.any()


def test_tissue_mask_rejects_stack():
    with pytest.raises(ValueError, match="2-D"):
        tissue_mask(np.ones((2, 4, 4)))


def test_label_sections_largest_first():
    m = np.zeros((20, 30), bool)
    m[2:5, 2:5] = True  # 9 px
    m[8:18, 10:25] = True  # 150 px
    m[1:3, 25:29] = True  # 8 px
    labels, n = label_sections(m)
    assert n == 3 and labels.dtype == np.int32
    assert (labels == 1).sum() == 150 and (labels == 2).sum() == 9 and (labels == 3).sum() == 8
    assert labels[0, 0] == 0
    assert label_sections(np.zeros((4, 4), bool))[1] == 0


def test_propose_rois_boxes_margin_and_clipping():
    m = np.zeros((20, 30), bool)
    m[2:5, 1:4] = True
    m[8:18, 10:25] = True
    assert propose_rois(m) == [(10, 25, 8, 18), (1, 4, 2, 5)]
    assert propose_rois(m, margin_px=3) == [(7, 28, 5, 20), (0, 7, 0, 8)]
    assert propose_rois(np.zeros((4, 4), bool)) == []


def test_remove_small_components_connectivity():
    m = np.zeros((6, 6), bool)
    m[0, 0] = m[1, 1] = True  # diagonal pair: 2 px with 8-connectivity, 2 x 1 px with 4
    m[3:6, 3:6] = True
    assert remove_small_components(m, 2, connectivity=2)[0, 0]
    assert not remove_small_components(m, 2, connectivity=1)[0, 0]
    assert remove_small_components(m, 9).sum() == 9


def test_soft_mask():
    m = np.zeros((41, 41), bool)
    m[10:31, 10:31] = True
    s0 = soft_mask(m, 0)
    assert s0.dtype == np.float32
    np.testing.assert_array_equal(s0, m.astype(np.float32))
    s = soft_mask(m, 2.0)
    assert s.min() >= 0 and s.max() <= 1
    assert s.sum() == pytest.approx(m.sum(), rel=1e-4)  # mass preserved away from the borders
    # first tissue pixel: its centre is half a pixel inside the edge -> Phi(0.5 / sigma)
    from scipy.stats import norm

    assert s[20, 20] == pytest.approx(1.0, abs=1e-4)
    assert s[20, 10] == pytest.approx(norm.cdf(0.25), abs=2e-3)


# ------------------------------------------------------------------------------------------
# masks from component maps: sections on background, fields of view inside the tissue
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio, n_coarse, seed", [(4, 32, 0), (8, 16, 1), (12, 12, 2), (8, 8, 3)])
def test_field_inside_textured_tissue_is_all_tissue(ratio, n_coarse, seed):
    """A textured tissue filling the field (wood: walls, empty lumens, counting noise) has no
    background: both k-means classes are parts of its texture, at either resolution."""
    coarse, fine = textured_field(ratio, n_coarse, seed)
    assert tissue_mask_from_maps(coarse).mean() >= 0.95
    assert tissue_mask_from_maps(fine).mean() >= 0.95


@pytest.mark.real
@pytest.mark.skipif(not REAL_TOFSIMS.exists(), reason="real data ../shared/data/real absent")
@pytest.mark.parametrize("factor", [1, 8])
def test_real_wood_section_is_all_tissue(factor):
    """The real ToF-SIMS poplar wood cube (wood everywhere, 256 x 256 px) at full resolution and
    block-averaged by 8 (32 x 32 px): both channel groups keep >= 95 % of the acquired pixels."""
    for maps in real_split(factor, 256):
        assert tissue_mask_from_maps(maps).mean() >= 0.95


def _section_maps(tissue, seed, *, background=0.5, counts=40.0):
    """Component-like maps (4, ny, nx) of a textured tissue on a background of another
    composition with ``background`` times the tissue's signal (a MALDI matrix), smoothed like NMF
    maps of counts."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    tex = ndi.gaussian_filter(rng.standard_normal(tissue.shape), 2.0)
    tex = np.exp(0.7 * tex / tex.std())
    comp_t = (np.array([1.0, 0.8, 0.2, 0.1]) + 0.2 * rng.random(4))[:, None, None]
    comp_b = comp_t[::-1]
    lam = np.where(tissue, counts * tex * comp_t / comp_t.sum(), background * counts * comp_b / comp_b.sum())
    return ndi.gaussian_filter(rng.poisson(lam).astype(float), (0, 1, 1))


@pytest.mark.parametrize("where", ["inside", "crossing"])
def test_section_on_background_keeps_its_outline(where):
    """A textured section with background around it, or a field of view crossing the section's
    edge (tissue touching two thirds of the border): the mask is the section, not the field."""
    yy, xx = np.mgrid[0:90, 0:110]
    tissue = (xx - 55) ** 2 / 35 ** 2 + (yy - 45) ** 2 / 28 ** 2 <= 1 if where == "inside" \
        else (xx + 0.3 * yy) < 70
    mask = tissue_mask_from_maps(_section_maps(tissue, seed=4))
    iou = (mask & tissue).sum() / (mask | tissue).sum()
    assert iou > 0.93 and mask.mean() < 0.8, (iou, mask.mean())


def test_interleaving_regions_against_texture():
    """Two regions meet along one outline (density near 0); a checkerboard of 2 x 2 blocks
    interleaves finely; a class of isolated pixels vanishes under the majority vote."""
    yy, xx = np.mgrid[0:40, 0:50]
    acquired = np.ones((40, 50), bool)
    density, share = interleaving(xx < 20, acquired)
    assert density < 0.05 and share == pytest.approx(0.4)
    assert interleaving(((xx // 4 + yy // 4) % 2) == 0, acquired)[0] > 0.3
    assert interleaving(((xx % 7) == 0) & ((yy % 7) == 0), acquired)[1] == 0.0
