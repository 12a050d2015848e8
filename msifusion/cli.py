"""Command line: every stage is usable outside Snakemake (``python -m msifusion <stage> --help``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from .errors import InputError, MsifusionError

log = logging.getLogger("msifusion.cli")


def _roi(text: str):
    from .config import parse_roi

    roi = parse_roi(text, "--roi")
    return list(roi) if isinstance(roi, tuple) else roi


def cmd_convert(a):
    from .pipeline import convert_step

    summary = convert_step(a.imzml, a.out, pixel_size_um=a.pixel_size_um,
                           block_mb=a.block_mb, xml_chunk_mb=a.xml_chunk_mb,
                           verify_checksum=not a.no_checksum, full_xml_check=a.full_xml_check,
                           threads=a.threads)
    print(json.dumps(summary, default=str))


def cmd_export(a):
    from .pipeline import export_step

    summary = export_step(a.inp, a.out, mode=a.mode, top_n=a.top_n)
    print(json.dumps(summary, default=str))


def cmd_nmf(a):
    from .pipeline import axis_step, components_figure, nmf_step
    from .config import file_id

    converted = {}
    for path in a.inputs:
        converted[file_id(Path(path).with_suffix(".imzML"))] = path
    with tempfile.TemporaryDirectory() as tmp:
        axis = str(Path(tmp) / "axis.h5")
        axis_step(a.inputs, axis, ppm=a.ppm, min_pixels=a.min_pixels)
        nmf_step(converted, axis, a.out, modality=a.modality, rank=a.rank, normalize=a.normalize,
                 transform=a.transform, backend=a.backend, max_iter=a.max_iter, tol=a.tol,
                 seed=a.seed, device=a.device, memory_gb=a.memory_gb)
    if a.figure:
        components_figure(a.out, a.figure)


def cmd_degrid(a):
    from .pipeline import degrid_step

    degrid_step(a.inp, a.out, tile_px=a.tile, method=a.method, figure=a.figure)


def cmd_crop(a):
    from .pipeline import crop_step

    crop_step(a.nmf, a.file_id, a.out, section=a.section, modality=a.modality, roi=a.roi,
              pixel_size_um=a.pixel_size_um)


def cmd_register(a):
    from .pipeline import register_step

    qc = a.qc or str(Path(a.out).with_suffix(".png"))
    register_step(a.coarse, a.fine, a.out, qc, model=a.model, n_starts=a.n_starts,
                  mirror=a.mirror, min_score=a.min_score, min_margin=a.min_margin, seed=a.seed)


def cmd_fuse(a):
    from .pipeline import fuse_step

    if len(a.transforms) != len(a.maps) - 1 or len(a.out) != len(a.maps) - 1:
        raise MsifusionError("fuse: give N maps files (reference first), N-1 transforms and "
                             "N-1 outputs")
    consistency = {"auto": "auto", "on": True, "off": False}[a.consistency]
    fuse_step(a.maps, a.transforms, a.out, a.report, method=a.method, consistency=consistency,
              seed=a.seed)


def cmd_ion_image(a):
    import numpy as np

    from .products import (not_predictable_note, product_ion_image, read_fused, save_image_png,
                           save_tiff)

    d = read_fused(a.product)
    img, flag = product_ion_image(d, a.mz, a.ppm)
    px = float(d.get("pixel_size_um", np.nan))
    title = f"m/z {a.mz:.4f} +- {a.ppm:g} ppm"
    if flag is not None:
        title += "\n" + not_predictable_note(flag)
        print(f"m/z {a.mz}: {not_predictable_note(flag)} from the last level where it was "
              "predictable")
    if a.png:
        save_image_png(img, a.png, pixel_size_um=px, title=title, label="intensity (a.u.)")
    if a.tiff:
        save_tiff(img, a.tiff, pixel_size_um=px)
    if not (a.png or a.tiff):
        print(f"ion image m/z {a.mz} +- {a.ppm} ppm: shape {img.shape}, "
              f"min {np.nanmin(img):.4g}, max {np.nanmax(img):.4g}")


def cmd_spectrum(a):
    import numpy as np

    from .products import plot_spectrum, read_fused, roi_mean_spectrum

    d = read_fused(a.product)
    mask = np.isfinite(d["maps"]).all(axis=0)
    if a.roi == "auto":
        raise InputError("spectrum: --roi auto is for sections of an acquisition (crop); give "
                         "x0:x1,y0:y1")
    if a.roi:
        x0, x1, y0, y1 = a.roi
        box = np.zeros_like(mask)
        box[y0:y1, x0:x1] = True
        mask &= box
    if not mask.any():
        raise MsifusionError(f"{a.product}: the ROI holds no pixel with data")
    spec = roi_mean_spectrum(d["spectra"], d["maps"], mask)
    lines = ["mz\tintensity"] + [f"{m:.6f}\t{v:.6g}" for m, v in zip(d["mz"], spec)]
    text = "\n".join(lines) + "\n"
    if a.out:
        from .store import atomic_output

        with atomic_output(a.out) as tmp:
            Path(tmp).write_text(text)
    else:
        sys.stdout.write(text)
    if a.png:
        plot_spectrum(d["mz"], {"ROI mean": spec}, a.png, title=f"{a.product}: ROI mean spectrum")


def cmd_phantom(a):
    from .phantom import generate_study

    chain = tuple(a.chain.split(",")) if a.chain else ("fticr", "maldi", "tofsims")
    summary = generate_study(a.outdir, preset=a.preset, seed=a.seed, chain=chain,
                             tile_px=a.tile_px, n_sections=a.sections)
    print(json.dumps(summary, indent=2, default=str))


def cmd_evaluate(a):
    from .evaluate import format_table, read_table

    print(format_table(read_table(a.table)))


def cmd_validate(a):
    import yaml

    from .config import load_config, read_sections, check_rois

    overrides = {}
    for item in a.set or []:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    config = load_config(a.configfile, overrides)
    acq = read_sections(config["sections"], config["chain"])
    check_rois(acq, config["sections"])
    sections = list(dict.fromkeys(x.section for x in acq))
    print(f"ok: chain {' -> '.join(config['chain'])}; {len(sections)} section(s): "
          f"{', '.join(sections)}; {len({x.imzml for x in acq})} imzML file(s)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msifusion", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("convert", help="imzML -> HDF5 (CSR over acquired pixels)")
    s.add_argument("imzml")
    s.add_argument("out")
    s.add_argument("--pixel-size-um", type=float, help="pixel size when the imzML has none")
    s.add_argument("--block-mb", type=float, default=32, help=".ibd MB read per block")
    s.add_argument("--xml-chunk-mb", type=float, default=8, help="XML MB scanned per chunk")
    s.add_argument("--threads", type=int, default=2, help="threads of the XML scan")
    s.add_argument("--no-checksum", action="store_true", help="skip the .ibd checksum")
    s.add_argument("--full-xml-check", action="store_true",
                   help="index with the full XML parser (slower; checks all of the XML)")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("export", help="converted HDF5 or fused product -> imzML (+ .ibd)")
    s.add_argument("inp", metavar="IN.h5")
    s.add_argument("out", metavar="OUT.imzML")
    s.add_argument("--mode", choices=["auto", "continuous", "processed"], default="auto",
                   help="auto: continuous when the data have one m/z axis, else processed")
    s.add_argument("--top-n", type=int, help="keep the N most intense values per pixel "
                   "(processed output)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("nmf", help="NMF of one modality's converted files (shared components)")
    s.add_argument("inputs", nargs="+", help="converted HDF5 file(s)")
    s.add_argument("out")
    s.add_argument("--rank", type=int, default=40)
    s.add_argument("--backend", choices=["hals", "mu", "tensorly"], default="hals")
    s.add_argument("--max-iter", type=int, default=200)
    s.add_argument("--tol", type=float, default=1e-4)
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: a CUDA GPU when torch sees one")
    s.add_argument("--memory-gb", type=float, default=8.0,
                   help="memory budget; larger matrices run out of core")
    s.add_argument("--ppm", type=float, default=10.0, help="m/z bin width (ppm)")
    s.add_argument("--min-pixels", type=int, default=1)
    s.add_argument("--normalize", choices=["none", "tic", "rms"], default="none")
    s.add_argument("--transform", choices=["none", "sqrt"], default="none")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--modality", default="modality")
    s.add_argument("--figure", help="PNG of component maps and spectra")
    s.set_defaults(func=cmd_nmf)

    s = sub.add_parser("degrid", help="remove the scan-tile grid from an NMF file's maps")
    s.add_argument("inp")
    s.add_argument("out")
    s.add_argument("--tile", type=int, help="tile size in pixels (default: detected)")
    s.add_argument("--method", choices=["gain", "subtract"], default="gain")
    s.add_argument("--figure")
    s.set_defaults(func=cmd_degrid)

    s = sub.add_parser("crop", help="one section's ROI of an NMF file, with its tissue mask")
    s.add_argument("nmf")
    s.add_argument("out")
    s.add_argument("--file-id", required=True, help="which file's maps (see the NMF file)")
    s.add_argument("--roi", type=_roi, default=None,
                   help="x0:x1,y0:y1, * (default) or auto (the only tissue section found)")
    s.add_argument("--section", default="section")
    s.add_argument("--modality", default="modality")
    s.add_argument("--pixel-size-um", type=float)
    s.set_defaults(func=cmd_crop)

    s = sub.add_parser("register", help="register a fine section maps file to a coarse one")
    s.add_argument("coarse")
    s.add_argument("fine")
    s.add_argument("out", help="transform JSON")
    s.add_argument("--qc", help="QC overlay PNG (default: beside OUT)")
    s.add_argument("--model", choices=["rigid", "affine"], default="rigid")
    s.add_argument("--n-starts", type=int, default=36)
    s.add_argument("--mirror", action="store_true")
    s.add_argument("--min-score", type=float, default=0.6)
    s.add_argument("--min-margin", type=float, default=0.05)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_register)

    s = sub.add_parser("fuse", help="chained fusion of one section")
    s.add_argument("--maps", nargs="+", required=True, help="section maps files, reference first")
    s.add_argument("--transforms", nargs="+", required=True, help="pair transforms, in chain order")
    s.add_argument("--out", nargs="+", required=True, help="fused products for maps[1:]")
    s.add_argument("--report", required=True, help="JSON with cross-validated scores")
    s.add_argument("--method", choices=["ridge", "cca"], default="ridge")
    s.add_argument("--consistency", choices=("auto", "on", "off"), default="auto",
                   help="footprint consistency with the coarse values: auto (per component, by "
                        "how little the finer modality explains it), on or off")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_fuse)

    s = sub.add_parser("ion-image", help="ion image at m/z +- ppm from a fused product")
    s.add_argument("product", help="fused_*.h5 (or section maps_*.h5)")
    s.add_argument("--mz", type=float, required=True)
    s.add_argument("--ppm", type=float, default=10.0)
    s.add_argument("--png")
    s.add_argument("--tiff")
    s.set_defaults(func=cmd_ion_image)

    s = sub.add_parser("spectrum", help="ROI mean spectrum of a fused product")
    s.add_argument("product")
    s.add_argument("--roi", type=_roi, default=None, help="x0:x1,y0:y1 of the product grid")
    s.add_argument("--out", help="TSV (default: stdout)")
    s.add_argument("--png")
    s.set_defaults(func=cmd_spectrum)

    s = sub.add_parser("phantom", help="generate a multimodal study with ground truth")
    s.add_argument("outdir")
    s.add_argument("--preset", choices=["demo", "small"], default="demo")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--chain", help="comma-separated modality names (default fticr,maldi,tofsims)")
    s.add_argument("--tile-px", type=int, default=40)
    s.add_argument("--sections", type=int, default=2)
    s.set_defaults(func=cmd_phantom)

    s = sub.add_parser("evaluate", help="print an accuracy table written by the workflow")
    s.add_argument("table", nargs="?", default="results/evaluation.tsv")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("validate", help="check a config and its sections sheet")
    s.add_argument("configfile", nargs="?", default="config/config.yaml")
    s.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="top-level overrides")
    s.set_defaults(func=cmd_validate)
    return p


def main(argv=None) -> int:
    """Entry point; returns the exit status (non-zero on any error, with one clear message)."""
    from .pipeline import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(level=logging.DEBUG if args.verbose else logging.INFO)
    try:
        args.func(args)
    except MsifusionError as err:
        print(f"msifusion {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0
