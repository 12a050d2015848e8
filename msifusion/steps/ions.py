"""Step of the ion_images rule: the targets' measured ion images over one section of the
reference, and their reader."""

from __future__ import annotations

import logging

import h5py
import numpy as np

from ..errors import InputError
from ..schema import default
from ..spectra import measured_ion_images
from ..store import ConvertedReader, atomic_output, plain_attr

log = logging.getLogger("msifusion.steps.ions")


def ion_images_step(converted: str, maps: str, out: str, *, targets: list[float],
                    ppm: float = default("targets.ppm")) -> None:
    """Measured ion images of the targets over one section of the reference.

    Parameters
    ----------
    converted : str
        The reference's converted file holding the section.
    maps : str
        The section maps file of the reference (:func:`crop_step`: its ROI origin and shape).
    out : str
        HDF5 file: ``images`` (T, ny, nx) float32 on the section's grid, NaN where not acquired;
        attrs ``targets_mz``, ``ppm``, ``origin_xy``, ``section``, ``modality``.
    targets, ppm : list of float, float
        Target m/z and window half-width (ppm).
    """
    with h5py.File(maps, "r") as f:
        ny, nx = f["acquired"].shape
        x0, y0 = (int(v) for v in f.attrs["origin_xy"])
        section, modality = (plain_attr(f.attrs[k]) for k in ("section", "modality"))
    images = measured_ion_images(ConvertedReader(converted), targets, ppm)[:, y0:y0 + ny, x0:x0 + nx]
    if images.shape[1:] != (ny, nx):
        raise InputError(f"{converted}: the section {section!r} ({nx} x {ny} px at {x0}, {y0}) "
                         f"does not fit in the acquisition ({images.shape[2]} x {images.shape[1]})")
    log.info("section %r, %s: measured ion images of %d targets (+- %g ppm), %d x %d px", section,
             modality, len(targets), ppm, nx, ny)
    with atomic_output(out) as tmp, h5py.File(tmp, "w") as f:
        f["images"] = images.astype(np.float32)
        f.attrs.update(targets_mz=np.asarray(targets, np.float64), ppm=float(ppm), origin_xy=(x0, y0),
                       section=section, modality=modality)


def read_ion_images(path: str) -> dict:
    """Read a file written by :func:`ion_images_step`: ``images`` and its attributes."""
    with h5py.File(path, "r") as f:
        d = {"images": f["images"][()].astype(np.float64)}
        d.update({k: plain_attr(v) for k, v in f.attrs.items()})
    return d
