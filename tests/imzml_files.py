"""Shared test helpers: small imzML files written with pyimzML, and edits of their XML."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pyimzml.compression import NoCompression, ZlibCompression
from pyimzml.ImzMLWriter import ImzMLWriter


def write_imzml(path, spectra, coords, *, mode="processed", mz_dtype=np.float64,
                int_dtype=np.float32, spec_type="profile", polarity="positive", zlib=False):
    """Write (mz, intensity) pairs at 1-based ``coords`` with pyimzml; return the .imzML path."""
    comp = ZlibCompression() if zlib else NoCompression()
    with ImzMLWriter(str(path), mz_dtype=mz_dtype, intensity_dtype=int_dtype, mode=mode,
                     spec_type=spec_type, polarity=polarity, mz_compression=comp,
                     intensity_compression=comp) as w:
        for (mz, inten), c in zip(spectra, coords):
            w.addSpectrum(np.asarray(mz), np.asarray(inten), tuple(c))
    return Path(path).with_suffix(".imzML")


def edit_xml(imzml, fn):
    """Rewrite the imzML text with ``fn(text) -> text`` (the .ibd stays untouched)."""
    text = imzml.read_text(encoding="latin-1")
    new = fn(text)
    assert new != text, "edit did not change the file"
    imzml.write_text(new, encoding="latin-1")


def random_spectra(n, seed=0, max_len=7, mz_dtype=np.float64, int_dtype=np.float32):
    """``n`` processed spectra of 1..max_len peaks with sorted m/z in 100-1000."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, max_len + 1))
        mz = np.sort(rng.uniform(100, 1000, k)).astype(mz_dtype)
        out.append((mz, (rng.integers(0, 5000, k) / 8).astype(int_dtype)))
    return out
