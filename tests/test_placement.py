"""msifusion.evaluate.placement_score / placement_check on a synthetic pair with a known placement.

The fine image is a stack of smooth random textures (about one coarse pixel in size) over a region
larger than the coarse grid; the coarse images are monotone, non-linear functions of its footprint
averages at the true matrix plus noise, acquired inside a polygon; the fine field of view is a
part of that region (one corner not imaged).
"""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from scipy import ndimage

from msifusion.affine import compose, transform_points
from msifusion.errors import InputError
from msifusion.evaluate import perturb_matrix, placement_check, placement_score
from msifusion.fuse import footprint_average

COARSE = (34, 44)          # nyc, nxc
FINE_PER_COARSE = 4        # fine px per coarse px
FIELD = (100, 120)         # nyf, nxf of the fine field of view (25 x 30 coarse px)


def _shift(dx, dy):
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])


def _rotation(deg):
    """Rotation about the fine pixel (0, 0) (a fine -> fine matrix)."""
    c, s = np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0]])


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(3)
    s = 1.0 / FINE_PER_COARSE
    th = np.deg2rad(8.0)
    truth = np.array([[s * np.cos(th), -s * np.sin(th), 7.0],
                      [s * np.sin(th), s * np.cos(th), 3.5]])
    # a "world" fine grid around the field, so that the coarse pixels outside the field have
    # content too; the field is world[pad:pad + nyf, pad:pad + nxf]
    pad = 40
    world_shape = (FIELD[0] + 2 * pad, FIELD[1] + 2 * pad)
    feats = []
    for sigma in (3.0, 4.0, 6.0):
        t = ndimage.gaussian_filter(rng.standard_normal(world_shape), sigma)
        feats.append((t - t.mean()) / t.std())
    world = np.stack(feats)
    avg, cov = footprint_average(world, compose(_shift(-pad, -pad), truth), COARSE)
    a, b, c = avg
    targets = np.stack([np.exp(0.8 * a), 1.0 / (1.0 + np.exp(-1.5 * (b + 0.5 * c))),
                        np.log1p(np.exp(a - c)), (2.0 + b + 0.3 * a) ** 2])
    targets *= np.exp(0.3 * rng.standard_normal(targets.shape))       # multiplicative noise
    # acquisition polygon on the coarse grid
    poly = MplPath([(3, 2), (38, 1), (43, 15), (36, 33), (6, 31), (0, 16)])
    yy, xx = np.mgrid[0:COARSE[0], 0:COARSE[1]]
    valid = poly.contains_points(np.column_stack([xx.ravel(), yy.ravel()])).reshape(COARSE)
    valid &= cov > 0.99
    targets[:, ~valid] = np.nan
    fine = world[:, pad:pad + FIELD[0], pad:pad + FIELD[1]].copy()
    fine_valid = np.ones(FIELD, dtype=bool)
    fy, fx = np.mgrid[0:FIELD[0], 0:FIELD[1]]
    fine_valid[(fx > 90) & (fy > 70)] = False                          # a corner not imaged
    fine[:, ~fine_valid] = np.nan
    return dict(targets=targets, valid=valid, fine=fine, fine_valid=fine_valid, truth=truth)


def _max_error(pair, m):
    ys, xs = np.nonzero(pair["fine_valid"])
    pts = np.column_stack([xs, ys]).astype(np.float64)
    return float(np.hypot(*(transform_points(m, pts) - transform_points(pair["truth"], pts)).T).max())


def _args(pair, m):
    return pair["targets"], pair["valid"], pair["fine"], pair["fine_valid"], m


def test_score_peaks_at_the_true_placement(pair):
    truth = pair["truth"]
    at_truth = placement_score(*_args(pair, truth))
    assert at_truth > 0.5
    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        shifted = compose(truth, _shift(dx, dy))
        assert placement_score(*_args(pair, shifted)) < at_truth - 0.05
    # an unrelated placement explains (almost) nothing
    far = compose(truth, _shift(9, -6))
    assert placement_score(*_args(pair, far)) < 0.5 * at_truth


def test_check_from_the_truth_stays(pair):
    res = placement_check(*_args(pair, pair["truth"]), max_shift_px=2.0)
    assert res["displacement_px"]["max"] < 0.2
    assert res["displacement_px"]["median"] < 0.2
    assert res["at_best"]
    assert res["best_score"] >= res["score"]
    prof = res["profiles"]
    assert set(prof) == {"dx", "dy", "rotation_deg", "scale"}
    for name, p in prof.items():
        assert p["offset"].shape == p["score"].shape
        # the score falls off on both sides of the best point
        i = int(np.nanargmax(p["score"]))
        assert 0 < i < len(p["score"]) - 1, name
    assert np.asarray(res["best_matrix"]).shape == (2, 3)


def test_check_recovers_a_shifted_and_rotated_placement(pair):
    truth = pair["truth"]
    # shifted by (1.5, -1) coarse px and rotated by 2 deg about the fine pixel (0, 0), not about
    # the tissue centroid the search rotates about: the answer is off the search's grid points
    start = compose(compose(_rotation(2.0), truth), _shift(1.5, -1.0))
    assert _max_error(pair, start) > 1.5
    res = placement_check(*_args(pair, start))
    assert _max_error(pair, res["best_matrix"]) < 0.25
    assert res["at_best"]
    off = res["best_offset"]
    assert abs(off["rotation_deg"] + 2.0) < 0.5 and abs(off["scale"] - 1.0) < 0.02
    assert res["displacement_px"]["max"] > 1.5


def test_check_flags_a_truth_outside_the_bounds(pair):
    start = compose(pair["truth"], _shift(2.5, 0.0))
    res = placement_check(*_args(pair, start), max_shift_px=1.0, max_rotation_deg=1.0,
                          max_scale=0.02, grid_step_px=0.5)
    assert not res["at_best"]
    assert res["best_offset"]["dx"] == pytest.approx(-1.0)
    assert res["best_score"] > res["score"]


def test_bad_input_is_named(pair):
    with pytest.raises(InputError, match="coarse_valid"):
        placement_score(pair["targets"], pair["valid"][:-1], pair["fine"], pair["fine_valid"],
                        pair["truth"])
    with pytest.raises(InputError, match="matrix"):
        placement_score(*_args(pair, np.zeros((2, 3))))
    with pytest.raises(InputError, match="unknown option"):
        placement_check(*_args(pair, pair["truth"]), bogus=1)
    # no usable coarse pixel: NaN, not an exception
    assert np.isnan(placement_score(*_args(pair, compose(pair["truth"], _shift(200, 0)))))


def test_perturbation_turns_about_the_centre():
    m = np.array([[0.2, 0.05, 3.0], [-0.04, 0.21, 1.0]])
    centre = (40.0, 25.0)
    p = perturb_matrix(m, (0.0, 0.0, 3.0, 1.04), centre)
    c = np.array([centre])
    assert np.allclose(transform_points(p, c), transform_points(m, c))
    shifted = perturb_matrix(m, (1.5, -2.0, 0.0, 1.0), centre)
    assert np.allclose(transform_points(shifted, c) - transform_points(m, c), [[1.5, -2.0]])
    # rotation in degrees from +x towards +y (affine.pose's convention), scale factor
    assert np.allclose(np.linalg.det(p[:, :2]), 1.04 ** 2 * np.linalg.det(m[:, :2]))
    assert np.allclose(p[:, :2] @ np.linalg.inv(m[:, :2]),
                       1.04 * np.array([[np.cos(np.deg2rad(3)), -np.sin(np.deg2rad(3))],
                                        [np.sin(np.deg2rad(3)), np.cos(np.deg2rad(3))]]))
