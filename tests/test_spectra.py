"""Tests of msifusion.spectra: m/z axes, binning and matrix assembly (small hand-made spectra)."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from msifusion.errors import InputError
from msifusion.spectra import (MzAxis, _LogGrid, assemble_matrix, build_axis, mz_window,
                               reference_axis)
from msifusion.store import ConvertedReader, write_converted

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real"


def converted(path, spectra, xy=None, **attrs):
    """Write a converted file from a list of (mz, intensity) pairs (one per pixel)."""
    indptr = np.concatenate([[0], np.cumsum([len(m) for m, _ in spectra])])
    mz = np.concatenate([np.asarray(m, float) for m, _ in spectra])
    inten = np.concatenate([np.asarray(i, np.float32) for _, i in spectra])
    if xy is None:
        xy = [(i, 0) for i in range(len(spectra))]
    attrs = {"mode": "processed", "spectrum_type": "centroid"} | attrs
    write_converted(path, indptr=indptr, mz=mz, intensity=inten, xy=xy, attrs=attrs)
    return ConvertedReader(path)


def ppm_shift(m, ppm):
    return m * (1 + ppm * 1e-6)


def test_log_grid_index_agrees_with_edges():
    grid = _LogGrid(50.0, 2000.0, 3.0)
    rng = np.random.default_rng(0)
    mz = np.concatenate([rng.uniform(50, 2000, 20000), grid.edges(np.arange(0, 1000, 7))])
    b = grid.index(mz)
    assert np.all(grid.edges(b) <= mz) and np.all(mz < grid.edges(b + 1))
    # bins are 3 ppm wide
    e = grid.edges(np.array([0, 1]))
    assert (e[1] - e[0]) / e[0] == pytest.approx(3e-6, rel=1e-9)


def test_build_axis_merges_contiguous_bins_into_weighted_peaks(tmp_path):
    # peak A jitters by 7 ppm between pixels: two adjacent 5 ppm bins (the grid starts at the
    # smallest m/z, 300), merged into one peak; peak B 100 ppm away stays separate
    a0, a1, b = 300.0, ppm_shift(300.0, 7.0), ppm_shift(300.0, 100.0)
    r = converted(tmp_path / "c.h5", [([a0, b], [1.0, 5.0]), ([a1], [3.0]), ([a0, 700.0], [2, 1])])
    axis = build_axis([r], ppm=5)
    assert axis.kind == "peaks"
    assert len(axis) == 3
    np.testing.assert_allclose(axis.centres[0], (1 * a0 + 3 * a1 + 2 * a0) / 6, rtol=1e-12)
    np.testing.assert_allclose(axis.centres[1:], [b, 700.0], rtol=1e-12)
    np.testing.assert_array_equal(axis.n_pixels, [2, 1, 1])  # largest single-bin pixel count
    X = assemble_matrix(r, axis).toarray()
    np.testing.assert_allclose(X, [[1, 5, 0], [3, 0, 0], [2, 0, 1]])


def test_build_axis_min_pixels_and_no_loss(tmp_path):
    rng = np.random.default_rng(1)
    spectra = []
    for _ in range(30):
        mz = np.sort(rng.uniform(100, 1000, 40))
        spectra.append((mz, rng.uniform(0.5, 2.0, 40)))
    spectra[0] = (np.r_[spectra[0][0], 1000.5], np.r_[spectra[0][1], 9.0])  # single-pixel peak
    r = converted(tmp_path / "c.h5", spectra)
    total = sum(float(np.sum(i)) for _, i in spectra)
    for merge in (True, False):
        axis = build_axis([r], ppm=10, merge=merge)
        X = assemble_matrix(r, axis)
        # every positive peak lands on the axis: nothing lost, nothing duplicated
        assert X.sum() == pytest.approx(total, rel=1e-6)
    axis2 = build_axis([r], ppm=10, merge=False, min_pixels=2)
    assert np.all(axis2.n_pixels >= 2)
    assert not np.any(np.abs(axis2.centres - 1000.5) < 0.01)


def test_reference_axis_ppm_window_and_nearest(tmp_path):
    axis = reference_axis([100.0, 200.0], ppm=10)
    mz = np.array([ppm_shift(100, 9.9), ppm_shift(100, 10.1), ppm_shift(100, -9.9),
                   ppm_shift(100, -10.1), 150.0, ppm_shift(200, -9.9), ppm_shift(200, 10.1)])
    np.testing.assert_array_equal(axis.assign(mz), [0, -1, 0, -1, -1, 1, -1])
    # two centres 10 ppm apart with a 20 ppm window: the nearest wins
    c0, c1 = 500.0, ppm_shift(500.0, 10)
    near = reference_axis([c0, c1], ppm=20)
    pts = [ppm_shift(c0, 4.0), ppm_shift(c0, 6.0), ppm_shift(c0, -19.0), ppm_shift(c1, 19.0)]
    np.testing.assert_array_equal(near.assign(pts), [0, 1, 0, 1])
    # matrix: peaks summed into the reference columns, others dropped
    r = converted(tmp_path / "c.h5", [([ppm_shift(100, 3), ppm_shift(100, -3), 150.0], [1, 2, 7])])
    np.testing.assert_allclose(assemble_matrix(r, axis).toarray(), [[3, 0]])
    with pytest.raises(InputError):
        reference_axis([200.0, 100.0], ppm=5)


def test_assemble_matrix_normalisation_values(tmp_path):
    axis = reference_axis([100.0, 200.0, 300.0], ppm=5)
    r = converted(tmp_path / "c.h5", [([100.0, 200.0], [1, 3]), ([200.0, 300.0], [3, 4]),
                                      ([150.0], [5.0])])
    X = assemble_matrix(r, axis)
    assert sp.isspmatrix_csr(X) or isinstance(X, sp.csr_array)
    assert X.dtype == np.float32 and X.shape == (3, 3)
    np.testing.assert_allclose(assemble_matrix(r, axis, normalize="tic").toarray(),
                               [[0.25, 0.75, 0], [0, 3 / 7, 4 / 7], [0, 0, 0]], rtol=1e-6)
    rms = np.sqrt((9 + 16) / 3)
    np.testing.assert_allclose(assemble_matrix(r, axis, normalize="rms").toarray()[1],
                               [0, 3 / rms, 4 / rms], rtol=1e-6)
    np.testing.assert_allclose(assemble_matrix(r, axis, normalize="tic", transform="sqrt")
                               .toarray()[0], [0.5, np.sqrt(0.75), 0], rtol=1e-6)
    np.testing.assert_allclose(assemble_matrix(r, axis, transform="sqrt").toarray()[1],
                               [0, np.sqrt(3), 2], rtol=1e-6)
    # blocks of one pixel give the same matrix
    np.testing.assert_array_equal(assemble_matrix(r, axis, block_pixels=1).toarray(),
                                  X.toarray())
    with pytest.raises(InputError, match="normalize"):
        assemble_matrix(r, axis, normalize="l1")
    bad = converted(tmp_path / "bad.h5", [([100.0], [1.0]), ([100.0, 200.0], [2.0, -1.0])])
    with pytest.raises(InputError, match=r"bad\.h5: spectrum 1 has negative"):
        assemble_matrix(bad, axis)


def test_continuous_profile_keeps_channels(tmp_path):
    channels = np.linspace(100, 101, 11)  # 1000 ppm apart, a contiguous profile
    rng = np.random.default_rng(2)
    inten = rng.uniform(0, 1, (4, 11))
    inten[:, 3] = 0  # a channel never positive is dropped
    attrs = {"mode": "continuous", "spectrum_type": "profile"}
    r1 = converted(tmp_path / "a.h5", [(channels, i) for i in inten[:2]], **attrs)
    r2 = converted(tmp_path / "b.h5", [(channels, i) for i in inten[2:]], **attrs)
    axis = build_axis([r1, r2], ppm=5)
    assert axis.kind == "channels"
    np.testing.assert_allclose(axis.centres, np.delete(channels, 3))
    np.testing.assert_allclose(assemble_matrix(r2, axis).toarray(),
                               np.delete(inten[2:], 3, axis=1), rtol=1e-6)
    # a profile file that is not continuous is binned without merging
    r3 = converted(tmp_path / "c.h5", [(channels, i) for i in inten], mode="processed",
                   spectrum_type="profile")
    axis3 = build_axis([r3], ppm=5)
    assert axis3.kind == "bins" and len(axis3) == 10


def test_axis_save_load_round_trip(tmp_path):
    axis = reference_axis([100.0, 150.0, 222.5], ppm=3)
    axis.save(tmp_path / "axis.h5")
    back = MzAxis.load(tmp_path / "axis.h5")
    for name in ("centres", "lower", "upper", "n_pixels"):
        np.testing.assert_array_equal(getattr(back, name), getattr(axis, name))
    assert back.kind == "reference" and back.ppm == 3
    with h5py.File(tmp_path / "g.h5", "w") as f:
        axis.save(f.create_group("axis"))
    with h5py.File(tmp_path / "g.h5", "r") as f:
        np.testing.assert_array_equal(MzAxis.load(f["axis"]).centres, axis.centres)
    with pytest.raises(InputError, match="not found"):
        MzAxis.load(tmp_path / "missing.h5")


def test_mz_window():
    mz = np.array([ppm_shift(400, -5.1), ppm_shift(400, -4.9), 400.0, ppm_shift(400, 4.9),
                   ppm_shift(400, 5.1)])
    np.testing.assert_array_equal(mz_window(mz, 400, 5), [False, True, True, True, False])


def test_bad_ppm(tmp_path):
    r = converted(tmp_path / "c.h5", [([100.0], [1.0])])
    with pytest.raises(InputError, match="ppm"):
        build_axis([r], ppm=0)


@pytest.mark.real
def test_real_tofsims_channels(tmp_path):
    cube_path = REAL / "tofsims_poplar" / "tofsims_trift_poplar_256x256.h5"
    if not cube_path.exists():
        pytest.skip(f"real data not available at {cube_path}")
    with h5py.File(cube_path, "r") as f:
        cube = f["intensities"][:32, :32, :].astype(np.float32)
        mz = f["mz"][:].astype(np.float64)
    yy, xx = np.mgrid[:32, :32]
    spectra = [(mz, cube[y, x]) for y, x in zip(yy.ravel(), xx.ravel())]
    r = converted(tmp_path / "t.h5", spectra, xy=np.c_[xx.ravel(), yy.ravel()],
                  mode="continuous", spectrum_type="profile")
    axis = build_axis([r], ppm=50)
    used = cube.reshape(-1, len(mz)).max(0) > 0
    assert axis.kind == "channels" and len(axis) == used.sum()
    X = assemble_matrix(r, axis)
    np.testing.assert_allclose(X.toarray(), cube.reshape(-1, len(mz))[:, used])


def test_targets_checked_against_the_reference_axis(tmp_path):
    """A target with no column within targets.ppm is named with the nearest m/z of the data and
    its distance, every absent one in one message (issue 14); present ones are tabulated."""
    import json

    from msifusion.steps.axis import targets_step

    centres = np.array([500.0, 600.0, 700.0])
    MzAxis(centres, centres - 1e-3, centres + 1e-3, ppm=5.0).save(tmp_path / "axis.h5")
    out = tmp_path / "targets.json"
    targets_step(str(tmp_path / "axis.h5"), str(out), targets=[600.002, 700.0], ppm=5.0,
                 modality="fticr")
    rows = json.loads(out.read_text())["targets"]
    assert [r["nearest_mz"] for r in rows] == [600.0, 700.0]
    assert rows[0]["distance_ppm"] == pytest.approx(0.002 / 600.002 * 1e6)
    assert [r["columns"] for r in rows] == [1, 1]
    out.unlink()
    with pytest.raises(InputError, match=r"2 of 3 target\(s\) have no m/z of the fticr data within "
                                         r"5 ppm \(key 'targets.ppm'\): m/z 760\.5851: nearest m/z "
                                         r"in the data 700\.0000 \(79656 ppm away\); m/z "
                                         r"500\.0100: nearest m/z in the data 500\.0000 \(20 ppm"):
        targets_step(str(tmp_path / "axis.h5"), str(out), targets=[760.5851, 600.0, 500.01],
                     ppm=5.0, modality="fticr")
    assert not out.exists()
