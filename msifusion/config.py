"""Study configuration: ``config.yaml`` validation and the sections sheet.

The configuration is checked against ``msifusion/schemas/config.schema.yaml`` (defaults filled in), then
cross-checked (every chain modality has settings), and the sections sheet is read and checked (columns,
modalities, imzML files present, ROIs well formed and inside the image when the imzML header states its
size). Every problem raises :class:`~msifusion.errors.InputError` naming the key or the file and row.
"""

from __future__ import annotations

import copy
import csv
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import yaml

from .errors import InputError
from .image import SUPPORTED_EXTENSIONS
from .metadata import PixelSize, resolve_pixel_size, working_roi
from .schema import load_schema, resolve_ref

log = logging.getLogger("msifusion.config")

SHEET_COLUMNS = ("section", "modality", "imzml", "roi")
#: Accepted names of the third column (the data file: an imzML or, for an image level, an image).
FILE_COLUMNS = ("imzml", "file")
_SECTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ROI_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*,\s*(\d+)\s*:\s*(\d+)\s*$")
_YAML_NULLS = ("null", "Null", "NULL", "~", "")


def file_id(path) -> str:
    """Identifier of a data file (imzML or image) used in result paths: its stem with unsafe
    characters replaced.

    >>> file_id("data/run 1/FT-ICR_brain.imzML"), file_id("he/slide 3.ome.tiff")
    ('FT-ICR_brain', 'slide_3')
    """
    stem = Path(str(path)).name
    stem = re.sub(r"(\.imzml|(\.ome)?\.(tiff?|btf)|\.png|\.jpe?g)$", "", stem, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = []
    for p in error.absolute_path:
        parts.append(f"[{p}]" if isinstance(p, int) else (("." if parts else "") + str(p)))
    return "".join(parts) or "(top level)"


def canonical_path(path: str | os.PathLike) -> str:
    """One spelling of a path for result bookkeeping: relative to the working directory when it
    lies inside it, else absolute (normalised, symbolic links kept).

    Snakemake compares the recorded input paths and parameters of a job with the current ones;
    ``config/sections.tsv``, ``./config/sections.tsv`` and ``$PWD/config/sections.tsv`` must give
    the same paths, and a project folder moved as a whole must keep them.

    >>> canonical_path(os.path.join(os.getcwd(), "data", ".", "run.imzML"))
    'data/run.imzML'
    """
    absolute = os.path.abspath(os.fspath(path))
    relative = os.path.relpath(absolute)
    return absolute if relative == os.pardir or relative.startswith(os.pardir + os.sep) else relative


def _map_leaves(value, schema, root: dict, leaf):
    """``value`` with ``leaf(scalar, subschema)`` applied to every scalar the schema describes
    (through ``properties``, ``additionalProperties``, ``items`` and local ``$ref``)."""
    schema = resolve_ref(schema, root)
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out = {}
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            out[key] = item if sub is None else _map_leaves(item, sub, root, leaf)
        return out
    if isinstance(value, list):
        items = schema.get("items")
        return [_map_leaves(v, items, root, leaf) for v in value] if isinstance(items, dict) else value
    return leaf(value, schema)


def _typed_scalar(value, schema):
    """A string where the schema wants a number, boolean or null, read as YAML (``--config
    key="{rank: 8}"`` gives strings: snakemake reads nested values with YAML's BaseLoader)."""
    if not isinstance(value, str):
        return value
    check = jsonschema.Draft202012Validator(schema)
    if value.strip() in _YAML_NULLS and check.is_valid(None):
        return None   # 'null' of a nullable key is YAML's null, not a path or name "null"
    if check.is_valid(value):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return parsed if not isinstance(parsed, str) and check.is_valid(parsed) else value


def _canonical_number(value, schema):
    """An integral float of a number or integer key as an int (``5.0`` -> ``5``), so that
    ``seed: 0`` and ``--config seed=0.0`` give the same rule parameters (snakemake compares their
    ``repr``) and jobs do not rerun for a changed spelling."""
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if (isinstance(value, float) and value.is_integer()
            and ("integer" in types or "number" in types)):
        return int(value)
    return value


def _with_defaults(validator_class):
    """A validator class that fills ``default`` values of missing properties (as snakemake does)."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def validate_config(config: dict, source: str = "config") -> dict:
    """Validate a configuration against the schema and return a copy with defaults filled in.

    Parameters
    ----------
    config : dict
        Parsed ``config.yaml`` (plus ``--config`` overrides).
    source : str
        Name used in error messages (e.g. the config file path).

    Returns
    -------
    dict
        Validated configuration with every default present.

    Raises
    ------
    InputError
        Naming the first offending key and what is wrong with it.
    """
    config = copy.deepcopy(dict(config))
    schema = load_schema()
    config = _map_leaves(config, schema, schema, _typed_scalar)
    cls = _with_defaults(jsonschema.Draft202012Validator)
    validator = cls(schema)
    # Fill defaults of modality entries too (additionalProperties sub-schemas).
    for name, mod in (config.get("modalities") or {}).items():
        if mod is None:
            config["modalities"][name] = {}
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        raise InputError(f"{source}: key '{_key_path(err)}': {err.message}")
    config = _map_leaves(config, schema, schema, _canonical_number)
    chain = config["chain"]
    missing = [m for m in chain if m not in config["modalities"]]
    if missing:
        raise InputError(f"{source}: key 'modalities': no settings for chain modality "
                         f"{', '.join(map(repr, missing))} (add 'modalities.{missing[0]}: {{}}' "
                         "to use the defaults)")
    if config["modalities"][chain[0]]["binning"]["mode"] == "reference":
        raise InputError(f"{source}: key 'modalities.{chain[0]}.binning.mode': the reference "
                         f"modality '{chain[0]}' cannot be binned onto itself; use 'ppm'")
    return config


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> dict:
    """Read ``config.yaml``, apply ``overrides`` (top-level keys) and validate it."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: config file not found")
    if path.is_dir():
        raise InputError(f"{path}: the config file is a directory")
    try:
        with open(path, encoding="utf-8-sig") as fh:
            config = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({err})") from err
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: the config file is not UTF-8 text ({err.reason} at byte "
                         f"{err.start})") from err
    if not isinstance(config, dict):
        raise InputError(f"{path}: the top level must be a mapping of keys")
    config.update(overrides or {})
    return validate_config(config, source=str(path))


def parse_roi(text: str, where: str) -> tuple[int, int, int, int] | str | None:
    """Parse ``x0:x1,y0:y1`` (0-based, half-open), ``*`` (whole acquisition -> ``None``) or
    ``auto`` (the section is found in the tissue mask -> ``"auto"``)."""
    text = text.strip()
    if text == "*":
        return None
    if text.lower() == "auto":
        return "auto"
    m = _ROI_RE.match(text)
    if not m:
        raise InputError(f"{where}: roi {text!r} is not 'x0:x1,y0:y1' (0-based, half-open), '*' "
                         "or 'auto'")
    x0, x1, y0, y1 = (int(v) for v in m.groups())
    if x1 <= x0 or y1 <= y0:
        raise InputError(f"{where}: roi {text!r} is empty (need x0 < x1 and y0 < y1)")
    return x0, x1, y0, y1


@dataclass(frozen=True)
class Acquisition:
    """One (section, modality) row of the sections sheet."""

    section: str
    modality: str
    #: The data file: an imzML, or the image of an image level.
    path: str
    file_id: str
    roi: tuple[int, int, int, int] | str | None
    row: int
    #: With ``roi == "auto"``: rank of this section among the file's ``auto`` rows (sheet order)
    #: and their number; the file's tissue sections, left to right, are given out in that order.
    auto_index: int = 0
    auto_count: int = 0
    #: The ``.ibd`` beside the imzML (its extension matched case-insensitively); "" for images.
    ibd: str = ""
    #: ``"imzml"`` or ``"image"`` (:func:`file_kind`).
    kind: str = "imzml"

    @property
    def roi_param(self) -> list[int] | str | None:
        """The ROI as a plain rule parameter: [x0, x1, y0, y1], "auto" or None (whole image)."""
        return list(self.roi) if isinstance(self.roi, tuple) else self.roi


@dataclass
class Study:
    """A validated study: configuration plus the sections sheet."""

    config: dict
    sheet: str
    acquisitions: list[Acquisition] = field(default_factory=list)
    #: Per data file: the decided pixel size (:func:`check_study` fills it).
    pixel_sizes: dict[str, PixelSize] = field(default_factory=dict)
    #: Per image file: the factor it is block-averaged by for its working grid
    #: (:func:`msifusion.image.choose_downsample`, decided by :func:`check_study`).
    downsample: dict[str, int] = field(default_factory=dict)

    @property
    def chain(self) -> list[str]:
        return list(self.config["chain"])

    @property
    def reference(self) -> str:
        return self.config["chain"][0]

    @property
    def sections(self) -> list[str]:
        """Section ids in sheet order."""
        return list(dict.fromkeys(a.section for a in self.acquisitions))

    def acquisition(self, section: str, modality: str) -> Acquisition:
        for a in self.acquisitions:
            if a.section == section and a.modality == modality:
                return a
        raise KeyError((section, modality))

    def files(self, modality: str) -> dict[str, str]:
        """``{file_id: data file path}`` of one modality, in sheet order."""
        return {a.file_id: a.path for a in self.acquisitions if a.modality == modality}

    def kind(self, modality: str) -> str:
        """``"imzml"`` or ``"image"``: what the modality's files are (one kind per modality)."""
        return next(a.kind for a in self.acquisitions if a.modality == modality)

    def ibd(self, modality: str, file_id: str) -> str:
        """The ``.ibd`` path of one of the modality's files."""
        return next(a.ibd for a in self.acquisitions
                    if a.modality == modality and a.file_id == file_id)

    def pairs(self) -> list[tuple[str, str]]:
        """Adjacent (coarse, fine) pairs of the chain."""
        return list(zip(self.chain[:-1], self.chain[1:]))

    def summary(self) -> list[str]:
        """Lines for the start-up log: the chain, sections, files and their pixel sizes."""
        kinds = [a.kind for a in {a.path: a for a in self.acquisitions}.values()]
        files = f"{kinds.count('imzml')} imzML file(s)" + (
            f", {kinds.count('image')} image(s)" if "image" in kinds else "")
        lines = [f"chain {' -> '.join(self.chain)}; {len(self.sections)} section(s): "
                 f"{', '.join(self.sections)}; {files}"]
        for modality in self.chain:
            for fid, path in self.files(modality).items():
                px = self.pixel_sizes.get(path)
                if px is None:
                    continue
                size = (f"pixel size {px.um:g} um ({px.source})" if px.source != "none" else
                        "pixel size unknown: the registration finds the scale")
                f = self.downsample.get(path)
                read = (f"; read block-averaged by {f}" + (f" ({px.um * f:g} um pixels)"
                                                           if px.source != "none" else "")
                        if f else "")
                lines.append(f"{modality} {fid}: {size}{read}"
                             + (f"; {px.note}" if px.note else ""))
        return lines


def file_kind(path: str | os.PathLike, configured: str = "auto", *, where: str = "",
              modality: str = "") -> str:
    """What a data file of the sections sheet is: ``"imzml"`` or ``"image"`` (a microscopy image,
    :data:`msifusion.image.SUPPORTED_EXTENSIONS`), from its name ending, checked against the
    modality's configured ``kind`` (``auto``: the ending decides).

    Raises
    ------
    InputError
        The ending is neither, or it contradicts the configured kind.

    >>> file_kind("s1.imzML"), file_kind("he.ome.tif")
    ('imzml', 'image')
    """
    name = Path(path).name.lower()
    kind = ("imzml" if name.endswith(".imzml") else
            "image" if name.endswith(SUPPORTED_EXTENSIONS) else None)
    key = f"modalities.{modality}.kind"
    if kind is None:
        raise InputError(f"{where}: {Path(path).name!r} is neither an .imzML file nor an image "
                         f"({', '.join(SUPPORTED_EXTENSIONS)})")
    if configured not in ("auto", kind):
        raise InputError(f"{where}: {Path(path).name!r} is an {'imzML file' if kind == 'imzml' else 'image'}"
                         f" but '{key}' is {configured!r}")
    return kind


def read_sections(sheet: str | os.PathLike, chain: list[str],
                  kinds: dict[str, str] | None = None) -> list[Acquisition]:
    """Read and check the sections sheet.

    Data file paths (third column, ``imzml`` or ``file``) are taken relative to the sheet's folder
    unless absolute. Every section must list every modality of the chain exactly once; every file
    must exist, be of its modality's kind (``kinds``: ``modalities.<name>.kind`` of the config,
    :func:`file_kind`; one kind per modality) and, for imzML, have its ``.ibd`` beside it. A UTF-8
    byte-order mark (spreadsheet export) is skipped.
    """
    from .imzml import find_ibd

    sheet = Path(sheet)
    if not sheet.exists():
        raise InputError(f"{sheet}: sections sheet not found (config key 'sections')")
    if not sheet.is_file():
        raise InputError(f"{sheet}: the sections sheet is a directory, not a file (config key "
                         "'sections')")
    try:
        with open(sheet, newline="", encoding="utf-8-sig") as fh:
            lines = [ln for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
    except UnicodeDecodeError as err:
        raise InputError(f"{sheet}: the sections sheet is not UTF-8 text ({err.reason} at byte "
                         f"{err.start}); save it as tab-separated UTF-8") from err
    reader = csv.reader(lines, delimiter="\t")
    header = next(reader, None)
    if header is None:
        raise InputError(f"{sheet}: the sections sheet is empty (add the header "
                         f"{' '.join(SHEET_COLUMNS)} and one row per section and modality)")
    header = [h.strip() for h in header]
    if (len(header) < 4 or tuple(header[:2]) != SHEET_COLUMNS[:2] or header[2] not in FILE_COLUMNS
            or header[3] != SHEET_COLUMNS[3]):
        raise InputError(f"{sheet}: header must be the tab-separated columns "
                         f"{' '.join(SHEET_COLUMNS)} (the third may be called 'file'), got "
                         f"{' '.join(header)!r}")
    kinds = kinds or {}
    acquisitions: list[Acquisition] = []
    ids: dict[tuple[str, str], str] = {}
    for i, fields in enumerate(reader, start=2):
        where = f"{sheet}, row {i}"
        if len(fields) < 4:
            raise InputError(f"{where}: expected 4 tab-separated columns, got {len(fields)}")
        section, modality, name, roi = (f.strip() for f in fields[:4])
        if not _SECTION_RE.match(section):
            raise InputError(f"{where}: section id {section!r} must be letters, digits, '_', '.', '-'")
        if modality not in chain:
            raise InputError(f"{where}: modality {modality!r} is not in the chain {chain}")
        path = Path(name)
        if not path.is_absolute():
            path = sheet.parent / path
        path = Path(canonical_path(path))
        kind = file_kind(path, kinds.get(modality, "auto"), where=where, modality=modality)
        what = "imzML file" if kind == "imzml" else "image"
        if not path.exists():
            raise InputError(f"{where}: {what} not found: {path}")
        if not path.is_file():
            raise InputError(f"{where}: {path} is a directory, not a file")
        ibd = ""
        if kind == "imzml":
            try:
                ibd = canonical_path(find_ibd(path))
            except InputError as err:
                raise InputError(f"{where}: {err}") from err
        acquisitions.append(Acquisition(section, modality, str(path), "", parse_roi(roi, where), i,
                                        ibd=ibd, kind=kind))
    if not acquisitions:
        raise InputError(f"{sheet}: the sections sheet lists no sections (add one row per section "
                         "and modality below the header; see config/README.md)")
    seen = set()
    for a in acquisitions:
        if (a.section, a.modality) in seen:
            raise InputError(f"{sheet}, row {a.row}: section {a.section!r} lists modality "
                             f"{a.modality!r} twice")
        seen.add((a.section, a.modality))
    for modality in chain:
        rows = [a for a in acquisitions if a.modality == modality]
        if len({a.kind for a in rows}) > 1:
            raise InputError(f"{sheet}: modality {modality!r} mixes imzML files and images (rows "
                             f"{', '.join(str(a.row) for a in rows)}); one kind per modality")
    for section in dict.fromkeys(a.section for a in acquisitions):
        absent = [m for m in chain if (section, m) not in seen]
        if absent:
            raise InputError(f"{sheet}: section {section!r} has no row for modality "
                             f"{', '.join(map(repr, absent))} (every section needs the whole chain)")
    # Unique file ids per modality (two folders may hold files of the same name).
    for modality in chain:
        paths = list(dict.fromkeys(a.path for a in acquisitions if a.modality == modality))
        names = _unique_ids(paths)
        ids.update({(modality, p): n for p, n in zip(paths, names)})
    autos: dict[tuple[str, str], list[int]] = {}
    for i, a in enumerate(acquisitions):
        if a.roi == "auto":
            autos.setdefault((a.modality, a.path), []).append(i)
    rank = {i: (k, len(rows)) for rows in autos.values() for k, i in enumerate(rows)}
    return [Acquisition(a.section, a.modality, a.path, ids[(a.modality, a.path)], a.roi, a.row,
                        *rank.get(i, (0, 0)), ibd=a.ibd, kind=a.kind)
            for i, a in enumerate(acquisitions)]


def _unique_ids(paths: list[str]) -> list[str]:
    """File ids of ``paths``: the stem, prefixed by the folder name where stems collide."""
    stems = [file_id(p) for p in paths]
    names = [file_id(Path(p).parent.name + "_" + Path(p).name) if stems.count(s) > 1 else s
             for p, s in zip(paths, stems)]
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def check_kinds(study: Study, source: str = "config") -> None:
    """What an image level cannot be: the reference (it gives the fused products their spectra)
    or a tiled MSI scan (grid removal).

    Raises
    ------
    InputError
        Naming the key.
    """
    ref = study.reference
    if study.kind(ref) == "image":
        raise InputError(f"{source}: key 'modalities.{ref}.kind': the reference (first in chain) "
                         f"'{ref}' gives the fused products their spectra: it must be an imzML "
                         f"modality, not an image ({next(iter(study.files(ref).values()))})")
    for name in study.chain:
        if study.kind(name) == "image" and study.config["modalities"][name]["grid"]["enabled"]:
            raise InputError(f"{source}: key 'modalities.{name}.grid.enabled': '{name}' is an "
                             "image level; the scan-tile grid removal is for MSI acquisitions")


def check_study(study: Study) -> None:
    """Everything about a study that can be known before the first job, all problems at once.

    Reads only the file headers (milliseconds per file, whole-slide images included). Checks:
    each file's header; each ROI inside the image its header states; each file's pixel size
    (:func:`resolve_pixel_size`, the result is kept in ``study.pixel_sizes``) and, for an image
    level, the factor it is read at (``study.downsample``); a configured scan tile divides the
    image; every
    configured ``rois`` entry (box order, ``level`` in the chain, mask files present, loadable
    and of the level's section size, boxes inside it, where that size is known from the sheet and
    headers); the ground-truth files of ``evaluation.truth``.

    Raises
    ------
    InputError
        Listing every problem found, each naming its file, row or key.
    """
    cfg, sheet = study.config, study.sheet
    problems: list[str] = []
    headers: dict[str, dict] = {}
    for a in study.acquisitions:
        if a.path in headers:
            continue
        try:
            headers[a.path] = read_header(a.path, a.kind)
        except InputError as err:
            problems.append(f"{sheet}, row {a.row}: {err}")
            headers[a.path] = {}
    for a in study.acquisitions:
        problems += _check_acquisition(study, a, headers[a.path])
    shapes = {path: _grid_shape(study, path, h) for path, h in headers.items()}
    for roi in cfg.get("rois", []):
        problems += _check_config_roi(study, roi, shapes)
    truth = cfg.get("evaluation", {}).get("truth")
    if truth:
        if not Path(truth).is_dir():
            problems.append(f"key 'evaluation.truth': folder {truth} not found (null for a study "
                            "without ground truth)")
        else:
            problems += [f"key 'evaluation.truth': {Path(truth) / (s + '.h5')} not found"
                         for s in study.sections if not (Path(truth) / f"{s}.h5").is_file()]
    problems = list(dict.fromkeys(problems))
    if problems:
        head = f"{len(problems)} problems found before running anything:\n  - " if len(
            problems) > 1 else ""
        raise InputError(head + "\n  - ".join(problems))


def read_header(path: str, kind: str) -> dict:
    """What the start-up check needs of a data file, from its header alone: ``image_shape``
    (ny, nx) (level 0 of an image; None when an imzML states no size), ``pixel_size_um`` (None
    when the file states none) and, for an image, ``info`` (:class:`msifusion.image.ImageInfo`)
    and ``pixel_size_note``."""
    if kind == "image":
        from .image import read_image_info

        info = read_image_info(path)
        return {"image_shape": info.shape, "pixel_size_um": info.pixel_size_um, "info": info,
                "pixel_size_note": info.pixel_size_note}
    from .imzml import read_imzml_header

    return read_imzml_header(path)


def _check_acquisition(study: Study, a: Acquisition, header: dict) -> list[str]:
    """Problems of one sheet row: ROI inside the image, pixel size (and an image's read factor),
    scan tile."""
    from .degrid import check_tile_divides

    problems, where = [], f"{study.sheet}, row {a.row}"
    mod = study.config["modalities"][a.modality]
    shape = header.get("image_shape")
    if shape is not None and isinstance(a.roi, tuple):
        ny, nx = shape
        x0, x1, y0, y1 = a.roi
        if x1 > nx or y1 > ny:
            problems.append(f"{where}: roi {x0}:{x1},{y0}:{y1} of section {a.section!r} lies "
                            f"outside the image of {a.path} ({nx} x {ny} pixels, x by y)")
    if header and a.path not in study.pixel_sizes:
        image = a.kind == "image"
        try:
            px = resolve_pixel_size(
                header.get("pixel_size_um"), mod["pixel_size_um"],
                force=mod.get("force_pixel_size", False), where=f"{where}: {a.path}",
                key=f"modalities.{a.modality}.pixel_size_um", required=not image,
                origin="image" if image else "imzML")
        except InputError as err:
            problems.append(str(err))
        else:
            if image and header.get("pixel_size_note") and px.source in ("image", "none"):
                note = header["pixel_size_note"]
                px = type(px)(px.um, px.source, f"{px.note}; {note}" if px.note else note)
            study.pixel_sizes[a.path] = px
            if image:
                from .image import choose_downsample

                study.downsample[a.path] = choose_downsample(
                    header["info"], max_pixels=mod["image"]["max_pixels"])
    grid = mod.get("grid", {})
    if grid.get("enabled") and grid.get("tile_px") and shape is not None:
        try:
            check_tile_divides(shape, grid["tile_px"], where=f"{a.path}")
        except InputError as err:
            problems.append(f"{where}: {err} (key 'modalities.{a.modality}.grid.tile_px')")
    return problems


def _grid_shape(study: Study, path: str, header: dict) -> tuple[int, int] | None:
    """(ny, nx) of a data file's grid as the workflow uses it: an imzML's acquisition grid, an
    image's working grid (block-averaged by its read factor); None when unknown."""
    shape = header.get("image_shape")
    f = study.downsample.get(path, 1)
    return None if shape is None else (int(shape[0]) // f, int(shape[1]) // f)


def section_grid(study: Study, section: str, level: str, shapes: dict) -> tuple[int, int] | None:
    """(ny, nx) of a section's grid on one level (its ROI of the acquisition, on an image's
    working grid), or None when not known before running (roi ``auto``, or no image size in the
    header). ``shapes``: the files' grids (:func:`_grid_shape`)."""
    a = study.acquisition(section, level)
    if isinstance(a.roi, tuple):
        f = study.downsample.get(a.path, 1)
        x0, x1, y0, y1 = working_roi(a.roi, f) if a.kind == "image" else a.roi
        grid = shapes.get(a.path)
        if grid is not None:       # a partial last block of the image is not on the grid
            x1, y1 = min(x1, grid[1]), min(y1, grid[0])
        return y1 - y0, x1 - x0
    return shapes.get(a.path) if a.roi is None else None


def _check_config_roi(study: Study, roi: dict, shapes: dict) -> list[str]:
    """Problems of one ``rois`` entry of the config, for every section."""
    key = f"key 'rois' entry {roi['name']!r}"
    level = roi.get("level", study.reference)
    if level not in study.chain:
        return [f"{key}: level {level!r} is not in the chain {study.chain}"]
    problems = []
    if "box" in roi:
        x0, x1, y0, y1 = roi["box"]
        if x1 <= x0 or y1 <= y0:
            return [f"{key}: box [{x0}, {x1}, {y0}, {y1}] is empty (need x0 < x1 and y0 < y1: "
                    "[x0, x1, y0, y1], half-open)"]
    for section in study.sections:
        grid = section_grid(study, section, level, shapes)
        if "box" in roi:
            if grid is not None and (x1 > grid[1] or y1 > grid[0]):
                problems.append(f"{key}: box [{x0}, {x1}, {y0}, {y1}] lies outside section "
                                f"{section!r} on {level} ({grid[1]} x {grid[0]} pixels, x by y)")
            continue
        path = Path(roi["mask"].replace("{section}", section))
        if not path.is_file():
            problems.append(f"{key}: mask file {path} not found (section {section!r})")
            continue
        try:
            import numpy as np

            mask = np.load(path, allow_pickle=False, mmap_mode="r")
        except (OSError, ValueError) as err:
            problems.append(f"{key}: {path} is not a .npy array ({err})")
            continue
        if mask.ndim != 2:
            problems.append(f"{key}: {path} has shape {mask.shape}; a mask is (ny, nx)")
        elif grid is not None and tuple(mask.shape) != tuple(grid):
            problems.append(f"{key}: {path} is {mask.shape[1]} x {mask.shape[0]} pixels but "
                            f"section {section!r} on {level} is {grid[1]} x {grid[0]} (x by y)")
    return problems


def load_study(config: dict, source: str = "config", check_images: bool = True) -> Study:
    """Validate ``config``, read its sections sheet and (``check_images``) check everything
    knowable before running (:func:`check_study`)."""
    config = validate_config(config, source=source)
    acquisitions = read_sections(config["sections"], config["chain"],
                                 {m: config["modalities"][m]["kind"] for m in config["chain"]})
    study = Study(config=config, sheet=config["sections"], acquisitions=acquisitions)
    check_kinds(study, source)
    if check_images:
        check_study(study)
    return study
