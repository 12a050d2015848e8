"""Tests of msifusion.degrid: tile-period detection, mean tile, grid removal, NMF files."""

from pathlib import Path

import h5py
import numpy as np
import pytest

from msifusion.degrid import (check_tile_divides, degrid_converted, degrid_nmf_file,
                              detect_tile_period, estimate_gain, grid_energy, mean_tile,
                              remove_grid, select_gain_smooth)
from msifusion.store import ConvertedReader, write_converted
from msifusion.errors import InputError
from msifusion.store import read_nmf, write_nmf

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real"


def smooth_image(ny, nx, seed=0):
    """Positive smooth image: a constant plus a few broad Gaussian blobs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:ny, :nx]
    img = np.ones((ny, nx))
    for _ in range(6):
        cy, cx, s = rng.uniform(0, ny), rng.uniform(0, nx), rng.uniform(20, 60)
        img += rng.uniform(0.5, 2) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * s * s))
    return img


def vignette(ty, tx, depth=0.3):
    """Tile gain: bright centre, dark seams (0.9 - depth/3 .. 0.9 + depth)."""
    u = (np.arange(ty) - (ty - 1) / 2) / (ty / 2)
    v = (np.arange(tx) - (tx - 1) / 2) / (tx / 2)
    return 0.9 + depth * np.outer(1 - u ** 2, 1 - v ** 2)


def tiled(pattern, shape):
    ty, tx = pattern.shape
    return np.tile(pattern, (shape[0] // ty + 1, shape[1] // tx + 1))[:shape[0], :shape[1]]


@pytest.mark.parametrize("tile,shape", [(40, (200, 230)), (64, (200, 300)), (80, (250, 330))])
def test_detect_tile_period(tile, shape):
    img = smooth_image(*shape) * tiled(vignette(tile, tile), shape)
    assert detect_tile_period(img) == (tile, tile)


def test_detect_rectangular_tiles_with_nan():
    shape = (240, 260)
    img = smooth_image(*shape, seed=3) * tiled(vignette(48, 32), shape)
    img[100:130, 50:90] = np.nan  # not acquired
    assert detect_tile_period(img) == (48, 32)


def test_detect_no_periodicity_raises():
    rng = np.random.default_rng(0)
    img = smooth_image(200, 200, seed=1) + 0.05 * rng.random((200, 200))
    with pytest.raises(InputError, match="no tile periodicity"):
        detect_tile_period(img)


# --- ToF-SIMS-like fields (the phantom's count model) with only three tiles per axis (issue 14)

def tissue_field(shape, seed=0):
    """Structure maps (names of ``phantom.STRUCTURES`` -> (ny, nx), values in [0, 1]) of a
    ToF-SIMS field of view beside a tissue edge, like the phantom's: the edge (an arc of a circle
    centred outside the field) crosses the field, a bright cortex band runs inside it, a lobe
    with fine stripes (9 px) and small bright dots lie in the tissue."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    y, x = np.mgrid[:ny, :nx].astype(float)
    ang = rng.uniform(0, 2 * np.pi)
    r = 1.6 * max(ny, nx)
    cy, cx = ny / 2 + 1.05 * r * np.sin(ang), nx / 2 + 1.05 * r * np.cos(ang)
    depth = r - np.hypot(y - cy, x - cx) + rng.uniform(0.05, 0.2) * max(ny, nx) - 0.05 * r
    tissue = np.clip(depth / 1.5 + 0.5, 0, 1)                      # depth in px inside the edge
    ly, lx = ny / 2 + 0.3 * ny * np.sin(ang), nx / 2 + 0.3 * nx * np.cos(ang)
    lobe = tissue * (np.hypot(y - ly, x - lx) < 0.25 * min(ny, nx))
    th = rng.uniform(0, np.pi)
    stripes = lobe * (np.sin(2 * np.pi * (x * np.cos(th) + y * np.sin(th)) / 9) > 0.5)
    dots = np.zeros(shape)
    for _ in range(ny * nx // 600):
        dy, dx = rng.uniform(0, ny), rng.uniform(0, nx)
        dots = np.maximum(dots, np.hypot(y - dy, x - dx) < rng.uniform(1.5, 3))
    return {"tissue": tissue, "cortex": tissue * np.exp(-((depth - 7) / 4) ** 2), "lobe": lobe,
            "lines_b": stripes, "dots_a": dots * tissue,
            "core": tissue * (1 - np.abs(depth / max(ny, nx) - 0.3)), "offtissue": 1 - tissue}


def tofsims_total(shape, tile_px=None, gain=None, seed=0):
    """Total ion counts (ny, nx) of :func:`tissue_field` under the phantom's ToF-SIMS model
    (``phantom._tofsims_counts``: species fragments, Poisson counts, summed over m/z), with the
    phantom's tile gain of ``tile_px``, or the tile ``gain (ty, tx)`` applied to the expected
    counts instead (the phantom gain of a 1-px tile is a constant)."""
    from msifusion import phantom

    ny, nx = shape
    foot = np.zeros((ny * nx, len(phantom.STRUCTURES)))
    for name, m in tissue_field(shape, seed).items():
        foot[:, phantom.STRUCTURES.index(name)] = m.ravel()
    yy, xx = np.mgrid[:ny, :nx]
    xy = np.c_[xx.ravel(), yy.ravel()]
    if gain is not None:
        foot *= tiled(gain, shape).ravel()[:, None]
        tile_px = 1
    counts = phantom._tofsims_counts(np.random.default_rng(seed + 1000), foot, xy, tile_px)
    return counts.sum(axis=1).reshape(shape).astype(np.float64)


def radial_vignette(ty, tx, a=0.3):
    """Tile gain ``1 - a r^2``, ``r`` the distance to the tile centre in half-tile units (1 at
    the middle of the tile edges)."""
    u = (np.arange(ty) - (ty - 1) / 2) / (ty / 2)
    v = (np.arange(tx) - (tx - 1) / 2) / (tx / 2)
    return 1 - a * (u[:, None] ** 2 + v[None, :] ** 2)


def ramp_gain(ty, tx):
    """Tile gain: ramps 0.9 -> 1.1 along y and 0.85 -> 1.15 along x, so a step back at every
    seam."""
    return np.outer(0.9 + 0.2 * np.arange(ty) / ty, 0.85 + 0.3 * np.arange(tx) / tx)


@pytest.mark.parametrize("shape,tile", [((120, 120), 40), ((120, 160), 40), ((75, 75), 25)])
@pytest.mark.parametrize("seed", [0, 1])
def test_detect_three_tiles_per_axis_phantom_tofsims(shape, tile, seed):
    """Issue 14: a field of three tiles per axis (the phantom's ToF-SIMS counts and tile gain:
    vignetting along y, vignetting and ramp along x) is detected; the first difference of the
    profiles left 2 whole periods of 119 samples and lost the vignetting in the counting noise."""
    assert detect_tile_period(tofsims_total(shape, tile_px=tile, seed=seed)) == (tile, tile)


@pytest.mark.parametrize("gain,shape", [(radial_vignette(40, 40), (120, 120)),
                                        (radial_vignette(40, 40), (120, 160)),
                                        (ramp_gain(40, 40), (120, 120)),
                                        (radial_vignette(25, 25), (75, 75))])
def test_detect_three_tiles_per_axis_other_gains_with_nan(gain, shape):
    img = tofsims_total(shape, gain=gain, seed=0)
    img[:12, :20] = np.nan                                    # not acquired
    img[shape[0] // 2:shape[0] // 2 + 10, -15:] = np.nan
    assert detect_tile_period(img) == gain.shape


@pytest.mark.parametrize("shape", [(120, 120), (75, 75), (120, 160)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detect_no_false_grid_on_tofsims_like_fields(shape, seed):
    """Tissue edges, cortex band, stripes, dots and counting noise without a tile gain."""
    with pytest.raises(InputError, match="no tile periodicity"):
        detect_tile_period(tofsims_total(shape, gain=np.ones((1, 1)), seed=seed))


@pytest.mark.parametrize("seed", range(4))
def test_detect_no_false_grid_on_noise_free_smooth_images(seed):
    """Noise-free smooth images are locally regular at any scale: no grid either."""
    for shape in ((75, 75), (120, 120), (200, 160)):
        with pytest.raises(InputError, match="no tile periodicity"):
            detect_tile_period(smooth_image(*shape, seed=seed))


def test_detect_failure_names_best_candidate():
    """Issue 14: when it gives up, the error names the best candidate per axis and its score and
    asks for grid.tile_px. Here a straight tissue edge runs along x through the middle tile row
    and hides the weaker gain ramp along y; x alone is not enough."""
    img = tofsims_total((120, 120), gain=ramp_gain(40, 40), seed=2)
    with pytest.raises(InputError, match=r"no tile periodicity along y between 8 and 40 px: best "
                                         r"candidate 40 px \(score 0\.\d\d < 0\.40\); set "
                                         r"grid\.tile_px to the scan's tile size"):
        detect_tile_period(img)
    img = tofsims_total((120, 120), tile_px=40, seed=0)
    with pytest.raises(InputError, match=r"along y between 8 and 40 px: best candidate 40 px "
                                         r"\(score 0\.\d\d < 0\.99\)"):
        detect_tile_period(img, min_score=0.99)
    with pytest.raises(InputError, match=r"along y between 8 and 25 px: best candidate \d+ px "
                                         r"\(score -?\d\.\d\d < 0\.40\); set grid\.tile_px"):
        detect_tile_period(tofsims_total((75, 75), gain=np.ones((1, 1)), seed=0))
    with pytest.raises(InputError, match=r"too short for 3 periods of >= 8 px; set grid\.tile_px"):
        detect_tile_period(np.ones((20, 100)))


@pytest.mark.parametrize("tile,shape", [(40, (200, 230)), (64, (200, 300))])
def test_gain_removal_drops_grid_energy(tile, shape):
    clean = smooth_image(*shape, seed=1)
    obs = clean * tiled(vignette(tile, tile), shape)
    corrected = remove_grid(obs, tile, "gain")
    before, after = grid_energy(obs, tile), grid_energy(corrected, tile)
    assert before > 0.1
    assert after <= 0.05 * before
    ratio = corrected / clean  # the gain is removed up to a constant
    assert ratio.std() / ratio.mean() < 0.02


def test_gain_exact_on_constant_image_and_zeros_stay_zero():
    g = vignette(10, 8)
    obs = 5.0 * tiled(g, (45, 43))  # partial tiles at the right and bottom edges
    corrected = remove_grid(obs, (10, 8), "gain")
    np.testing.assert_allclose(corrected, corrected.mean(), rtol=1e-5)
    np.testing.assert_allclose(estimate_gain(obs, (10, 8))[0], g / g.mean(), rtol=1e-6)
    obs[3, 4] = 0.0
    assert remove_grid(obs, (10, 8), "gain")[3, 4] == 0


def test_nan_pixels_ignored_and_kept():
    shape = (120, 120)
    obs = smooth_image(*shape, seed=2) * tiled(vignette(30, 30), shape)
    obs[:, :25] = np.nan
    for method in ("gain", "subtract"):
        out = remove_grid(obs, 30, method)
        assert np.isnan(out[:, :25]).all() and np.isfinite(out[:, 25:]).all()
    assert grid_energy(remove_grid(obs, 30, "gain"), 30) < 0.05 * grid_energy(obs, 30)


def test_subtract_keeps_non_negativity_and_removes_additive_pattern():
    pattern = np.zeros((6, 6))
    pattern[0, :] = 3.0  # an additive stripe on the first row of each tile
    clean = np.full((36, 30), 2.0)
    out = remove_grid(clean + tiled(pattern, clean.shape), 6, "subtract")
    np.testing.assert_allclose(out, 2.0 + 3.0 / 6, rtol=1e-6)  # tile-mean offset stays
    rng = np.random.default_rng(4)
    sparse_img = rng.random((3, 60, 60)) * (rng.random((3, 60, 60)) < 0.2)
    out = remove_grid(sparse_img * tiled(vignette(12, 12), (60, 60)), 12, "subtract")
    assert out.shape == (3, 60, 60) and out.dtype == np.float32
    assert out.min() >= 0


def test_mean_tile_hand_case():
    img = np.arange(25, dtype=float).reshape(5, 5)
    img[0, 0] = np.nan
    t = mean_tile(img, 2)
    # position (0, 0) collects rows 0, 2, 4 x cols 0, 2, 4 without the NaN
    assert t.shape == (1, 2, 2)
    assert t[0, 0, 0] == pytest.approx(np.mean([2, 4, 10, 12, 14, 20, 22, 24]))
    assert t[0, 1, 1] == pytest.approx(np.mean([6, 8, 16, 18]))
    w = np.zeros((5, 5))
    w[:2, :2] = 1
    np.testing.assert_allclose(mean_tile(img, 2, weights=w)[0], [[np.nan, 1], [5, 6]])


def test_grid_energy_limits():
    pattern = tiled(vignette(16, 16), (64, 64))
    assert grid_energy(pattern, 16) > 0.999
    assert grid_energy(smooth_image(64, 64), 16) < 0.05
    with pytest.raises(InputError, match="does not fit"):
        grid_energy(pattern, 100)


def test_shared_gain_over_components():
    shape = (96, 96)
    g = tiled(vignette(24, 24), shape)
    comps = np.stack([smooth_image(*shape, seed=s) for s in range(3)])
    comps[1] *= 0.1
    out = remove_grid(comps * g, 24, "gain", per_component=False, component_weights=[1, 10, 1])
    for j in range(3):
        ratio = out[j] / comps[j]
        assert ratio.std() / ratio.mean() < 0.01


def test_degrid_nmf_file(tmp_path):
    shape_a, shape_b = (120, 150), (96, 96)
    maps_a = np.stack([smooth_image(*shape_a, seed=s) for s in (0, 1)]) * tiled(vignette(30, 30),
                                                                               shape_a)
    maps_b = np.stack([smooth_image(*shape_b, seed=s) for s in (2, 3)]) * tiled(vignette(30, 30),
                                                                               shape_b)
    maps_b[:, :5, :7] = np.nan
    src = tmp_path / "tofsims.h5"
    write_nmf(src, spectra=np.array([[1.0, 0.5, 0.0], [0.2, 1.0, 0.3]]), mz=[10.0, 20.0, 30.0],
              errors=[0.5, 0.4], maps={"a": maps_a, "b": maps_b},
              map_attrs={"a": {"source": "a.h5", "pixel_size_um": 2.0},
                         "b": {"source": "b.h5", "pixel_size_um": 2.0}},
              attrs={"modality": "tofsims", "rank": 2})
    out = tmp_path / "tofsims.degrid.h5"
    tiles = degrid_nmf_file(src, out, tile=None, method="gain")
    assert tiles == {"a": (30, 30), "b": (30, 30)}
    d, s = read_nmf(out), read_nmf(src)
    np.testing.assert_array_equal(d["spectra"], s["spectra"])
    np.testing.assert_array_equal(d["mz"], s["mz"])
    assert d["attrs"]["modality"] == "tofsims" and d["attrs"]["degrid_method"] == "gain"
    assert d["map_attrs"]["a"]["pixel_size_um"] == 2.0
    for fid in ("a", "b"):
        assert d["maps"][fid].shape == s["maps"][fid].shape
        np.testing.assert_array_equal(np.isnan(d["maps"][fid]), np.isnan(s["maps"][fid]))
        for j in range(2):
            assert grid_energy(d["maps"][fid][j], 30) < 0.05 * grid_energy(s["maps"][fid][j], 30)
    with h5py.File(out, "r") as f:
        assert set(f) == {"spectra", "mz", "errors", "maps"}
    with pytest.raises(InputError, match=r"tofsims\.h5: /maps/a: the configured tile 100 x 100 px "
                                         r"does not divide the 120 x 150 px image"):
        degrid_nmf_file(src, tmp_path / "x.h5", tile=100, method="subtract")
    assert not (tmp_path / "x.h5").exists()


@pytest.mark.real
def test_real_tofsims_no_false_grid_and_gain_correction():
    path = REAL / "tofsims_poplar" / "tofsims_trift_poplar_256x256.h5"
    if not path.exists():
        pytest.skip(f"real data not available at {path}")
    with h5py.File(path, "r") as f:
        total = f["intensities"][:].sum(axis=2).astype(float)
    with pytest.raises(InputError, match="no tile periodicity"):
        detect_tile_period(total)  # a single-tile acquisition has no grid
    # planted vignetting on real texture (too faint against the texture to be detected)
    obs = total * tiled(vignette(32, 32, depth=0.6), total.shape)
    gain = remove_grid(obs, 32, "gain")
    subtract = remove_grid(obs, 32, "subtract")
    corr = [np.corrcoef(im.ravel(), total.ravel())[0, 1] for im in (obs, gain, subtract)]
    assert corr[0] < 0.98
    assert corr[1] > 0.995
    assert corr[1] > corr[2]


@pytest.mark.parametrize("tile", [40, 64, 80])
def test_planted_gain_detected_and_removed(tile):
    """Done-when of the grid removal: tile found automatically, >= 95 % of the tile-harmonic
    energy gone, and the corrected image closer to the gain-free truth than the observed one."""
    shape = (4 * tile, 5 * tile)
    clean = smooth_image(*shape, seed=tile)
    obs = clean * tiled(vignette(tile, tile), shape)
    t = detect_tile_period(obs)
    assert t == (tile, tile)
    corrected = remove_grid(obs, t, "gain")
    assert grid_energy(corrected, t) <= 0.05 * grid_energy(obs, t)
    r_obs = np.corrcoef(obs.ravel(), clean.ravel())[0, 1]
    r_cor = np.corrcoef(corrected.ravel(), clean.ravel())[0, 1]
    assert r_cor > r_obs and r_cor > 0.999


def test_check_tile_divides():
    check_tile_divides((160, 200), 40)
    with pytest.raises(InputError, match=r"x: the configured tile 30 x 30 px does not divide the "
                                         r"100 x 100 px image \(remainders 10 px in y, 10 px"):
        check_tile_divides((3, 100, 100), 30, "x")


def sparse_cube(shape, gain, n_mz=50, seed=0, gain2=None):
    """Converted file content: each pixel holds a few peaks of a smooth image times a tile gain
    (gain2 applies above m/z 316, the log-middle of 100-1000, instead when given)."""
    rng = np.random.default_rng(seed)
    clean = smooth_image(*shape, seed=seed)
    ny, nx = shape
    mz_axis = np.linspace(100, 1000, n_mz)
    indptr, mz, inten, xy, truth = [0], [], [], [], []
    for y in range(ny):
        for x in range(nx):
            cols = np.sort(rng.choice(n_mz, 4, replace=False))
            base = clean[y, x] * rng.uniform(0.9, 1.1, 4)
            g = np.where(mz_axis[cols] < 316, gain[y, x], gain2[y, x] if gain2 is not None
                         else gain[y, x])
            mz.append(mz_axis[cols])
            inten.append((base * g).astype(np.float32))
            truth.append(base)
            xy.append((x, y))
            indptr.append(indptr[-1] + 4)
    return (np.array(indptr), np.concatenate(mz), np.concatenate(inten), np.array(xy),
            np.concatenate(truth))


def test_degrid_converted_gain_sparse(tmp_path):
    shape, tile = (120, 160), 40
    gain = tiled(vignette(tile, tile), shape)
    indptr, mz, inten, xy, truth = sparse_cube(shape, gain)
    src = tmp_path / "t.h5"
    write_converted(src, indptr=indptr, mz=mz, intensity=inten, xy=xy,
                    attrs={"pixel_size_um": 1.0, "mode": "processed", "mz_range": (100.0, 1000.0)})
    report = {}
    assert degrid_converted(src, tmp_path / "d.h5", tile=None, report=report) == (tile, tile)
    r = ConvertedReader(tmp_path / "d.h5")
    (_s, _e, ip, m, v), = r.iter_blocks(10 ** 6)
    np.testing.assert_array_equal(ip, indptr)                 # zeros stay zeros: same values
    np.testing.assert_array_equal(m, mz)
    ratio = v / truth                                         # gain removed up to a constant
    assert ratio.std() / ratio.mean() < 0.02
    assert report["energy_after"] <= 0.05 * report["energy_before"]
    assert r.attrs["degrid_tile"] == (tile, tile) and r.attrs["degrid_method"] == "gain"


def test_degrid_converted_per_mz_block(tmp_path):
    shape, tile = (160, 160), 40
    g1 = tiled(vignette(tile, tile, depth=0.4), shape)
    ramp = np.tile(0.7 + 0.6 * np.arange(tile) / tile, (tile, 1))    # another pattern at high m/z
    g2 = tiled(ramp, shape)
    indptr, mz, inten, xy, truth = sparse_cube(shape, g1, gain2=g2, seed=4)
    src = tmp_path / "t.h5"
    write_converted(src, indptr=indptr, mz=mz, intensity=inten, xy=xy,
                    attrs={"pixel_size_um": 1.0, "mode": "processed", "mz_range": (100.0, 1000.0)})
    cv = {}
    for blocks in (1, 2):
        degrid_converted(src, tmp_path / f"d{blocks}.h5", tile=tile, mz_blocks=blocks)
        (_s, _e, _ip, m, v), = ConvertedReader(tmp_path / f"d{blocks}.h5").iter_blocks(10 ** 6)
        worst = []
        for sel in (m < 316, m >= 316):
            ratio = v[sel] / truth[sel]
            worst.append(ratio.std() / ratio.mean())
        cv[blocks] = max(worst)
    assert cv[2] < 0.04 < cv[1]


def test_degrid_converted_errors_and_never_dense(tmp_path):
    import tracemalloc

    shape = (100, 100)
    indptr, mz, inten, xy, _t = sparse_cube(shape, tiled(vignette(25, 25), shape), n_mz=10_000)
    src = tmp_path / "t.h5"
    write_converted(src, indptr=indptr, mz=mz, intensity=inten, xy=xy,
                    attrs={"pixel_size_um": 1.0, "mode": "processed", "mz_range": (100.0, 1000.0)})
    with pytest.raises(InputError, match=r"t\.h5: grid removal before NMF supports method 'gain'"):
        degrid_converted(src, tmp_path / "x.h5", tile=25, method="subtract")
    with pytest.raises(InputError, match=r"configured tile 30 x 30 px does not divide"):
        degrid_converted(src, tmp_path / "x.h5", tile=30)
    assert not (tmp_path / "x.h5").exists()
    # 10,000 pixels x 10,000 m/z would be 800 MB dense; the sparse path stays far below
    tracemalloc.start()
    degrid_converted(src, tmp_path / "d.h5", tile=25, mz_blocks=4, block_pixels=2000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20 * 2 ** 20


def rel_error(img, truth):
    """||s img - truth|| / ||truth|| with the best constant s (a gain is known up to a scale)."""
    s = float((img * truth).sum() / (img * img).sum())
    return float(np.linalg.norm(s * img - truth) / np.linalg.norm(truth))


@pytest.mark.real
@pytest.mark.parametrize("tile,limit", [(16, 0.02), (32, 0.04)])
def test_real_cube_injected_gain_sparse_path(tmp_path, tile, limit):
    """Done-when of issue 5: the real ToF-SIMS cube with a multiplicative tile pattern (depth 0.6)
    injected, corrected value by value on the converted data, restores the TIC image within 2 %
    (relative L2 after the best constant scale; 15 % uncorrected) with 16-px tiles (256 tiles on
    the 256 x 256 px cube, like the 400 of the published acquisition), and equals the map-level
    correction. With 32-px tiles (64 tiles) the wood texture's own tile-periodic part (10 % rms
    in the mean tile) limits any estimate to about 3.5 %."""
    path = REAL / "tofsims_poplar" / "tofsims_trift_poplar_256x256.h5"
    if not path.exists():
        pytest.skip(f"real data not available at {path}")
    with h5py.File(path, "r") as f:
        cube, mz_axis = f["intensities"][:].astype(np.float32), f["mz"][:]
    ny, nx, n_mz = cube.shape
    gain = tiled(vignette(tile, tile, depth=0.6), (ny, nx)).astype(np.float32)
    flat = (cube * gain[..., None]).reshape(ny * nx, n_mz)
    rows, cols = np.nonzero(flat)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=ny * nx))])
    yy, xx = np.divmod(np.arange(ny * nx), nx)
    src = tmp_path / "cube.h5"
    write_converted(src, indptr=indptr, mz=mz_axis[cols].astype(np.float64),
                    intensity=flat[rows, cols], xy=np.c_[xx, yy],
                    attrs={"pixel_size_um": 1.0, "mode": "processed",
                           "mz_range": (float(mz_axis.min()), float(mz_axis.max()))})
    degrid_converted(src, tmp_path / "d.h5", tile=tile)
    r = ConvertedReader(tmp_path / "d.h5")
    truth = cube.sum(axis=2)
    err = rel_error(r.to_image(r.tic()), truth)
    observed = flat.sum(axis=1).reshape(ny, nx)
    err_map = rel_error(remove_grid(observed, tile, "gain"), truth)
    assert err == pytest.approx(err_map, rel=0.05)            # the sparse path = the map path
    assert err < limit and rel_error(observed, truth) > 0.14


def test_gain_smoothing_chosen_by_cross_validation():
    """A smooth vignetting on a textured image gets a wide window, a sharp pattern a narrow one;
    on each, the chosen window beats both no smoothing and the window chosen for the other."""
    rng = np.random.default_rng(0)
    shape = (256, 256)
    texture = smooth_image(*shape, seed=1) * rng.gamma(4.0, 0.25, shape)
    u = (np.arange(16) + 0.5) / 16
    sharp = 0.7 + 0.8 * np.exp(-((u[:, None] - 0.35) ** 2 + (u[None, :] - 0.6) ** 2) / 0.02)
    chosen = {}
    for name, pattern in (("smooth", vignette(16, 16, 0.6)), ("sharp", sharp)):
        obs = texture * tiled(pattern, shape)
        chosen[name] = (obs, select_gain_smooth(obs, 16))
    assert chosen["smooth"][1] >= 0.5 and chosen["sharp"][1] <= 0.25
    for name, other in (("smooth", "sharp"), ("sharp", "smooth")):
        obs = chosen[name][0]
        err = {lv: rel_error(obs / tiled(estimate_gain(obs, 16, gain_smooth=lv)[0], shape), texture)
               for lv in (0.0, chosen[name][1], chosen[other][1])}
        assert err[chosen[name][1]] < 0.7 * min(err[0.0], err[chosen[other][1]])
