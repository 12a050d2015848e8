"""Stage 1: imzML -> HDF5 conversion into the converted layout of :mod:`msifusion.store`.

The imzML header is parsed by a guarded expat parser (:func:`read_imzml_header`) that stops at the
``<spectrumList>`` element and refuses any ``<!DOCTYPE>`` / entity declaration, so hostile XML
(external entities, entity expansion) is rejected before :mod:`pyimzml` touches the file. The
spectrum list and offsets are then read by :class:`pyimzml.ImzMLParser.ImzMLParser`, everything that
can be checked without the intensities is validated (``.ibd`` present, UUID, offsets inside the
``.ibd``, array lengths, duplicate coordinates, checksum), and the spectra are streamed into a
:class:`msifusion.store.ConvertedWriter` in blocks.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.parsers import expat

import numpy as np

from .errors import InputError
from .store import ConvertedWriter

log = logging.getLogger("msifusion.convert")

#: Namespace of mzML / imzML elements.
MZML_NS = "http://psi.hupo.org/ms/mzml"

_MODE = {"IMS:1000030": "continuous", "IMS:1000031": "processed"}
_SPECTRUM_TYPE = {"MS:1000127": "centroid", "MS:1000128": "profile"}
_SPECTRUM_TYPE_NAME = {"centroid spectrum": "centroid", "profile spectrum": "profile"}
_POLARITY = {"MS:1000130": "positive", "MS:1000129": "negative"}
#: Length units of pixel sizes -> factor to micrometres (imzML's default unit is the micrometre).
_UNIT_TO_UM = {"UO:0000017": 1.0, "UO:0000018": 1e-3, "UO:0000016": 1e3, "UO:0000008": 1e6}
#: Binary array compressions that pyimzml does not decode.
_NO_COMPRESSION = "MS:1000576"
_COMPRESSIONS = {"MS:1000574", "MS:1002312", "MS:1002313", "MS:1002314", "MS:1002746",
                 "MS:1002747", "MS:1002748", "MS:1003089", "MS:1003090"}
_DTYPE = {"f": np.float32, "d": np.float64, "i": np.int32, "l": np.int64}
_HEADER_CHUNK = 1 << 16


class _HeaderEnd(Exception):
    """Raised inside the expat handlers when ``<spectrumList>`` starts."""


# --------------------------------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------------------------------

def _parse_header_tree(path: Path) -> tuple[ET.Element, int | None]:
    """Parse the imzML header up to ``<spectrumList>`` with a guarded expat parser.

    Returns
    -------
    root : xml.etree.ElementTree.Element
        The ``mzML`` element with everything before the spectrum list (tags without namespace).
    n_spectra : int or None
        The ``count`` attribute of ``<spectrumList>``.
    """
    builder = ET.TreeBuilder()
    state: dict = {"root": None, "count": None, "found": False}

    def refuse(*_args):
        raise InputError(f"{path}: the XML declares a DOCTYPE or entities; refused "
                         "(imzML needs none, and they can be used for entity-expansion or "
                         "external-entity attacks)")

    def start(name, attrs):
        ns, _, local = name.rpartition("}")
        if state["root"] is None:
            if local != "mzML" or ns != MZML_NS:
                raise InputError(f"{path}: not an imzML file (root element is <{local}> in "
                                 f"namespace {ns or 'none'!r}, expected <mzML> in {MZML_NS!r})")
        if local == "spectrumList":
            count = attrs.get("count")
            try:
                state["count"] = int(count) if count is not None else None
            except ValueError:
                raise InputError(f"{path}: spectrumList count {count!r} is not an integer") from None
            state["found"] = True
            raise _HeaderEnd
        elem = builder.start(local, {k.rpartition("}")[2]: v for k, v in attrs.items()})
        if state["root"] is None:
            state["root"] = elem

    def end(name):
        builder.end(name.rpartition("}")[2])

    parser = expat.ParserCreate(namespace_separator="}")
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        with open(path, "rb") as fh:
            while True:
                chunk = fh.read(_HEADER_CHUNK)
                parser.Parse(chunk, not chunk)
                if not chunk:
                    break
    except _HeaderEnd:
        pass
    except expat.ExpatError as err:
        raise InputError(f"{path}: not a well-formed XML (imzML) file ({err})") from None
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err})") from None
    if not state["found"]:
        raise InputError(f"{path}: not an imzML file (no <spectrumList> element)")
    return state["root"], state["count"]


def _cv_params(elem: ET.Element | None, groups: dict[str, ET.Element], deep: bool = False) -> list:
    """cvParam elements of ``elem`` (direct children, or all descendants when ``deep``), including
    those of referenced ``referenceableParamGroup`` elements."""
    if elem is None:
        return []
    params = list(elem.iter("cvParam")) if deep else elem.findall("cvParam")
    for ref in elem.findall("referenceableParamGroupRef"):
        group = groups.get(ref.get("ref"))
        if group is not None:
            params += group.findall("cvParam")
    return params


def _pixel_size(path: Path, params: list) -> float | None:
    """Pixel size in um from the scan settings' "pixel size x/y" (IMS:1000046/47), or None."""
    sizes = {}
    for p in params:
        acc = p.get("accession")
        if acc not in ("IMS:1000046", "IMS:1000047") or acc in sizes:
            continue
        try:
            value = float(p.get("value"))
        except (TypeError, ValueError):
            log.warning("%s: pixel size %r is not a number; ignored", path, p.get("value"))
            continue
        unit = p.get("unitAccession")
        if unit not in (None, "") and unit not in _UNIT_TO_UM:
            log.warning("%s: unknown pixel size unit %s (%s); assuming micrometres",
                        path, unit, p.get("unitName"))
        value *= _UNIT_TO_UM.get(unit, 1.0)
        if not (math.isfinite(value) and value > 0):
            log.warning("%s: pixel size %r is not positive; ignored", path, p.get("value"))
            continue
        sizes[acc] = value
    sx, sy = sizes.get("IMS:1000046"), sizes.get("IMS:1000047")
    if sx is not None and sy is not None and abs(sx - sy) > 0.01 * max(sx, sy):
        log.warning("%s: pixels are not square (x %g um, y %g um); using the x size", path, sx, sy)
    return sx if sx is not None else sy


def _spectrum_type(path: Path, params: list) -> str | None:
    """"profile" / "centroid" from MS:1000128 / MS:1000127; "unknown" when contradictory (both
    stated, or an accession whose name says the other type); None when absent."""
    types = set()
    for p in params:
        by_acc = _SPECTRUM_TYPE.get(p.get("accession"))
        by_name = _SPECTRUM_TYPE_NAME.get((p.get("name") or "").strip().lower())
        if by_acc and by_name and by_acc != by_name:
            log.warning("%s: cvParam %s is named %r; spectrum type treated as unknown",
                        path, p.get("accession"), p.get("name"))
            return "unknown"
        if by_acc:
            types.add(by_acc)
    if len(types) > 1:
        log.warning("%s: both profile and centroid spectra stated; spectrum type treated as "
                    "unknown", path)
        return "unknown"
    return types.pop() if types else None


def _instrument(root: ET.Element, groups: dict[str, ET.Element]) -> str | None:
    """Best-effort instrument name: the first instrument cvParam of the run's configuration."""
    configs = root.findall("instrumentConfigurationList/instrumentConfiguration")
    run = root.find("run")
    default = run.get("defaultInstrumentConfigurationRef") if run is not None else None
    configs.sort(key=lambda c: c.get("id") != default)
    for config in configs:
        for p in _cv_params(config, groups):
            if p.get("accession") == "MS:1000529":  # instrument serial number
                continue
            name, value = (p.get("name") or "").strip(), (p.get("value") or "").strip()
            if name or value:
                return f"{name}: {value}" if name and value else (name or value)
        for p in config.findall("userParam"):
            if p.get("name"):
                return p.get("name")
    return None


def read_imzml_header(imzml_path: str | os.PathLike) -> dict:
    """Read the imzML header (everything before the spectrum list) without reading the spectra.

    Only the XML up to ``<spectrumList>`` is parsed, so this takes milliseconds on a multi-GB file.
    A ``<!DOCTYPE>`` or entity declaration is refused (:class:`InputError`).

    Parameters
    ----------
    imzml_path : path-like
        The ``.imzML`` file.

    Returns
    -------
    dict
        ``image_shape`` : (ny, nx) from "max count of pixels y/x" (IMS:1000043/42), None if absent;
        ``pixel_size_um`` : float or None, from "pixel size x/y" (IMS:1000046/47) in um;
        ``n_spectra`` : int or None, the spectrumList ``count`` attribute;
        ``mode`` : "continuous" | "processed" | None;
        ``spectrum_type`` : "profile" | "centroid" | "unknown" (contradictory) | None (absent);
        ``polarity`` : "positive" | "negative" | "mixed" | None;
        ``uuid`` : str or None, 32 lower-case hex digits (IMS:1000080);
        ``sha1`` / ``md5`` : str or None, lower-case hex checksums of the ``.ibd`` (IMS:1000091/90);
        ``compression`` : str or None, name of a binary-array compression other than "none";
        ``instrument`` : str or None (best effort).

    Raises
    ------
    InputError
        Missing file, not XML, not imzML, DOCTYPE/entities, no spectrum list.
    """
    path = Path(imzml_path)
    if not path.is_file():
        raise InputError(f"{path}: imzML file not found")
    root, n_spectra = _parse_header_tree(path)
    groups = {g.get("id"): g for g in
              root.findall("referenceableParamGroupList/referenceableParamGroup")}
    content = root.find("fileDescription/fileContent")
    content_params = _cv_params(content, groups)
    group_params = [p for g in groups.values() for p in g.findall("cvParam")]
    by_acc = {}
    for p in content_params:
        by_acc.setdefault(p.get("accession"), p)

    modes = {_MODE[a] for a in by_acc if a in _MODE}
    mode = modes.pop() if len(modes) == 1 else None

    settings = _cv_params(root.find("scanSettingsList"), groups, deep=True)
    counts = {}
    for p in settings:
        if p.get("accession") in ("IMS:1000042", "IMS:1000043"):
            try:
                counts[p.get("accession")] = int(float(p.get("value")))
            except (TypeError, ValueError):
                log.warning("%s: %s %r is not a number; ignored", path, p.get("name"), p.get("value"))
    nx, ny = counts.get("IMS:1000042"), counts.get("IMS:1000043")
    image_shape = (ny, nx) if nx and ny and nx > 0 and ny > 0 else None

    spectrum_type = (_spectrum_type(path, content_params) or _spectrum_type(path, group_params))
    pols = {_POLARITY[p.get("accession")] for p in content_params + group_params
            if p.get("accession") in _POLARITY}
    polarity = "mixed" if len(pols) > 1 else (pols.pop() if pols else None)

    uuid = None
    if "IMS:1000080" in by_acc:
        raw = by_acc["IMS:1000080"].get("value") or ""
        uuid = raw.strip().strip("{}").replace("-", "").lower()
        if len(uuid) != 32 or any(c not in "0123456789abcdef" for c in uuid):
            raise InputError(f"{path}: malformed universally unique identifier (IMS:1000080) {raw!r}")

    def checksum(acc):
        p = by_acc.get(acc)
        value = (p.get("value") or "").strip().lower() if p is not None else ""
        return value or None

    compression = None
    for p in group_params:
        acc = p.get("accession")
        if acc in _COMPRESSIONS or ("compression" in (p.get("name") or "").lower()
                                    and acc != _NO_COMPRESSION):
            compression = p.get("name") or acc
            break

    return {
        "image_shape": image_shape,
        "pixel_size_um": _pixel_size(path, settings),
        "n_spectra": n_spectra,
        "mode": mode,
        "spectrum_type": spectrum_type,
        "polarity": polarity,
        "uuid": uuid,
        "sha1": checksum("IMS:1000091"),
        "md5": checksum("IMS:1000090"),
        "compression": compression,
        "instrument": _instrument(root, groups),
    }


# --------------------------------------------------------------------------------------------------
# Validation before reading intensities
# --------------------------------------------------------------------------------------------------

def find_ibd(imzml_path: str | os.PathLike) -> Path:
    """The ``.ibd`` file beside ``imzml_path`` (same stem, extension matched case-insensitively).

    Raises
    ------
    InputError
        When there is none.
    """
    path = Path(imzml_path)
    exact = path.with_suffix(".ibd")
    if exact.is_file():
        return exact
    for cand in sorted(path.parent.glob(path.stem + ".*")):
        if cand.suffix.lower() == ".ibd" and cand.stem == path.stem and cand.is_file():
            return cand
    raise InputError(f"{path}: binary data file {exact.name} not found beside it")


def _check_uuid(imzml_path: Path, ibd_path: Path, uuid: str | None) -> None:
    """Compare the imzML's UUID with the first 16 bytes of the ``.ibd``."""
    with open(ibd_path, "rb") as fh:
        head = fh.read(16)
    if len(head) < 16:
        raise InputError(f"{ibd_path}: only {len(head)} bytes long; truncated (no 16-byte UUID)")
    if uuid is None:
        log.warning("%s: no universally unique identifier (IMS:1000080); cannot check that %s "
                    "belongs to it", imzml_path, ibd_path.name)
        return
    if head.hex() != uuid:
        raise InputError(f"{imzml_path}: UUID mismatch: the imzML states {uuid} but {ibd_path.name} "
                         f"starts with {head.hex()}; the two files do not belong together")


def _check_checksum(ibd_path: Path, header: dict) -> None:
    """Verify the ``.ibd`` SHA-1 (IMS:1000091) and/or MD5 (IMS:1000090) declared in the header."""
    for key, algo in (("sha1", hashlib.sha1), ("md5", hashlib.md5)):
        expected = header.get(key)
        if not expected:
            continue
        h = algo()
        with open(ibd_path, "rb") as fh:
            while chunk := fh.read(1 << 23):
                h.update(chunk)
        if h.hexdigest() != expected:
            raise InputError(f"{ibd_path}: {key.upper()} checksum mismatch (imzML states {expected}, "
                             f"file has {h.hexdigest()}); the file is corrupt or truncated")


def _check_spectra(path: Path, ibd_path: Path, parser) -> tuple[np.ndarray, np.ndarray]:
    """Validate the spectrum list of an opened pyimzml parser.

    Returns
    -------
    xy : ndarray, shape (n, 2), int32
        0-based (x, y) per spectrum.
    z : ndarray, shape (n,), int32
        0-based z per spectrum.
    """
    n = len(parser.coordinates)
    if n == 0:
        raise InputError(f"{path}: the file contains zero spectra")
    if parser.mzPrecision not in _DTYPE or parser.intensityPrecision not in _DTYPE:
        raise InputError(f"{path}: cannot determine the m/z or intensity array data type "
                         "(32/64-bit float or integer in a referenceableParamGroup)")
    mz_len = np.asarray(parser.mzLengths, dtype=np.int64)
    int_len = np.asarray(parser.intensityLengths, dtype=np.int64)
    bad = np.flatnonzero(mz_len != int_len)
    if bad.size:
        i = int(bad[0])
        raise InputError(f"{path}: spectrum {i}: m/z array length {mz_len[i]} differs from "
                         f"intensity array length {int_len[i]} ({bad.size} spectra affected)")
    size = ibd_path.stat().st_size
    for name, offsets, lengths, prec in (
            ("m/z", parser.mzOffsets, mz_len, parser.mzPrecision),
            ("intensity", parser.intensityOffsets, int_len, parser.intensityPrecision)):
        offsets = np.asarray(offsets, dtype=np.int64)
        ends = offsets + lengths * np.dtype(_DTYPE[prec]).itemsize
        bad = np.flatnonzero((ends > size) | (offsets < 0) | (lengths < 0))
        if bad.size:
            i = int(bad[0])
            raise InputError(f"{ibd_path}: spectrum {i}: {name} array at offset {offsets[i]} with "
                             f"{lengths[i]} values ends at byte {ends[i]}, beyond the end of the "
                             f"file ({size} bytes); the .ibd is truncated ({bad.size} spectra "
                             "affected)")
    coords = np.asarray(parser.coordinates, dtype=np.int64).reshape(n, 3)
    bad = np.flatnonzero((coords < 1).any(axis=1))
    if bad.size:
        i = int(bad[0])
        raise InputError(f"{path}: spectrum {i}: position {tuple(coords[i].tolist())} is below 1; "
                         "imzML positions are 1-based")
    if coords.max() > np.iinfo(np.int32).max:
        raise InputError(f"{path}: pixel positions exceed the int32 range")
    order = np.lexsort(coords.T[::-1])
    same = np.flatnonzero((np.diff(coords[order], axis=0) == 0).all(axis=1))
    if same.size:
        i, j = sorted((int(order[same[0]]), int(order[same[0] + 1])))
        x, y, z = coords[i].tolist()
        raise InputError(f"{path}: spectra {i} and {j} have the same position (x={x}, y={y}, z={z}) "
                         f"({same.size} duplicates in all)")
    coords -= 1
    return coords[:, :2].astype(np.int32), coords[:, 2].astype(np.int32)


def _open_parser(path: Path, ibd_path: Path, n_spectra: int | None):
    """Open ``path`` with pyimzml (ibd opened by us); parser errors become :class:`InputError`."""
    from pyimzml.ImzMLParser import ImzMLParser

    if n_spectra == 0:
        raise InputError(f"{path}: the file contains zero spectra (spectrumList count is 0)")
    fh = open(ibd_path, "rb")
    try:
        return ImzMLParser(str(path), ibd_file=fh)
    except IndexError:
        fh.close()
        raise InputError(f"{path}: the file contains zero spectra") from None
    except Exception as err:  # pyimzml raises bare KeyError/TypeError/AttributeError on bad input
        fh.close()
        raise InputError(f"{path}: cannot read the spectrum list ({type(err).__name__}: {err})") \
            from err


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------

def _clean_spectrum(path: Path, index: int, mz: np.ndarray, intensity: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, bool]:
    """Check one spectrum and return it as (m/z float64, intensity float32, was_sorted)."""
    if intensity.dtype.kind == "f":
        if not np.isfinite(intensity).all():
            k = int(np.flatnonzero(~np.isfinite(intensity))[0])
            raise InputError(f"{path}: spectrum {index}: non-finite intensity {intensity[k]} "
                             f"at m/z {mz[k]}")
    if intensity.size and intensity.min() < 0:
        k = int(np.argmin(intensity))
        raise InputError(f"{path}: spectrum {index}: negative intensity {intensity[k]} at m/z {mz[k]}")
    if mz.dtype.kind == "f" and not np.isfinite(mz).all():
        raise InputError(f"{path}: spectrum {index}: non-finite m/z value")
    out_i = intensity.astype(np.float32)
    if intensity.dtype == np.float64 and not np.isfinite(out_i).all():
        raise InputError(f"{path}: spectrum {index}: intensity beyond the float32 range")
    out_mz = mz.astype(np.float64)
    unsorted = bool(out_mz.size > 1 and (np.diff(out_mz) < 0).any())
    if unsorted:
        order = np.argsort(out_mz, kind="stable")
        out_mz, out_i = out_mz[order], out_i[order]
    return out_mz, out_i, unsorted


def _resolve_pixel_size(path: Path, from_file: float | None, given: float | None) -> float:
    """The file's pixel size, else ``given``, else NaN (warns when both disagree by > 1 %)."""
    if from_file is not None:
        if given is not None and abs(from_file - given) > 0.01 * max(abs(from_file), abs(given)):
            log.warning("%s: pixel size %g um from the file differs from the configured %g um; "
                        "using the file's", path, from_file, given)
        return float(from_file)
    if given is not None:
        return float(given)
    log.warning("%s: no pixel size in the file and none given; stored as NaN", path)
    return float("nan")


def convert_imzml(
    imzml_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    pixel_size_um: float | None = None,
    block_pixels: int = 65536,
    verify_checksum: bool = True,
    max_block_values: int = 1 << 24,
) -> dict:
    """Convert one imzML/ibd pair into the converted HDF5 layout (see ``docs/design.md``).

    Everything checkable without the intensities is validated first; spectra are then read one by
    one (pyimzml ``getspectrum``) and written in blocks, so memory is bounded by one block. No
    output file is left behind on any error.

    Parameters
    ----------
    imzml_path : path-like
        The ``.imzML`` file; its ``.ibd`` must lie beside it with the same stem.
    out_path : path-like
        Output HDF5 file (written atomically).
    pixel_size_um : float, optional
        Pixel size in um, used only when the file states none (the file's value wins; a
        disagreement > 1 % is logged). NaN is stored when neither is known.
    block_pixels : int
        Maximum number of spectra per written block.
    verify_checksum : bool
        Verify the ``.ibd`` SHA-1 / MD5 when the imzML declares one.
    max_block_values : int
        Maximum number of (m/z, intensity) values per written block (bounds memory, ~12 B each).

    Returns
    -------
    dict
        ``n_pixels``, ``nnz``, ``image_shape`` (ny, nx), ``pixel_size_um``, ``mode``,
        ``spectrum_type``, ``n_sorted`` (spectra whose m/z had to be sorted), ``seconds``.

    Raises
    ------
    InputError
        Missing/unreadable/hostile/non-imzML input, missing ``.ibd``, UUID mismatch, truncated
        ``.ibd``, m/z and intensity lengths that differ, duplicate positions, zero spectra,
        checksum mismatch, compressed arrays, or a non-finite/negative intensity (with its
        spectrum index).
    """
    t0 = time.perf_counter()
    path = Path(imzml_path)
    header = read_imzml_header(path)
    ibd_path = find_ibd(path)
    _check_uuid(path, ibd_path, header["uuid"])
    if header["compression"]:
        raise InputError(f"{path}: binary arrays use {header['compression']!r}; only uncompressed "
                         "imzML is supported")
    parser = _open_parser(path, ibd_path, header["n_spectra"])
    with parser:
        xy, z = _check_spectra(path, ibd_path, parser)
        if verify_checksum:
            _check_checksum(ibd_path, header)
        n = len(xy)
        mode = header["mode"]
        if mode is None:
            mode = "continuous" if len(set(parser.mzOffsets)) == 1 else "processed"
            log.warning("%s: no continuous/processed mode (IMS:1000030/31) stated; looks %s",
                        path, mode)
        spectrum_type = header["spectrum_type"] or parser.spectrum_mode or "unknown"
        px = _resolve_pixel_size(path, header["pixel_size_um"], pixel_size_um)
        # The image is the larger of the stated size and the positions reached, so that a
        # last row or column that was not acquired still belongs to the grid the ROIs refer to.
        image_shape = (int(xy[:, 1].max()) + 1, int(xy[:, 0].max()) + 1)
        if header["image_shape"] is not None:
            if any(d > h for d, h in zip(image_shape, header["image_shape"])):
                log.warning("%s: positions reach %s (ny, nx) beyond the stated max count of "
                            "pixels %s", path, image_shape, header["image_shape"])
            image_shape = tuple(max(d, h) for d, h in zip(image_shape, header["image_shape"]))
        if _DTYPE[parser.intensityPrecision] in (np.float64, np.int64):
            log.info("%s: %s intensities are stored as float32", path,
                     np.dtype(_DTYPE[parser.intensityPrecision]).name)
        attrs = {
            "source": str(path),
            "uuid": header["uuid"] or "",
            "mode": mode,
            "spectrum_type": spectrum_type,
            "polarity": header["polarity"] or parser.polarity or "unknown",
            "instrument": header["instrument"] or "unknown",
            "pixel_size_um": px,
            "image_shape": image_shape,
        }
        log.info("%s: converting %d spectra (%s, %s) to %s", path, n, mode, spectrum_type, out_path)
        block_pixels = max(1, int(block_pixels))
        n_sorted = 0
        nnz = 0
        mz_lo, mz_hi = np.inf, -np.inf
        with ConvertedWriter(out_path, n_pixels=n, attrs=attrs) as writer:
            mzs, ints, values = [], [], 0

            def flush():
                lengths = np.fromiter((len(m) for m in mzs), dtype=np.int64, count=len(mzs))
                indptr = np.concatenate([[0], np.cumsum(lengths)])
                writer.append(indptr, np.concatenate(mzs) if mzs else np.zeros(0),
                              np.concatenate(ints) if ints else np.zeros(0, np.float32))
                mzs.clear()
                ints.clear()

            for i in range(n):
                mz, inten, unsorted = _clean_spectrum(path, i, *parser.getspectrum(i))
                n_sorted += unsorted
                if mz.size:
                    mz_lo, mz_hi = min(mz_lo, mz[0]), max(mz_hi, mz[-1])
                mzs.append(mz)
                ints.append(inten)
                values += mz.size
                nnz += mz.size
                if len(mzs) >= block_pixels or values >= max_block_values:
                    flush()
                    values = 0
                    log.info("%s: %d / %d spectra converted", path, i + 1, n)
            if mzs:
                flush()
            writer.set_pixels(xy, z)
            writer.attrs["mz_range"] = ((float(mz_lo), float(mz_hi)) if nnz
                                        else (float("nan"), float("nan")))
            image_shape = tuple(int(v) for v in writer.attrs["image_shape"])
    if n_sorted:
        log.warning("%s: m/z values were not increasing in %d of %d spectra; sorted them",
                    path, n_sorted, n)
    seconds = time.perf_counter() - t0
    log.info("%s: %d spectra, %d values written to %s in %.1f s", path, n, nnz, out_path, seconds)
    return {"n_pixels": n, "nnz": nnz, "image_shape": image_shape, "pixel_size_um": px,
            "mode": mode, "spectrum_type": spectrum_type, "n_sorted": n_sorted,
            "seconds": seconds}
