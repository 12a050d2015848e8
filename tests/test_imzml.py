"""Tests of msifusion.imzml: the vectorised spectrum index against the full XML parse and pyimzML,
block reads of the .ibd, and the streaming writer (read back by pyimzML)."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest
from pyimzml.ImzMLParser import ImzMLParser

from msifusion.errors import InputError
from msifusion.imzml import (ImzMLStreamWriter, SpectrumIndex, _block_bounds, _parse_uints,
                             _words, iter_spectra, read_imzml_header, read_index)

from imzml_files import edit_xml, random_spectra, write_imzml

FIELDS = ("coords", "mz_offset", "mz_length", "int_offset", "int_length")


def grid(n, nx=20):
    return [(i % nx + 1, i // nx + 1, 1) for i in range(n)]


def assert_index_equal(a: SpectrumIndex, b: SpectrumIndex):
    for f in FIELDS + ("mz_encoded", "int_encoded"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    assert (a.mz_dtype, a.int_dtype) == (b.mz_dtype, b.int_dtype)


def assert_matches_pyimzml(index: SpectrumIndex, imzml):
    with ImzMLParser(str(imzml)) as p:
        np.testing.assert_array_equal(index.coords, p.coordinates)
        np.testing.assert_array_equal(index.mz_offset, p.mzOffsets)
        np.testing.assert_array_equal(index.mz_length, p.mzLengths)
        np.testing.assert_array_equal(index.int_offset, p.intensityOffsets)
        np.testing.assert_array_equal(index.int_length, p.intensityLengths)


@pytest.fixture
def many(tmp_path):
    """300 processed spectra (1-7 peaks) on a 20 x 15 grid: ~700 kB of XML."""
    spectra = random_spectra(300)
    return write_imzml(tmp_path / "many", spectra, grid(300)), spectra


# --------------------------------------------------------------------------------------------------
# index
# --------------------------------------------------------------------------------------------------

def test_fast_index_equals_full_parse_and_pyimzml(many):
    path, _ = many
    fast = read_index(path, method="fast")
    full = read_index(path, method="general")
    assert fast.method == "fast" and full.method == "general" and fast.n == 300
    assert_index_equal(fast, full)
    assert_matches_pyimzml(fast, path)
    assert fast.mz_dtype == np.float64 and fast.int_dtype == np.float32
    np.testing.assert_array_equal(fast.mz_encoded, fast.mz_length * 8)


@pytest.mark.parametrize("chunk_bytes,threads", [(1000, 1), (3000, 2), (50_000, 3)])
def test_chunks_and_threads_do_not_change_the_index(many, chunk_bytes, threads):
    """1000-byte chunks are shorter than one spectrum's XML (the reader must grow its buffer)."""
    path, _ = many
    ref = read_index(path, method="general")
    assert_index_equal(read_index(path, method="fast", chunk_bytes=chunk_bytes, threads=threads),
                       ref)


def _value_first(t):
    return re.sub(r'<cvParam accession="IMS:1000102" cvRef="IMS" name="external offset" '
                  r'value="(\d+)"/>', r'<cvParam value="\1" accession="IMS:1000102" cvRef="IMS" '
                  r'name="external offset"/>', t)


def _newlines(t):
    return t.replace('cvRef="IMS" name="position y" value=', 'cvRef="IMS" name="position y"\n  value=')


@pytest.mark.parametrize("edit,method", [
    (_value_first, "fast"),            # value before accession: read tag by tag, still fast
    (_newlines, "fast"),               # attributes on two lines
    (lambda t: t.replace('accession="IMS:1000050"', "accession='IMS:1000050'"), "general"),
    (lambda t: t.replace('<referenceableParamGroupRef ref="mzArray"/>',
                         '<referenceableParamGroupRef ref="mzArray"/><cvParam cvRef="MS" '
                         'accession="MS:1000523" name="64-bit float" value=""/>'), "general"),
    (lambda t: t.replace('<referenceableParamGroupRef ref="intensityArray"/>',
                         '<cvParam cvRef="MS" accession="MS:1000515" name="intensity array"/>'),
     "fast"),                          # array kind stated inline instead of by a group
    (lambda t: t.replace("</scanList>", "</scanList><!-- a < comment -->", 1), "general"),
])
def test_unusual_layouts_index_exactly(many, edit, method):
    path, _ = many
    ref = read_index(path)
    edit_xml(path, edit)
    index = read_index(path)
    assert index.method == method
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(index, f), getattr(ref, f), err_msg=f)


def test_fast_only_refuses_what_it_cannot_verify(many):
    path, _ = many
    edit_xml(path, lambda t: t.replace('accession="IMS:1000050"', "accession='IMS:1000050'"))
    with pytest.raises(InputError, match=r"many\.imzML: the fast index could not verify the file "
                                         r"\(not one position x per spectrum\)"):
        read_index(path, method="fast")


def _drop_second(pattern):
    def edit(t):
        first = t.index(pattern)
        second = t.index(pattern, first + 1)
        end = t.index("/>", second) + 2
        return t[:second] + t[end:]
    return edit


def _truncate_list(t):
    i = t.index("<spectrum ", len(t) // 2)
    return t[:i + 200]


@pytest.mark.parametrize("edit,match", [
    (_truncate_list, r"many\.imzML: not a well-formed XML \(imzML\) file \(unclosed token at "
                     r"line \d+, column \d+\)"),
    (_drop_second('<cvParam accession="IMS:1000051"'),
     r"many\.imzML: spectrum 1: no position y \(IMS:1000051\)"),
    (lambda t: t.replace('name="external offset" value="16"', 'name="external offset" value="1x6"'),
     r"many\.imzML: spectrum 0: external offset '1x6' is not an integer"),
    (lambda t: t.replace('<referenceableParamGroupRef ref="intensityArray"/>',
                         '<referenceableParamGroupRef ref="nosuchgroup"/>', 1),
     r"spectrum 0: binaryDataArray refers to unknown group 'nosuchgroup'"),
    (lambda t: re.sub(r'<spectrumList count="\d+"', '<spectrumList count="301"', t),
     r"many\.imzML: the spectrumList states 301 spectra but holds 300"),
    (lambda t: t.replace('<cvParam accession="IMS:1000051" cvRef="IMS" name="position y" '
                         'value="1"/>', '<cvParam accession="IMS:1000051" cvRef="IMS" '
                         'name="position y" value="1"/><cvParam accession="IMS:1000051" '
                         'cvRef="IMS" name="position y" value="2"/>', 1),
     r"many\.imzML: spectrum 0: position y stated twice"),
])
def test_malformed_spectrum_list_errors_name_the_spectrum(many, edit, match):
    path, _ = many
    edit_xml(path, edit)
    with pytest.raises(InputError, match=match):
        read_index(path)


def _in_spectrum(k, old, new):
    """Edit replacing the first ``old`` by ``new`` inside spectrum ``k`` only."""
    def edit(t):
        i = t.index(f'index="{k}"')
        j = t.index("</spectrum>", i)
        assert old in t[i:j]
        return t[:i] + t[i:j].replace(old, new, 1) + t[j:]
    return edit


@pytest.mark.parametrize("edit", [
    _in_spectrum(150, '<scanList count="1">', '<scanList count="1"'),            # no '>'
    _in_spectrum(150, 'name="no combination"/>', 'name="no combination">'),     # not closed
    _in_spectrum(150, "</scan>", "</scam>"),                                    # wrong end tag
    _in_spectrum(150, 'name="no combination"', 'name="no combination'),         # lost quote
    _in_spectrum(150, 'name="no combination"', 'name="no &combination;"'),      # entity
], ids=["unclosed tag", "start tag left open", "mismatched end tag", "unpaired quote",
        "undefined entity"])
def test_broken_tag_in_the_spectrum_list_is_not_passed(many, edit):
    """A broken tag among the spectra used to pass the fast scan (it reads only the tags it
    needs); the scan now checks the markup and leaves the file to the full parser, which names
    the line."""
    path, _ = many
    edit_xml(path, edit)
    with pytest.raises(InputError, match=r"many\.imzML: the fast index could not verify"):
        read_index(path, method="fast")
    with pytest.raises(InputError, match=r"many\.imzML: not a well-formed XML \(imzML\) file "
                                         r"\(.* at line \d+, column \d+\)"):
        read_index(path)


def test_parse_uints_exact():
    texts = [b'0"', b'7"', b'12345"', b'999999999999999999"', b'"', b'12a"', b'-1"',
             b'1234567890123456789"', b'42']
    buf = bytearray(b"".join(t + b" " for t in texts) + b"\0" * 64)
    starts = np.cumsum([0] + [len(t) + 1 for t in texts[:-1]])
    _a, w8 = _words(buf)
    values, ok = _parse_uints(w8, starts, ord('"'))
    assert ok.tolist() == [True, True, True, True, False, False, False, False, False]
    assert values[:4].tolist() == [0, 7, 12345, 999999999999999999]


# --------------------------------------------------------------------------------------------------
# .ibd reads
# --------------------------------------------------------------------------------------------------

def test_iter_spectra_misaligned_blocks(many):
    """pyimzML interleaves float64 m/z and float32 intensities: odd lengths misalign the m/z."""
    path, spectra = many
    index = read_index(path)
    assert np.any(index.mz_offset % 8 != 0)
    for block_bytes in (1, 100, 10 ** 9):
        got = []
        for start, stop, indptr, mz, inten in iter_spectra(path.with_suffix(".ibd"), index,
                                                           block_bytes=block_bytes):
            got += [(mz[indptr[j]:indptr[j + 1]], inten[indptr[j]:indptr[j + 1]])
                    for j in range(stop - start)]
        assert len(got) == 300
        for (mz, inten), (gm, gi) in zip(spectra, got):
            np.testing.assert_array_equal(gm, mz)
            np.testing.assert_array_equal(gi, inten)


def test_iter_spectra_scattered_arrays(tmp_path):
    """Arrays written in reverse order, far apart: read one by one, still exact."""
    spectra = random_spectra(20, seed=3)
    ibd = tmp_path / "x.ibd"
    offsets = []
    with open(ibd, "wb") as fh:
        fh.write(b"\0" * 16)
        for mz, inten in reversed(spectra):
            fh.write(b"\1" * 1_000_000)                        # gaps between spectra
            offsets.append((fh.tell(), fh.tell() + mz.nbytes))
            fh.write(mz.tobytes() + inten.tobytes())
    offsets = np.array(offsets[::-1])
    lengths = np.array([len(mz) for mz, _ in spectra])
    index = SpectrumIndex(coords=np.ones((20, 3), np.int64), mz_offset=offsets[:, 0],
                          mz_length=lengths, mz_encoded=-np.ones(20, np.int64),
                          int_offset=offsets[:, 1], int_length=lengths,
                          int_encoded=-np.ones(20, np.int64), mz_dtype=np.dtype("<f8"),
                          int_dtype=np.dtype("<f4"))
    (_s, _e, indptr, mz, inten), = iter_spectra(ibd, index, block_bytes=10 ** 9)
    for j, (m, i) in enumerate(spectra):
        np.testing.assert_array_equal(mz[indptr[j]:indptr[j + 1]], m)
        np.testing.assert_array_equal(inten[indptr[j]:indptr[j + 1]], i)


def test_block_bounds():
    assert _block_bounds(np.array([5, 5, 5, 5, 20, 1]), 10) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert _block_bounds(np.array([50, 1]), 10) == [(0, 1), (1, 2)]


# --------------------------------------------------------------------------------------------------
# writer
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("int_dtype", [np.float32, np.float64, np.int32, np.int64])
def test_writer_processed_read_by_pyimzml(tmp_path, int_dtype):
    spectra = random_spectra(50, seed=1, int_dtype=int_dtype)
    xy = np.array([(i % 10, i // 10) for i in range(50)])
    out = tmp_path / "w.imzML"
    with ImzMLStreamWriter(out, mode="processed", intensity_dtype=int_dtype, pixel_size_um=12.5,
                           spectrum_type="centroid", polarity="negative") as w:
        for lo, hi in ((0, 20), (20, 50)):                     # two blocks
            block = spectra[lo:hi]
            indptr = np.concatenate([[0], np.cumsum([len(m) for m, _ in block])])
            w.add_block(indptr, np.concatenate([m for m, _ in block]),
                        np.concatenate([i for _, i in block]), xy[lo:hi])
    with ImzMLParser(str(out)) as p:
        np.testing.assert_array_equal(np.array(p.coordinates)[:, :2], xy + 1)
        for k, (mz, inten) in enumerate(spectra):
            rm, ri = p.getspectrum(k)
            np.testing.assert_array_equal(rm, mz)
            np.testing.assert_array_equal(ri, inten)
            assert ri.dtype == np.dtype(int_dtype)
    h = read_imzml_header(out)
    assert h["pixel_size_um"] == 12.5 and h["mode"] == "processed"
    assert h["spectrum_type"] == "centroid" and h["polarity"] == "negative"
    assert h["image_shape"] == (5, 10)
    data = out.with_suffix(".ibd").read_bytes()
    assert data[:16].hex() == h["uuid"] and hashlib.sha1(data).hexdigest() == h["sha1"]
    assert_index_equal(read_index(out, method="fast"), read_index(out, method="general"))


def test_writer_continuous_and_deterministic(tmp_path):
    axis = np.linspace(100, 200, 7)
    rng = np.random.default_rng(2)
    dense = rng.random((6, 7)).astype(np.float32)
    xy = np.array([(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)])
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name / "c.imzML"
        out.parent.mkdir()
        with ImzMLStreamWriter(out, mode="continuous", mz_axis=axis) as w:
            w.add_block(np.arange(7) * 7, None, dense.ravel(), xy, z=np.array([0, 0, 0, 1, 1, 1]))
        outs.append(out)
    with ImzMLParser(str(outs[0])) as p:
        assert len(set(p.mzOffsets)) == 1
        for k in range(6):
            rm, ri = p.getspectrum(k)
            np.testing.assert_array_equal(rm, axis)
            np.testing.assert_array_equal(ri, dense[k])
        assert [c[2] for c in p.coordinates] == [1, 1, 1, 2, 2, 2]
    assert read_imzml_header(outs[0])["mode"] == "continuous"
    for suffix in (".imzML", ".ibd"):                          # same inputs, same bytes
        assert outs[0].with_suffix(suffix).read_bytes() == outs[1].with_suffix(suffix).read_bytes()


def test_writer_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "e.imzML"
    with pytest.raises(RuntimeError):
        with ImzMLStreamWriter(out, mode="processed") as w:
            w.add_block(np.array([0, 1]), np.array([100.0]), np.array([1.0]), np.array([[0, 0]]))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="no spectra to write"):
        with ImzMLStreamWriter(out, mode="processed"):
            pass
    assert list(tmp_path.iterdir()) == []
