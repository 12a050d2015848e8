"""Ground-truth evaluation helpers on exact small cases."""

import numpy as np
import pytest

from msifusion.affine import block_matrix
from msifusion.evaluate import bicubic_to_grid, format_table, pearson, raw_ion_image, read_table
from msifusion.store import ConvertedReader, write_converted


def test_raw_ion_image_sums_window_and_marks_missing(tmp_path):
    path = tmp_path / "c.h5"
    # pixel (0,0): peaks at 100.0 and 100.0005 (5 ppm) and 101; pixel (1,0): 99.99 only; (0,1) absent
    write_converted(path, indptr=np.array([0, 3, 4]), mz=np.array([100.0, 100.0005, 101.0, 99.99]),
                    intensity=np.array([2, 3, 7, 11], np.float32), xy=[[0, 0], [1, 0]],
                    attrs={"image_shape": (2, 2)})
    img = raw_ion_image(ConvertedReader(path), 100.0, 10.0)
    assert img.shape == (2, 2)
    assert img[0, 0] == 5.0 and img[0, 1] == 0.0
    assert np.isnan(img[1, 0]) and np.isnan(img[1, 1])


def test_pearson_exact_and_masked():
    a = np.arange(12.0).reshape(3, 4)
    mask = np.ones_like(a, bool)
    assert pearson(a, 2 * a + 1, mask) == pytest.approx(1.0)
    assert pearson(a, -a, mask) == pytest.approx(-1.0)
    b = a.copy()
    b[0, 0] = 1000.0
    mask[0, 0] = False
    assert pearson(a, b, mask) == pytest.approx(1.0)


def test_bicubic_identity_and_shift():
    rng = np.random.default_rng(0)
    img = rng.random((6, 7))
    same = bicubic_to_grid(img, np.array([[1.0, 0, 0], [0, 1.0, 0]]), img.shape)
    np.testing.assert_allclose(same, img, atol=1e-9)
    shifted = bicubic_to_grid(img, np.array([[1.0, 0, 1], [0, 1.0, 2]]), (3, 5))
    np.testing.assert_allclose(shifted, img[2:5, 1:6], atol=1e-9)
    outside = bicubic_to_grid(img, np.array([[1.0, 0, 10], [0, 1.0, 0]]), (2, 2))
    assert np.isnan(outside).all()


def test_bicubic_does_not_ring_at_unknown_pixels():
    """A flat image known on a disc (NaN around it, e.g. off the scan): upsampled by 4 it stays
    exactly flat on the disc (a spline through NaN set to 0 overshoots and undershoots there),
    NaN where the nearest coarse pixel is unknown; a ramp stays a ramp up to near the edge."""
    yy, xx = np.mgrid[0:12, 0:12]
    disc = (xx - 5.5) ** 2 + (yy - 5.5) ** 2 <= 20
    f = 4
    m = block_matrix(f)
    up = bicubic_to_grid(np.where(disc, 3.0, np.nan), m, (48, 48))
    expect_known = np.kron(disc, np.ones((f, f), bool))
    np.testing.assert_array_equal(np.isfinite(up), expect_known)
    np.testing.assert_allclose(up[expect_known], 3.0, atol=1e-12)
    ramp = bicubic_to_grid(np.where(disc, xx.astype(float), np.nan), m, (48, 48))
    xf = (np.arange(48) + 0.5) / f - 0.5
    inner = np.kron(ndi_erode(disc), np.ones((f, f), bool))
    # two coarse pixels in from the edge: within 0.05 (the spline's prefilter sees the filled
    # values; with NaN set to 0 the error there is about 1)
    np.testing.assert_allclose(ramp[inner], np.broadcast_to(xf, (48, 48))[inner], atol=0.05)


def ndi_erode(mask):
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=2)


def test_table_round_trip_and_format(tmp_path):
    rows = [dict(section="s1", level="maldi", pixel_size_um=20.0, target_mz=760.5851, r_fused=0.9,
                 r_bicubic=0.7, n_pixels=100)]
    out = tmp_path / "t.tsv"
    from msifusion.evaluate import COLUMNS

    out.write_text("\t".join(COLUMNS) + "\n" + "s1\tmaldi\t20.0\t760.5851\t0.9\t0.7\t100\n")
    assert read_table(out) == rows
    text = format_table(rows)
    assert "760.5851" in text and "0.900" in text and text.splitlines()[-1].startswith("mean")
