"""Command line: every stage is usable outside Snakemake (``python -m msifusion <stage> --help``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from .errors import InputError, MsifusionError
from .schema import default

log = logging.getLogger("msifusion.cli")


def _roi(text: str):
    from .config import parse_roi

    roi = parse_roi(text, "--roi")
    return list(roi) if isinstance(roi, tuple) else roi


def cmd_convert(a):
    from .steps.convert import convert_step

    summary = convert_step(a.imzml, a.out, pixel_size_um=a.pixel_size_um,
                           block_mb=a.block_mb, xml_chunk_mb=a.xml_chunk_mb,
                           verify_checksum=not a.no_checksum, full_xml_check=a.full_xml_check,
                           threads=a.threads)
    print(json.dumps(summary, default=str))


def cmd_export(a):
    from .steps.export import export_step

    summary = export_step(a.inp, a.out, mode=a.mode, top_n=a.top_n)
    print(json.dumps(summary, default=str))


def cmd_nmf(a):
    from .config import file_id
    from .steps.axis import axis_step
    from .steps.nmf import components_figure, nmf_step

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


def cmd_image(a):
    from .config import file_id
    from .steps.image import image_step

    image_step(a.image, a.out, modality=a.modality, file_id=a.file_id or file_id(a.image),
               pixel_size_um=a.pixel_size_um, force_pixel_size=a.force_pixel_size,
               stain=a.stain, max_pixels=a.max_pixels, memory_mb=a.memory_mb, figure=a.figure)


def cmd_degrid(a):
    from .steps.degrid import degrid_step

    degrid_step(a.inp, a.out, tile_px=a.tile, method=a.method, figure=a.figure)


def cmd_crop(a):
    from .steps.section import crop_step

    crop_step(a.nmf, a.file_id, a.out, section=a.section, modality=a.modality, roi=a.roi,
              pixel_size_um=a.pixel_size_um, force_pixel_size=a.force_pixel_size,
              all_tissue=a.all_tissue)


def _qc_path(a) -> str:
    """register's QC image: --qc, by default beside the transform."""
    return a.qc or str(Path(a.out).with_suffix(".png"))


def cmd_register(a):
    from .steps.register import register_step

    register_step(a.coarse, a.fine, a.out, _qc_path(a), model=a.model, n_starts=a.n_starts,
                  mirror=a.mirror, iterations=a.iterations, min_score=a.min_score,
                  min_margin=a.min_margin, min_boundary=a.min_boundary, min_ncc=a.min_ncc,
                  seed=a.seed)


def cmd_fuse(a):
    from .steps.fuse import fuse_step

    if len(a.transforms) != len(a.maps) - 1 or len(a.out) != len(a.maps) - 1:
        raise MsifusionError("fuse: give N maps files (reference first), N-1 transforms and "
                             "N-1 outputs")
    consistency = {"auto": "auto", "on": True, "off": False}[a.consistency]
    fuse_step(a.maps, a.transforms, a.out, a.report, method=a.method,
              n_components=a.n_components, scales_px=a.scales_px, alpha_se=a.alpha_se,
              consistency=consistency, min_coverage=a.min_coverage, targets=a.targets,
              ppm=a.ppm, min_target_r=a.min_target_r, min_gain=a.min_gain, ions=a.ions,
              seed=a.seed)


def cmd_ions(a):
    from .steps.ions import ion_images_step

    ion_images_step(a.converted, a.maps, a.out, targets=a.targets, ppm=a.ppm)


def cmd_ion_image(a):
    import numpy as np

    from .figures import save_image_png
    from .products import (measured_section_image, not_predictable_note, product_ion_image,
                           read_fused, save_tiff)
    from .store import ConvertedReader

    d = read_fused(a.product)
    if a.measured:
        from .sharpen import measured_ion_image

        measured = measured_section_image(ConvertedReader(a.measured), d, a.mz, a.ppm)
        img, flag = measured_ion_image(d, a.mz, a.ppm, measured)
    else:
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
                             tile_px=a.tile_px, n_sections=a.sections,
                             pixel_size_um=a.pixel_size_um, tof_field_px=a.tof_field_px,
                             state_tof_pixel_size=a.state_tof_pixel_size, mz_shift=a.mz_shift,
                             response=a.response)
    print(json.dumps(summary, indent=2, default=str))


def cmd_evaluate(a):
    from .evaluate import format_table, read_table

    print(format_table(read_table(a.table)))


def cmd_validate(a):
    import yaml

    from .config import load_config, load_study

    overrides = {}
    for item in a.set or []:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    study = load_study(load_config(a.configfile, overrides), source=a.configfile)
    lines = study.summary()
    print("ok: " + lines[0])
    for line in lines[1:]:
        print("  " + line)


def cmd_config_keys(a):
    from .schema import reference_table

    sys.stdout.write(reference_table())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msifusion", description=__doc__)
    p.set_defaults(input_args=(), output_args=())
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("convert", help="imzML -> HDF5 (CSR over acquired pixels)")
    s.add_argument("imzml")
    s.add_argument("out")
    s.add_argument("--pixel-size-um", type=float, help="pixel size when the imzML has none")
    s.add_argument("--block-mb", type=float, default=default("convert.block_mb"),
                   help=".ibd MB read per block")
    s.add_argument("--xml-chunk-mb", type=float, default=default("convert.xml_chunk_mb"),
                   help="XML MB scanned per chunk")
    s.add_argument("--threads", type=int, default=2, help="threads of the XML scan")
    s.add_argument("--no-checksum", action="store_true", help="skip the .ibd checksum")
    s.add_argument("--full-xml-check", action="store_true",
                   help="index with the full XML parser (slower; checks all of the XML)")
    s.set_defaults(func=cmd_convert, input_args=("imzml",), output_args=("out",))

    s = sub.add_parser("export", help="converted HDF5 or fused product -> imzML (+ .ibd)")
    s.add_argument("inp", metavar="IN.h5")
    s.add_argument("out", metavar="OUT.imzML")
    s.add_argument("--mode", choices=["auto", "continuous", "processed"],
                   default=default("export.mode"),
                   help="auto: continuous when the data have one m/z axis, else processed")
    s.add_argument("--top-n", type=int, help="keep the N most intense values per pixel "
                   "(processed output)")
    s.set_defaults(func=cmd_export, input_args=("inp",), output_args=("out",))

    s = sub.add_parser("nmf", help="NMF of one modality's converted files (shared components)")
    s.add_argument("inputs", nargs="+", help="converted HDF5 file(s)")
    s.add_argument("out")
    s.add_argument("--rank", type=int, default=default("modality.nmf.rank"))
    s.add_argument("--backend", choices=["hals", "mu", "tensorly"], default=default("nmf.backend"))
    s.add_argument("--max-iter", type=int, default=default("nmf.max_iter"))
    s.add_argument("--tol", type=float, default=default("nmf.tol"))
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default=default("nmf.device"),
                   help="auto: a CUDA GPU when torch sees one")
    s.add_argument("--memory-gb", type=float, default=default("nmf.memory_gb"),
                   help="memory budget; larger matrices run out of core")
    s.add_argument("--ppm", type=float, default=default("modality.binning.ppm"),
                   help="m/z bin width (ppm)")
    s.add_argument("--min-pixels", type=int, default=default("modality.binning.min_pixels"))
    s.add_argument("--normalize", choices=["none", "tic", "rms"],
                   default=default("modality.nmf.normalize"))
    s.add_argument("--transform", choices=["none", "sqrt"],
                   default=default("modality.nmf.transform"))
    s.add_argument("--seed", type=int, default=default("seed"))
    s.add_argument("--modality", default="modality")
    s.add_argument("--figure", help="PNG of component maps and spectra")
    s.set_defaults(func=cmd_nmf, input_args=("inputs",), output_args=("out", "figure"))

    s = sub.add_parser("image", help="a microscopy image as a chain level: features, tissue "
                       "mask, pixel size (NMF-file layout, for crop)")
    s.add_argument("image", help="TIFF / OME-TIFF / PNG / JPEG")
    s.add_argument("out")
    s.add_argument("--file-id", help="maps name in OUT (default: from the file name)")
    s.add_argument("--modality", default="image")
    s.add_argument("--pixel-size-um", type=float,
                   help="level-0 pixel size (um) when the file states none")
    s.add_argument("--force-pixel-size", action="store_true",
                   help="--pixel-size-um replaces the file's pixel size")
    s.add_argument("--stain", choices=["auto", "brightfield", "fluorescence"],
                   default=default("modality.image.stain"))
    s.add_argument("--max-pixels", type=int, default=default("modality.image.max_pixels"),
                   help="working grid size bound (block-averaged)")
    s.add_argument("--memory-mb", type=float, default=default("modality.image.memory_mb"),
                   help="reading memory beyond the working grid")
    s.add_argument("--figure", help="PNG of the image, tissue outline and features")
    s.set_defaults(func=cmd_image, input_args=("image",), output_args=("out", "figure"))

    s = sub.add_parser("degrid", help="remove the scan-tile grid from an NMF file's maps")
    s.add_argument("inp")
    s.add_argument("out")
    s.add_argument("--tile", type=int, help="tile size in pixels (default: detected)")
    s.add_argument("--method", choices=["gain", "subtract"],
                   default=default("modality.grid.method"))
    s.add_argument("--figure")
    s.set_defaults(func=cmd_degrid, input_args=("inp",), output_args=("out", "figure"))

    s = sub.add_parser("crop", help="one section's ROI of an NMF file, with its tissue mask")
    s.add_argument("nmf")
    s.add_argument("out")
    s.add_argument("--file-id", required=True, help="which file's maps (see the NMF file)")
    s.add_argument("--roi", type=_roi, default=None,
                   help="x0:x1,y0:y1, * (default) or auto (the only tissue section found)")
    s.add_argument("--section", default="section")
    s.add_argument("--modality", default="modality")
    s.add_argument("--pixel-size-um", type=float,
                   help="pixel size (um) when the imzML states none")
    s.add_argument("--force-pixel-size", action="store_true",
                   help="--pixel-size-um replaces the imzML's pixel size")
    s.add_argument("--all-tissue", action="store_true",
                   help="every acquired pixel is tissue (no automatic mask)")
    s.set_defaults(func=cmd_crop, input_args=("nmf",), output_args=("out",))

    s = sub.add_parser("register", help="register a fine section maps file to a coarse one")
    s.add_argument("coarse")
    s.add_argument("fine")
    s.add_argument("out", help="transform JSON")
    s.add_argument("--qc", help="QC overlay PNG (default: beside OUT)")
    s.add_argument("--model", choices=["rigid", "affine"], default=default("registration.model"))
    s.add_argument("--n-starts", type=int, default=default("registration.n_starts"))
    s.add_argument("--mirror", action="store_true")
    s.add_argument("--iterations", type=int, default=default("registration.iterations"))
    s.add_argument("--min-score", type=float, default=default("registration.min_score"))
    s.add_argument("--min-margin", type=float, default=default("registration.min_margin"))
    s.add_argument("--min-boundary", type=float, default=default("registration.min_boundary"))
    s.add_argument("--min-ncc", type=float, default=default("registration.min_ncc"))
    s.add_argument("--seed", type=int, default=default("seed"))
    s.set_defaults(func=cmd_register, input_args=("coarse", "fine"), output_args=("out",))

    s = sub.add_parser("fuse", help="chained fusion of one section")
    s.add_argument("--maps", nargs="+", required=True, help="section maps files, reference first")
    s.add_argument("--transforms", nargs="+", required=True, help="pair transforms, in chain order")
    s.add_argument("--out", nargs="+", required=True, help="fused products for maps[1:]")
    s.add_argument("--report", required=True, help="JSON with cross-validated scores")
    s.add_argument("--method", choices=["ridge", "cca"], default=default("fusion.method"))
    s.add_argument("--n-components", type=int, default=default("fusion.n_components"),
                   help="CCA components (method cca)")
    s.add_argument("--scales-px", type=float, nargs="+", default=default("fusion.scales_px"))
    s.add_argument("--alpha-se", type=float, default=default("fusion.alpha_se"))
    s.add_argument("--min-coverage", type=float, default=default("fusion.min_coverage"))
    s.add_argument("--targets", type=float, nargs="*", default=default("targets.mz"),
                   help="target m/z scored and flagged per level")
    s.add_argument("--ppm", type=float, default=default("targets.ppm"),
                   help="target window (+- ppm)")
    s.add_argument("--min-target-r", type=float, default=default("fusion.min_target_r"))
    s.add_argument("--min-gain", type=float, default=default("fusion.min_gain"),
                   help="least r a target's detail must add in the reduced-scale test")
    s.add_argument("--ions", help="measured target ion images of the section (command ions); "
                                  "needed with --targets")
    s.add_argument("--consistency", choices=("auto", "on", "off"),
                   default={"auto": "auto", True: "on", False: "off"}[default("fusion.consistency")],
                   help="footprint consistency with the coarse values: auto (per component, by "
                        "how little the finer modality explains it), on or off")
    s.add_argument("--seed", type=int, default=default("seed"))
    s.set_defaults(func=cmd_fuse, input_args=("maps", "transforms", "ions"),
                   output_args=("out", "report"))

    s = sub.add_parser("ions", help="measured target ion images over one section of the reference")
    s.add_argument("converted", help="the reference's converted file (results/converted/...)")
    s.add_argument("maps", help="the section maps file of the reference (its ROI)")
    s.add_argument("out", help="ion images file (HDF5)")
    s.add_argument("--targets", type=float, nargs="+", required=True)
    s.add_argument("--ppm", type=float, default=default("targets.ppm"))
    s.set_defaults(func=cmd_ions, input_args=("converted", "maps"), output_args=("out",))

    s = sub.add_parser("ion-image", help="ion image at m/z +- ppm from a fused product")
    s.add_argument("product", help="fused_*.h5 (or section maps_*.h5)")
    s.add_argument("--mz", type=float, required=True)
    s.add_argument("--ppm", type=float, default=default("targets.ppm"))
    s.add_argument("--measured", metavar="CONVERTED",
                   help="the reference's converted file (results/converted/REF.h5): add the measured "
                        "minus reconstructed residual to an m/z that is not a target, so the image is "
                        "not limited by the NMF rank and averages back to the measured one")
    s.add_argument("--png")
    s.add_argument("--tiff")
    s.set_defaults(func=cmd_ion_image, input_args=("product", "measured"), output_args=("png", "tiff"))

    s = sub.add_parser("spectrum", help="ROI mean spectrum of a fused product")
    s.add_argument("product")
    s.add_argument("--roi", type=_roi, default=None, help="x0:x1,y0:y1 of the product grid")
    s.add_argument("--out", help="TSV (default: stdout)")
    s.add_argument("--png")
    s.set_defaults(func=cmd_spectrum, input_args=("product",), output_args=("out", "png"))

    s = sub.add_parser("phantom", help="generate a multimodal study with ground truth")
    s.add_argument("outdir")
    s.add_argument("--preset", choices=["demo", "small"], default="demo")
    s.add_argument("--seed", type=int, default=default("seed"))
    s.add_argument("--chain", help="comma-separated modality names (default fticr,maldi,tofsims)")
    s.add_argument("--tile-px", type=int, default=40)
    s.add_argument("--sections", type=int, default=2)
    s.add_argument("--pixel-size-um", type=float, nargs=3, metavar=("REF", "MID", "FINE"),
                   help="pixel sizes (um) instead of the preset's; the geometry scales with them")
    s.add_argument("--tof-field-px", type=int, help="ToF-SIMS field of view (pixels, square)")
    s.add_argument("--state-tof-pixel-size", action="store_true",
                   help="the ToF-SIMS imzML states its pixel size (like the others)")
    s.add_argument("--mz-shift", type=float, default=0.0,
                   help="Da added to every species' m/z (targets other than the demo's)")
    s.add_argument("--response", choices=["linear", "nonlinear"], default="linear",
                   help="how the finer modalities respond to abundance: linear mixing, or power "
                        "laws and ion suppression (breaks the fusion's linear assumption)")
    s.set_defaults(func=cmd_phantom)

    s = sub.add_parser("evaluate", help="print an accuracy table written by the workflow")
    s.add_argument("table", nargs="?", default="results/evaluation.tsv")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("validate", help="check a config and its sections sheet")
    s.add_argument("configfile", nargs="?", default="config/config.yaml")
    s.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="top-level overrides")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("config-keys", help="every config key, its type, default and meaning "
                       "(Markdown, from the schema)")
    s.set_defaults(func=cmd_config_keys)
    return p


def _paths(args, names) -> list[str]:
    """The paths the arguments ``names`` of a command hold (a path, a list of paths or None)."""
    out = []
    for name in names:
        value = getattr(args, name, None)
        out += value if isinstance(value, list) else [value]
    return [p for p in out if p is not None]


def _outputs(args) -> list[str]:
    """Every file a command writes (register's QC image defaults to beside its output)."""
    out = _paths(args, args.output_args)
    return out + [_qc_path(args)] if args.command == "register" else out


def main(argv=None) -> int:
    """Entry point; returns the exit status (non-zero on any error, with one clear message).

    Before any work the outputs are checked (:func:`msifusion.job.check_outputs`: none may
    overwrite an input, each must be writable); an error of the operating system or of a text
    encoding is reported like msifusion's own errors, in one line naming the file.
    """
    from .job import check_outputs, os_error_message, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(level=logging.DEBUG if args.verbose else logging.INFO)
    try:
        check_outputs(_outputs(args), _paths(args, args.input_args))
        args.func(args)
    except MsifusionError as err:
        message = str(err)
    except OSError as err:
        message = os_error_message(err)
    except UnicodeError as err:
        message = f"a file is not valid text ({err})"
    else:
        return 0
    print(f"msifusion {args.command}: error: {message}", file=sys.stderr)
    return 1
