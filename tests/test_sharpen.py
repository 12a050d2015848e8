"""Tests of msifusion.sharpen: measured ion images, consistency, Wald's reduced-scale test."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from msifusion.errors import InputError
from msifusion.evaluate import bicubic_to_grid, pearson
from msifusion.fuse import footprint_average
from msifusion.affine import block_matrix
from msifusion.sharpen import (choose_gains, fidelity, make_consistent, pixel_ratio,
                               reduced_scale_scores, sharpen_targets)
from msifusion.spectra import measured_ion_images
from msifusion.store import ConvertedReader, write_converted


def textures(n: int, seed: int):
    """Three log-normal textures (Gaussian scales 1.5, 3 and 6 px), (3, n, n), and a fourth
    independent one (n, n)."""
    rng = np.random.default_rng(seed)

    def pat(sigma):
        g = ndi.gaussian_filter(rng.standard_normal((n, n)), sigma)
        return np.exp(0.7 * g / g.std())

    return np.array([pat(1.5), pat(3.0), pat(6.0)]), pat(2.5)


def study(n=96, f=4, seed=0, noise=0.02):
    """Fine maps (3, n, n) and targets: linear in the maps (seen), independent (unseen),
    nonlinear (sqrt(m0) * m2); coarse = block mean by ``f`` plus Gaussian noise."""
    maps, other = textures(n, seed)
    truth = np.array([2 * maps[0] + maps[1], other, np.sqrt(maps[0]) * maps[2]])
    m = block_matrix(f)
    coarse, _ = footprint_average(truth, m, (n // f, n // f))
    rng = np.random.default_rng(seed + 100)
    coarse += noise * coarse.std(axis=(1, 2), keepdims=True) * rng.standard_normal(coarse.shape)
    return maps, truth, coarse, m


def test_block_matrix_and_pixel_ratio():
    m = block_matrix(4)
    # fine pixel 0..3 -> coarse pixel 0 (centre 1.5 -> 0), pixel 4..7 -> 1
    np.testing.assert_allclose(m @ np.array([1.5, 5.5, 1.0]), [0.0, 1.0])
    assert pixel_ratio(m) == pytest.approx(4.0)
    rot = np.array([[0.0, -0.5, 3.0], [0.5, 0.0, 1.0]])
    assert pixel_ratio(rot) == pytest.approx(2.0)


def test_make_consistent_reproduces_the_coarse_image():
    """Any fine image (here noise and a wrong constant) averaged over the coarse pixels after the
    correction reproduces the coarse image on every covered pixel; NaN pixels stay NaN; an image
    already consistent does not change."""
    rng = np.random.default_rng(1)
    m = block_matrix(4)
    coarse = rng.random((2, 8, 10)) + 1.0
    coarse[1, 0, 0] = np.nan                        # unknown coarse pixel: not constrained
    fine = np.stack([rng.random((32, 40)), np.full((32, 40), 5.0)])
    fine[:, -3:, :] = np.nan                         # fine not acquired on the last rows
    out, info = make_consistent(fine, coarse, m, min_coverage=0.9)
    assert np.isnan(out[:, -3:]).all() and np.isfinite(out[:, :-3]).all()
    avg, cov = footprint_average(out, m, coarse.shape[1:])
    ok = (cov >= 0.9) & np.isfinite(coarse).all(0)
    assert ok.sum() == 8 * 10 - 10 - 1 and info["n_constrained"] == ok.sum()
    np.testing.assert_allclose(avg[:, ok], coarse[:, ok], atol=1e-3)
    # the partly covered last coarse row is not forced
    again, info2 = make_consistent(out, coarse, m, min_coverage=0.9)
    np.testing.assert_allclose(again, out, atol=2e-3)
    with pytest.raises(InputError, match="same T"):
        make_consistent(fine[:1], coarse, m)


def test_fidelity_of_block_means_is_one():
    maps, truth, coarse, m = study(noise=0.0)
    np.testing.assert_allclose(fidelity(truth, coarse, m), 1.0, atol=1e-9)
    shifted = np.roll(truth, 3, axis=2)
    assert (fidelity(shifted, coarse, m) < 0.99).all()


def test_choose_gains():
    gains = (0.0, 0.5, 1.0)
    r = np.array([[0.8, 0.9, 0.95], [0.8, 0.802, 0.79], [np.nan] * 3, [0.9, 0.95, 0.93]])
    np.testing.assert_array_equal(choose_gains(r, gains, 0.005), [1.0, 0.0, 0.0, 0.5])
    with pytest.raises(InputError, match="first gain"):
        choose_gains(r, (0.5, 1.0), 0.0)


def test_seen_species_get_detail_unseen_ones_the_interpolated_image():
    """Wald's test decides per target: the species the fine modality explains (linearly, or
    not) get detail and beat bicubic by a wide margin; the species it does not see gets gain 0
    and ships the interpolated measured image, made consistent (no worse than bicubic). Every
    shipped image averages back to the coarse one (r >= 0.999)."""
    maps, truth, coarse, m = study()
    sh = sharpen_targets(coarse, np.ones(coarse.shape[1:], bool), maps, m, seed=0)
    assert sh.info["reduced_factor"] == 4 and sh.reduced_r.shape == (3, 5)
    assert sh.gain[0] == 1.0 and sh.gain[2] > 0 and sh.gain[1] == 0.0
    full = np.ones(truth.shape[1:], bool)
    r = [pearson(a, b, full) for a, b in zip(sh.images, truth)]
    bic = [pearson(bicubic_to_grid(c, m, truth.shape[1:]), t, full) for c, t in zip(coarse, truth)]
    assert r[0] > bic[0] + 0.1 and r[2] > bic[2] + 0.01, (r, bic)
    assert r[1] >= bic[1] - 0.01, (r, bic)
    assert (sh.fidelity_r >= 0.999).all(), sh.fidelity_r
    # not allowed (no detail at the previous chain step): interpolation for all
    off = sharpen_targets(coarse, np.ones(coarse.shape[1:], bool), maps, m, seed=0,
                          allowed=np.zeros(3, bool))
    assert (off.gain == 0).all()
    interp, _ = make_consistent(np.array([bicubic_to_grid(c, m, truth.shape[1:]) for c in coarse]),
                                coarse, m)
    np.testing.assert_allclose(off.images, interp, rtol=1e-5, atol=1e-5)


def test_no_reduced_scale_test_means_interpolation():
    """A coarse section of 3 x 3 pixels leaves nothing one scale down: no gain, and a reason."""
    maps, truth, coarse, m = study(n=12, f=4)
    r, factor, reason = reduced_scale_scores(coarse, np.ones((3, 3), bool), maps, m)
    assert factor == 0 and np.isnan(r).all() and "tissue pixels" in reason


def test_measured_ion_images_sum_the_window(tmp_path):
    """Two targets in one pass: the raw intensities inside each ppm window, per pixel; NaN
    where no spectrum was acquired."""
    xy = np.array([[0, 0], [1, 0], [0, 1]])          # (x, y); pixel (1, 1) not acquired
    mz = np.array([100.0, 100.0004, 200.0, 100.0, 200.0009, 300.0])
    inten = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0], np.float32)
    write_converted(tmp_path / "c.h5", indptr=np.array([0, 3, 5, 6]), mz=mz, intensity=inten, xy=xy,
                    attrs={"pixel_size_um": 10.0, "mode": "processed", "spectrum_type": "centroid"})
    img = measured_ion_images(ConvertedReader(tmp_path / "c.h5"), [100.0, 200.0], 5.0)
    assert img.shape == (2, 2, 2)
    np.testing.assert_array_equal(img[0], [[3.0, 8.0], [0.0, np.nan]])
    np.testing.assert_array_equal(img[1], [[4.0, 16.0], [0.0, np.nan]])


def test_reduced_scale_test_degrades_by_at_least_half_the_ratio():
    """Pixel ratio 8 on a 12 x 12 coarse section: at 1/8 to 1/4 too few pixels remain; a test at
    1/3 (16 pixels) or 1/2 would not validate an 8-fold extrapolation, so there is none."""
    maps, truth, coarse, m = study(n=96, f=8)
    r, factor, reason = reduced_scale_scores(coarse, np.ones((12, 12), bool), maps, m)
    assert factor == 0 and np.isnan(r).all()
    assert "less than 0.5 x the pixel ratio 8.0 (1/4)" in reason
    # the same section at ratio 4 (24 x 24 coarse pixels) is tested at the full ratio
    maps, truth, coarse, m = study(n=96, f=4)
    assert reduced_scale_scores(coarse, np.ones((24, 24), bool), maps, m)[1] == 4


def test_chain_step_reproduces_the_anchor():
    """A later chain step learns from the previous level's image (here the 1/4 image) but must
    reproduce the measured anchor (a 1/8 image of the same truth, through its own matrix): the
    shipped images average back to the anchor exactly, not to the step's coarse image."""
    maps, truth, coarse, m4 = study(noise=0.0)
    m8 = block_matrix(8)
    anchor, _ = footprint_average(truth, m8, (12, 12))
    anchor *= 1.0 + 0.05 * np.random.default_rng(3).standard_normal(anchor.shape)   # "noise"
    sh = sharpen_targets(coarse, np.ones(coarse.shape[1:], bool), maps, m4, anchor=anchor,
                         anchor_matrix=m8, seed=0)
    avg, _ = footprint_average(sh.images, m8, (12, 12))
    np.testing.assert_allclose(avg, anchor, rtol=1e-3, atol=1e-3 * np.abs(anchor).max())
    assert (sh.fidelity_r >= 0.999).all()
    with pytest.raises(InputError, match="both anchor and anchor_matrix"):
        sharpen_targets(coarse, np.ones(coarse.shape[1:], bool), maps, m4, anchor=anchor)


def test_principal_maps_and_feature_sets():
    """Maps that are all one pattern (scaled, shifted) have one principal map, that pattern up to
    scale (sign fixed); NaN stays NaN. With few pixels the feature sets go down to principal maps
    that a regression on them can support."""
    from msifusion.fuse import _rows_needed
    from msifusion.maps import principal_maps
    from msifusion.sharpen import _feature_sets

    rng = np.random.default_rng(0)
    p = rng.random((6, 7))
    maps = np.stack([2 * p + 1, 0.5 * p, 3 * p - 2, p]).astype(np.float64)
    maps[:, 0, 0] = np.nan
    pc = principal_maps(maps, 2)
    assert pc.shape == (2, 6, 7) and np.isnan(pc[:, 0, 0]).all()
    ok = np.isfinite(p) & ~np.isnan(pc[0])
    assert np.corrcoef(pc[0][ok], p[ok])[0, 1] == pytest.approx(1.0)
    np.testing.assert_allclose(pc[1][ok], 0.0, atol=1e-9)       # nothing left to explain
    sets = list(_feature_sets(rng.random((40, 5, 5)), n_rows=25))
    assert [len(s) for s in sets] == [11, 5, 2, 1]
    assert _rows_needed(40) > 25 and all(_rows_needed(len(s)) <= 25 for s in sets[1:])
