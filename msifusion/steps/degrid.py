"""Steps of the grid-removal rules: on the component maps (after NMF) or on the converted spectra."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..degrid import degrid_converted, degrid_nmf_file
from ..figures import plot_before_after
from ..schema import default
from ..store import atomic_output
from .nmf import components_figure

log = logging.getLogger("msifusion.steps.degrid")


def _degrid_qc(reports: dict, qc_png: str | None, report_json: str | None) -> None:
    """Before/after total images with their grid energy (PNG, first file) and a JSON report."""
    if qc_png:
        fid, r = next(iter(reports.items()))
        plot_before_after(
            r["before"], r["after"], qc_png, pixel_size_um=r["pixel_size_um"],
            titles=(f"before: grid energy {r['energy_before']:.4f}",
                    f"after: grid energy {r['energy_after']:.4f}"),
            suptitle=f"{fid}: tile {r['tile'][0]} x {r['tile'][1]} px, {r['method']} "
                     f"({r['stage'].replace('_', ' ')})", label="total intensity")
    if report_json:
        doc = {fid: {k: (v.tolist() if k == "gains" else v) for k, v in r.items()
                     if k not in ("before", "after", "pixel_size_um")}
               for fid, r in reports.items()}
        with atomic_output(report_json) as tmp:
            Path(tmp).write_text(json.dumps(doc, indent=2) + "\n")


def degrid_step(nmf_in: str, out: str, *, tile_px: int | None = default("modality.grid.tile_px"),
                method: str = default("modality.grid.method"), figure: str | None = None, qc: str | None = None,
                report: str | None = None) -> None:
    """Remove the scan-tile grid from a modality's component maps (after NMF); QC figure of the
    total image before/after and a JSON report of the grid energy per file."""
    reports: dict = {}
    degrid_nmf_file(nmf_in, out, tile=tile_px, method=method, report=reports)
    if figure:
        components_figure(out, figure)
    _degrid_qc(reports, qc, report)


def degrid_converted_step(converted: str, out: str, *,
                          tile_px: int | None = default("modality.grid.tile_px"),
                          method: str = default("modality.grid.method"),
                          mz_blocks: int = default("modality.grid.mz_blocks"), qc: str | None = None,
                          report: str | None = None) -> None:
    """Remove the scan-tile grid from one converted file (before NMF, sparse, value by value)."""
    rep: dict = {}
    degrid_converted(converted, out, tile=tile_px, method=method, mz_blocks=mz_blocks,
                     report=rep)
    _degrid_qc({Path(converted).stem: rep}, qc, report)
