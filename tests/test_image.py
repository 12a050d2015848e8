"""Tests of msifusion.image: headers, pixel sizes, pyramids, bounded-memory block means, stain
features and tissue masks of microscopy images."""

from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from msifusion import image as mi
from msifusion.errors import InputError
from msifusion.image import (
    ImageInfo,
    background_mask,
    choose_downsample,
    read_image,
    read_image_info,
    stain_features,
)

REAL_HE = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real"
           / "msight_prostate" / "prostate_he_example.tif")


def block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Reference: (ny // f, nx // f, c) float64 means of f x f blocks of a (ny, nx, c) array."""
    if a.ndim == 2:
        a = a[:, :, None]
    ny, nx = a.shape[0] // f, a.shape[1] // f
    return a[:ny * f, :nx * f].astype(np.float64).reshape(ny, f, nx, f, -1).mean(axis=(1, 3))


def rgb_image(shape=(61, 83), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*shape, 3), dtype=np.uint8)


def smooth_rgb(shape, seed=0):
    """A smooth RGB uint8 image (JPEG keeps it close)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    rng = np.random.default_rng(seed)
    ch = [128 + 100 * np.sin(xx / (20 + 7 * i) + rng.uniform(0, 6)) * np.cos(yy / (25 + 5 * i))
          for i in range(3)]
    return np.clip(np.stack(ch, axis=-1), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Header and layouts
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("planar", [False, True])
def test_rgb_contig_and_planar_info_and_exact_read(tmp_path, planar):
    a = rgb_image()
    path = tmp_path / "rgb.tif"
    if planar:
        tifffile.imwrite(path, np.moveaxis(a, -1, 0), photometric="rgb", planarconfig="separate",
                         rowsperstrip=8)
    else:
        tifffile.imwrite(path, a, photometric="rgb")
    info = read_image_info(path)
    assert info.shape == (61, 83) and info.channels == 3 and info.dtype == "uint8"
    assert info.kind == "brightfield" and info.levels == ((61, 83),)
    assert info.channel_names == ("red", "green", "blue")
    out = read_image(path, 1, info=info)
    assert out.dtype == np.float32 and out.shape == (61, 83, 3)
    np.testing.assert_array_equal(out, a.astype(np.float32))


@pytest.mark.parametrize("layout", ["strips_zlib", "tiles_zlib", "single_raw_strip", "tiles_jpeg",
                                    "raw_strips_planar", "tiles_planar", "raw_big_endian"])
@pytest.mark.parametrize("factor", [1, 2, 3, 4])
def test_block_means_equal_numpy_reference(tmp_path, layout, factor):
    shape = (203, 157)  # partial last blocks for 2, 3 and 4
    a = smooth_rgb(shape) if layout == "tiles_jpeg" else rgb_image(shape)
    path = tmp_path / f"{layout}.tif"
    kw = {"strips_zlib": dict(rowsperstrip=7, compression="zlib"),
          "tiles_zlib": dict(tile=(64, 48), compression="zlib"),
          "single_raw_strip": dict(rowsperstrip=shape[0]),
          "tiles_jpeg": dict(tile=(64, 64), compression="jpeg"),
          "raw_strips_planar": dict(rowsperstrip=10, planarconfig="separate"),
          "tiles_planar": dict(tile=(32, 32), planarconfig="separate", compression="zlib"),
          "raw_big_endian": dict(rowsperstrip=13, byteorder=">")}[layout]
    data = np.moveaxis(a, -1, 0) if "planar" in layout else a
    tifffile.imwrite(path, data, photometric="rgb", **kw)
    decoded = tifffile.imread(path)  # JPEG is lossy: compare with what the file holds
    if decoded.shape[0] == 3:
        decoded = np.moveaxis(decoded, 0, -1)
    out = read_image(path, factor, memory_mb=1)
    assert out.shape == (shape[0] // factor, shape[1] // factor, 3)
    np.testing.assert_allclose(out, block_mean(decoded, factor), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.float64])
def test_gray_dtypes_are_fluorescence_and_exact(tmp_path, dtype):
    rng = np.random.default_rng(1)
    a = (rng.random((50, 70)) * 4000).astype(dtype)
    path = tmp_path / "gray.tif"
    tifffile.imwrite(path, a, tile=(32, 32), compression="zlib")
    info = read_image_info(path)
    assert info.kind == "fluorescence" and info.channels == 1
    assert info.dtype == np.dtype(dtype).name and info.channel_names == ("channel_0",)
    out = read_image(path, 3)
    assert out.shape == (16, 23, 1)
    np.testing.assert_allclose(out, block_mean(a, 3), rtol=1e-6)


def test_rgba_alpha_dropped(tmp_path, caplog):
    a = rgb_image((40, 30))
    alpha = np.full((40, 30, 1), 7, np.uint8)
    path = tmp_path / "rgba.tif"
    tifffile.imwrite(path, np.concatenate([a, alpha], axis=-1), photometric="rgb",
                     extrasamples=["unassalpha"])
    with caplog.at_level(logging.INFO, logger="msifusion.image"):
        info = read_image_info(path)
    assert info.channels == 3 and info.kind == "brightfield"
    assert "alpha" in caplog.text
    np.testing.assert_array_equal(read_image(path, info=info), a)


def test_planar_multisample_fluorescence(tmp_path):
    rng = np.random.default_rng(2)
    c = rng.integers(0, 60000, (3, 40, 50), dtype=np.uint16)
    path = tmp_path / "planar_gray.tif"
    tifffile.imwrite(path, c, photometric="minisblack", planarconfig="separate")
    info = read_image_info(path)
    assert info.kind == "fluorescence" and info.channels == 3 and info.dtype == "uint16"
    out = read_image(path, 2, info=info)
    np.testing.assert_allclose(out, block_mean(np.moveaxis(c, 0, -1), 2), rtol=1e-6)


def test_ome_cyx_fluorescence_with_pyramid(tmp_path, caplog):
    rng = np.random.default_rng(3)
    c = rng.integers(0, 4000, (3, 120, 100)).astype(np.float32)
    lvl1 = c.reshape(3, 60, 2, 50, 2).mean(axis=(2, 4), dtype=np.float64).astype(np.float32)
    path = tmp_path / "fluo.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(c, subifds=1, tile=(32, 32), compression="zlib",
                  metadata={"axes": "CYX", "PhysicalSizeX": 325.0, "PhysicalSizeXUnit": "nm",
                            "PhysicalSizeY": 325.0, "PhysicalSizeYUnit": "nm",
                            "Channel": {"Name": ["DAPI", "GFP", "Cy5"]}})
        tif.write(lvl1, subfiletype=1, tile=(32, 32), compression="zlib")
    info = read_image_info(path)
    assert info.kind == "fluorescence" and info.channels == 3 and info.dtype == "float32"
    assert info.channel_names == ("DAPI", "GFP", "Cy5")
    assert info.levels == ((120, 100), (60, 50))
    assert info.pixel_size_um == pytest.approx(0.325)
    assert "OME PhysicalSizeX" in info.pixel_size_note
    with caplog.at_level(logging.INFO, logger="msifusion.image"):
        out = read_image(path, 4, info=info)
    assert "level 1" in caplog.text
    np.testing.assert_allclose(out, block_mean(np.moveaxis(c, 0, -1), 4), rtol=1e-5)


def _write_subifd_pyramid(path, a, factors, **kw):
    with tifffile.TiffWriter(path) as tif:
        tif.write(a, subifds=len(factors), tile=(32, 32), compression="zlib", **kw)
        for f in factors:
            tif.write(block_mean(a, f).astype(a.dtype).squeeze(), subfiletype=1, tile=(32, 32),
                      compression="zlib", **kw)


@pytest.mark.parametrize("factor,level", [(1, 0), (2, 1), (3, 0), (4, 2), (8, 2), (12, 2), (6, 1)])
def test_pyramid_levels_give_the_level0_block_means(tmp_path, caplog, factor, level):
    rng = np.random.default_rng(4)
    a = rng.random((250, 330)).astype(np.float32) * 1000  # floor shapes: 125 x 165, 62 x 82
    path = tmp_path / "pyr.tif"
    _write_subifd_pyramid(path, a, (2, 4), photometric="minisblack")
    info = read_image_info(path)
    assert info.levels == ((250, 330), (125, 165), (62, 82))
    with caplog.at_level(logging.INFO, logger="msifusion.image"):
        out = read_image(path, factor, info=info)
    assert f"level {level} " in caplog.text
    np.testing.assert_allclose(out, block_mean(a, factor), rtol=1e-5)


def test_rgb_pyramid_from_subifds(tmp_path):
    base = rgb_image((40, 50), seed=5)
    a = np.kron(base, np.ones((4, 4, 1), np.uint8))  # exact integer block means at /2 and /4
    path = tmp_path / "rgb_pyr.tif"
    _write_subifd_pyramid(path, a, (2, 4), photometric="rgb")
    info = read_image_info(path)
    assert info.levels == ((160, 200), (80, 100), (40, 50)) and info.kind == "brightfield"
    np.testing.assert_array_equal(read_image(path, 4, info=info), base)
    np.testing.assert_allclose(read_image(path, 8, info=info), block_mean(a, 8), rtol=1e-6)


def test_ome_rgb_pyramid_levels(tmp_path):
    base = rgb_image((40, 50), seed=9)
    a = np.kron(base, np.ones((4, 4, 1), np.uint8))
    path = tmp_path / "rgb_pyr.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(a, subifds=2, tile=(64, 64), photometric="rgb", compression="zlib",
                  metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        for f in (2, 4):
            tif.write(a[::f, ::f], subfiletype=1, tile=(64, 64), photometric="rgb",
                      compression="zlib")
    info = read_image_info(path)
    assert info.levels == ((160, 200), (80, 100), (40, 50)) and info.pixel_size_um == 0.5
    np.testing.assert_array_equal(read_image(path, 4, info=info), base)


def test_reduced_pages_in_main_chain_are_levels_but_other_images_are_not(tmp_path):
    base = rgb_image((30, 40), seed=6)
    a = np.kron(base, np.ones((2, 2, 1), np.uint8))
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(a, photometric="rgb", metadata=None)
        tif.write(base, photometric="rgb", subfiletype=1, metadata=None)     # reduced copy
        tif.write(rgb_image((20, 20)), photometric="rgb", subfiletype=1, metadata=None)  # aspect
        tif.write(rgb_image((30, 40), seed=7), photometric="rgb", metadata=None)  # not flagged
    info = read_image_info(path)
    assert info.levels == ((60, 80), (30, 40))
    np.testing.assert_array_equal(read_image(path, 2, info=info), base)


def test_thumbnail_of_other_channels_is_not_a_level(tmp_path):
    a = rgb_image((64, 64))
    path = tmp_path / "thumb.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(a, subifds=1, photometric="rgb")
        tif.write(a[::4, ::4, 0], subfiletype=1, photometric="minisblack")  # gray thumbnail
    assert read_image_info(path).levels == ((64, 64),)


# --------------------------------------------------------------------------------------------------
# Pixel size
# --------------------------------------------------------------------------------------------------

def _ome(path, **md):
    tifffile.imwrite(path, rgb_image((20, 30)), photometric="rgb", ome=True, metadata=md)
    return read_image_info(path)


def test_ome_pixel_size_units(tmp_path):
    info = _ome(tmp_path / "um.ome.tif", PhysicalSizeX=0.5, PhysicalSizeY=0.5)
    assert info.pixel_size_um == pytest.approx(0.5) and "OME PhysicalSizeX" in info.pixel_size_note
    info = _ome(tmp_path / "nm.ome.tif", PhysicalSizeX=250.0, PhysicalSizeXUnit="nm",
                PhysicalSizeY=250.0, PhysicalSizeYUnit="nm")
    assert info.pixel_size_um == pytest.approx(0.25)
    info = _ome(tmp_path / "mm.ome.tif", PhysicalSizeX=0.002, PhysicalSizeXUnit="mm",
                PhysicalSizeY=0.002, PhysicalSizeYUnit="mm")
    assert info.pixel_size_um == pytest.approx(2.0)
    info = _ome(tmp_path / "aniso.ome.tif", PhysicalSizeX=0.5, PhysicalSizeY=0.6)
    assert info.pixel_size_um is None and "anisotropic" in info.pixel_size_note


def test_ome_wins_over_resolution_tags(tmp_path):
    path = tmp_path / "both.ome.tif"
    tifffile.imwrite(path, rgb_image((20, 30)), photometric="rgb", ome=True,
                     resolution=(96, 96), resolutionunit="inch",
                     metadata={"PhysicalSizeX": 0.17, "PhysicalSizeY": 0.17})
    info = read_image_info(path)
    assert info.pixel_size_um == pytest.approx(0.17) and "OME" in info.pixel_size_note


@pytest.mark.parametrize("resolution,unit,expected,note", [
    ((25400 / 0.5, 25400 / 0.5), "inch", 0.5, "dpi"),
    ((10000 / 0.25, 10000 / 0.25), "centimeter", 0.25, "px/cm"),
    ((96, 96), "inch", None, "screen default"),
    ((72, 72), "inch", None, "screen default"),
    ((10000 / 0.5, 10000 / 0.6), "centimeter", None, "anisotropic"),
    ((2.0, 2.0), "none", None, "NONE"),
])
def test_resolution_tags(tmp_path, resolution, unit, expected, note):
    path = tmp_path / "res.tif"
    tifffile.imwrite(path, rgb_image((20, 30)), photometric="rgb", resolution=resolution,
                     resolutionunit=unit)
    info = read_image_info(path)
    if expected is None:
        assert info.pixel_size_um is None
    else:
        assert info.pixel_size_um == pytest.approx(expected, rel=1e-6)
    assert note in info.pixel_size_note


def test_96_dpi_note_names_the_value(tmp_path):
    path = tmp_path / "screen.tif"
    tifffile.imwrite(path, rgb_image((20, 30)), photometric="rgb", resolution=(96, 96),
                     resolutionunit="inch")
    note = read_image_info(path).pixel_size_note
    assert "96 dpi" in note and "264.6 um/px" in note and "ignored" in note


def test_imagej_unit(tmp_path):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, np.zeros((2, 20, 30), np.uint16), imagej=True, resolution=(4.0, 4.0),
                     metadata={"unit": "um", "axes": "CYX"})
    info = read_image_info(path)
    assert info.channels == 2 and info.pixel_size_um == pytest.approx(0.25)
    assert "ImageJ" in info.pixel_size_note


def test_no_resolution(tmp_path):
    path = tmp_path / "plain.png"
    Image.fromarray(rgb_image((20, 30))).save(path)
    info = read_image_info(path)
    assert info.pixel_size_um is None and info.pixel_size_note


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------

def test_refusals(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_image_info(tmp_path / "missing.tif")
    with pytest.raises(InputError, match="not a file"):
        (tmp_path / "dir.tif").mkdir()
        read_image_info(tmp_path / "dir.tif")
    (tmp_path / "x.bmp").write_bytes(b"BM")
    with pytest.raises(InputError, match=r"x\.bmp.*supported: .tif, .tiff"):
        read_image_info(tmp_path / "x.bmp")
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage" * 3)
    with pytest.raises(InputError, match=r"bad\.tif.*corrupt"):
        read_image_info(tmp_path / "bad.tif")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InputError, match=r"bad\.png"):
        read_image_info(tmp_path / "bad.png")


def test_zstack_and_time_series_refused(tmp_path):
    z = tmp_path / "z.ome.tif"
    tifffile.imwrite(z, np.zeros((4, 2, 20, 30), np.uint16), ome=True, metadata={"axes": "ZCYX"})
    with pytest.raises(InputError, match=r"z\.ome\.tif.*z-stack \(4 Z planes\)"):
        read_image_info(z)
    t = tmp_path / "t.ome.tif"
    tifffile.imwrite(t, np.zeros((3, 20, 30), np.uint16), ome=True, metadata={"axes": "TYX"})
    with pytest.raises(InputError, match="time series"):
        read_image_info(t)


@pytest.mark.parametrize("dtype", [np.int16, np.uint32, np.int8])
def test_dtype_refused(tmp_path, dtype):
    path = tmp_path / "d.tif"
    tifffile.imwrite(path, np.zeros((10, 10), dtype))
    with pytest.raises(InputError, match=np.dtype(dtype).name):
        read_image_info(path)


def test_too_small_refused(tmp_path):
    path = tmp_path / "line.tif"
    tifffile.imwrite(path, np.zeros((1, 50), np.uint8))
    with pytest.raises(InputError, match="1 x 50 pixels"):
        read_image_info(path)


# --------------------------------------------------------------------------------------------------
# Bounded memory
# --------------------------------------------------------------------------------------------------

def _count_bands(monkeypatch):
    bands = []
    orig = mi._BlockMeans.add

    def add(self, y0, band):
        bands.append(band.shape[0])
        return orig(self, y0, band)

    monkeypatch.setattr(mi._BlockMeans, "add", add)
    return bands


@pytest.mark.parametrize("kw", [dict(tile=(64, 64), compression="zlib"),
                                dict(rowsperstrip=2000)])  # one uncompressed strip
def test_small_memory_reads_in_bands(tmp_path, monkeypatch, kw):
    a = rgb_image((2000, 2000), seed=8)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, a, photometric="rgb", **kw)
    info = read_image_info(path)
    read_image(path, 500, memory_mb=1, info=info)  # warm up: lazy imports are not the read's
    bands = _count_bands(monkeypatch)
    tracemalloc.start()
    out = read_image(path, 5, memory_mb=1, info=info)
    peak = tracemalloc.get_traced_memory()[1] - out.nbytes
    tracemalloc.stop()
    assert len(bands) > 10 and max(bands) <= 256
    assert peak < 1.0 * 2**20, f"peak {peak / 2**20:.2f} MB beyond the output"
    np.testing.assert_allclose(out, block_mean(a, 5), rtol=1e-6)


def test_memory_too_small_for_one_band_refused(tmp_path):
    a = rgb_image((600, 700))
    path = tmp_path / "strip.tif"
    tifffile.imwrite(path, a, photometric="rgb", rowsperstrip=600, compression="zlib")
    with pytest.raises(InputError, match=r"strip\.tif: reading level 0 .* needs \d+\.\d MB .*"
                                         r"memory_mb=0\.5 is too small"):
        read_image(path, 2, memory_mb=0.5)
    assert read_image(path, 2, memory_mb=8).shape == (300, 350, 3)


# --------------------------------------------------------------------------------------------------
# PNG and JPEG
# --------------------------------------------------------------------------------------------------

def test_png_rgb_rgba_and_16bit(tmp_path):
    a = rgb_image((45, 62))
    p = tmp_path / "a.png"
    Image.fromarray(a).save(p, dpi=(25400 / 0.5, 25400 / 0.5))
    info = read_image_info(p)
    assert info.shape == (45, 62) and info.kind == "brightfield" and info.channels == 3
    assert info.pixel_size_um == pytest.approx(0.5, rel=1e-3) and "PNG" in info.pixel_size_note
    np.testing.assert_allclose(read_image(p, 3, info=info), block_mean(a, 3), rtol=1e-6)
    q = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([a, np.full(a.shape[:2], 9, np.uint8)])).save(q)
    np.testing.assert_array_equal(read_image(q), a)
    g = np.random.default_rng(0).integers(0, 65535, (30, 40)).astype(np.uint16)
    r = tmp_path / "g16.png"
    Image.fromarray(g).save(r)
    info = read_image_info(r)
    assert info.kind == "fluorescence" and info.dtype == "uint16" and info.channels == 1
    np.testing.assert_allclose(read_image(r, 2), block_mean(g, 2), rtol=1e-6)


def test_jpeg_draft_downscale_close_to_block_mean(tmp_path):
    a = smooth_rgb((400, 480))
    p = tmp_path / "a.jpg"
    Image.fromarray(a).save(p, quality=95, dpi=(96, 96))
    info = read_image_info(p)
    assert info.pixel_size_um is None and "screen default" in info.pixel_size_note
    full = np.asarray(Image.open(p)).astype(np.float64)
    for f in (8, 16, 3):
        out = read_image(p, f, info=info)
        assert out.shape == (400 // f, 480 // f, 3)
        assert np.abs(out - block_mean(full, f)).mean() < 1.5
    with pytest.raises(InputError, match=r"a\.jpg.*memory_mb=0\.1"):
        read_image(p, 1, memory_mb=0.1)
    assert read_image(p, 8, memory_mb=0.1).shape == (50, 60, 3)  # 1/8 scale decode fits


# --------------------------------------------------------------------------------------------------
# choose_downsample
# --------------------------------------------------------------------------------------------------

def _info(shape):
    return ImageInfo("x.tif", shape, 3, "uint8", "brightfield", (shape,), None, "", ())


def test_choose_downsample():
    info = _info((30000, 40000))
    assert choose_downsample(info, max_pixels=2**22) == 17  # ceil(sqrt(1.2e9 / 4194304))
    assert choose_downsample(_info((100, 100)), max_pixels=10**6) == 1
    assert choose_downsample(_info((100, 100)), max_pixels=2500) == 2
    assert choose_downsample(_info((100, 100)), max_pixels=2499) == 3
    # target: as coarse as the target allows, never coarser because of it
    assert choose_downsample(_info((100, 100)), max_pixels=10**6, pixel_size_um=0.5,
                             target_um=2.2) == 4
    assert choose_downsample(_info((100, 100)), max_pixels=10**6, pixel_size_um=0.1,
                             target_um=0.3) == 3
    assert choose_downsample(_info((100, 100)), max_pixels=100, pixel_size_um=0.5,
                             target_um=2.0) == 10
    assert choose_downsample(_info((100, 100)), max_pixels=10**6, pixel_size_um=5.0,
                             target_um=2.0) == 1


# --------------------------------------------------------------------------------------------------
# Stain features and tissue masks
# --------------------------------------------------------------------------------------------------

def he_image(shape=(200, 240), centre=(100, 120), radius=60, all_tissue=False, seed=0):
    """Glass (240, 240, 240) with a textured H&E disc: hematoxylin left half, eosin right half."""
    from skimage.color import rgb_from_hed

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2
    if all_tissue:
        disc = np.ones(shape, bool)
    texture = 1 + 0.3 * rng.standard_normal(shape)
    left = xx < centre[1]
    h = np.where(disc & left, 0.5, 0.08 * disc) * texture
    e = np.where(disc & ~left, 0.5, 0.15 * disc) * texture
    od = h[..., None] * rgb_from_hed[0] + e[..., None] * rgb_from_hed[1]
    rgb = 240.0 * 10 ** (-np.clip(od, 0, None)) + rng.normal(0, 1.0, (*shape, 3))
    return np.clip(rgb, 0, 255).astype(np.float32), disc, left


def test_stain_features_brightfield():
    img, disc, left = he_image()
    feats, names = stain_features(img, "brightfield")
    assert names == ("optical_density", "hematoxylin", "eosin")
    assert feats.shape == (3, 200, 240) and feats.dtype == np.float32 and (feats >= 0).all()
    from scipy import ndimage as ndi

    glass = ~ndi.binary_dilation(disc, iterations=3)
    od, hema, eos = feats
    assert od[glass].mean() < 0.02 and od[disc].mean() > 0.5
    assert hema[disc & left].mean() > 3 * hema[disc & ~left].mean()
    assert eos[disc & ~left].mean() > 3 * eos[disc & left].mean()
    assert hema[glass].mean() < 0.02 and eos[glass].mean() < 0.02


def test_stain_vectors_of_the_slide_are_recovered():
    """Macenko's estimate finds a slide's own stain vectors (here not scikit-image's defaults),
    hematoxylin first; too few stained pixels fall back to rgb2hed's vectors."""
    from msifusion.image import RUIFROK_HE, stain_vectors

    rng = np.random.default_rng(1)
    h_vec, e_vec = np.array([0.44, 0.77, 0.47]), np.array([0.05, 0.93, 0.37])
    h_vec, e_vec = h_vec / np.linalg.norm(h_vec), e_vec / np.linalg.norm(e_vec)
    conc = rng.gamma(2.0, 0.15, (20000, 2)) * (rng.random((20000, 2)) < 0.7)
    od = conc[:, :1] * h_vec + conc[:, 1:] * e_vec + rng.normal(0, 0.003, (20000, 3))
    v = stain_vectors(od)
    angle = lambda a, b: np.degrees(np.arccos(np.clip(a @ b, -1, 1)))  # noqa: E731
    assert angle(v[0], h_vec) < 3 and angle(v[1], e_vec) < 3
    ruifrok = RUIFROK_HE / np.linalg.norm(RUIFROK_HE, axis=1, keepdims=True)
    np.testing.assert_allclose(stain_vectors(od[:100] * 0.1), ruifrok)


def test_uneven_illumination_is_flat_fielded():
    """A vignetting of the glass (the real H&E: OD 0.07 at the centre, 0.2 in the corners) is
    not stain: the glass's optical density and stain channels stay near 0 everywhere, and the
    tissue mask keeps to the disc."""
    img, disc, _ = he_image(shape=(240, 320), centre=(120, 160), radius=70)
    yy, xx = np.mgrid[0:240, 0:320]
    r2 = ((yy - 120) / 120.0) ** 2 + ((xx - 160) / 160.0) ** 2
    img = img * (1 - 0.2 * r2)[..., None].astype(np.float32)       # corners 40 % darker
    feats, _ = stain_features(img, "brightfield")
    from scipy import ndimage as ndi

    glass = ~ndi.binary_dilation(disc, iterations=3)
    assert np.percentile(feats[0][glass], 99) < 0.03, np.percentile(feats[0][glass], 99)
    assert feats[1][glass].mean() < 0.01 and feats[2][glass].mean() < 0.01
    mask = background_mask(img, "brightfield")
    assert (mask ^ disc).mean() < 0.01


def test_stain_features_fluorescence():
    rng = np.random.default_rng(0)
    img = (100 + rng.random((50, 60, 2)) * 10).astype(np.float32)
    img[10:30, 10:30, 1] += 500
    feats, names = stain_features(img, "fluorescence", channel_names=("DAPI", "GFP"))
    assert names == ("DAPI", "GFP") and feats.shape == (2, 50, 60) and (feats >= 0).all()
    assert np.median(feats[1][40:, 40:]) < 10 and feats[1][10:30, 10:30].mean() > 490
    assert stain_features(img, "fluorescence")[1] == ("channel_0", "channel_1")


def test_background_mask_recovers_disc():
    img, disc, _ = he_image()
    mask = background_mask(img, "brightfield")
    assert mask.dtype == bool and mask.shape == disc.shape
    from scipy import ndimage as ndi

    wrong = mask ^ disc
    edge = ndi.binary_dilation(disc, iterations=3) & ~ndi.binary_erosion(disc, iterations=3)
    assert not (wrong & ~edge).any()  # every error lies within 3 px of the disc's edge
    assert wrong.sum() < 0.1 * disc.sum()


def test_background_mask_all_tissue_and_all_glass():
    img, _, _ = he_image(all_tissue=True)
    assert background_mask(img, "brightfield").mean() > 0.95
    glass = np.random.default_rng(1).normal(235, 2, (80, 90, 3)).astype(np.float32)
    assert background_mask(glass, "brightfield").mean() < 0.05


def test_background_mask_fluorescence():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:120, 0:150]
    disc = (yy - 60) ** 2 + (xx - 70) ** 2 <= 40 ** 2
    img = (rng.poisson(5, (120, 150, 2)) + 200 * disc[..., None]
           * (1 + 0.2 * rng.random((120, 150, 2)))).astype(np.float32)
    mask = background_mask(img, "fluorescence")
    assert (mask ^ disc).sum() < 0.05 * disc.sum()
    uniform = (300 + 30 * rng.random((60, 70, 1))).astype(np.float32)
    assert background_mask(uniform, "fluorescence").mean() > 0.95


def test_bad_kind_or_shape():
    with pytest.raises(ValueError, match="kind"):
        stain_features(np.zeros((5, 5, 3)), "darkfield")
    with pytest.raises(ValueError, match="3 channels"):
        background_mask(np.zeros((5, 5, 2)), "brightfield")


# --------------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------------

@pytest.mark.real
def test_real_msight_he():
    if not REAL_HE.exists():
        pytest.skip(f"real H&E not present at {REAL_HE}")
    info = read_image_info(REAL_HE)
    assert info.shape == (1920, 2560) and info.channels == 3 and info.kind == "brightfield"
    assert info.dtype == "uint8"
    assert info.pixel_size_um == pytest.approx(0.17) and "OME PhysicalSizeX" in info.pixel_size_note
    assert info.levels == ((1920, 2560), (120, 160))  # the SubIFD thumbnail is a /16 copy
    tracemalloc.start()
    out = read_image(REAL_HE, 4, memory_mb=8, info=info)
    peak = tracemalloc.get_traced_memory()[1] - out.nbytes
    tracemalloc.stop()
    assert peak < 8 * 2**20
    np.testing.assert_allclose(out, block_mean(tifffile.imread(REAL_HE), 4), rtol=1e-6)
    frac = background_mask(out, "brightfield").mean()
    assert 0.4 < frac < 0.8
