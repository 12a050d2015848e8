"""Steps of the NMF rule: the NMF of a modality and its component figure."""

from __future__ import annotations

import logging

from .. import nmf, spectra
from ..figures import plot_components
from ..schema import default
from ..store import read_nmf

log = logging.getLogger("msifusion.steps.nmf")


def nmf_step(converted: dict[str, str], axis: str, out: str, *, modality: str,
             rank: int = default("modality.nmf.rank"),
             normalize: str = default("modality.nmf.normalize"),
             transform: str = default("modality.nmf.transform"),
             backend: str = default("nmf.backend"), max_iter: int = default("nmf.max_iter"),
             tol: float = default("nmf.tol"), seed: int = default("seed"),
             figure: str | None = None, device: str = default("nmf.device"),
             memory_gb: float = default("nmf.memory_gb"),
             block_pixels: int | None = default("nmf.block_pixels")) -> None:
    """Factorise all files of one modality into shared components; optional component figure."""
    ax = spectra.MzAxis.load(axis)
    res = nmf.run_nmf(converted, ax, out, rank=rank, normalize=normalize, transform=transform,
                      backend=backend, max_iter=max_iter, tol=tol, seed=seed, modality=modality,
                      device=device, memory_gb=memory_gb, block_pixels=block_pixels)
    log.info("NMF %s: rank %d, relative error %.4f after %d iterations", modality, res.W.shape[1],
             res.errors[-1], len(res.errors))
    if figure:
        components_figure(out, figure)


def components_figure(nmf_file: str, png: str, *, pixel_size_um: float | None = None) -> None:
    """Component maps beside their spectra (the published S1/S2 figure) for the first file; the
    scale bar uses ``pixel_size_um``, else the size the file states (none without either)."""
    d = read_nmf(nmf_file)
    fid, maps = next(iter(d["maps"].items()))
    px = pixel_size_um or d["map_attrs"][fid].get("pixel_size_um") or float("nan")
    plot_components(maps, d["spectra"], d["mz"], png, pixel_size_um=px)
