"""Tests of msifusion.products: ion images, ROI spectra, fused HDF5, PNG/TIFF and figures."""

import os

import h5py
import numpy as np
import pytest
import tifffile
from matplotlib.image import imread

from msifusion.errors import InputError
from msifusion.figures import plot_before_after, plot_components, plot_spectrum, save_image_png
from msifusion.products import (ion_image, mz_window, product_ion_image, region_mask,
                                region_on_grid, read_fused, roi_mean_spectrum, save_tiff,
                                target_flag, write_fused)

MZ = np.array([100.0, 100.0004, 100.01, 200.0, 300.0])
SPECTRA = np.array([[1.0, 2.0, 4.0, 0.0, 1.0],
                    [0.0, 3.0, 0.0, 5.0, 0.0]])


def small_maps():
    maps = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    maps[:, 0, 0] = np.nan
    return maps


def test_mz_window_in_ppm():
    # 5 ppm of 100 = 0.0005: 100.0004 is inside, 100.01 (100 ppm) outside
    np.testing.assert_array_equal(mz_window(MZ, 100.0, 5), [True, True, False, False, False])
    np.testing.assert_array_equal(mz_window(MZ, 100.0, 150), [True, True, True, False, False])


def test_ion_image_equals_hand_computation():
    maps = small_maps()
    img = ion_image(SPECTRA, MZ, maps, 100.0, 5)
    # weights: component 0 -> 1 + 2 = 3, component 1 -> 0 + 3 = 3
    expected = 3.0 * maps[0] + 3.0 * maps[1]
    np.testing.assert_allclose(img, expected)
    assert np.isnan(img[0, 0])
    img2 = ion_image(SPECTRA, MZ, maps, 200.0, 10)
    np.testing.assert_allclose(img2[1:], 5.0 * maps[1][1:])
    with pytest.raises(InputError, match="nearest is 300"):
        ion_image(SPECTRA, MZ, maps, 301.0, 10)


def test_roi_mean_spectrum_skips_unacquired_pixels():
    maps = small_maps()
    mask = np.zeros((3, 4), bool)
    mask[0, :2] = True                                      # (0, 0) is NaN -> only (0, 1) counts
    np.testing.assert_allclose(roi_mean_spectrum(SPECTRA, maps, mask), maps[:, 0, 1] @ SPECTRA)
    mask[1, 1] = True
    expected = (maps[:, 0, 1] @ SPECTRA + maps[:, 1, 1] @ SPECTRA) / 2
    np.testing.assert_allclose(roi_mean_spectrum(SPECTRA, maps, mask), expected)
    only_nan = np.zeros((3, 4), bool)
    only_nan[0, 0] = True
    with pytest.raises(InputError, match="no acquired pixel"):
        roi_mean_spectrum(SPECTRA, maps, only_nan)


def test_fused_product_round_trip(tmp_path):
    path = tmp_path / "sec1" / "fused_MALDI.h5"
    maps = small_maps()
    write_fused(path, maps, SPECTRA, MZ, origin_xy=(5, 7), pixel_size_um=20.0,
                reference="FT-ICR", extra={"cv_r": np.array([0.9, 0.8]), "method": "ridge"})
    out = read_fused(path)
    np.testing.assert_array_equal(out["maps"], maps)
    assert out["maps"].dtype == np.float32 and out["spectra"].dtype == np.float32
    np.testing.assert_array_equal(out["spectra"], SPECTRA.astype(np.float32))
    np.testing.assert_array_equal(out["mz"], MZ)
    assert out["mz"].dtype == np.float64
    assert out["origin_xy"] == (5, 7) and out["pixel_size_um"] == 20.0
    assert out["reference"] == "FT-ICR"
    np.testing.assert_allclose(out["extra"]["cv_r"], [0.9, 0.8])
    assert out["extra"]["method"] == "ridge"
    # the layout of docs/design.md
    with h5py.File(path, "r") as f:
        assert set(f) >= {"maps", "spectra", "mz"}
        assert {"origin_xy", "pixel_size_um", "reference"} <= set(f.attrs)
    assert [p for p in os.listdir(path.parent) if p.endswith(".part")] == []


def test_product_ion_image_ships_the_target_images(tmp_path, caplog):
    """A configured target ships the product's target image (sharpened or, flagged, interpolated),
    any other m/z is reconstructed from the maps; so is a target asked at another window."""
    maps = small_maps()
    shipped = np.stack([np.full((3, 4), 5.0), np.full((3, 4), 7.0)]).astype(np.float32)
    write_fused(tmp_path / "f.h5", maps, SPECTRA, MZ, origin_xy=(0, 0), pixel_size_um=20.0,
                reference="FT-ICR",
                extra={"target_mz": np.array([100.0, 200.0]), "target_ppm": 5.0,
                       "target_predictable": np.array([True, False]),
                       "target_cv_r": np.array([0.9, 0.1], np.float32), "target_image": shipped})
    d = read_fused(tmp_path / "f.h5")
    assert target_flag(d["extra"], 100.0) is None and target_flag(d["extra"], 300.0) is None
    assert target_flag(d["extra"], 200.0) == pytest.approx(0.1)
    img, flag = product_ion_image(d, 100.0, 5.0)
    assert flag is None
    np.testing.assert_array_equal(img, shipped[0])
    img, flag = product_ion_image(d, 200.0, 5.0)
    assert flag == pytest.approx(0.1)
    np.testing.assert_array_equal(img, shipped[1])
    img, flag = product_ion_image(d, 300.0, 5.0)
    np.testing.assert_array_equal(img, ion_image(SPECTRA, MZ, maps, 300.0, 5.0))
    # another window than the stored one: the maps, with a warning naming the m/z
    img, flag = product_ion_image(d, 200.0, 50.0)
    np.testing.assert_array_equal(img, ion_image(SPECTRA, MZ, maps, 200.0, 50.0))
    assert "200.0000 is a target of the product at +- 5 ppm, not +- 50 ppm" in caplog.text


def test_measured_ion_image_adds_back_the_measured_residual(tmp_path):
    """An m/z that is no target, given its measured image on the reference grid, is the maps'
    reconstruction plus the measured-minus-reconstructed residual: it averages over every
    reference pixel to the measured value (here 2 x 2 fine pixels each), and keeps the maps'
    detail where the reconstruction already agrees."""
    from msifusion.affine import block_matrix
    from msifusion.sharpen import measured_ion_image

    rng = np.random.default_rng(0)
    maps = rng.random((2, 8, 8)).astype(np.float32)
    write_fused(tmp_path / "f.h5", maps, SPECTRA, MZ, origin_xy=(0, 0), pixel_size_um=10.0,
                reference="FT-ICR", extra={"matrix_to_reference": block_matrix(2)})
    d = read_fused(tmp_path / "f.h5")
    recon = ion_image(SPECTRA, MZ, maps, 300.0, 5.0)
    coarse = recon.reshape(4, 2, 4, 2).mean((1, 3))
    measured = coarse + rng.random((4, 4))       # what rank 2 does not explain
    img, flag = measured_ion_image(d, 300.0, 5.0, measured)
    assert flag is None
    np.testing.assert_allclose(img.reshape(4, 2, 4, 2).mean((1, 3)), measured, rtol=1e-3)
    # a measured image that the maps reproduce changes nothing
    img, _ = measured_ion_image(d, 300.0, 5.0, coarse)
    np.testing.assert_allclose(img, recon, rtol=1e-6, atol=1e-9)


def test_fused_write_is_atomic_and_checks_shapes(tmp_path):
    path = tmp_path / "fused.h5"
    with pytest.raises(InputError, match="do not match"):
        write_fused(path, small_maps(), SPECTRA[:, :3], MZ, origin_xy=(0, 0), pixel_size_um=1,
                    reference="x")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "other.h5").write_bytes(b"not hdf5")
    with pytest.raises(InputError, match="cannot be read"):
        read_fused(tmp_path / "other.h5")
    with pytest.raises(InputError, match="not found"):
        read_fused(tmp_path / "missing.h5")


def test_tiff_values_and_resolution(tmp_path):
    img = np.random.default_rng(0).random((6, 9)).astype(np.float32)
    img[2, 3] = np.nan
    path = tmp_path / "ion.tif"
    save_tiff(img, path, pixel_size_um=20.0)
    back = tifffile.imread(path)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, img)
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        num, den = page.tags["XResolution"].value
        assert num / den == pytest.approx(1 / 20.0)          # pixels per um
        assert tf.imagej_metadata["unit"] == "um"
    save_tiff(img, tmp_path / "nopx.tif", pixel_size_um=float("nan"))   # still written
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "nopx.tif"), img)
    stack = np.stack([img, 2 * img])
    save_tiff(stack, tmp_path / "stack.tif", pixel_size_um=5.0)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "stack.tif"), stack)


def test_png_written_with_nan_and_readable(tmp_path):
    img = np.random.default_rng(1).random((30, 40))
    img[:5, :5] = np.nan
    path = tmp_path / "ion.png"
    save_image_png(img, path, pixel_size_um=20.0, title="m/z 100 +- 5 ppm", label="a.u.")
    rgba = imread(path)
    assert rgba.ndim == 3 and rgba.shape[0] > 100 and rgba.shape[1] > 100
    assert rgba[..., :3].std() > 0.05                       # not a blank image
    const = np.ones((10, 10))                               # constant image must not fail
    save_image_png(const, tmp_path / "const.png", pixel_size_um=1.0, title="")
    assert (tmp_path / "const.png").stat().st_size > 0
    assert [p for p in os.listdir(tmp_path) if p.endswith(".part")] == []


def test_spectrum_and_component_figures(tmp_path):
    spec = tmp_path / "spectra.png"
    plot_spectrum(MZ, {"FT-ICR": SPECTRA[0], "MALDI": (MZ[:3], SPECTRA[1, :3])}, spec,
                  title="ROI mean", targets=[100.0])
    assert imread(spec).shape[0] > 100
    with pytest.raises(InputError, match="MALDI"):
        plot_spectrum(MZ, {"MALDI": (MZ[:2], SPECTRA[1, :3])}, tmp_path / "bad.png", title="")
    comp = tmp_path / "components.png"
    maps = np.abs(np.random.default_rng(2).standard_normal((3, 20, 25)))
    maps[:, 0, :] = np.nan
    spectra = np.abs(np.random.default_rng(3).standard_normal((3, 5)))
    plot_components(maps, spectra, MZ, comp, pixel_size_um=10.0, max_components=2)
    h = imread(comp).shape[0]
    plot_components(maps, spectra, MZ, tmp_path / "all.png", pixel_size_um=10.0, max_components=8)
    assert imread(tmp_path / "all.png").shape[0] > h      # one more row drawn


def test_plot_before_after(tmp_path):
    a = np.random.default_rng(0).random((30, 40))
    a[0, 0] = np.nan
    plot_before_after(a, 2 * a, tmp_path / "qc.png", pixel_size_um=2.0, suptitle="tile 10 x 10")
    assert (tmp_path / "qc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InputError, match=r"x\.png: before/after images must both be \(ny, nx\)"):
        plot_before_after(a, a[:, :5], tmp_path / "x.png", pixel_size_um=2.0)
    assert not (tmp_path / "x.png").exists()


def test_region_on_grid_through_the_reference():
    """A region drawn on the coarse reference grid lands on the fine pixels it covers, and back."""
    fine_to_ref = np.array([[0.5, 0.0, -0.25], [0.0, 0.5, -0.25]])    # 2 x 2 fine px per coarse px
    coarse = np.zeros((4, 4), bool)
    coarse[1, 1] = True
    fine = region_on_grid((8, 8), fine_to_ref, coarse, np.eye(2, 3))
    expect = np.zeros((8, 8), bool)
    expect[2:4, 2:4] = True
    np.testing.assert_array_equal(fine, expect)
    back = region_on_grid((4, 4), np.eye(2, 3), fine, fine_to_ref)
    np.testing.assert_array_equal(back, coarse)
    # outside the region's grid is outside the region
    assert not region_on_grid((3, 3), np.array([[1.0, 0, 10], [0, 1.0, 0]]), coarse,
                              np.eye(2, 3)).any()


def test_region_mask_box_file_and_errors(tmp_path):
    box = region_mask({"name": "a", "box": [1, 3, 0, 2]}, (4, 5))
    assert box.sum() == 4 and box[0:2, 1:3].all()
    with pytest.raises(InputError, match="roi 'a': box 1:9,0:2 does not fit the 5 x 4 px"):
        region_mask({"name": "a", "box": [1, 9, 0, 2]}, (4, 5))
    np.save(tmp_path / "m.npy", np.eye(4, 5, dtype=bool))
    assert region_mask({"name": "b", "mask": str(tmp_path / "m.npy")}, (4, 5)).sum() == 4
    with pytest.raises(InputError, match="has shape \\(4, 5\\), the section grid of its level is"):
        region_mask({"name": "b", "mask": str(tmp_path / "m.npy")}, (5, 5))
    with pytest.raises(InputError, match="mask file not found"):
        region_mask({"name": "c", "mask": str(tmp_path / "none.npy")}, (4, 5))


def test_roi_spectra_average_tissue_at_every_level(tmp_path):
    """The mean spectra of a region (and the 'tissue mean spectra' figure) average the tissue
    pixels of every level: the fused levels' own tissue masks (stored in the product), not every
    acquired pixel with its background (they used to differ from the reference level)."""
    import h5py

    from msifusion.steps.products import products_step

    rng = np.random.default_rng(0)
    ref_maps = rng.uniform(1, 2, (2, 4, 4)).astype(np.float32)
    ref_mask = np.zeros((4, 4), bool)
    ref_mask[1:3, 1:3] = True
    with h5py.File(tmp_path / "maps_fticr.h5", "w") as f:
        f["maps"], f["mask"], f["acquired"] = ref_maps, ref_mask, np.ones((4, 4), bool)
        f["spectra"], f["mz"] = SPECTRA.astype(np.float32), MZ
        f.attrs.update(origin_xy=(0, 0), pixel_size_um=20.0, modality="fticr", section="s1",
                       source="x")
    fine = rng.uniform(1, 2, (2, 8, 8)).astype(np.float32)
    fine[:, :, :4] *= 100                     # background: intense, not tissue
    tissue = np.zeros((8, 8), bool)
    tissue[2:6, 4:7] = True
    write_fused(tmp_path / "fused_maldi.h5", fine, SPECTRA, MZ, origin_xy=(0, 0),
                pixel_size_um=5.0, reference="fticr",
                extra={"matrix_to_reference": np.array([[0.5, 0, 0], [0, 0.5, 0]]),
                       "tissue_mask": tissue})
    products_step(str(tmp_path / "maps_fticr.h5"), [str(tmp_path / "fused_maldi.h5")],
                  str(tmp_path), targets=[], ppm=10, rois=[{"name": "all", "box": [0, 4, 0, 4]}])
    lines = (tmp_path / "roi_all.tsv").read_text().splitlines()
    assert "tissue pixels fticr 4, maldi 12" in lines[0]
    got = np.array([[float(v) for v in ln.split("\t")[1:]] for ln in lines[2:]])
    want = roi_mean_spectrum(SPECTRA, fine, tissue)
    np.testing.assert_allclose(got[:, 1], want, rtol=1e-5)
    assert (tmp_path / "roi_mean_spectra.png").exists()
