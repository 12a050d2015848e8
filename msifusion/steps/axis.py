"""Steps of the m/z axis rules: a modality's m/z axis, and the check of the target m/z against the
reference's axis."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .. import spectra
from ..errors import InputError
from ..schema import default
from ..store import ConvertedReader, atomic_output

log = logging.getLogger("msifusion.steps.axis")


def axis_step(converted: list[str], out: str, *, ppm: float,
              min_pixels: int = default("modality.binning.min_pixels"),
              reference_axis: str | None = None,
              block_pixels: int = default("nmf.block_pixels")) -> None:
    """Build a modality's m/z axis from its converted files, or adopt the reference's axis."""
    if reference_axis:
        ref = spectra.MzAxis.load(reference_axis)
        axis = spectra.reference_axis(ref.centres, ppm)
        log.info("m/z axis: %d columns of the reference axis (+-%g ppm)", len(axis.centres), ppm)
    else:
        readers = [ConvertedReader(p) for p in converted]
        axis = spectra.build_axis(readers, ppm, min_pixels=min_pixels, block_pixels=block_pixels)
        log.info("m/z axis: %d columns from %d file(s) (%g ppm bins)", len(axis.centres),
                 len(readers), ppm)
    axis.save(out)


def targets_step(axis: str, out: str, *, targets: list[float],
                 ppm: float = default("targets.ppm"), modality: str = "") -> None:
    """Check that every target m/z has a column of the reference axis within +- ``ppm``.

    Runs right after the reference's m/z axis, before any NMF or registration result is needed,
    so that a target absent from the data stops the section's fusion at once. Writes a JSON
    table (target, nearest m/z, distance in ppm, columns in the window).

    Raises
    ------
    InputError
        Naming every absent target with the nearest m/z of the data and its distance.
    """
    centres = spectra.MzAxis.load(axis).centres
    rows, absent = [], []
    for t in map(float, targets):
        window = spectra.mz_window(centres, t, ppm)
        j = int(np.argmin(np.abs(centres - t))) if len(centres) else -1
        nearest = float(centres[j]) if j >= 0 else float("nan")
        dist = abs(nearest - t) / t * 1e6
        rows.append({"mz": t, "nearest_mz": nearest, "distance_ppm": dist,
                     "columns": int(window.sum())})
        if not window.any():
            absent.append(f"m/z {t:.4f}: nearest m/z in the data {nearest:.4f} ({dist:.0f} ppm "
                          "away)")
    if absent:
        raise InputError(f"targets (key 'targets.mz'): {len(absent)} of {len(rows)} target(s) "
                         f"have no m/z of the {modality or 'reference'} data within "
                         f"{ppm:g} ppm (key 'targets.ppm'): " + "; ".join(absent))
    with atomic_output(out) as tmp:
        Path(tmp).write_text(json.dumps({"ppm": float(ppm), "targets": rows}, indent=2) + "\n")
    log.info("targets: all %d within %g ppm of the %s m/z axis", len(rows), ppm, modality)
