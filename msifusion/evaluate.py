"""Accuracy against ground truth: fused ion images vs bicubic upsampling of the coarse ion image.

Used on phantom studies (``msifusion phantom`` writes ``truth/{section}.h5``). For each section, each
finer level of the chain and each target m/z, the Pearson correlation with the noise-free truth on
the tissue is computed for (a) the fused ion image and (b) the measured reference ion image
(raw spectra summed over the +-ppm window) upsampled bicubically with the TRUE transform.
"""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

from .errors import InputError
from .schema import default
from .spectra import mz_window
from .store import ConvertedReader, atomic_output, value_rows

log = logging.getLogger("msifusion.evaluate")

COLUMNS = ("section", "level", "pixel_size_um", "target_mz", "r_fused", "r_bicubic", "n_pixels")


def raw_ion_image(reader: ConvertedReader, target_mz: float, ppm: float,
                  block_pixels: int = 65536) -> np.ndarray:
    """Measured ion image: intensities within ``target_mz +- ppm`` summed per pixel.

    Returns
    -------
    ndarray, shape (ny, nx)
        On the acquisition grid; NaN where no spectrum was acquired.
    """
    values = np.zeros(reader.n_pixels)
    for start, stop, indptr, mz, inten in reader.iter_blocks(block_pixels):
        rows = value_rows(indptr)
        keep = mz_window(mz, target_mz, ppm)
        values[start:stop] = np.bincount(rows[keep], weights=inten[keep], minlength=stop - start)
    return reader.to_image(values)


def pearson(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Pearson correlation of two images over ``mask`` (pixels finite in both)."""
    m = mask & np.isfinite(a) & np.isfinite(b)
    if m.sum() < 3:
        return float("nan")
    x, y = a[m] - a[m].mean(), b[m] - b[m].mean()
    den = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / den) if den > 0 else float("nan")


def bicubic_to_grid(coarse: np.ndarray, matrix: np.ndarray, fine_shape: tuple[int, int]) -> np.ndarray:
    """Sample a coarse image at the fine pixel centres mapped by ``matrix`` (fine -> coarse px), cubic.

    Parameters
    ----------
    coarse : ndarray, shape (nyc, nxc)
        Coarse image (NaN treated as 0).
    matrix : ndarray, shape (2, 3)
        Fine pixel (x, y, 1) -> coarse pixel (x, y).
    fine_shape : tuple
        ``(nyf, nxf)``.
    """
    ny, nx = fine_shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    m = np.asarray(matrix, dtype=np.float64)
    xc = m[0, 0] * xx + m[0, 1] * yy + m[0, 2]
    yc = m[1, 0] * xx + m[1, 1] * yy + m[1, 2]
    img = np.nan_to_num(np.asarray(coarse, dtype=np.float64))
    out = ndimage.map_coordinates(img, [yc, xc], order=3, mode="nearest")
    inside = (xc > -0.5) & (xc < img.shape[1] - 0.5) & (yc > -0.5) & (yc < img.shape[0] - 0.5)
    return np.where(inside, out, np.nan)


def _ion(fused: dict, target: float, ppm: float) -> np.ndarray:
    """The product's ion image as it ships (interpolated for a target flagged not predictable)."""
    from .products import product_ion_image

    return product_ion_image(fused, target, ppm)[0]


def evaluate_section(truth: str, fused: dict[str, str], reference: str, roi, *, targets=None,
                     ppm: float = default("targets.ppm")) -> list[dict]:
    """Rows of :data:`COLUMNS` for one section.

    Parameters
    ----------
    truth : str
        Ground-truth file of the section (written by :mod:`msifusion.phantom`).
    fused : dict
        ``{modality: fused product path}`` for the finer levels.
    reference : str
        Converted reference file holding the section.
    roi : sequence of int
        ``[x0, x1, y0, y1]`` of the section in the reference acquisition (empty: whole image).
    targets : list of float, optional
        Target m/z; defaults to the truth file's targets.
    """
    from .products import read_fused

    reader = ConvertedReader(reference)
    rows = []
    with h5py.File(truth, "r") as t:
        section = t.attrs["section"]
        section = section.decode() if isinstance(section, bytes) else str(section)
        truth_targets = np.asarray(t.attrs["targets_mz"], dtype=np.float64)
        for target in (truth_targets if targets is None or not len(targets) else targets):
            ti = int(np.argmin(np.abs(truth_targets - target)))
            if abs(truth_targets[ti] - target) > target * ppm * 1e-6:
                log.warning("%s: target m/z %.4f has no ground truth; skipped", truth, target)
                continue
            raw = raw_ion_image(reader, float(target), ppm)
            if roi is not None and len(roi):
                x0, x1, y0, y1 = roi
                raw = raw[y0:y1, x0:x1]
            for modality, path in fused.items():
                g = t[modality]
                true_img = g["ion_images"][ti]
                mask = g["mask"][()]
                pred = _ion(read_fused(path), float(target), ppm)
                if pred.shape != true_img.shape:
                    raise ValueError(f"{path}: fused grid {pred.shape} differs from the truth grid "
                                     f"{true_img.shape} in {truth}")
                bic = bicubic_to_grid(raw, g["matrix_to_reference"][()], true_img.shape)
                valid = mask & np.isfinite(pred) & np.isfinite(bic)
                rows.append(dict(section=section, level=modality,
                                 pixel_size_um=float(g.attrs["pixel_size_um"]),
                                 target_mz=float(target), r_fused=pearson(pred, true_img, valid),
                                 r_bicubic=pearson(bic, true_img, valid), n_pixels=int(valid.sum())))
    return rows


def format_table(rows: list[dict]) -> str:
    """Plain-text table of evaluation rows with a mean line per level."""
    lines = [f"{'section':<10}{'level':<12}{'px um':>7}{'target m/z':>12}{'r fused':>9}"
             f"{'r bicubic':>11}{'pixels':>9}"]
    for r in rows:
        lines.append(f"{r['section']:<10}{r['level']:<12}{r['pixel_size_um']:>7g}"
                     f"{r['target_mz']:>12.4f}{r['r_fused']:>9.3f}{r['r_bicubic']:>11.3f}"
                     f"{r['n_pixels']:>9d}")
    for level in dict.fromkeys(r["level"] for r in rows):
        sel = [r for r in rows if r["level"] == level]
        lines.append(f"{'mean':<10}{level:<12}{'':>7}{'':>12}"
                     f"{np.nanmean([r['r_fused'] for r in sel]):>9.3f}"
                     f"{np.nanmean([r['r_bicubic'] for r in sel]):>11.3f}{'':>9}")
    return "\n".join(lines)


def section_roi(section_maps: str) -> list[int]:
    """``[x0, x1, y0, y1]`` of a section maps file (``results/{section}/maps_{modality}.h5``) in its
    acquisition: the ROI as cropped, also when the sheet said ``auto``."""
    with h5py.File(section_maps, "r") as f:
        x0, y0 = (int(v) for v in f.attrs["origin_xy"])
        ny, nx = f["mask"].shape
    return [x0, x0 + nx, y0, y0 + ny]


def evaluate_study(truth: list[str], fused: list[str], reference: list[str], out: str, *,
                   sections: list[str], chain: list[str], rois: list | None = None,
                   section_maps: list[str] | None = None, targets=None,
                   ppm: float = default("targets.ppm")) -> list[dict]:
    """Evaluate every section and write a TSV table (``out``); the table is also logged.

    ``fused`` lists the products section by section in chain order (``chain[1:]`` per section).
    The sections' ROIs in the reference acquisition are ``rois`` or, when None, read from the
    reference's ``section_maps`` files (:func:`section_roi`).
    """
    finer = list(chain[1:])
    if rois is None:
        if section_maps is None or len(section_maps) != len(sections):
            raise InputError("evaluate_study: give rois or one reference section maps file per "
                             "section")
        rois = [section_roi(p) for p in section_maps]
    rows = []
    for i, section in enumerate(sections):
        paths = dict(zip(finer, fused[i * len(finer):(i + 1) * len(finer)]))
        rows += evaluate_section(truth[i], paths, reference[i], rois[i], targets=targets, ppm=ppm)
    with atomic_output(out) as tmp:
        with open(tmp, "w") as fh:
            fh.write("\t".join(COLUMNS) + "\n")
            for r in rows:
                fh.write("\t".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c])
                                   for c in COLUMNS) + "\n")
    log.info("accuracy against ground truth (Pearson r on tissue; bicubic uses the true "
             "transform):\n%s", format_table(rows))
    return rows


def read_table(path: str | Path) -> list[dict]:
    """Read a table written by :func:`evaluate_study`."""
    if not Path(path).exists():
        raise InputError(f"{path}: no evaluation table (it is written by a workflow run on a study "
                         "with 'evaluation.truth' set)")
    lines = Path(path).read_text().splitlines()
    head = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        r = dict(zip(head, line.split("\t")))
        for c in ("pixel_size_um", "target_mz", "r_fused", "r_bicubic"):
            r[c] = float(r[c])
        r["n_pixels"] = int(r["n_pixels"])
        rows.append(r)
    return rows
