"""Step of the products rule: ion images and ROI mean spectra of one section at every level."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..figures import plot_spectrum, save_image_png
from ..products import (not_predictable_note, product_ion_image, product_tissue_mask, read_fused,
                        region_mask, region_on_grid, roi_mean_spectrum, save_tiff)
from ..schema import default
from ..store import atomic_output
from .section import read_section_maps

log = logging.getLogger("msifusion.steps.products")


def products_step(reference_maps: str, fused: list[str], out_dir: str, *,
                  targets: list[float] = default("targets.mz"),
                  ppm: float = default("targets.ppm"), rois: list[dict] | None = None,
                  outputs: list[str] | None = None) -> list[str]:
    """Ion images (PNG + float TIFF) of every target at every level, and ROI mean spectra.

    Level 0 is the reference's own component maps; the others are the fused products. Mean
    spectra average the tissue pixels of each level (its tissue mask). ``rois``: named regions (``name``, ``box`` or ``mask``, optional ``level``; see the config
    schema) whose mean spectra at every level go to ``roi_{name}.tsv`` and ``.png``.
    Returns the list of files written.
    """
    ref = read_section_maps(reference_maps)
    # every level as a product (the reference: its own maps, flagging nothing)
    products = [dict(maps=ref["maps"], spectra=ref["spectra"], mz=ref["mz"],
                     extra={"matrix_to_reference": np.eye(2, 3)})]
    levels = [(ref["modality"], ref["maps"], ref["mask"], float(ref["pixel_size_um"]),
               products[0]["extra"])]
    for path in fused:
        d = read_fused(path)
        products.append(d)
        levels.append((_modality_of(path), d["maps"], product_tissue_mask(d),
                       float(d["pixel_size_um"]), d["extra"]))
    written, spectra_by_level = [], {}
    for (modality, maps, mask, px, extra), product in zip(levels, products):
        spectra_by_level[f"{modality} ({px:g} um)"] = roi_mean_spectrum(ref["spectra"], maps, mask)
        for mz in targets:
            img, flag = product_ion_image(product, mz, ppm)
            stem = Path(out_dir) / f"ion_{modality}_mz{mz:.4f}"
            title = f"{ref['section']}: m/z {mz:.4f} +- {ppm:g} ppm, {modality} grid"
            if flag is not None:
                title += "\n" + not_predictable_note(flag)
            save_image_png(img, f"{stem}.png", pixel_size_um=px, title=title,
                           label="intensity (a.u.)")
            save_tiff(img, f"{stem}.tif", pixel_size_um=px)
            written += [f"{stem}.png", f"{stem}.tif"]
    png = str(Path(out_dir) / "roi_mean_spectra.png")
    plot_spectrum(ref["mz"], spectra_by_level, png, title=f"{ref['section']}: tissue mean spectra",
                  targets=targets)
    written.append(png)
    for roi in rois or []:
        written += _roi_spectra(roi, levels, ref, out_dir, targets)
    missing = sorted(set(outputs or []) - set(map(str, written)))
    if missing:
        raise RuntimeError(f"products step did not write {missing}")
    return written


def _roi_spectra(roi: dict, levels: list, ref: dict, out_dir: str, targets) -> list[str]:
    """Mean spectra of one configured ROI at every level: ``roi_{name}.tsv`` and ``.png``."""
    names = [lv[0] for lv in levels]
    level = roi.get("level", names[0])
    if level not in names:
        raise InputError(f"roi {roi['name']!r}: level {level!r} is not in the chain {names}")
    own = levels[names.index(level)]
    region = region_mask(roi, own[1].shape[1:])
    columns, counts = {}, {}
    for modality, maps, mask, px, extra in levels:
        sel = region_on_grid(maps.shape[1:], extra["matrix_to_reference"], region,
                             own[4]["matrix_to_reference"]) & mask
        counts[modality] = int(sel.sum())
        if sel.any():
            columns[f"{modality} ({px:g} um)"] = roi_mean_spectrum(ref["spectra"], maps, sel)
        else:
            log.warning("section %r: roi %r holds no tissue pixel of %s", ref["section"],
                        roi["name"], modality)
            columns[f"{modality} ({px:g} um)"] = np.full(len(ref["mz"]), np.nan)
    stem = Path(out_dir) / f"roi_{roi['name']}"
    with atomic_output(f"{stem}.tsv") as tmp:
        with open(tmp, "w") as fh:
            fh.write(f"# section {ref['section']}, roi {roi['name']} given on {level}; tissue pixels "
                     + ", ".join(f"{m} {n}" for m, n in counts.items()) + "\n")
            fh.write("\t".join(["mz"] + list(columns)) + "\n")
            for i, mz in enumerate(ref["mz"]):
                fh.write("\t".join([f"{mz:.6f}"] + [f"{c[i]:.6g}" for c in columns.values()])
                         + "\n")
    plot_spectrum(ref["mz"], {k: v for k, v in columns.items() if np.isfinite(v).all()},
                  f"{stem}.png", title=f"{ref['section']}: roi {roi['name']} mean spectra",
                  targets=targets)
    return [f"{stem}.tsv", f"{stem}.png"]


def _modality_of(fused_path: str) -> str:
    return Path(fused_path).stem.removeprefix("fused_")
