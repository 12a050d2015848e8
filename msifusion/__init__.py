"""msifusion: multimodal mass spectrometry imaging fusion.

One module per pipeline stage: :mod:`convert` (imzML <-> HDF5, with :mod:`imzml` for the format),
:mod:`spectra` (m/z binning),
:mod:`nmf`, :mod:`degrid`, :mod:`tissue`, :mod:`register`, :mod:`fuse`, :mod:`products`,
plus :mod:`phantom` (demo data with ground truth) and :mod:`evaluate`.
"""

__version__ = "0.1.0"
