"""Tests of the phantom study generator (msifusion.phantom), on the "small" preset."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from pyimzml.ImzMLParser import ImzMLParser
from scipy import ndimage

from msifusion import phantom
from msifusion.convert import convert_imzml
from msifusion.errors import InputError
from msifusion.imzml import read_imzml_header
from msifusion.store import ConvertedReader

TILE = 10


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom")
    return phantom.generate_study(out, preset="small", seed=0, tile_px=TILE)


@functools.lru_cache(maxsize=None)
def _read(path: str):
    """(parser, xy 0-based (n, 2), list of (mz, intensity))."""
    p = ImzMLParser(path)
    xy = np.array(p.coordinates)[:, :2] - 1
    spectra = [p.getspectrum(i) for i in range(len(xy))]
    return p, xy, spectra


def _image(xy, values, shape):
    img = np.full(shape, np.nan)
    img[xy[:, 1], xy[:, 0]] = values
    return img


def _window_sum(spectra, mz, ppm):
    lo, hi = mz * (1 - ppm * 1e-6), mz * (1 + ppm * 1e-6)
    return np.array([it[(m >= lo) & (m <= hi)].sum() for m, it in spectra])


def _roi(text):
    xs, ys = text.split(",")
    x0, x1 = (int(v) for v in xs.split(":"))
    y0, y1 = (int(v) for v in ys.split(":"))
    return x0, x1, y0, y1


def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _to_reference(fine_values, matrix, ref_shape):
    """Mean of fine pixel values per reference pixel (nearest reference pixel of each fine centre)
    and the number of fine pixels that fell in each reference pixel."""
    ny, nx = fine_values.shape[-2:]
    yy, xx = np.mgrid[0:ny, 0:nx]
    xr = np.rint(matrix[0, 0] * xx + matrix[0, 1] * yy + matrix[0, 2]).astype(int).ravel()
    yr = np.rint(matrix[1, 0] * xx + matrix[1, 1] * yy + matrix[1, 2]).astype(int).ravel()
    ok = (xr >= 0) & (xr < ref_shape[1]) & (yr >= 0) & (yr < ref_shape[0])
    idx = yr[ok] * ref_shape[1] + xr[ok]
    n = np.bincount(idx, minlength=ref_shape[0] * ref_shape[1]).reshape(ref_shape)
    vals = fine_values.reshape(-1, ny * nx)[:, ok]
    sums = np.stack([np.bincount(idx, weights=v, minlength=n.size) for v in vals])
    return sums.reshape((-1,) + ref_shape) / np.maximum(n, 1), n


# ------------------------------------------------------------------------------------- files
def test_imzml_files_pixels_and_metadata(study):
    chain = study["chain"]
    ref_file = study["files"]["s01"][chain[0]]
    assert ref_file == study["files"]["s02"][chain[0]]          # one reference file, all sections
    paths = {ref_file} | {study["files"][s][m] for s in study["sections"] for m in chain[1:]}
    assert len(paths) == 1 + 2 * len(study["sections"])
    for path in paths:
        p, xy, spectra = _read(path)
        ny, nx = study["shapes"][Path(path).name]
        # full rectangle, every pixel once, 1-based in the file
        assert len(xy) == nx * ny
        assert xy.min() == 0 and xy[:, 0].max() == nx - 1 and xy[:, 1].max() == ny - 1
        assert len({tuple(v) for v in xy}) == nx * ny
        assert min(len(m) for m, _ in spectra) >= 1
        assert all(np.all(np.diff(m) >= 0) for m, _ in spectra)
        assert all(np.all(it >= 0) for _, it in spectra)
    # reference and MALDI: processed centroid with pixel size; ToF-SIMS: continuous, no pixel size
    for mod, px in ((chain[0], 100.0), (chain[1], 25.0)):
        p, _, spectra = _read(study["files"]["s01"][mod])
        assert p.imzmldict["pixel size x"] == px and p.imzmldict["pixel size y"] == px
        assert p.spectrum_mode == "centroid"
        assert len(set(p.mzOffsets)) == len(p.mzOffsets)
    p, _, spectra = _read(study["files"]["s01"][chain[2]])
    assert "pixel size x" not in p.imzmldict
    assert len(set(p.mzOffsets)) == 1
    np.testing.assert_array_equal(spectra[0][0], np.arange(1, 201))
    np.testing.assert_array_equal(spectra[-1][0], np.arange(1, 201))


def test_sections_sheet(study):
    sheet = Path(study["sections_sheet"])
    lines = sheet.read_text().splitlines()
    assert lines[0] == "section\tmodality\timzml\troi"
    rows = [line.split("\t") for line in lines[1:]]
    assert [(r[0], r[1]) for r in rows] == [(s, m) for s in ("s01", "s02") for m in study["chain"]]
    ref_rois = []
    for section, modality, imzml, roi in rows:
        assert imzml.startswith("imzml/") and (sheet.parent / imzml).exists()
        assert str(sheet.parent / imzml) == study["files"][section][modality]
        if modality == study["reference"]:
            x0, x1, y0, y1 = _roi(roi)
            ny, nx = study["shapes"][Path(imzml).name]
            assert 0 <= x0 < x1 <= nx and 0 <= y0 < y1 <= ny
            ref_rois.append((x0, x1, y0, y1))
        else:
            assert roi == "*"
    (a0, a1, _, _), (b0, b1, _, _) = ref_rois
    assert a1 <= b0 or b1 <= a0                                  # side by side, disjoint


def test_truth_layout(study):
    chain = study["chain"]
    for si, section in enumerate(study["sections"]):
        with h5py.File(study["truth"][section], "r") as f:
            assert f.attrs["section"] == section and f.attrs["reference"] == chain[0]
            np.testing.assert_allclose(f.attrs["targets_mz"], phantom.DEMO_TARGETS)
            assert f.attrs["ppm"] == phantom.DEMO_PPM
            assert sorted(f.keys()) == sorted(chain)
            for k, mod in enumerate(chain):
                g = f[mod]
                ion, mask = g["ion_images"][()], g["mask"][()]
                mat = g["matrix_to_reference"][()]
                assert ion.dtype == np.float32 and mask.dtype == bool and mat.shape == (2, 3)
                assert ion.shape == (len(phantom.DEMO_TARGETS),) + mask.shape
                assert np.all(ion >= 0) and 0.1 < mask.mean() < 0.95
                assert g.attrs["pixel_size_um"] == phantom.PRESETS["small"].pixel_um[k]
                # a rigid map scaled by the pixel-size ratio, no mirror
                scale = g.attrs["pixel_size_um"] / f[chain[0]].attrs["pixel_size_um"]
                np.testing.assert_allclose(mat[:, :2] @ mat[:, :2].T, scale ** 2 * np.eye(2),
                                           atol=1e-12)
                assert np.linalg.det(mat[:, :2]) > 0
                if k == 0:
                    np.testing.assert_allclose(mat, np.eye(2, 3), atol=1e-12)
                    x0, x1, y0, y1 = _roi(study["rois"][section][mod])
                    assert mask.shape == (y1 - y0, x1 - x0)
                    assert tuple(g.attrs["origin_xy"]) == (x0, y0)
                else:
                    assert tuple(g.attrs["origin_xy"]) == (0, 0)
                    assert mask.shape == study["shapes"][Path(study["files"][section][mod]).name]
    assert [t["reference_only"] for t in study["targets"]].count(True) == 1
    assert study["reference_only_mz"] in study["targets_mz"]


@pytest.mark.parametrize("level", [1, 2])
def test_truth_matrix_maps_fine_mask_onto_reference_mask(study, level):
    chain = study["chain"]
    px = phantom.PRESETS["small"].pixel_um
    full = (px[0] / px[level]) ** 2
    for section in study["sections"]:
        with h5py.File(study["truth"][section], "r") as f:
            ref_mask = f[chain[0]]["mask"][()]
            fine_mask = f[chain[level]]["mask"][()].astype(float)
            mat = f[chain[level]]["matrix_to_reference"][()]
        frac, n = _to_reference(fine_mask[None], mat, ref_mask.shape)
        covered = n >= 0.9 * full                      # reference pixels inside the fine field
        assert covered.sum() >= (10 if level == 2 else 100)
        assert _dice(frac[0][covered] > 0.5, ref_mask[covered]) > 0.9
        if level == 1:
            # the test can fail: the same map turned by 90 degrees about the image centre misplaces
            ny, nx = fine_mask.shape
            c = np.array([(nx - 1) / 2, (ny - 1) / 2])
            turn = np.array([[0.0, -1.0], [1.0, 0.0]])
            bad = np.hstack([mat[:, :2] @ turn, (mat[:, :2] @ (c - turn @ c) + mat[:, 2])[:, None]])
            frac_bad, n_bad = _to_reference(fine_mask[None], bad, ref_mask.shape)
            cov = n_bad >= 0.9 * full
            assert _dice(frac_bad[0][cov] > 0.5, ref_mask[cov]) < 0.9


def test_truth_ion_images_agree_across_grids(study):
    """Fine truth averaged over reference footprints reproduces the reference truth."""
    chain = study["chain"]
    px = phantom.PRESETS["small"].pixel_um
    for section in study["sections"]:
        with h5py.File(study["truth"][section], "r") as f:
            ref = f[chain[0]]["ion_images"][()]
            fine = f[chain[1]]["ion_images"][()]
            mat = f[chain[1]]["matrix_to_reference"][()]
        avg, n = _to_reference(fine, mat, ref.shape[1:])
        covered = n >= 0.9 * (px[0] / px[1]) ** 2
        for t in range(len(ref)):
            a, b = avg[t][covered], ref[t][covered]
            assert np.corrcoef(a, b)[0, 1] > 0.97
            assert 0.9 < a.sum() / b.sum() < 1.1


def test_fine_structure_is_below_the_reference_resolution(study):
    """The fine modalities' truth holds detail that the reference pixels average away."""
    chain = study["chain"]
    px = phantom.PRESETS["small"].pixel_um
    with h5py.File(study["truth"]["s01"], "r") as f:
        img = f[chain[1]]["ion_images"][1]                 # PC 32:0: core band + fine dots
        mask = f[chain[1]]["mask"][()]
    box = ndimage.uniform_filter(img, size=int(px[0] / px[1]))
    assert np.std((img - box)[mask]) > 0.25 * np.std(img[mask])


def test_reference_spectra_follow_truth(study):
    chain = study["chain"]
    p, xy, spectra = _read(study["files"]["s01"][chain[0]])
    ny, nx = study["shapes"][Path(study["files"]["s01"][chain[0]]).name]
    for section in study["sections"]:
        x0, x1, y0, y1 = _roi(study["rois"][section][chain[0]])
        with h5py.File(study["truth"][section], "r") as f:
            truth = f[chain[0]]["ion_images"][()]
            mask = f[chain[0]]["mask"][()]
        for t, mz in enumerate(phantom.DEMO_TARGETS):
            meas = _image(xy, _window_sum(spectra, mz, phantom.DEMO_PPM), (ny, nx))[y0:y1, x0:x1]
            assert np.corrcoef(meas[mask], truth[t][mask])[0, 1] > 0.8
            ratio = meas[mask].sum() / truth[t][mask].sum()
            assert 0.6 < ratio < 1.4                          # TIC field + Poisson, no other bias
    # centroids within +-2 ppm of the true m/z, isotope M+1 present
    mz_all = np.concatenate([m for m, _ in spectra])
    for mz in phantom.DEMO_TARGETS:
        near = mz_all[np.abs(mz_all - mz) < mz * 50e-6]
        assert len(near) > 20
        assert np.abs(near - mz).max() <= mz * 2.0001e-6
        iso = mz_all[np.abs(mz_all - mz - phantom.ISOTOPE_SPACING) < mz * 3e-6]
        assert len(iso) > 20


def test_reference_only_species_absent_from_finer_modalities(study):
    chain = study["chain"]
    ref_only = study["reference_only_mz"]
    assert [t["mz"] for t in study["targets"] if t["reference_only"]] == [ref_only]
    for mod in chain[1:]:
        names = study["species"][mod]
        assert not any(n for n in names if n == "PC 34:1 [M+K]+")
    assert "PC 34:1 [M+K]+" in study["species"][chain[0]]
    _, _, tof = _read(study["files"]["s01"][chain[2]])
    assert tof[0][0].max() < ref_only - 500                   # unit-mass fragments only
    for section in study["sections"]:
        _, _, spectra = _read(study["files"][section][chain[1]])
        mz_all = np.concatenate([m for m, _ in spectra])
        for k in range(3):
            m = ref_only + k * phantom.ISOTOPE_SPACING
            assert not np.any(np.abs(mz_all - m) < m * 100e-6)
        # a shared target is there, shifted by the MALDI calibration error (~20 ppm)
        shared = phantom.DEMO_TARGETS[0]
        err = (mz_all[np.abs(mz_all - shared) < shared * 60e-6] - shared) / shared * 1e6
        assert len(err) > 200
        assert 10 < abs(np.median(err)) < 30
    # the reference does see it
    _, xy, spectra = _read(study["files"]["s01"][chain[0]])
    x0, x1, y0, y1 = _roi(study["rois"]["s01"][chain[0]])
    with h5py.File(study["truth"]["s01"], "r") as f:
        mask = f[chain[0]]["mask"][()]
    shape = study["shapes"][Path(study["files"]["s01"][chain[0]]).name]
    seen = _image(xy, _window_sum(spectra, ref_only, 3.0), shape)[y0:y1, x0:x1]
    assert np.mean(seen[mask] > 0) > 0.9


def test_maldi_matrix_peaks_on_and_off_tissue(study):
    chain = study["chain"]
    _, xy, spectra = _read(study["files"]["s01"][chain[1]])
    with h5py.File(study["truth"]["s01"], "r") as f:
        mask = f[chain[1]]["mask"][()]
    on = mask[xy[:, 1], xy[:, 0]]
    off = ~ndimage.binary_dilation(mask, iterations=2)[xy[:, 1], xy[:, 0]]
    assert off.sum() > 200
    found = _window_sum(spectra, 137.0233, 60.0) > 0
    assert found[off].mean() > 0.95 and found[on].mean() > 0.8
    lipid = _window_sum(spectra, phantom.DEMO_TARGETS[0], 60.0)
    assert lipid[off].sum() == 0 and lipid[on].sum() > 1000


def test_tofsims_tile_grid_in_tic(study):
    chain = study["chain"]
    _, xy, spectra = _read(study["files"]["s01"][chain[2]])
    shape = study["shapes"][Path(study["files"]["s01"][chain[2]]).name]
    tic = _image(xy, [it.sum() for _, it in spectra], shape)
    # tiles anchored at pixel (0, 0): the gain ramps up along x in a tile and drops at its border
    jump = np.diff(np.log(tic + 1), axis=1).mean(0)          # between columns x and x + 1
    x = np.arange(len(jump))

    def border_jump(period):
        return min(jump[x % period == phase].mean() for phase in range(period))

    assert min(range(6, 17), key=border_jump) == TILE
    assert np.argmin([jump[x % TILE == phase].mean() for phase in range(TILE)]) == TILE - 1
    # the mean tile of log TIC follows the gain pattern
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    cls = ((yy % TILE) * TILE + xx % TILE).ravel()
    profile = np.bincount(cls, np.log(tic + 1).ravel()) / np.bincount(cls)
    assert np.corrcoef(profile, np.log(phantom.tile_gain_pattern(TILE)).ravel())[0, 1] > 0.75
    gain = phantom.tile_gain_pattern(TILE)
    assert math.isclose(gain.min(), 0.7) and math.isclose(gain.max(), 1.3)


def test_deterministic_from_seed(study, tmp_path):
    again = phantom.generate_study(tmp_path / "a", preset="small", seed=0, tile_px=TILE)
    other = phantom.generate_study(tmp_path / "b", preset="small", seed=1, tile_px=TILE)
    first = sorted(Path(study["outdir"], "imzml").iterdir())
    assert len(first) == 2 * (1 + 2 * 2)
    for path in first:
        same = Path(again["outdir"], "imzml", path.name)
        assert path.read_bytes() == same.read_bytes()
        if path.suffix == ".ibd":
            assert path.read_bytes() != Path(other["outdir"], "imzml", path.name).read_bytes()
    assert Path(study["sections_sheet"]).read_text() == Path(again["sections_sheet"]).read_text()
    with h5py.File(study["truth"]["s02"], "r") as f, h5py.File(again["truth"]["s02"], "r") as g:
        np.testing.assert_array_equal(f["maldi/ion_images"][()], g["maldi/ion_images"][()])
    assert again["rotation_deg"] == study["rotation_deg"] != other["rotation_deg"]


def test_short_renamed_chain(tmp_path):
    s = phantom.generate_study(tmp_path, preset="small", seed=3, chain=("ftA", "mal-B"),
                               n_sections=1)
    names = sorted(p.name for p in (tmp_path / "imzml").iterdir())
    assert names == ["ftA_sections.ibd", "ftA_sections.imzML", "mal-B_s01.ibd", "mal-B_s01.imzML"]
    rows = (tmp_path / "sections.tsv").read_text().splitlines()[1:]
    assert [r.split("\t")[:2] for r in rows] == [["s01", "ftA"], ["s01", "mal-B"]]
    with h5py.File(s["truth"]["s01"], "r") as f:
        assert sorted(f.keys()) == ["ftA", "mal-B"] and f.attrs["reference"] == "ftA"
    assert not list(tmp_path.rglob("*.part")) and not list(tmp_path.rglob(".*"))


@pytest.mark.parametrize("kwargs", [dict(preset="huge"), dict(chain=()),
                                    dict(chain=("a", "b", "c", "d")), dict(chain=("a", "a")),
                                    dict(chain=("a/b",)), dict(tile_px=1), dict(seed=-1),
                                    dict(n_sections=0)])
def test_bad_arguments(tmp_path, kwargs):
    with pytest.raises(InputError):
        phantom.generate_study(tmp_path, **({"preset": "small"} | kwargs))
    assert not (tmp_path / "imzml").exists()


def test_write_imzml_roundtrip(tmp_path):
    xy = np.array([[0, 0], [1, 0], [0, 1], [1, 1]])
    spectra = [(np.array([100.0, 200.0 + i]), np.array([1.0, 2.0 * i], np.float32))
               for i in range(4)]
    csr = (np.arange(5) * 2, np.concatenate([m for m, _ in spectra]),
           np.concatenate([v for _, v in spectra]))
    path = phantom.write_imzml(tmp_path / "p.imzML", xy, *csr, mode="processed",
                               pixel_size_um=7.5, uuid_key="k")
    p = ImzMLParser(str(path))
    assert [c[:2] for c in p.coordinates] == [(1, 1), (2, 1), (1, 2), (2, 2)]
    assert p.imzmldict["pixel size x"] == 7.5
    for i, (mz, it) in enumerate(spectra):
        got = p.getspectrum(i)
        np.testing.assert_array_equal(got[0], mz)
        np.testing.assert_array_equal(got[1], it)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["p.ibd", "p.imzML"]
    first = (tmp_path / "p.ibd").read_bytes()
    phantom.write_imzml(tmp_path / "p.imzML", xy, *csr, mode="processed",
                        pixel_size_um=7.5, uuid_key="k")
    assert (tmp_path / "p.ibd").read_bytes() == first
    # continuous without pixel size
    cont = phantom.write_imzml(tmp_path / "c.imzML", xy, np.arange(5) * 3, None, np.ones(12),
                               mode="continuous", mz_axis=np.arange(1.0, 4.0))
    pc = ImzMLParser(str(cont))
    assert "pixel size x" not in pc.imzmldict and len(set(pc.mzOffsets)) == 1
    with pytest.raises(InputError):
        phantom.write_imzml(tmp_path / "bad.txt", xy, *csr, mode="processed")


def test_outline_fixes_rotation_and_mirror():
    """No rotation (and no mirror image) of the outline matches the outline itself."""
    outline = phantom._random_outline(np.random.default_rng(0), phantom.PRESETS["demo"])
    n = 720
    r = outline.radius(np.linspace(0, 2 * np.pi, n, endpoint=False))
    r = r / r.mean()
    shifts = [np.abs(np.roll(r, k) - r).mean() for k in range(10, n - 10)]
    mirrors = [np.abs(np.roll(r[::-1], k) - r).mean() for k in range(n)]
    assert min(shifts) > 0.03 and min(mirrors) > 0.03
    assert math.isclose(outline.half_axes[0], 1300.0)


# ------------------------------------------------------------------ options: a new user's study
#: The commit before the study options: with their defaults, generate_study writes its files.
BASELINE_COMMIT = "17734c0"
USER = dict(preset="small", seed=3, pixel_size_um=(8, 2, 1), tof_field_px=120, tile_px=40,
            state_tof_pixel_size=True, mz_shift=13.0)


def _digests(folder) -> dict:
    """sha256 of every file under ``folder`` by relative path."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _baseline_module(tmp_path):
    """msifusion/phantom.py as of BASELINE_COMMIT, imported inside the package (skip without
    git history)."""
    root = Path(phantom.__file__).resolve().parents[1]
    try:
        src = subprocess.run(["git", "-C", str(root), "show",
                              f"{BASELINE_COMMIT}:msifusion/phantom.py"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("git is not available")
    if src.returncode != 0:
        pytest.skip(f"commit {BASELINE_COMMIT} is not in this checkout")
    path = tmp_path / "baseline_phantom.py"
    path.write_text(src.stdout)
    name = "msifusion._baseline_phantom"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def test_default_call_is_byte_identical_to_the_baseline(study, tmp_path):
    """The study options off, every file (imzML, ibd, sheet, truth) is the pre-options one."""
    old = _baseline_module(tmp_path)
    old.generate_study(tmp_path / "old", preset="small", seed=0, tile_px=TILE)
    assert _digests(tmp_path / "old") == _digests(study["outdir"])


def test_options_at_the_preset_values_change_nothing(study, tmp_path):
    p = phantom.PRESETS["small"]
    same = phantom.generate_study(tmp_path, preset="small", seed=0, tile_px=TILE,
                                  pixel_size_um=p.pixel_um,
                                  tof_field_px=int(round(p.tof_fov_um / p.pixel_um[2])),
                                  state_tof_pixel_size=False, mz_shift=0.0)
    assert _digests(tmp_path) == _digests(study["outdir"])
    assert same["tof_field_px"] == 100 and same["mz_shift"] == 0.0 and same["length_scale"] == 1
    assert same["states_pixel_size"] == {"fticr": True, "maldi": True, "tofsims": False}
    assert same["targets_mz"] == study["targets_mz"] == phantom.DEMO_TARGETS


@pytest.fixture(scope="module")
def user_study(tmp_path_factory):
    """The user-like study and the small preset's study of the same seed, both timed."""
    out = tmp_path_factory.mktemp("user")
    t0 = time.perf_counter()
    small = phantom.generate_study(out / "small", preset="small", seed=USER["seed"])
    t1 = time.perf_counter()
    user = phantom.generate_study(out / "user", **USER)
    t2 = time.perf_counter()
    print(f"\nphantom generation: small preset {t1 - t0:.2f} s, user-like {t2 - t1:.2f} s "
          f"(shapes {user['shapes']})")
    return user, small, t2 - t1, t1 - t0


def test_user_study_summary(user_study):
    user, small, _, _ = user_study
    chain = user["chain"]
    assert user["pixel_size_um"] == dict(zip(chain, (8.0, 2.0, 1.0)))
    assert user["tof_field_px"] == 120 and user["tile_px"] == 40
    assert user["states_pixel_size"] == dict.fromkeys(chain, True)
    assert user["mz_shift"] == 13.0 and math.isclose(user["length_scale"], 0.08)
    assert user["canvas_um"] < 1.0                       # finer than the finest pixel (1 um)
    np.testing.assert_allclose(user["targets_mz"], np.array(phantom.DEMO_TARGETS) + 13.0,
                               rtol=0, atol=1e-9)
    assert user["reference_only_mz"] == pytest.approx(phantom.REFERENCE_ONLY_MZ + 13.0)
    assert [(t["name"], t["reference_only"]) for t in user["targets"]] == \
        [(t["name"], t["reference_only"]) for t in small["targets"]]
    for t, s in zip(user["targets"], small["targets"]):
        assert t["mz"] == pytest.approx(s["mz"] + 13.0)


def test_user_study_keeps_the_preset_pixel_counts(user_study):
    """Every length scaled with the reference pixel: reference and MALDI-like files have the
    small preset's shapes; the ToF-SIMS field is 120 x 120 px (3 x 3 tiles of 40 px)."""
    user, small, _, _ = user_study
    for sec in user["sections"]:
        for k, mod in enumerate(user["chain"]):
            shape = user["shapes"][Path(user["files"][sec][mod]).name]
            preset_shape = small["shapes"][Path(small["files"][sec][mod]).name]
            assert shape == ((120, 120) if k == 2 else preset_shape)
        assert user["rois"][sec] == small["rois"][sec]


def test_user_study_imzml_headers_state_every_pixel_size(user_study):
    user, _, _, _ = user_study
    for sec in user["sections"]:
        for mod, px in zip(user["chain"], (8.0, 2.0, 1.0)):
            path = user["files"][sec][mod]
            head = read_imzml_header(path)
            assert head["pixel_size_um"] == px
            assert head["image_shape"] == user["shapes"][Path(path).name]
            p, _, _ = _read(path)
            assert p.imzmldict["pixel size x"] == px and p.imzmldict["pixel size y"] == px
        tof = read_imzml_header(user["files"][sec][user["chain"][2]])
        assert tof["image_shape"] == (120, 120) and tof["mode"] == "continuous"
    _, _, tof_spectra = _read(user["files"]["s01"][user["chain"][2]])
    np.testing.assert_array_equal(tof_spectra[0][0], phantom.TOF_MZ)   # unit masses unshifted


def test_user_study_targets_are_shifted_in_the_spectra(user_study):
    user, _, _, _ = user_study
    chain = user["chain"]
    _, xy, spectra = _read(user["files"]["s01"][chain[0]])
    mz_all = np.concatenate([m for m, _ in spectra])
    for mz, old in zip(user["targets_mz"], phantom.DEMO_TARGETS):
        near = mz_all[np.abs(mz_all - mz) < mz * 50e-6]
        assert len(near) > 20
        assert np.abs(near - mz).max() <= mz * 5e-6           # within the 5 ppm window
        iso = mz_all[np.abs(mz_all - mz - phantom.ISOTOPE_SPACING) < mz * 5e-6]
        assert len(iso) > 20
        # at the demo's m/z only the odd noise peak
        assert np.sum(np.abs(mz_all - old) < old * 20e-6) < 0.1 * len(near)
    # reference spectra follow the (shifted) truth
    shape = user["shapes"][Path(user["files"]["s01"][chain[0]]).name]
    for sec in user["sections"]:
        x0, x1, y0, y1 = _roi(user["rois"][sec][chain[0]])
        with h5py.File(user["truth"][sec], "r") as f:
            truth, mask = f[chain[0]]["ion_images"][()], f[chain[0]]["mask"][()]
        for t, mz in enumerate(user["targets_mz"]):
            meas = _image(xy, _window_sum(spectra, mz, user["ppm"]), shape)[y0:y1, x0:x1]
            assert np.corrcoef(meas[mask], truth[t][mask])[0, 1] > 0.7
            assert 0.6 < meas[mask].sum() / truth[t][mask].sum() < 1.4
    # MALDI-like: a shared target shifted (with the ~20 ppm calibration error), matrix not shifted,
    # the reference-only target absent
    _, _, maldi = _read(user["files"]["s01"][chain[1]])
    mz_m = np.concatenate([m for m, _ in maldi])
    shared, ref_only = user["targets_mz"][0], user["reference_only_mz"]
    assert np.sum(np.abs(mz_m - shared) < shared * 60e-6) > 200
    assert not np.any(np.abs(mz_m - ref_only) < ref_only * 100e-6)
    assert np.sum(np.abs(mz_m - 137.0233) < 137.0233 * 60e-6) > 200


def test_user_study_converts(user_study, tmp_path):
    """The pipeline's own converter takes the user-like files: every pixel size comes from the
    file, the shifted targets are in the reference spectra."""
    user, _, _, _ = user_study
    chain = user["chain"]
    for mod, px in zip(chain, (8.0, 2.0, 1.0)):
        path = user["files"]["s01"][mod]
        out = tmp_path / f"{mod}.h5"
        info = convert_imzml(path, out)
        assert info["pixel_size_um"] == px
        assert tuple(info["image_shape"]) == user["shapes"][Path(path).name]
        assert ConvertedReader(out).pixel_size_um == px
    mz = np.concatenate([b[3] for b in ConvertedReader(tmp_path / f"{chain[0]}.h5").iter_blocks()])
    for t in user["targets_mz"]:
        assert np.sum(np.abs(mz - t) <= t * 5e-6) > 20


def test_user_study_truth(user_study):
    user, _, _, _ = user_study
    chain = user["chain"]
    for sec in user["sections"]:
        with h5py.File(user["truth"][sec], "r") as f:
            np.testing.assert_allclose(f.attrs["targets_mz"], user["targets_mz"], rtol=0,
                                       atol=1e-9)
            assert f.attrs["reference_only_mz"] == pytest.approx(user["reference_only_mz"])
            for k, (mod, px) in enumerate(zip(chain, (8.0, 2.0, 1.0))):
                g = f[mod]
                ion, mask, mat = g["ion_images"][()], g["mask"][()], g["matrix_to_reference"][()]
                assert g.attrs["pixel_size_um"] == px
                if k == 0:
                    x0, x1, y0, y1 = _roi(user["rois"][sec][mod])
                    assert mask.shape == (y1 - y0, x1 - x0)
                else:
                    assert mask.shape == user["shapes"][Path(user["files"][sec][mod]).name]
                assert ion.shape == (len(user["targets_mz"]),) + mask.shape
                assert np.all(ion >= 0) and 0.1 < mask.mean() < 0.95
                np.testing.assert_allclose(mat[:, :2] @ mat[:, :2].T, (px / 8.0) ** 2 * np.eye(2),
                                           atol=1e-12)
            # the ToF-SIMS field holds tissue and slide; MALDI truth averages to the reference's
            tof_mask = f[chain[2]]["mask"][()]
            assert 0.3 < tof_mask.mean() < 0.8
            ref = f[chain[0]]["ion_images"][()]
            avg, n = _to_reference(f[chain[1]]["ion_images"][()],
                                   f[chain[1]]["matrix_to_reference"][()], ref.shape[1:])
        covered = n >= 0.9 * (8.0 / 2.0) ** 2
        for t in range(len(ref)):
            assert np.corrcoef(avg[t][covered], ref[t][covered])[0, 1] > 0.97


def test_user_study_run_time(user_study):
    """Scaled lengths keep the work of the preset: at most ~2x its time (printed by the fixture)."""
    _, _, t_user, t_small = user_study
    assert t_user < 2.5 * t_small + 1.0


def test_scaled_preset():
    small = phantom.PRESETS["small"]
    p = phantom.scaled_preset(small, (8, 2, 1))
    assert p.pixel_um == (8.0, 2.0, 1.0) and math.isclose(p.length_scale, 0.08)
    np.testing.assert_allclose(p.section_um, (160.0, 112.0))
    np.testing.assert_allclose(p.line_widths_um, np.array(small.line_widths_um) * 0.08)
    assert math.isclose(p.canvas_um, 0.2) and math.isclose(p.tof_fov_um, 80.0)
    # a relatively finer ToF-SIMS pixel makes the canvas finer (the preset's canvas : pixel ratio)
    q = phantom.scaled_preset(small, (8, 2, 0.5))
    assert math.isclose(q.canvas_um, 0.5 * small.canvas_um / small.pixel_um[2])
    assert phantom.scaled_preset(small, small.pixel_um) == small


def test_target_separation_across_shifts():
    assert phantom.target_separation_ppm(0.0) > 1000
    for shift in np.linspace(*phantom.MZ_SHIFT_RANGE, 27):
        assert phantom.target_separation_ppm(shift) >= phantom.MIN_TARGET_SEPARATION_PPM


@pytest.mark.parametrize("kwargs, name", [
    (dict(pixel_size_um=(8, 2)), "pixel_size_um"),
    (dict(pixel_size_um=(8, 2, 0)), "pixel_size_um"),
    (dict(pixel_size_um=(8, 2, float("nan"))), "pixel_size_um"),
    (dict(pixel_size_um=(2, 8, 1)), "pixel_size_um"),
    (dict(pixel_size_um=(8, 0.5, 0.5)), "pixel_size_um"),
    (dict(pixel_size_um="821"), "pixel_size_um"),
    (dict(pixel_size_um=8), "pixel_size_um"),
    (dict(tof_field_px=4), "tof_field_px"),
    (dict(tof_field_px=120.0), "tof_field_px"),
    (dict(tof_field_px=True), "tof_field_px"),
    (dict(tof_field_px=400), "tof_field_px"),
    (dict(pixel_size_um=(8, 2, 1), tof_field_px=200), "tof_field_px"),
    (dict(state_tof_pixel_size="yes"), "state_tof_pixel_size"),
    (dict(mz_shift=float("nan")), "mz_shift"),
    (dict(mz_shift=-400.0), "mz_shift"),
    (dict(mz_shift=5000), "mz_shift"),
    (dict(mz_shift="13"), "mz_shift"),
    (dict(response="quadratic"), "response"),
])
def test_bad_study_options(tmp_path, kwargs, name):
    with pytest.raises(InputError, match=name):
        phantom.generate_study(tmp_path, **({"preset": "small"} | kwargs))
    assert not list(tmp_path.iterdir())


def test_nonlinear_response_changes_only_the_finer_modalities(study, tmp_path):
    """response="nonlinear": the finer modalities' files differ (power laws, ion suppression),
    the reference's file and the truth stay those of the linear study; the MALDI-like signal of
    a species is no longer proportional to its reference signal."""
    nl = phantom.generate_study(tmp_path, preset="small", seed=0, tile_px=TILE, response="nonlinear")
    lin, new = _digests(study["outdir"]), _digests(tmp_path)
    assert nl["response"] == "nonlinear" and study["response"] == "linear"
    assert set(lin) == set(new) and lin["sections.tsv"] == new["sections.tsv"]
    assert all(lin[k] == new[k] for k in lin if k.startswith("truth/"))

    def ibd(folder, name):        # the binary data after the file's own UUID
        return (Path(folder) / "imzml" / name).read_bytes()[16:]

    assert ibd(study["outdir"], "fticr_sections.ibd") == ibd(tmp_path, "fticr_sections.ibd")
    finer = [k.split("/")[1] for k in lin if k.endswith(".ibd") and "fticr" not in k]
    assert finer and all(ibd(study["outdir"], k) != ibd(tmp_path, k) for k in finer)
    abund = np.linspace(0.01, 3.0, 50)[:, None] * np.ones((1, len(phantom.SPECIES)))
    seen = phantom._response(abund, "nonlinear", seed=0)
    ratio = seen / abund
    assert (ratio.max(axis=0) / ratio.min(axis=0) > 1.5).all()
    np.testing.assert_array_equal(phantom._response(abund, "linear", seed=0), abund)
