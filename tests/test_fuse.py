"""Tests of msifusion.fuse: footprint averaging, multi-scale features, pair and chained fusion."""

import numpy as np
import pytest
from scipy import ndimage

from msifusion.errors import InputError
from msifusion.fuse import (FusionResult, footprint_average, fuse_chain, fuse_pair,
                            multiscale_features)


def scale_matrix(ratio, tx=0.0, ty=0.0):
    """Fine -> coarse matrix for an axis-aligned grid whose pixel edges coincide (ratio fine px per
    coarse px), optionally shifted by (tx, ty) coarse pixels."""
    off = (1.0 / ratio - 1.0) / 2.0
    return np.array([[1.0 / ratio, 0.0, off + tx], [0.0, 1.0 / ratio, off + ty]])


def block_mean(stack, r):
    k, ny, nx = stack.shape
    return stack.reshape(k, ny // r, r, nx // r, r).mean((2, 4))


def fields(rng, k, n, sigma):
    """k smooth random fields (n, n), scaled to [0, 1]."""
    f = ndimage.gaussian_filter(rng.standard_normal((k, n, n)), (0, sigma, sigma))
    f -= f.min((1, 2), keepdims=True)
    return f / f.max((1, 2), keepdims=True)


# ---------------------------------------------------------------- footprint_average

def test_footprint_identity_is_exact():
    f = np.random.default_rng(0).random((2, 5, 7))
    mean, cov = footprint_average(f, [[1, 0, 0], [0, 1, 0]], (5, 7))
    np.testing.assert_allclose(mean, f, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(cov, np.ones((5, 7)))


@pytest.mark.parametrize("ratio", [2, 4])
@pytest.mark.parametrize("supersample", [1, 4])
def test_footprint_integer_ratio_gives_block_means(ratio, supersample):
    f = np.random.default_rng(1).random((3, 3 * ratio, 5 * ratio))
    mean, cov = footprint_average(f, scale_matrix(ratio), (3, 5), supersample=supersample)
    np.testing.assert_allclose(mean, block_mean(f, ratio), rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, 1.0, atol=1e-12)


def test_footprint_rotation_90_degrees():
    f = np.random.default_rng(2).random((2, 3, 4))          # (k, ny=3, nx=4)
    # coarse (u, v) = (y, nx - 1 - x): the grid rotated by 90 degrees, as np.rot90 does
    mean, cov = footprint_average(f, [[0, 1, 0], [-1, 0, 3]], (4, 3))
    np.testing.assert_allclose(mean, np.rot90(f, axes=(1, 2)), atol=1e-12)
    np.testing.assert_allclose(cov, 1.0)


def test_footprint_rotation_90_with_ratio_2():
    f = np.random.default_rng(3).random((1, 4, 6))
    rot = np.rot90(f, axes=(1, 2))                          # (1, 6, 4) on the rotated grid
    # rotate (exact pixel permutation), then 2x2 blocks
    m = np.array([[0, 0.5, -0.25], [-0.5, 0, 2.5 - 0.25]])
    mean, cov = footprint_average(f, m, (3, 2))
    np.testing.assert_allclose(mean, block_mean(rot, 2), atol=1e-12)
    np.testing.assert_allclose(cov, 1.0)


def test_footprint_coverage_at_fov_edges():
    g = np.random.default_rng(4).random((4, 4))
    # fine pixel edges shifted by half a coarse pixel: the fine FOV spans coarse [0, 2] x [0, 2]
    mean, cov = footprint_average(g, scale_matrix(2, 0.25 + 0.25, 0.25 + 0.25), (3, 3))
    edge = np.array([0.5, 1.0, 0.5])
    np.testing.assert_allclose(cov, np.outer(edge, edge), atol=1e-12)
    assert mean[0, 0] == pytest.approx(g[0, 0])
    assert mean[1, 1] == pytest.approx(g[1:3, 1:3].mean())
    assert mean[0, 1] == pytest.approx(g[0, 1:3].mean())
    assert mean[2, 2] == pytest.approx(g[3, 3])


def test_footprint_nan_pixels_do_not_count():
    f = np.arange(16, dtype=float).reshape(1, 4, 4)
    f[0, 0, 0] = np.nan                                     # one of the 4 in coarse (0, 0)
    f[0, 2:4, 2:4] = np.nan                                 # all of coarse (1, 1)
    mean, cov = footprint_average(f, scale_matrix(2), (2, 2))
    assert cov[0, 0] == pytest.approx(0.75)
    assert mean[0, 0, 0] == pytest.approx((1 + 4 + 5) / 3)
    assert cov[1, 1] == 0 and np.isnan(mean[0, 1, 1])
    assert mean[0, 0, 1] == pytest.approx(np.mean([2, 3, 6, 7]))


def test_footprint_outside_coarse_grid_is_dropped():
    f = np.ones((1, 4, 4))
    mean, cov = footprint_average(f, scale_matrix(2, 1.0, 0.0), (2, 2))  # one coarse column right
    np.testing.assert_allclose(cov, [[0, 1], [0, 1]])
    assert np.isnan(mean[0, 0, 0]) and mean[0, 0, 1] == 1.0


# ---------------------------------------------------------------- multiscale features

def test_multiscale_shapes_order_and_nan():
    rng = np.random.default_rng(5)
    maps = rng.random((3, 10, 12)).astype(np.float32)
    maps[:, 0, 0] = np.nan
    feats = multiscale_features(maps, (0, 1, 2))
    assert feats.shape == (9, 10, 12) and feats.dtype == np.float32
    np.testing.assert_array_equal(feats[:3], maps)          # scale 0 first, component order kept
    assert np.isnan(feats[:, 0, 0]).all()
    assert np.isfinite(feats[:, 1:, 1:]).all()
    # NaN-aware normalisation: a constant map stays constant at the edges and around holes
    const = np.full((1, 10, 12), 2.5)
    const[0, 4:6, 4:6] = np.nan
    blurred = multiscale_features(const, (3,))[0]
    np.testing.assert_allclose(blurred[np.isfinite(const[0])], 2.5, rtol=1e-6)


def test_multiscale_rejects_negative_scale():
    with pytest.raises(InputError):
        multiscale_features(np.zeros((1, 4, 4)), (0, -1))


# ---------------------------------------------------------------- fuse_pair

def linear_problem(seed=0, n=64, ratio=4, k1=3):
    """Fine maps with structure finer than a coarse pixel; target = block mean of B @ maps + c."""
    rng = np.random.default_rng(seed)
    fine = fields(rng, k1, n, 1.5)
    b = np.array([[1.0, -0.5, 0.3], [0.2, 0.8, -0.6]])[:, :k1]
    truth = np.einsum("kl,lyx->kyx", b, fine) + np.array([2.0, 1.0])[:, None, None]
    coarse = block_mean(truth, ratio)
    return fine.astype(np.float32), coarse, truth, scale_matrix(ratio)


def r_fine(pred, truth):
    return np.array([np.corrcoef(p.ravel(), t.ravel())[0, 1] for p, t in zip(pred, truth)])


def test_ridge_recovers_linear_target_at_fine_grid():
    fine, coarse, truth, m = linear_problem()
    res = fuse_pair(coarse, None, fine, m, method="ridge", level="MALDI")
    assert isinstance(res, FusionResult)
    assert res.pred.shape == truth.shape and res.pred.dtype == np.float32
    assert np.all(r_fine(res.pred, truth) > 0.99)
    assert np.all(res.cv_r > 0.99)
    # the coarse truth is blurred relative to the fine truth: recovery is more than upsampling
    up = np.repeat(np.repeat(coarse, 4, 1), 4, 2)
    assert np.all(r_fine(res.pred, truth) > r_fine(up, truth) + 0.02)
    assert res.residual.shape == coarse.shape
    assert res.info["n_train"] == 16 * 16 and res.info["train_mask"].all()


def test_consistency_auto_corrects_only_what_the_fine_modality_cannot_explain():
    """consistency="auto": a component the fine maps explain keeps its fine-scale prediction, an
    unexplained one gets the full consistency correction; bad values are refused."""
    fine, coarse, _, m = linear_problem()
    unseen = fields(np.random.default_rng(5), 1, 16, 1.0)[0] * 2.0 + 1.0
    target = np.stack([coarse[0], unseen])
    plain, cons, auto = (fuse_pair(target, None, fine, m, consistency=c)
                         for c in (False, True, "auto"))
    share = auto.info["consistency_share"]
    assert share[0] < 0.1 and share[1] > 0.9
    for k, ref in ((0, plain), (1, cons)):
        other = cons if ref is plain else plain
        d_ref = np.abs(auto.pred[k] - ref.pred[k]).mean()
        d_other = np.abs(auto.pred[k] - other.pred[k]).mean()
        assert d_ref < 0.15 * d_other, (k, d_ref, d_other)
    with pytest.raises(InputError, match="consistency must be true, false or 'auto'"):
        fuse_pair(target, None, fine, m, consistency="yes")


def test_cca_runs_and_is_not_better_than_ridge():
    fine, coarse, truth, m = linear_problem(seed=1)
    ridge = fuse_pair(coarse, None, fine, m, method="ridge")
    cca = fuse_pair(coarse, None, fine, m, method="cca")
    assert cca.pred.shape == truth.shape and np.isfinite(cca.pred).all()
    assert cca.info["n_components"] == 2
    assert np.all(r_fine(cca.pred, truth) <= r_fine(ridge.pred, truth) + 1e-3)
    assert np.all(r_fine(cca.pred, truth) > 0.5)


@pytest.mark.parametrize("backprojection", ["bilinear", "box"])
def test_consistency_reproduces_coarse_values(backprojection):
    fine, coarse, truth, m = linear_problem(seed=2)
    # add a smooth structure the fine modality does not see: the model alone cannot match it
    hidden = fields(np.random.default_rng(9), 1, 64, 6)[0]
    coarse = coarse + block_mean(hidden[None], 4)
    plain = fuse_pair(coarse, None, fine, m, consistency=False)
    fixed = fuse_pair(coarse, None, fine, m, consistency=True, backprojection=backprojection)
    err_plain = np.abs(footprint_average(plain.pred, m, coarse.shape[1:])[0] - coarse).max()
    err_fixed = np.abs(footprint_average(fixed.pred, m, coarse.shape[1:])[0] - coarse).max()
    assert err_plain > 0.05
    assert err_fixed < 1e-3
    assert fixed.info["consistency_iterations"] > 0
    np.testing.assert_allclose(fixed.cv_r, plain.cv_r)     # validation is before the correction


def test_nan_outside_acquired_fine_pixels_and_mask():
    fine, coarse, truth, m = linear_problem(seed=3)
    yy, xx = np.mgrid[:64, :64]
    acquired = (yy - 32) ** 2 + (xx - 32) ** 2 < 30 ** 2
    fine[:, ~acquired] = np.nan
    mask = np.ones(coarse.shape[1:], bool)
    mask[:, :3] = False
    res = fuse_pair(coarse, mask, fine, m)
    assert np.isfinite(res.pred[:, acquired]).all()
    assert np.isnan(res.pred[:, ~acquired]).all()
    assert not res.info["train_mask"][:, :3].any()
    assert (res.info["coverage"][res.info["train_mask"]] >= 0.9).all()
    assert np.isnan(res.residual[:, ~res.info["train_mask"]]).all()
    assert np.all(r_fine(res.pred[:, acquired][:, None], truth[:, acquired][:, None]) > 0.98)


def test_insufficient_overlap_raises_naming_the_level():
    fine, coarse, _, _ = linear_problem(seed=4)
    far = scale_matrix(4, 100.0, 0.0)                       # fine FOV right of the coarse FOV
    with pytest.raises(InputError, match="ToF-SIMS"):
        fuse_pair(coarse, None, fine, far, level="ToF-SIMS")
    small = np.zeros(coarse.shape[1:], bool)
    small[:3, :3] = True                                    # 9 pixels < 2 x (12 features + 1)
    with pytest.raises(InputError, match=r"only 9 coarse pixels are both tissue in the coarser "
                                         r"level's tissue mask \(9 pixels\) and covered >= 90% "
                                         r"by acquired fine pixels \(\d+ pixels\).*all_tissue"):
        fuse_pair(coarse, small, fine, scale_matrix(4), level="MALDI")


def test_bad_arguments_raise_input_error():
    fine, coarse, _, m = linear_problem(seed=5)
    with pytest.raises(InputError, match="method"):
        fuse_pair(coarse, None, fine, m, method="pls")
    with pytest.raises(InputError, match="matrix"):
        fuse_pair(coarse, None, fine, np.eye(2))
    with pytest.raises(InputError, match="mask"):
        fuse_pair(coarse, np.ones((3, 3), bool), fine, m)


# ---------------------------------------------------------------- fuse_chain

def test_chain_predicts_reference_through_two_levels():
    rng = np.random.default_rng(6)
    level2 = fields(rng, 3, 64, 1.5).astype(np.float32)    # finest modality, 64 x 64
    b = np.array([[1.0, -0.5, 0.3], [0.2, 0.8, -0.6]])
    truth = np.einsum("kl,lyx->kyx", b, level2) + 2.0
    level1 = block_mean(level2, 2) + 0.02 * rng.standard_normal((3, 32, 32))  # 32 x 32 modality
    level0 = block_mean(truth, 8)                           # reference, 8 x 8
    results = fuse_chain([level0, level1.astype(np.float32), level2],
                         [scale_matrix(4), scale_matrix(2)], names=["FT-ICR", "MALDI", "SIMS"])
    assert len(results) == 2
    assert results[0].pred.shape == (2, 32, 32) and results[1].pred.shape == (2, 64, 64)
    assert np.all(r_fine(results[1].pred, truth) > 0.95)
    upsampled = np.repeat(np.repeat(level0, 8, 1), 8, 2)
    assert np.all(r_fine(results[1].pred, truth) > r_fine(upsampled, truth))
    # levels as dicts with training masks (the pipeline's form) give the same result
    as_dicts = fuse_chain([{"maps": level0, "mask": np.ones((8, 8), bool)},
                           {"maps": level1.astype(np.float32)}, {"maps": level2}],
                          [scale_matrix(4), scale_matrix(2)])
    np.testing.assert_allclose(as_dicts[1].pred, results[1].pred, atol=1e-6)
    with pytest.raises(InputError, match="matrices"):
        fuse_chain([level0, level1], [])


def _section_maps(path, maps, px, modality):
    import h5py

    with h5py.File(path, "w") as f:
        f["maps"] = maps.astype(np.float32)
        f["mask"] = np.ones(maps.shape[1:], bool)
        f["acquired"] = np.ones(maps.shape[1:], bool)
        f["spectra"] = np.eye(len(maps), 5, dtype=np.float32)
        f["mz"] = np.linspace(700.0, 800.0, 5)
        f.attrs.update(origin_xy=(0, 0), pixel_size_um=px, modality=modality, section="s1",
                       source="")


def test_failed_registration_is_never_fused(tmp_path):
    """A pair whose registration failed stops that section's fusion with a message naming the
    section, the pair, the verdict figures and the QC figure; nothing is written."""
    import json

    from msifusion.errors import QualityError
    from msifusion.steps.fuse import fuse_step
    from msifusion.register import Registration

    rng = np.random.default_rng(0)
    _section_maps(tmp_path / "c.h5", rng.random((3, 8, 8)), 40.0, "fticr")
    _section_maps(tmp_path / "f.h5", rng.random((3, 32, 32)), 10.0, "maldi")
    reg = Registration(matrix=scale_matrix(4), rotation_deg=0.0, translation_um=(0.0, 0.0),
                       scale=0.25, mirror=False, score=0.2, ncc=0.1, margin=0.001, passed=False,
                       coarse_px_um=40.0, fine_px_um=10.0)
    doc = reg.to_json() | {"section": "s1", "coarse": "fticr", "fine": "maldi"}
    (tmp_path / "transform_fticr_maldi.json").write_text(json.dumps(doc))
    out = tmp_path / "fused_maldi.h5"
    with pytest.raises(QualityError, match=r"section 's1': registration maldi -> fticr .*FAILED: "
                                           r"no confident placement; not fusing it\. Inspect "
                                           r".*qc_fticr_maldi\.png"):
        fuse_step([str(tmp_path / "c.h5"), str(tmp_path / "f.h5")],
                  [str(tmp_path / "transform_fticr_maldi.json")], [str(out)],
                  str(tmp_path / "fusion.json"))
    assert not out.exists() and not (tmp_path / "fusion.json").exists()


