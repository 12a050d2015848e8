"""Tests of msifusion.convert: imzML -> converted HDF5, header reading, input validation."""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
from pyimzml.ImzMLParser import ImzMLParser

from msifusion.convert import convert_imzml
from msifusion.export import export_imzml
from msifusion.imzml import read_imzml_header, read_index
from msifusion.errors import InputError
from msifusion.store import ConvertedReader, write_converted

from imzml_files import edit_xml, random_spectra, write_imzml

SHARED = Path(__file__).parents[1].parent / "shared"
REAL = SHARED / "data" / "real"


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------

def add_pixel_size(text, x="25", y="25", unit=("UO:0000017", "micrometer")):
    lines = "".join(
        f'<cvParam cvRef="IMS" accession="IMS:{acc}" name="{name}" value="{v}" '
        f'unitCvRef="UO" unitAccession="{unit[0]}" unitName="{unit[1]}"/>\n'
        for acc, name, v in (("1000046", "pixel size (x)", x), ("1000047", "pixel size y", y))
        if v is not None)
    return text.replace("</scanSettings>", lines + "</scanSettings>", 1)


def read_all(out):
    r = ConvertedReader(out)
    mzs, ints = [], []
    for _s, _e, indptr, mz, inten in r.iter_blocks(3):
        for k in range(len(indptr) - 1):
            mzs.append(mz[indptr[k]:indptr[k + 1]])
            ints.append(inten[indptr[k]:indptr[k + 1]])
    return r, mzs, ints


def assert_fails(imzml, out, match, **kw):
    """convert_imzml raises InputError matching ``match`` and leaves no file in out's folder."""
    before = set(out.parent.iterdir())
    with pytest.raises(InputError, match=match):
        convert_imzml(imzml, out, **kw)
    assert not out.exists()
    assert set(out.parent.iterdir()) == before  # no temporary .part file left either


@pytest.fixture
def small(tmp_path):
    """Processed file: 4 spectra (lengths 3, 2, 4, 1) at 1-based positions, one grid cell missing."""
    spectra = [([100.0, 150.5, 200.25], [1.0, 2.5, 0.0]),
               ([101.0, 300.0], [7.0, 8.0]),
               ([99.5, 100.0, 100.5, 400.0], [0.25, 1.0, 2.0, 3.0]),
               ([500.0], [9.0])]
    coords = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (3, 2, 1)]
    (tmp_path / "in").mkdir()
    path = write_imzml(tmp_path / "in" / "small", spectra, coords)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return path, spectra, coords, out_dir / "small.h5"


# --------------------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------------------

def test_round_trip_continuous(tmp_path):
    mz = np.array([100.0, 200.5, 300.25, 400.125], np.float32)
    rng = np.random.default_rng(0)
    coords = [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2)]          # (3, 2) not acquired
    ints = [rng.integers(1, 1000, 4) / 4 for _ in coords]      # exact in float32
    ints[2][[0, 3]] = 0.0                                      # zeros are not stored
    path = write_imzml(tmp_path / "cont", [(mz, i) for i in ints], coords, mode="continuous",
                       mz_dtype=np.float32, int_dtype=np.float32)
    summary = convert_imzml(path, tmp_path / "cont.h5", pixel_size_um=10.0)
    r, mzs, got = read_all(tmp_path / "cont.h5")

    assert summary["n_pixels"] == 5 and summary["nnz"] == 18 and r.nnz == 18
    assert summary["image_shape"] == (2, 3) and r.image_shape == (2, 3)
    assert summary["mode"] == "continuous" and summary["spectrum_type"] == "profile"
    assert summary["pixel_size_um"] == 10.0 and r.pixel_size_um == 10.0
    np.testing.assert_array_equal(r.mz_axis, mz.astype(np.float64))   # stored once
    np.testing.assert_array_equal(r.xy, np.array(coords) - 1)
    np.testing.assert_array_equal(r.z, 0)
    for k in range(5):
        keep = ints[k] != 0
        np.testing.assert_array_equal(mzs[k], mz.astype(np.float64)[keep])
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], ints[k].astype(np.float32)[keep])
    assert r.attrs["mode"] == "continuous" and r.attrs["polarity"] == "positive"
    assert r.attrs["mz_range"] == (100.0, 400.125)
    assert r.attrs["uuid"] == read_imzml_header(path)["uuid"] and len(r.attrs["uuid"]) == 32
    assert r.attrs["source"] == str(path)
    tic = r.to_image(r.tic())
    assert np.isnan(tic[1, 2]) and np.isfinite(tic[~np.isnan(tic)]).all()
    assert tic[0, 1] == ints[1].sum()
    # channel indices into the shared axis
    _s, _e, indptr, chan, _i = next(r.iter_blocks(10, channels=True))
    np.testing.assert_array_equal(chan[indptr[2]:indptr[3]], [1, 2])


def test_round_trip_processed_blocks(small):
    path, spectra, coords, out = small
    # blocks of ~30 bytes: one or two spectra per block
    summary = convert_imzml(path, out, block_bytes=30)
    r, mzs, ints = read_all(out)
    assert summary["mode"] == "processed" and r.attrs["mode"] == "processed"
    assert summary["nnz"] == 10 and r.nnz == 10
    np.testing.assert_array_equal(r.indptr, [0, 3, 5, 9, 10])
    for (mz, inten), m, i in zip(spectra, mzs, ints):
        np.testing.assert_array_equal(m, mz)
        np.testing.assert_array_equal(i, np.float32(inten))
    np.testing.assert_array_equal(r.xy, [[0, 0], [1, 0], [0, 1], [2, 1]])
    assert r.image_shape == (2, 3)
    assert r.attrs["mz_range"] == (99.5, 500.0)
    assert math.isnan(r.pixel_size_um)          # no pixel size anywhere -> NaN


@pytest.mark.parametrize("mz_dtype,int_dtype", [(np.float32, np.int32), (np.float64, np.float64),
                                                (np.float64, np.int64), (np.float32, np.float32)])
def test_dtypes_exact(tmp_path, mz_dtype, int_dtype):
    rng = np.random.default_rng(1)
    spectra = []
    for n in (5, 3, 6):
        mz = np.sort(rng.uniform(100, 1000, n)).astype(mz_dtype)
        high = 2 ** 31 - 1 if np.dtype(int_dtype) == np.int32 else 2 ** 40
        inten = rng.integers(0, high, n).astype(int_dtype)
        spectra.append((mz, inten))
    path = write_imzml(tmp_path / "d", spectra, [(1, 1), (2, 1), (1, 2)],
                       mz_dtype=mz_dtype, int_dtype=int_dtype, spec_type="centroid")
    summary = convert_imzml(path, tmp_path / "d.h5")
    r, mzs, ints = read_all(tmp_path / "d.h5")
    assert summary["spectrum_type"] == "centroid"
    for (mz, inten), m, i in zip(spectra, mzs, ints):
        assert m.dtype == np.float64 and i.dtype == np.dtype(int_dtype)   # kept exactly
        np.testing.assert_array_equal(m, mz.astype(np.float64))
        np.testing.assert_array_equal(i, inten)


def test_metadata_carried_over(small):
    path, _s, _c, out = small
    edit_xml(path, add_pixel_size)
    edit_xml(path, lambda t: t.replace('<instrumentConfiguration id="IC1">',
                                       '<instrumentConfiguration id="IC1"><cvParam cvRef="MS" '
                                       'accession="MS:1000557" name="LTQ FT Ultra" value=""/>'))
    convert_imzml(path, out)
    a = ConvertedReader(out).attrs
    assert a["instrument"] == "LTQ FT Ultra" and a["polarity"] == "positive"
    assert a["spectrum_type"] == "profile" and a["mode"] == "processed"
    assert a["pixel_size_um"] == 25.0 and a["mz_range"] == (99.5, 500.0)
    assert a["uuid"] == path.with_suffix(".ibd").read_bytes()[:16].hex()
    assert a["mz_dtype"] == "float64" and a["format_version"] == 2


def test_continuous_unsorted_axis_is_sorted(tmp_path, caplog):
    mz = np.array([300.0, 100.0, 200.0])
    ints = [np.array([3.0, 1.0, 0.0]), np.array([6.0, 4.0, 5.0])]
    path = write_imzml(tmp_path / "c", [(mz, i) for i in ints], [(1, 1), (2, 1)],
                       mode="continuous")
    with caplog.at_level(logging.WARNING, logger="msifusion.convert"):
        summary = convert_imzml(path, tmp_path / "c.h5")
    r, mzs, got = read_all(tmp_path / "c.h5")
    np.testing.assert_array_equal(r.mz_axis, [100.0, 200.0, 300.0])
    np.testing.assert_array_equal(mzs[0], [100.0, 300.0])
    np.testing.assert_array_equal(got[0], [1.0, 3.0])
    np.testing.assert_array_equal(got[1], [4.0, 5.0, 6.0])
    assert summary["n_sorted"] == 2
    assert any("not increasing in 2 of 2 spectra" in m for m in caplog.messages)


def test_coordinates_zero_based_with_z(tmp_path):
    spectra = [([100.0], [1.0])] * 3
    path = write_imzml(tmp_path / "z", spectra, [(1, 1, 2), (4, 3, 2), (1, 1, 3)])
    convert_imzml(path, tmp_path / "z.h5")
    r = ConvertedReader(tmp_path / "z.h5")
    np.testing.assert_array_equal(r.xy, [[0, 0], [3, 2], [0, 0]])
    np.testing.assert_array_equal(r.z, [1, 1, 2])
    assert r.image_shape == (3, 4) and r.n_pixels == 3
    # two planes are never flattened into one image (plane 2 used to overwrite plane 1)
    with pytest.raises(InputError, match=r"z\.h5: 2 z planes; an image holds one plane"):
        r.to_image(np.arange(3.0))


def test_workflow_conversion_refuses_several_planes_before_reading_data(tmp_path, monkeypatch):
    """The pipeline's conversion (and CLI convert) stops on a 3-D file right after the index,
    before any binary data is read, naming the planes; no output is left."""
    import msifusion.convert
    from msifusion.steps.convert import convert_step

    spectra = [([100.0], [1.0])] * 3
    path = write_imzml(tmp_path / "z", spectra, [(1, 1, 1), (2, 1, 1), (1, 1, 2)])
    monkeypatch.setattr(msifusion.convert, "iter_spectra", None)   # reading data would fail
    with pytest.raises(InputError, match=r"z\.imzML: 2 z planes \(z = 1, 2\); msifusion images "
                                         r"one 2-D plane per file"):
        convert_step(str(path), str(tmp_path / "z.h5"))
    assert not (tmp_path / "z.h5").exists()


def test_unsorted_mz_is_sorted_with_one_warning(tmp_path, caplog):
    spectra = [([100.0, 200.0], [1.0, 2.0]), ([300.0, 100.0, 200.0], [3.0, 1.0, 2.0]),
               ([50.0, 40.0], [5.0, 4.0])]
    path = write_imzml(tmp_path / "u", spectra, [(1, 1), (2, 1), (3, 1)])
    with caplog.at_level(logging.WARNING, logger="msifusion.convert"):
        summary = convert_imzml(path, tmp_path / "u.h5")
    r, mzs, ints = read_all(tmp_path / "u.h5")
    np.testing.assert_array_equal(mzs[1], [100.0, 200.0, 300.0])
    np.testing.assert_array_equal(ints[1], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(mzs[2], [40.0, 50.0])
    np.testing.assert_array_equal(ints[2], [4.0, 5.0])
    assert summary["n_sorted"] == 2
    sorted_msgs = [m for m in caplog.messages if "not increasing" in m]
    assert len(sorted_msgs) == 1 and "2 of 3 spectra" in sorted_msgs[0]


# --------------------------------------------------------------------------------------------------
# pixel size and header
# --------------------------------------------------------------------------------------------------

def test_read_imzml_header_values(small):
    path, _spectra, _coords, _out = small
    edit_xml(path, add_pixel_size)
    h = read_imzml_header(path)
    assert h["image_shape"] == (2, 3)          # (ny, nx) from max count of pixels y / x
    assert h["pixel_size_um"] == 25.0
    assert h["n_spectra"] == 4
    assert h["mode"] == "processed"
    assert h["spectrum_type"] == "profile" and h["polarity"] == "positive"
    with open(path.with_suffix(".ibd"), "rb") as fh:
        assert h["uuid"] == fh.read(16).hex()
    assert re.fullmatch(r"[0-9a-f]{40}", h["sha1"]) and h["md5"] is None


def test_read_imzml_header_units_and_absent_values(small):
    path, *_ = small
    edit_xml(path, lambda t: add_pixel_size(t, x="20000", y=None, unit=("UO:0000018", "nanometer")))
    edit_xml(path, lambda t: re.sub(r'<cvParam[^>]*IMS:1000043[^>]*/>', "", t))
    h = read_imzml_header(path)
    assert h["pixel_size_um"] == 20.0          # nanometres -> um, y absent -> x used
    assert h["image_shape"] is None            # max count of pixels y absent


def test_read_imzml_header_stops_at_spectrum_list(small, tmp_path):
    """Everything after <spectrumList ...> is garbage: the header must still read, and fast."""
    path, *_ = small
    text = path.read_text(encoding="latin-1")
    head = text[:text.index(">", text.index("<spectrumList")) + 1]
    big = tmp_path / "big.imzML"
    with open(big, "wb") as fh:
        fh.write(head.encode("latin-1"))
        fh.write(b"\x00<<<not xml at all>>>&&&" * ((8 << 20) // 24))
    t0 = time.perf_counter()
    h = read_imzml_header(big)
    assert time.perf_counter() - t0 < 0.1
    assert h["n_spectra"] == 4 and h["image_shape"] == (2, 3)


@pytest.mark.parametrize("given,expect,warns", [(None, 25.0, False), (30.0, 25.0, True),
                                                (25.2, 25.0, False)])
def test_pixel_size_from_file_wins(small, caplog, given, expect, warns):
    path, _s, _c, out = small
    edit_xml(path, add_pixel_size)
    with caplog.at_level(logging.WARNING, logger="msifusion.convert"):
        summary = convert_imzml(path, out, pixel_size_um=given)
    assert summary["pixel_size_um"] == expect and ConvertedReader(out).pixel_size_um == expect
    assert any("ignored: the imzML states 25 um" in m for m in caplog.messages) == warns


def test_pixel_size_argument_used_when_file_has_none(small):
    path, _s, _c, out = small
    assert convert_imzml(path, out, pixel_size_um=12.5)["pixel_size_um"] == 12.5
    assert ConvertedReader(out).pixel_size_um == 12.5


# --------------------------------------------------------------------------------------------------
# validation errors (no output left behind)
# --------------------------------------------------------------------------------------------------

def test_missing_ibd(small):
    path, _s, _c, out = small
    path.with_suffix(".ibd").unlink()
    assert_fails(path, out, r"small\.imzML: binary data file small\.ibd not found")


def test_uuid_mismatch(small):
    path, _s, _c, out = small
    with open(path.with_suffix(".ibd"), "r+b") as fh:
        fh.write(b"\x01" * 16)
    assert_fails(path, out, r"small\.imzML: UUID mismatch.*01010101")


def test_truncated_ibd(small):
    path, _s, _c, out = small
    ibd = path.with_suffix(".ibd")
    size = ibd.stat().st_size
    with open(ibd, "r+b") as fh:
        fh.truncate(size - 4)                  # last intensity value (spectrum 3) cut off
    assert_fails(path, out, r"small\.ibd: spectrum 3: intensity array .* beyond the end")


def _length_mismatch(text):
    # the second "external array length" of spectrum 0 is its intensity array (length 3)
    key = 'name="external array length" value="3"'
    j = text.index(key, text.index(key) + 1)
    return text[:j] + key.replace('"3"', '"2"') + text[j + len(key):]


def _zero_spectra(count):
    def edit(text):
        text = re.sub(r"<spectrum .*?</spectrum>", "", text, flags=re.S)
        return re.sub(r'<spectrumList count="\d+"', f'<spectrumList count="{count}"', text)
    return edit


@pytest.mark.parametrize("edit,match", [
    (_length_mismatch, r"spectrum 0: m/z array length 3 differs from intensity array length 2"),
    (_zero_spectra(0), r"small\.imzML: the file contains zero spectra"),
    (_zero_spectra(4), r"small\.imzML: the file contains zero spectra"),
    (lambda t: re.sub(r'(accession="IMS:1000091" name="ibd SHA-1" value=")\w+',
                      r"\g<1>" + "0" * 40, t), r"small\.ibd: SHA1 checksum mismatch"),
    (lambda t: t.replace('accession="MS:1000576" name="no compression"',
                         'accession="MS:1002312" name="MS-Numpress linear prediction compression"'),
     r"MS-Numpress linear prediction compression'; only uncompressed and zlib"),
    (lambda t: t.replace('name="position x" value="3"', 'name="position x" value="0"'),
     r"spectrum 3: position \(0, 2, 1\) is below 1"),
])
def test_xml_level_errors(small, edit, match):
    path, _s, _c, out = small
    edit_xml(path, edit)
    assert_fails(path, out, match)


def test_md5_mismatch(small):
    path, _s, _c, out = small
    edit_xml(path, lambda t: re.sub(r'accession="IMS:1000091" name="ibd SHA-1" value="\w+"',
                                    'accession="IMS:1000090" name="ibd MD5" value="' + "a" * 32 + '"',
                                    t))
    assert_fails(path, out, r"small\.ibd: MD5 checksum mismatch \(imzML states a{32}")
    assert convert_imzml(path, out, verify_checksum=False)["n_pixels"] == 4


def _truncate_list(t):
    return t[:t.index("<spectrum ", t.index("<spectrum ") + 1) + 300]


@pytest.mark.parametrize("edit,match", [
    (_truncate_list, r"small\.imzML: not a well-formed XML \(imzML\) file \(.* at line \d+, "
                     r"column \d+\)"),
    (lambda t: t.replace('<cvParam accession="IMS:1000050" cvRef="IMS" name="position x" '
                         'value="2"/>', ""),
     r"small\.imzML: spectrum 1: no position x \(IMS:1000050\)"),
    (lambda t: t.replace('name="position y" value="2"', 'name="position y" value="two"', 1),
     r"small\.imzML: spectrum 2: position y 'two' is not an integer"),
])
def test_malformed_spectrum_list(small, edit, match):
    path, _s, _c, out = small
    edit_xml(path, edit)
    assert_fails(path, out, match, verify_checksum=False)


def test_checksum_skipped_when_not_verified(small):
    path, _s, _c, out = small
    edit_xml(path, lambda t: re.sub(r'(name="ibd SHA-1" value=")\w+', r"\g<1>" + "0" * 40, t))
    assert convert_imzml(path, out, verify_checksum=False)["n_pixels"] == 4


@pytest.mark.parametrize("bad,match", [
    (-1.0, r"bad\.imzML: spectrum 2: negative intensity -1\.0 at m/z 200\.0"),
    (np.nan, r"bad\.imzML: spectrum 2: non-finite intensity nan at m/z 200\.0"),
    (np.inf, r"bad\.imzML: spectrum 2: non-finite intensity inf"),
])
def test_bad_intensity(tmp_path, bad, match):
    spectra = [([100.0, 200.0], [1.0, 2.0])] * 2 + [([100.0, 200.0], [1.0, bad])]
    path = write_imzml(tmp_path / "bad", spectra, [(1, 1), (2, 1), (3, 1)])
    assert_fails(path, tmp_path / "bad.h5", match)


def test_duplicate_coordinates(tmp_path):
    spectra = [([100.0], [1.0])] * 4
    path = write_imzml(tmp_path / "dup", spectra, [(1, 1), (2, 1), (1, 2), (2, 1)])
    assert_fails(path, tmp_path / "dup.h5",
                 r"dup\.imzML: spectra 1 and 3 have the same position \(x=2, y=1, z=1\)")


_XXE = '<!DOCTYPE mzML [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
_LAUGHS = ('<!DOCTYPE mzML [<!ENTITY a "aaaaaaaaaa">'
           + "".join(f'<!ENTITY {c} "{("&" + p + ";") * 10}">' for p, c in zip("abcdefgh", "bcdefghi"))
           + ']>\n')


@pytest.mark.parametrize("doctype,ref", [(_XXE, "&xxe;"), (_LAUGHS, "&i;")])
def test_hostile_xml_refused(small, doctype, ref):
    path, _s, _c, out = small
    edit_xml(path, lambda t: t.replace("?>\n", "?>\n" + doctype, 1)
             .replace("<fileContent>", f"<fileContent>{ref}", 1))
    with pytest.raises(InputError, match=r"small\.imzML: the XML declares a DOCTYPE"):
        read_imzml_header(path)
    assert_fails(path, out, r"DOCTYPE")


@pytest.mark.parametrize("content,match", [
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", r"x\.imzML: not a well-formed XML"),
    (b'<?xml version="1.0"?><html><body/></html>', r"x\.imzML: not an imzML file \(root element"),
    (b'<mzML xmlns="http://psi.hupo.org/ms/mzml"><run/></mzML>', r"no <spectrumList>"),
])
def test_not_imzml(tmp_path, content, match):
    path = tmp_path / "x.imzML"
    path.write_bytes(content)
    path.with_suffix(".ibd").write_bytes(b"\x00" * 16)
    assert_fails(path, tmp_path / "x.h5", match)


def test_missing_imzml(tmp_path):
    assert_fails(tmp_path / "nope.imzML", tmp_path / "nope.h5", r"nope\.imzML: imzML file not found")


# --------------------------------------------------------------------------------------------------
# bad inputs that used to get through (issue 17)
# --------------------------------------------------------------------------------------------------

def _digest(*paths):
    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


def test_outputs_never_overwrite_the_inputs(small):
    """convert and export refuse an output that is the imzML, its .ibd (any letter case, through a
    link) or, for export, the imzML the converted file came from; the raw data stay identical."""
    path, _s, _c, out = small
    ibd = path.with_suffix(".ibd")
    before = _digest(path, ibd)
    link = out.parent / "link.h5"
    link.symlink_to(ibd)
    for target in (path, ibd, path.with_suffix(".IBD"), link):
        with pytest.raises(InputError, match="the output would overwrite the input"):
            convert_imzml(path, target)
    convert_imzml(path, out)
    with pytest.raises(InputError, match=r"small\.imzML: the output would overwrite the input"):
        export_imzml(out, path)
    assert _digest(path, ibd) == before


def _in_group(gid, old, new):
    """Edit replacing ``old`` by ``new`` inside the referenceableParamGroup ``gid`` only."""
    def edit(text):
        i = text.index(f'<referenceableParamGroup id="{gid}">')
        j = text.index("</referenceableParamGroup>", i)
        return text[:i] + text[i:j].replace(old, new) + text[j:]
    return edit


_F32 = 'accession="MS:1000521" name="32-bit float"'
_F64 = 'accession="MS:1000523" name="64-bit float"'


@pytest.mark.parametrize("int_dtype,old,new", [
    (np.float64, _F64, 'accession="MS:1000521" name="64-bit float"'),   # accession says 32-bit
    (np.float32, _F32, 'accession="MS:1000523" name="32-bit float"'),   # accession says 64-bit
], ids=["accession 32-bit, name 64-bit", "accession 64-bit, name 32-bit"])
def test_data_type_contradiction_settled_by_encoded_length(tmp_path, caplog, int_dtype, old, new):
    """A data-type accession contradicted by its name: the encoded lengths decide (the values
    are read exactly, with a warning naming the contradiction), never garbage or "truncated"."""
    spectra = random_spectra(5, int_dtype=int_dtype)
    path = write_imzml(tmp_path / "c", spectra, [(i + 1, 1) for i in range(5)], int_dtype=int_dtype)
    edit_xml(path, _in_group("intensityArray", old, new))
    with caplog.at_level(logging.WARNING, logger="msifusion.imzml"):
        convert_imzml(path, tmp_path / "c.h5")
    _r, _mzs, ints = read_all(tmp_path / "c.h5")
    for got, (_mz, want) in zip(ints, spectra):
        np.testing.assert_array_equal(got, want)
    assert any("intensity arrays' data type is contradictory" in m for m in caplog.messages)


def test_wrong_data_type_named_in_the_truncation_message(tmp_path):
    """Accession and name agree on 64-bit, the data and encoded lengths are 32-bit: the arrays
    run past the .ibd, and the message points at the data type instead of only the file."""
    path = write_imzml(tmp_path / "w", random_spectra(3), [(1, 1), (2, 1), (3, 1)])
    edit_xml(path, _in_group("intensityArray", _F32, _F64))
    assert_fails(path, tmp_path / "w.h5", r"the \.ibd is truncated .*its encoded length "
                 r"\(IMS:1000104\) is \d+ bytes, not \d+ x 8: is the data type \(float64\) wrong\?")


def test_data_type_contradiction_without_encoded_length_refused(tmp_path):
    spectra = random_spectra(3, int_dtype=np.float64)
    path = write_imzml(tmp_path / "c", spectra, [(1, 1), (2, 1), (3, 1)], int_dtype=np.float64)
    edit_xml(path, _in_group("intensityArray", _F64, 'accession="MS:1000521" name="64-bit float"'))
    edit_xml(path, lambda t: re.sub(r'<cvParam[^>]*IMS:1000104[^>]*/>', "", t))
    assert_fails(path, tmp_path / "c.h5",
                 r"c\.imzML: the intensity arrays' data type is contradictory: accession "
                 r"MS:1000521 means 32-bit float but the cvParam is named '64-bit float', and no "
                 r"external encoded length")


def _pixel_param(unit_attrs):
    return lambda t: t.replace("</scanSettings>", '<cvParam cvRef="IMS" accession="IMS:1000046" '
                               f'name="pixel size x" value="20000" {unit_attrs}/>\n</scanSettings>', 1)


def test_pixel_size_unit_by_name_and_contradiction(small, caplog):
    path, *_ = small
    edit_xml(path, _pixel_param('unitName="nanometer"'))
    assert read_imzml_header(path)["pixel_size_um"] == 20.0
    edit_xml(path, lambda t: t.replace('unitName="nanometer"',
                                       'unitAccession="UO:0000017" unitName="nanometer"'))
    with caplog.at_level(logging.WARNING, logger="msifusion.imzml"):
        assert read_imzml_header(path)["pixel_size_um"] is None
    assert any("unit accession UO:0000017 contradicts the unit name 'nanometer'" in m
               for m in caplog.messages)


@pytest.mark.parametrize("mode", ["processed", "continuous"])
def test_non_positive_mz_refused(tmp_path, mode):
    spectra = [([0.0, 200.0], [1.0, 2.0])] * 3 if mode == "continuous" else \
        [([100.0, 200.0], [1.0, 2.0]), ([-5.0, 200.0], [1.0, 2.0]), ([100.0], [1.0])]
    path = write_imzml(tmp_path / "m", spectra, [(1, 1), (2, 1), (3, 1)], mode=mode)
    match = (r"m\.imzML: spectrum 0: m/z value 0\.0 is not positive in the shared m/z array"
             if mode == "continuous" else r"m\.imzML: spectrum 1: m/z value -5\.0 is not positive")
    assert_fails(path, tmp_path / "m.h5", match)


def test_all_spectra_empty_refused(tmp_path):
    spectra = [([100.0, 200.0], [0.0, 0.0])] * 3
    path = write_imzml(tmp_path / "e", spectra, [(1, 1), (2, 1), (3, 1)])
    assert_fails(path, tmp_path / "e.h5", r"e\.imzML: all 3 spectra are empty")


def test_stated_image_size_far_above_the_positions_not_believed(small, caplog):
    """A "max count of pixels y" typo (200000 for 2) would size every image of the file (the
    NMF then asked for 298 GiB): the grid follows the positions, with a warning."""
    path, _s, _c, out = small
    edit_xml(path, lambda t: t.replace('name="max count of pixels y" value="2"',
                                       'name="max count of pixels y" value="200000"'))
    with caplog.at_level(logging.WARNING, logger="msifusion.convert"):
        assert convert_imzml(path, out)["image_shape"] == (2, 3)
    assert ConvertedReader(out).image_shape == (2, 3)
    assert any("max count of pixels y (200000) is far above the positions reached (2)" in m
               for m in caplog.messages)


def _first_value(name, value, count=1):
    return lambda t: re.sub(rf'(name="{name}" value=")\d+"', rf'\g<1>{value}"', t, count=count)


@pytest.mark.parametrize("edit,match", [
    (_first_value("external offset", 2 ** 63),
     r"spectrum 0: external offset 9223372036854775808 is beyond the 64-bit range"),
    (_first_value("external offset", 2 ** 64),
     r"spectrum 0: external offset 18446744073709551616 is beyond the 64-bit range"),
    (_first_value("external array length", 2 ** 61, count=2),   # 8-byte values: 2^64 bytes
     r"small\.ibd: spectrum 0: m/z array at offset 16 with 2305843009213693952 values ends at "
     r"byte 18446744073709551632, beyond the end of the file"),
], ids=["offset 2^63", "offset 2^64", "length 2^61"])
def test_huge_offsets_and_lengths_refused(small, edit, match):
    path, _s, _c, out = small
    edit_xml(path, edit)
    assert_fails(path, out, match, verify_checksum=False)


def test_directory_and_bracketed_names(tmp_path):
    """A directory given as the imzML is named as such; an .ibd in another letter case beside an
    imzML whose name holds glob characters is found."""
    (tmp_path / "d.imzML").mkdir()
    assert_fails(tmp_path / "d.imzML", tmp_path / "d.h5", r"d\.imzML: is a directory")
    path = write_imzml(tmp_path / "s[1]", random_spectra(3), [(1, 1), (2, 1), (3, 1)])
    path.with_suffix(".ibd").rename(tmp_path / "s[1].IBD")
    assert convert_imzml(path, tmp_path / "s.h5")["n_pixels"] == 3


def test_to_image_refuses_pixels_on_one_cell(tmp_path):
    write_converted(tmp_path / "d.h5", indptr=np.array([0, 1, 2]), mz=np.array([100.0, 100.0]),
                    intensity=np.array([1.0, 2.0]), xy=np.array([[1, 0], [1, 0]]))
    with pytest.raises(InputError, match=r"d\.h5: pixels 0 and 1 lie on the same grid cell "
                                         r"\(x=1, y=0\)"):
        ConvertedReader(tmp_path / "d.h5").to_image(np.array([1.0, 2.0]))


# --------------------------------------------------------------------------------------------------
# real data
# --------------------------------------------------------------------------------------------------

# one placeholder when the folder is absent, so that the skip below reports its reason
REAL_FILES = sorted(REAL.glob("*/*.imzML")) if REAL.is_dir() else [REAL / "absent.imzML"]


@pytest.mark.real
@pytest.mark.filterwarnings("ignore:Accession .* found with incorrect name:UserWarning")
@pytest.mark.skipif(not REAL.is_dir(), reason=f"real data folder {REAL} absent")
@pytest.mark.parametrize("imzml", REAL_FILES, ids=[p.name for p in REAL_FILES])
def test_real_files_match_pyimzml(imzml, tmp_path):
    """Every value equals pyimzML's reading (continuous files: zeros are implicit; m/z that the
    file lists out of order, as the MSIght prostate file does, in increasing order)."""
    out = tmp_path / "real.h5"
    summary = convert_imzml(imzml, out)
    r = ConvertedReader(out)
    with ImzMLParser(str(imzml)) as p:
        assert r.n_pixels == len(p.coordinates) == summary["n_pixels"]
        np.testing.assert_array_equal(r.xy, np.asarray(p.coordinates)[:, :2] - 1)
        np.testing.assert_array_equal(r.z, np.asarray(p.coordinates)[:, 2] - 1)
        k = 0
        for _s, _e, indptr, mz, inten in r.iter_blocks(4096, channels=True):
            for j in range(len(indptr) - 1):
                ref_mz, ref_int = p.getspectrum(k)
                # m/z out of order in the file are sorted on conversion (with a warning)
                order = np.argsort(ref_mz, kind="stable")
                ref_mz, ref_int = ref_mz[order], ref_int[order]
                got_mz, got_int = mz[indptr[j]:indptr[j + 1]], inten[indptr[j]:indptr[j + 1]]
                assert got_int.dtype == ref_int.dtype
                if r.mz_axis is not None:                 # continuous: densify on the axis
                    np.testing.assert_array_equal(r.mz_axis, ref_mz.astype(np.float64))
                    dense = np.zeros_like(ref_int)
                    dense[got_mz] = got_int
                    np.testing.assert_array_equal(dense, ref_int)
                else:
                    np.testing.assert_array_equal(got_mz, ref_mz.astype(np.float64))
                    np.testing.assert_array_equal(got_int, ref_int)
                k += 1
        assert k == r.n_pixels
    header = read_imzml_header(imzml)
    assert r.attrs["mode"] == header["mode"]
    if header["image_shape"] is not None:
        assert all(a <= b for a, b in zip(r.image_shape, header["image_shape"]))
    # the vectorised index and the full XML parse agree on every real file
    fast, full = read_index(imzml, method="fast"), read_index(imzml, method="general")
    for field in ("coords", "mz_offset", "mz_length", "int_offset", "int_length"):
        np.testing.assert_array_equal(getattr(fast, field), getattr(full, field))


# --------------------------------------------------------------------------------------------------
# zlib, export and round trips
# --------------------------------------------------------------------------------------------------

def test_zlib_compressed_arrays_exact(tmp_path):
    spectra = random_spectra(40, seed=5)
    path = write_imzml(tmp_path / "z", spectra, [(i % 8 + 1, i // 8 + 1) for i in range(40)],
                       zlib=True)
    assert "zlib" in path.read_text(encoding="latin-1")
    convert_imzml(path, tmp_path / "z.h5", block_bytes=100)
    _r, mzs, ints = read_all(tmp_path / "z.h5")
    for (mz, inten), m, i in zip(spectra, mzs, ints):
        np.testing.assert_array_equal(m, mz)
        np.testing.assert_array_equal(i, inten)


def test_corrupt_zlib_array(tmp_path):
    path = write_imzml(tmp_path / "z", random_spectra(3, seed=5), [(1, 1), (2, 1), (3, 1)],
                       zlib=True)
    index = read_index(path)
    with open(path.with_suffix(".ibd"), "r+b") as fh:
        fh.seek(int(index.int_offset[2]))
        fh.write(b"\xff\xff\xff")
    assert_fails(path, tmp_path / "z.h5", r"z\.ibd: spectrum 2: intensity array cannot be "
                 r"decompressed", verify_checksum=False)


def h5_arrays(path):
    r = ConvertedReader(path)
    blocks = list(r.iter_blocks(10 ** 6, channels=True))
    mz = np.concatenate([b[3] for b in blocks])
    inten = np.concatenate([b[4] for b in blocks])
    return r, mz, inten


def assert_same_converted(a, b):
    ra, mza, ia = h5_arrays(a)
    rb, mzb, ib = h5_arrays(b)
    np.testing.assert_array_equal(ra.indptr, rb.indptr)
    np.testing.assert_array_equal(mza, mzb)
    assert ia.dtype == ib.dtype
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(ra.xy, rb.xy)
    np.testing.assert_array_equal(ra.z, rb.z)
    if ra.mz_axis is None:
        assert rb.mz_axis is None
    else:
        np.testing.assert_array_equal(ra.mz_axis, rb.mz_axis)
    for key in ("mode", "spectrum_type", "polarity", "image_shape", "mz_range", "instrument"):
        assert ra.attrs[key] == rb.attrs[key], key
    assert ra.pixel_size_um == rb.pixel_size_um


@pytest.mark.parametrize("mode", ["processed", "continuous"])
def test_export_round_trip_exact(tmp_path, mode):
    """convert -> export -> convert gives the same arrays, readable by pyimzML too."""
    if mode == "processed":
        spectra = random_spectra(30, seed=7, int_dtype=np.int32)
    else:
        axis = np.linspace(300, 900, 25)
        rng = np.random.default_rng(8)
        spectra = [(axis, np.where(rng.random(25) < 0.6, 0, rng.integers(1, 99, 25)).astype(np.float64))
                   for _ in range(30)]
    coords = [(i % 6 + 1, i // 6 + 1, 1 + (i >= 24)) for i in range(30)]
    src = write_imzml(tmp_path / "src", spectra, coords, mode=mode,
                      int_dtype=spectra[0][1].dtype.type, spec_type="centroid")
    edit_xml(src, add_pixel_size)
    convert_imzml(src, tmp_path / "a.h5")
    summary = export_imzml(tmp_path / "a.h5", tmp_path / "out" / "b.imzML")
    assert summary["mode"] == mode and summary["n_pixels"] == 30
    convert_imzml(tmp_path / "out" / "b.imzML", tmp_path / "b.h5")
    assert_same_converted(tmp_path / "a.h5", tmp_path / "b.h5")
    with ImzMLParser(str(tmp_path / "out" / "b.imzML")) as p:
        np.testing.assert_array_equal(p.coordinates, coords)
        for k, (mz, inten) in enumerate(spectra):
            rm, ri = p.getspectrum(k)
            np.testing.assert_array_equal(rm, mz)
            np.testing.assert_array_equal(ri, inten)


def test_export_top_n(tmp_path):
    spectra = [([100.0, 200.0, 300.0, 400.0], [5.0, 1.0, 7.0, 5.0]), ([150.0], [2.0]),
               ([120.0, 130.0, 140.0], [3.0, 9.0, 1.0])]
    src = write_imzml(tmp_path / "t", spectra, [(1, 1), (2, 1), (3, 1)])
    convert_imzml(src, tmp_path / "t.h5")
    export_imzml(tmp_path / "t.h5", tmp_path / "top.imzML", top_n=2)
    with ImzMLParser(str(tmp_path / "top.imzML")) as p:
        got = [tuple(map(list, p.getspectrum(k))) for k in range(3)]
    assert got == [([100.0, 300.0], [5.0, 7.0]), ([150.0], [2.0]), ([120.0, 130.0], [3.0, 9.0])]


def test_export_fused_product(tmp_path):
    from msifusion.products import write_fused

    rng = np.random.default_rng(9)
    maps = rng.random((3, 4, 5)).astype(np.float32)
    maps[:, 0, 0] = np.nan                                     # not acquired
    maps[1, 3, 4] = -2.0                                       # negative prediction
    spectra = rng.random((3, 6)).astype(np.float32)
    mz = np.linspace(700, 800, 6)
    write_fused(tmp_path / "f.h5", maps, spectra, mz, origin_xy=(3, 2), pixel_size_um=5.0,
                reference="fticr")
    summary = export_imzml(tmp_path / "f.h5", tmp_path / "f.imzML")
    assert summary["mode"] == "continuous" and summary["n_pixels"] == 19
    expect = np.maximum(np.einsum("kyx,km->yxm", maps, spectra), 0)
    assert summary["clipped"] == int((np.einsum("kyx,km->yxm", maps, spectra) < 0).sum())
    with ImzMLParser(str(tmp_path / "f.imzML")) as p:
        assert len(p.coordinates) == 19 and (1, 1, 1) not in p.coordinates
        for k, (x, y, _z) in enumerate(p.coordinates):
            rm, ri = p.getspectrum(k)
            np.testing.assert_array_equal(rm, mz)
            np.testing.assert_allclose(ri, expect[y - 1, x - 1], rtol=1e-6, atol=1e-7)
    assert read_imzml_header(tmp_path / "f.imzML")["pixel_size_um"] == 5.0
    summary = convert_imzml(tmp_path / "f.imzML", tmp_path / "f2.h5")
    assert summary["n_pixels"] == 19


@pytest.mark.parametrize("kw,match", [
    ({"mode": "continuous"}, r"processed data has no shared m/z axis"),
    ({"mode": "sideways"}, r"mode must be auto, continuous or processed"),
    ({"top_n": 0}, r"top_n=0 needs a positive number"),
])
def test_export_errors_leave_nothing(small, kw, match):
    path, _s, _c, out = small
    convert_imzml(path, out)
    before = set(out.parent.iterdir())
    with pytest.raises(InputError, match=match):
        export_imzml(out, out.parent / "x.imzML", **kw)
    assert set(out.parent.iterdir()) == before


def test_export_refuses_other_files(tmp_path):
    (tmp_path / "plain.h5").write_bytes(b"not hdf5")
    with pytest.raises(InputError, match=r"plain\.h5: cannot be read as HDF5"):
        export_imzml(tmp_path / "plain.h5", tmp_path / "x.imzML")
    with pytest.raises(InputError, match=r"nope\.h5: file not found"):
        export_imzml(tmp_path / "nope.h5", tmp_path / "x.imzML")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.h5"]


def test_remove_stale_parts_only_removes_atomic_temporaries(tmp_path):
    """A writer killed inside atomic_output leaves its .part file; remove_stale_parts finds it
    (also in sub-folders) and leaves every other file alone."""
    from msifusion.store import atomic_output, remove_stale_parts

    out = tmp_path / "s01" / "fused.h5"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out) as tmp:
            tmp.write_bytes(b"half")
            left = tmp
            raise KeyboardInterrupt      # the clean-up of a normal exception still runs...
    assert not left.exists()
    out.parent.mkdir(exist_ok=True)
    (out.parent / ".fused.h5.ab_cd123.part").write_bytes(b"half")   # ...SIGKILL leaves this
    keep = [out.parent / "fused.h5.part", out.parent / ".hidden.h5", tmp_path / "a.tsv"]
    for path in keep:
        path.write_bytes(b"x")
    assert remove_stale_parts(tmp_path) == [out.parent / ".fused.h5.ab_cd123.part"]
    assert all(p.exists() for p in keep)
    assert remove_stale_parts(tmp_path) == []
