"""Step of the convert rule: imzML -> converted HDF5."""

from __future__ import annotations

import logging

from ..convert import convert_imzml
from ..schema import default

log = logging.getLogger("msifusion.steps.convert")


def convert_step(imzml: str, out: str, *, pixel_size_um: float | None = None,
                 block_mb: float = default("convert.block_mb"),
                 xml_chunk_mb: float = default("convert.xml_chunk_mb"),
                 verify_checksum: bool = default("convert.verify_checksum"),
                 full_xml_check: bool = default("convert.full_xml_check"),
                 threads: int = 2) -> dict:
    """Convert one imzML file to the converted HDF5 layout (block sizes in MB); a file of several
    z planes is refused before its binary data is read (the pipeline images one plane per file).

    ``pixel_size_um`` is stored only when the file states none (the workflow passes none: the
    pixel size of a section is decided at crop, :func:`msifusion.metadata.resolve_pixel_size`).
    """
    summary = convert_imzml(imzml, out, pixel_size_um=pixel_size_um,
                            block_bytes=int(block_mb * 2 ** 20),
                            chunk_bytes=int(xml_chunk_mb * 2 ** 20),
                            verify_checksum=verify_checksum, full_xml_check=full_xml_check,
                            threads=threads, max_z_planes=1)
    log.info("converted %s -> %s: %s", imzml, out, summary)
    return summary
