"""Pipeline steps: one function per workflow job, taking plain paths and parameters.

The Snakemake scripts and the command line both call these, so that a stage behaves the same inside
and outside the workflow. Algorithms live in the stage modules; these functions only read inputs,
call them, check the results and write outputs atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np

from .errors import InputError, QualityError
from .store import atomic_output, plain_attr

log = logging.getLogger("msifusion.pipeline")


# ----------------------------------------------------------------------------------------- stage 1
def convert_step(imzml: str, out: str, *, pixel_size_um: float | None = None,
                 block_mb: float = 32, xml_chunk_mb: float = 8, verify_checksum: bool = True,
                 full_xml_check: bool = False, threads: int = 2) -> dict:
    """Convert one imzML file to the converted HDF5 layout (block sizes in MB)."""
    from .convert import convert_imzml

    summary = convert_imzml(imzml, out, pixel_size_um=pixel_size_um,
                            block_bytes=int(block_mb * 2 ** 20),
                            chunk_bytes=int(xml_chunk_mb * 2 ** 20),
                            verify_checksum=verify_checksum, full_xml_check=full_xml_check,
                            threads=threads)
    log.info("converted %s -> %s: %s", imzml, out, summary)
    return summary


def export_step(source: str, out: str, *, mode: str = "auto", top_n: int | None = None) -> dict:
    """Write a converted file or a fused product as imzML (+ .ibd beside it)."""
    from .convert import export_imzml

    summary = export_imzml(source, out, mode=mode, top_n=top_n)
    log.info("exported %s -> %s: %s", source, out, summary)
    return summary


# ----------------------------------------------------------------------------------------- stage 2
def axis_step(converted: list[str], out: str, *, ppm: float, min_pixels: int = 1,
              reference_axis: str | None = None, block_pixels: int = 65536) -> None:
    """Build a modality's m/z axis from its converted files, or adopt the reference's axis."""
    from . import spectra

    if reference_axis:
        ref = spectra.MzAxis.load(reference_axis)
        axis = spectra.reference_axis(ref.centres, ppm)
        log.info("m/z axis: %d columns of the reference axis (+-%g ppm)", len(axis.centres), ppm)
    else:
        from .store import ConvertedReader

        readers = [ConvertedReader(p) for p in converted]
        axis = spectra.build_axis(readers, ppm, min_pixels=min_pixels, block_pixels=block_pixels)
        log.info("m/z axis: %d columns from %d file(s) (%g ppm bins)", len(axis.centres),
                 len(readers), ppm)
    axis.save(out)


def nmf_step(converted: dict[str, str], axis: str, out: str, *, modality: str, rank: int,
             normalize: str = "none", transform: str = "none", backend: str = "hals",
             max_iter: int = 200, tol: float = 1e-4, seed: int = 0, figure: str | None = None,
             pixel_size_um: float | None = None, device: str = "auto", memory_gb: float = 8.0,
             block_pixels: int | None = None) -> None:
    """Factorise all files of one modality into shared components; optional component figure."""
    from . import nmf, spectra

    ax = spectra.MzAxis.load(axis)
    res = nmf.run_nmf(converted, ax, out, rank=rank, normalize=normalize, transform=transform,
                      backend=backend, max_iter=max_iter, tol=tol, seed=seed, modality=modality,
                      device=device, memory_gb=memory_gb, block_pixels=block_pixels)
    log.info("NMF %s: rank %d, relative error %.4f after %d iterations", modality, rank,
             res.errors[-1], len(res.errors))
    if figure:
        components_figure(out, figure, pixel_size_um=pixel_size_um)


def components_figure(nmf_file: str, png: str, *, pixel_size_um: float | None = None) -> None:
    """Component maps beside their spectra (the published S1/S2 figure) for the first file."""
    from .nmf import read_nmf
    from .products import plot_components

    d = read_nmf(nmf_file)
    fid, maps = next(iter(d["maps"].items()))
    px = pixel_size_um or d["map_attrs"][fid].get("pixel_size_um") or float("nan")
    plot_components(maps, d["spectra"], d["mz"], png, pixel_size_um=px)


def _degrid_qc(reports: dict, qc_png: str | None, report_json: str | None) -> None:
    """Before/after total images with their grid energy (PNG, first file) and a JSON report."""
    if qc_png:
        from .products import plot_before_after

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


def degrid_step(nmf_in: str, out: str, *, tile_px: int | None, method: str = "gain",
                figure: str | None = None, qc: str | None = None,
                report: str | None = None) -> None:
    """Remove the scan-tile grid from a modality's component maps (after NMF); QC figure of the
    total image before/after and a JSON report of the grid energy per file."""
    from .degrid import degrid_nmf_file

    reports: dict = {}
    degrid_nmf_file(nmf_in, out, tile=tile_px, method=method, report=reports)
    if figure:
        components_figure(out, figure)
    _degrid_qc(reports, qc, report)


def degrid_converted_step(converted: str, out: str, *, tile_px: int | None, method: str = "gain",
                          mz_blocks: int = 1, qc: str | None = None,
                          report: str | None = None) -> None:
    """Remove the scan-tile grid from one converted file (before NMF, sparse, value by value)."""
    from .degrid import degrid_converted

    rep: dict = {}
    degrid_converted(converted, out, tile=tile_px, method=method, mz_blocks=mz_blocks,
                     report=rep)
    _degrid_qc({Path(converted).stem: rep}, qc, report)


# ----------------------------------------------------------------------------------------- stage 4
def crop_step(nmf_file: str, file_id: str, out: str, *, section: str, modality: str,
              roi: list[int] | str | None, imzml: str = "", pixel_size_um: float | None = None,
              dilation_px: int = 0, min_size_px: int = 4, seed: int = 0, auto_index: int = 0,
              auto_count: int = 1, auto_margin_px: int = 2) -> None:
    """Cut one section out of a modality's component maps and compute its tissue mask.

    Parameters
    ----------
    roi : list of int, "auto" or None
        ``[x0, x1, y0, y1]`` (0-based, half-open, acquisition pixels), None for the whole image,
        or ``"auto"``: the bounding box (plus ``auto_margin_px``) of the ``auto_index``-th of the
        ``auto_count`` tissue sections found in the acquisition, counted left to right
        (:func:`auto_roi`).
    """
    from .nmf import read_nmf
    from .tissue import tissue_mask_from_maps

    where = f"section {section!r}, modality {modality!r} ({imzml or file_id})"
    d = read_nmf(nmf_file)
    if file_id not in d["maps"]:
        raise InputError(f"{nmf_file}: no maps for file {file_id!r} ({where})")
    maps = d["maps"][file_id]
    k, ny, nx = maps.shape
    # Tissue is told from background on the whole acquisition (which holds both), then cut out,
    # so that an ROI holding only background comes out empty instead of thresholding noise.
    whole_mask = tissue_mask_from_maps(maps, dilation_px=dilation_px, min_size_px=min_size_px,
                                       seed=seed)
    if roi == "auto":
        roi = auto_roi(whole_mask, auto_index, max(int(auto_count), 1), margin_px=auto_margin_px,
                       where=where)
        log.info("%s: roi auto -> %d:%d,%d:%d (section %d of %d, left to right)", where, *roi,
                 auto_index + 1, auto_count)
    x0, x1, y0, y1 = roi if roi is not None else (0, nx, 0, ny)
    if x1 > nx or y1 > ny:
        raise InputError(f"{where}: roi {x0}:{x1},{y0}:{y1} lies outside the image "
                         f"({nx} x {ny} pixels, x by y)")
    crop = np.ascontiguousarray(maps[:, y0:y1, x0:x1])
    acquired = np.isfinite(crop).all(axis=0)
    if not acquired.any():
        raise InputError(f"{where}: roi {x0}:{x1},{y0}:{y1} contains no acquired spectrum "
                         "(empty section)")
    mask = whole_mask[y0:y1, x0:x1] & acquired
    if not mask.any():
        raise InputError(f"{where}: no tissue found in roi {x0}:{x1},{y0}:{y1} (empty section)")
    px = pixel_size_um if pixel_size_um else d["map_attrs"][file_id].get("pixel_size_um")
    if px is None or not np.isfinite(px):
        raise InputError(f"{where}: pixel size unknown: the imzML has none; set "
                         f"'modalities.{modality}.pixel_size_um' in the config")
    log.info("%s: roi %d x %d pixels, %d acquired, %d tissue", where, x1 - x0, y1 - y0,
             acquired.sum(), mask.sum())
    with atomic_output(out) as tmp, h5py.File(tmp, "w") as f:
        f["maps"] = crop.astype(np.float32)
        f["mask"] = mask
        f["acquired"] = acquired
        f["spectra"] = d["spectra"]
        f["mz"] = d["mz"]
        f.attrs.update(origin_xy=(x0, y0), pixel_size_um=float(px), modality=modality,
                       section=section, source=str(imzml))


def auto_roi(mask: np.ndarray, index: int, count: int, *, margin_px: int = 2,
             min_fraction: float = 0.1, where: str = "") -> tuple[int, int, int, int]:
    """ROI of one of the tissue sections of an acquisition, from its tissue mask.

    Connected tissue components of at least ``min_fraction`` of the largest one are sections
    (smaller ones are debris); they are ordered left to right (by the left edge of their box, then
    the top) and the ``index``-th one's bounding box, grown by ``margin_px``, is returned.

    Parameters
    ----------
    mask : ndarray of bool, shape (ny, nx)
        Tissue mask of the whole acquisition.
    index, count : int
        Which section, and how many the sections sheet expects in this acquisition.

    Returns
    -------
    (x0, x1, y0, y1)

    Raises
    ------
    InputError
        The mask holds a different number of sections than ``count`` (the boxes found are listed).
    """
    from .tissue import label_sections, propose_rois

    labels, n = label_sections(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    boxes = propose_rois(mask, margin_px)
    boxes = [b for b, size in zip(boxes, sizes) if size >= min_fraction * sizes.max()] if n else []
    boxes.sort(key=lambda b: (b[0], b[2]))
    if len(boxes) != count:
        found = ", ".join(f"{b[0]}:{b[1]},{b[2]}:{b[3]}" for b in boxes) or "none"
        raise InputError(f"{where}: roi 'auto' found {len(boxes)} tissue section(s) ({found}) but "
                         f"the sections sheet gives this file {count} section(s) with roi 'auto'; "
                         "write their ROIs as x0:x1,y0:y1")
    return boxes[index]


def read_section_maps(path: str) -> dict:
    """Read a section maps file written by :func:`crop_step`."""
    with h5py.File(path, "r") as f:
        d = {k: f[k][()] for k in ("maps", "mask", "acquired", "spectra", "mz")}
        d.update({k: plain_attr(v) for k, v in f.attrs.items()})
    return d


def total_image(d: dict) -> np.ndarray:
    """Total-ion-like image of a section maps dict: the sum of its component maps (NaN off-scan)."""
    return np.where(d["acquired"], np.nansum(d["maps"], axis=0), np.nan)


def tissue_image(d: dict) -> np.ndarray:
    """Total image with the background set to 0 (NaN off-scan), as registration input.

    Modalities differ most off tissue (a MALDI matrix gives signal there, FT-ICR gives none), so
    registration compares the tissue only.
    """
    return np.where(d["mask"], total_image(d), np.where(d["acquired"], 0.0, np.nan))


def register_step(coarse: str, fine: str, out_json: str, out_png: str, *, model: str = "rigid",
                  n_starts: int = 36, mirror: bool = False, iterations: int = 60,
                  min_score: float = 0.6, min_margin: float = 0.05, seed: int = 0) -> None:
    """Register a fine modality's section to the coarse one; write the transform JSON and QC PNG."""
    from .register import plot_overlay, register_pair

    c, f = read_section_maps(coarse), read_section_maps(fine)
    # The component maps of both sections score every placement beyond the total images
    # (register_pair's multichannel similarity).
    # Two views of each section: the tissue alone (background 0), then, when that gives no
    # confident answer, the whole total image (off-tissue signal such as substrate or matrix
    # can carry the outline). The first view that passes wins; else the better-margin failure.
    reg = None
    for view in (tissue_image, total_image):
        trial = register_pair(view(c), c["mask"], c["pixel_size_um"], view(f), f["mask"],
                              f["pixel_size_um"], model=model, n_starts=n_starts, mirror=mirror,
                              iterations=iterations, min_score=min_score, min_margin=min_margin,
                              seed=seed, coarse_channels=c["maps"], fine_channels=f["maps"])
        trial.details["view"] = view.__name__
        if reg is None or trial.passed or (not reg.passed and trial.margin > reg.margin):
            reg = trial
        if reg.passed:
            break
    doc = reg.to_json() | {"section": c["section"], "coarse": c["modality"], "fine": f["modality"]}
    plot_overlay(total_image(c), total_image(f), reg, out_png)
    with atomic_output(out_json) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=2))
    level = logging.INFO if reg.passed else logging.WARNING
    log.log(level, "section %r: %s -> %s %s", c["section"], f["modality"], c["modality"],
            registration_summary(doc))


#: Columns of :func:`registration_table_step`.
REGISTRATION_COLUMNS = ("section", "coarse", "fine", "passed", "score", "margin", "ncc",
                        "rotation_deg", "scale", "mirror", "translation_x_um", "translation_y_um")


def registration_table_step(transforms: list[str], pairs: list[list[str]], out: str) -> None:
    """The registration scores of every section and chain pair as one TSV table (atomically).

    Parameters
    ----------
    transforms : list of str
        Transform JSON files written by :func:`register_step`.
    pairs : list of [section, coarse, fine]
        One entry per transform file, in the same order.
    out : str
        Table path: one row per pair, columns :data:`REGISTRATION_COLUMNS` (``NA`` when absent);
        a pair that did not pass is also logged as a warning.
    """
    if len(transforms) != len(pairs):
        raise InputError(f"registration table: {len(transforms)} transform files for "
                         f"{len(pairs)} pairs")
    rows = []
    for path, (section, coarse, fine) in zip(transforms, pairs):
        doc = json.loads(Path(path).read_text())
        tx, ty = (doc.get("translation_um") or [None, None])[:2]
        values = dict(doc, section=section, coarse=coarse, fine=fine, translation_x_um=tx,
                      translation_y_um=ty)
        rows.append("\t".join(_cell(values.get(c)) for c in REGISTRATION_COLUMNS))
        if not doc.get("passed"):
            log.warning("section %s: %s -> %s did not pass (%s)", section, fine, coarse,
                        registration_summary(doc))
    with atomic_output(out) as tmp:
        Path(tmp).write_text("\t".join(REGISTRATION_COLUMNS) + "\n" + "".join(r + "\n" for r in rows))


def _cell(value) -> str:
    """A table cell: ``NA`` for None, ``true``/``false``, floats to 4 decimals."""
    if value is None:
        return "NA"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def registration_summary(doc: dict) -> str:
    """One line on a registration JSON: pose, quality figures and the verdict."""
    def num(source, key):  # JSON stores NaN as null
        value = source.get(key)
        return float("nan") if value is None else float(value)

    d = doc.get("details", {})
    return (f"rotation {num(doc, 'rotation_deg'):.2f} deg, mask Dice {num(doc, 'score'):.3f} "
            f"(min {num(d, 'min_score'):g}), margin {num(doc, 'margin'):.3f} "
            f"(min {num(d, 'min_margin'):g}), outline agreement {num(doc, 'boundary'):.3f} "
            f"(min {num(d, 'min_boundary'):g}) or NCC {num(doc, 'ncc'):.3f} "
            f"(min {num(d, 'min_ncc'):g}): " + ("passed" if doc.get("passed") else "FAILED"))


# ----------------------------------------------------------------------------------------- stage 5
def fuse_step(maps: list[str], transforms: list[str], outs: list[str], report: str, *,
              method: str = "ridge", n_components: int = 10, scales_px=(0, 1, 2, 4),
              alpha_se: float = 0.25, consistency: bool | str = False, min_coverage: float = 0.9,
              targets: list[float] | None = None, ppm: float = 5.0, min_target_r: float = 0.5,
              seed: int = 0) -> None:
    """Chained fusion of one section: predict reference maps at every finer level.

    Parameters
    ----------
    maps : list of str
        Section maps files in chain order (reference first).
    transforms : list of str
        Registration JSON files of the adjacent pairs, in chain order.
    outs : list of str
        Fused product paths for ``maps[1:]``.
    report : str
        JSON file with the cross-validated scores per level and component, and per target.
    targets, ppm : list of float, float
        Target m/z (+- ppm) scored per level (:func:`msifusion.fuse.target_scores`); a target whose
        cross-validated r at some step of the chain up to a level is below ``min_target_r`` is
        flagged as not predictable at that level (and every finer one) in the products, the
        report and the log.
    """
    from .fuse import fuse_chain, target_scores
    from .spectra import mz_window
    from .products import write_fused
    from .register import Registration, chain_to_reference, pose

    levels = [read_section_maps(p) for p in maps]
    regs = []
    for path in transforms:
        doc = json.loads(Path(path).read_text())
        if not doc.get("passed", False):
            qc = Path(path).with_name(Path(path).stem.replace("transform", "qc") + ".png")
            raise QualityError(
                f"section {doc.get('section')!r}: registration {doc.get('fine')} -> "
                f"{doc.get('coarse')} {registration_summary(doc)}; not fusing it. Inspect {qc}, "
                "fix the ROI, or change registration.min_score / min_margin")
        regs.append(Registration.from_json(doc))
    ref = levels[0]
    target = np.where(ref["acquired"][None], ref["maps"], np.nan)
    results = fuse_chain(
        [dict(maps=target, mask=ref["mask"])] + [dict(maps=lv["maps"], mask=lv["mask"]) for lv in
                                                 levels[1:]],
        [r.matrix for r in regs], method=method, n_components=n_components,
        scales_px=tuple(scales_px), alpha_se=alpha_se, consistency=consistency,
        min_coverage=min_coverage, seed=seed)
    summary = {"section": ref["section"], "reference": ref["modality"], "method": method,
               "min_target_r": float(min_target_r), "levels": []}
    to_ref = chain_to_reference([r.matrix for r in regs])
    targets = [float(t) for t in (targets or [])]
    weights = np.array([ref["spectra"][:, mz_window(ref["mz"], t, ppm)].sum(axis=1)
                        for t in targets], dtype=np.float64).reshape(len(targets), len(ref["spectra"]))
    chain_r = np.full(len(targets), np.inf)
    step_target = target
    # per target: its image at the last level where it was predictable, and that grid -> reference
    ref_images = np.tensordot(weights, np.nan_to_num(ref["maps"].astype(np.float64)), axes=1)
    trusted = [(img, np.eye(2, 3)) for img in ref_images]
    for lv, res, out, m_ref in zip(levels[1:], results, outs, to_ref):
        r_t, resid_t = target_scores(weights, step_target, res.residual, res.info["train_mask"])
        chain_r = np.fmin(chain_r, np.where(np.isfinite(r_t), r_t, -np.inf))
        ok = chain_r >= min_target_r
        step_target = res.pred
        images = _target_images(weights, res.pred, ok, trusted, m_ref)
        trusted = [(img, m_ref) if o else t for img, o, t in zip(images, ok, trusted)]
        write_fused(out, res.pred, ref["spectra"], ref["mz"], origin_xy=tuple(lv["origin_xy"]),
                    pixel_size_um=float(lv["pixel_size_um"]), reference=ref["modality"],
                    extra={"cv_r": np.asarray(res.cv_r, np.float32), "matrix_to_reference": m_ref,
                           "target_mz": np.asarray(targets, np.float64),
                           "target_cv_r": np.asarray(chain_r, np.float32),
                           "target_predictable": ok, "target_cv_residual": resid_t,
                           "target_image": images,
                           "target_ppm": float(ppm), "min_target_r": float(min_target_r)})
        summary["levels"].append({"modality": lv["modality"],
                                  "cv_r": [float(v) for v in res.cv_r],
                                  "targets": [{"mz": t, "cv_r": _num(r), "chain_cv_r": _num(c),
                                               "predictable": bool(o)}
                                              for t, r, c, o in zip(targets, r_t, chain_r, ok)],
                                  "to_reference": pose(m_ref, lv["pixel_size_um"],
                                                       ref["pixel_size_um"])})
        log.info("section %r, %s: mean cross-validated r %.3f", ref["section"], lv["modality"],
                 float(np.nanmean(res.cv_r)))
        for t, c in zip(np.asarray(targets)[~ok], chain_r[~ok]):
            log.warning("section %r, %s: m/z %.4f is NOT PREDICTABLE from the finer modalities "
                        "(cross-validated r %.2f < %.2f): its product image is the coarse one "
                        "interpolated", ref["section"], lv["modality"], t, c, min_target_r)
    with atomic_output(report) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))


def _target_images(weights: np.ndarray, pred: np.ndarray, predictable: np.ndarray,
                   trusted: list, to_reference: np.ndarray) -> np.ndarray:
    """The target ion images a fused product vouches for, shape (T, ny, nx) float32.

    A predictable target's image is reconstructed from the predicted maps ``pred`` (k, ny, nx)
    with ``weights`` (T, k). A target flagged as not predictable gets its image at the last
    coarser level where it was predictable (the reference's own image when none was),
    interpolated (bicubic) onto this grid, so the product never paints fine detail that no finer
    modality supports.

    Parameters
    ----------
    weights : ndarray, shape (T, k)
    pred : ndarray, shape (k, ny, nx)
        NaN where not acquired (NaN in the output there).
    predictable : ndarray of bool, shape (T,)
    trusted : list of (ndarray (ny_t, nx_t), ndarray (2, 3))
        Per target: its image at the last level where it was predictable and that level's
        pixel -> reference pixel matrix.
    to_reference : ndarray, shape (2, 3)
        This grid's pixel -> reference pixel.
    """
    from .affine import compose, invert
    from .evaluate import bicubic_to_grid

    acquired = np.isfinite(pred).all(0)
    images = np.tensordot(weights, np.nan_to_num(pred.astype(np.float64)), axes=1)
    for t in np.flatnonzero(~np.asarray(predictable, dtype=bool)):
        img, m_src = trusted[t]
        images[t] = bicubic_to_grid(img, compose(to_reference, invert(m_src)), pred.shape[1:])
    return np.where(acquired[None], images, np.nan).astype(np.float32)


def _num(v: float) -> float | None:
    """A float for JSON (None for NaN or infinite)."""
    return float(v) if np.isfinite(v) else None


def products_step(reference_maps: str, fused: list[str], out_dir: str, *, targets: list[float],
                  ppm: float, rois: list[dict] | None = None,
                  outputs: list[str] | None = None) -> list[str]:
    """Ion images (PNG + float TIFF) of every target at every level, and ROI mean spectra.

    Level 0 is the reference's own component maps; the others are the fused products.
    ``rois``: named regions (``name``, ``box`` or ``mask``, optional ``level``; see the config
    schema) whose mean spectra at every level go to ``roi_{name}.tsv`` and ``.png``.
    Returns the list of files written.
    """
    from .products import (not_predictable_note, plot_spectrum, product_ion_image, read_fused,
                           roi_mean_spectrum, save_image_png, save_tiff)

    ref = read_section_maps(reference_maps)
    # every level as a product (the reference: its own maps, flagging nothing)
    products = [dict(maps=ref["maps"], spectra=ref["spectra"], mz=ref["mz"],
                     extra={"matrix_to_reference": np.eye(2, 3)})]
    levels = [(ref["modality"], ref["maps"], ref["mask"], float(ref["pixel_size_um"]),
               products[0]["extra"])]
    for path in fused:
        d = read_fused(path)
        products.append(d)
        levels.append((_modality_of(path), d["maps"], np.isfinite(d["maps"]).all(0),
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
    from .products import plot_spectrum, region_mask, region_on_grid, roi_mean_spectrum

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


# ------------------------------------------------------------------------------------ job harness
def setup_logging(log_file: str | None = None, level: int = logging.INFO) -> None:
    """Log ``msifusion.*`` progress to stderr and, when given, to ``log_file``."""
    root = logging.getLogger("msifusion")
    root.setLevel(level)
    root.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)


def run_job(smk, step, **kwargs) -> None:
    """Run a pipeline step inside a Snakemake ``script:`` job.

    Logs go to the rule's ``log:`` file and to stderr; an :class:`MsifusionError` ends the job with
    one clear message instead of a traceback; torch and BLAS use the rule's ``threads``.
    """
    import sys

    from .errors import MsifusionError

    setup_logging(smk.log[0] if len(smk.log) else None)
    threads = max(1, int(getattr(smk, "threads", 1)))
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads):
            step(**kwargs)
    except MsifusionError as err:
        log.error("msifusion error: %s", err)
        sys.exit(1)
    except Exception:
        log.exception("unexpected error in %s", getattr(step, "__name__", step))
        raise
