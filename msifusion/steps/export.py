"""Step of the export rule: a fused product (or converted file) -> imzML."""

from __future__ import annotations

import logging

from ..export import export_imzml
from ..schema import default

log = logging.getLogger("msifusion.steps.export")


def export_step(source: str, out: str, *, mode: str = default("export.mode"),
                top_n: int | None = default("export.top_n")) -> dict:
    """Write a converted file or a fused product as imzML (+ .ibd beside it)."""
    summary = export_imzml(source, out, mode=mode, top_n=top_n)
    log.info("exported %s -> %s: %s", source, out, summary)
    return summary
