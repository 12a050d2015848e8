"""The imzML format: guarded header parsing, a streaming spectrum index, block reads of the ``.ibd``,
and a streaming writer.

Reading a file has three steps, none of which builds a Python object per spectrum:

1. :func:`read_imzml_header` parses the XML up to ``<spectrumList>`` with expat, refusing any
   ``<!DOCTYPE>`` or entity declaration (no external entity is ever resolved, no entity expanded).
2. :func:`read_index` scans the spectrum list in chunks of ``chunk_bytes`` with numpy: the byte
   positions of the few tags and accessions that matter (``<spectrum``, ``<binaryDataArray``,
   ``referenceableParamGroupRef``, IMS position / external offset / length accessions) are found
   by vectorised byte comparisons and every value is checked to lie where the file's own layout
   puts it. A chunk whose structure does not verify (unusual attribute quoting, parameters inside
   the arrays instead of in referenceable groups, a missing value, ...) makes the whole file go
   through a general streaming expat parser instead, which also gives the precise error for a
   malformed file. Either way the result is one :class:`SpectrumIndex` of flat arrays
   (about 64 bytes per spectrum).
3. :func:`iter_spectra` reads the ``.ibd`` in large sequential blocks (``block_bytes``) and cuts them
   into spectra with vectorised gathers; zlib-compressed arrays are inflated per array.

:class:`ImzMLStreamWriter` writes continuous or processed imzML block by block (the XML body goes to
a temporary file, the header with UUID and SHA-1 is written last, both files appear atomically).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import math
import os
import re
import shutil
import tempfile
import uuid as uuidlib
import xml.etree.ElementTree as ET
import zlib
from array import array
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator
from xml.parsers import expat
from xml.sax.saxutils import quoteattr

import numpy as np

from .errors import InputError
from .store import atomic_output

log = logging.getLogger("msifusion.imzml")

#: Namespace of mzML / imzML elements.
MZML_NS = "http://psi.hupo.org/ms/mzml"

_MODE = {"IMS:1000030": "continuous", "IMS:1000031": "processed"}
_SPECTRUM_TYPE = {"MS:1000127": "centroid", "MS:1000128": "profile"}
_SPECTRUM_TYPE_NAME = {"centroid spectrum": "centroid", "profile spectrum": "profile"}
_POLARITY = {"MS:1000130": "positive", "MS:1000129": "negative"}
#: Length units of pixel sizes -> factor to micrometres (imzML's default unit is the micrometre).
_UNIT_TO_UM = {"UO:0000017": 1.0, "UO:0000018": 1e-3, "UO:0000016": 1e3, "UO:0000008": 1e6}
#: The same by unit name (lower case), for files that name a unit without its accession.
_UNIT_NAME_TO_UM = {"micrometer": 1.0, "micrometre": 1.0, "um": 1.0, "\u00b5m": 1.0,
                    "nanometer": 1e-3, "nanometre": 1e-3, "nm": 1e-3, "millimeter": 1e3,
                    "millimetre": 1e3, "mm": 1e3, "meter": 1e6, "metre": 1e6, "m": 1e6}
#: Binary data types allowed by imzML (little endian).
DTYPES = {"MS:1000521": np.dtype("<f4"), "MS:1000523": np.dtype("<f8"),
          "MS:1000519": np.dtype("<i4"), "MS:1000522": np.dtype("<i8")}
_DTYPE_ACC = {v: k for k, v in DTYPES.items()}
_DTYPE_NAME = {"MS:1000521": "32-bit float", "MS:1000523": "64-bit float",
               "MS:1000519": "32-bit integer", "MS:1000522": "64-bit integer"}
_DTYPE_BY_NAME = {name: DTYPES[acc] for acc, name in _DTYPE_NAME.items()}
#: Integers of the spectrum list (offsets, lengths, positions) must fit an int64.
_INT64_LIMIT = 1 << 63
_ARRAY_KIND = {"MS:1000514": "mz", "MS:1000515": "intensity"}
#: Compressions: the two we read, and the others that we recognise in order to refuse them.
_COMPRESSION = {"MS:1000576": "none", "MS:1000574": "zlib"}
_OTHER_COMPRESSIONS = {"MS:1002312", "MS:1002313", "MS:1002314", "MS:1002746", "MS:1002747",
                       "MS:1002748", "MS:1003089", "MS:1003090"}
_HEADER_CHUNK = 1 << 16
#: Default number of XML bytes scanned per chunk by :func:`read_index`.
CHUNK_BYTES = 8 << 20
#: Default number of ``.ibd`` bytes read per block by :func:`iter_spectra`.
BLOCK_BYTES = 32 << 20


class _HeaderEnd(Exception):
    """Raised inside the expat handlers when ``<spectrumList>`` starts."""


# --------------------------------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------------------------------

def _refuse_doctype(path: Path):
    def refuse(*_args):
        raise InputError(f"{path}: the XML declares a DOCTYPE or entities; refused "
                         "(imzML needs none, and they can be used for entity-expansion or "
                         "external-entity attacks)")
    return refuse


def _guarded_parser(path: Path) -> expat.XMLParserType:
    """An expat parser (namespace separator ``}``) that refuses DOCTYPE and entity declarations."""
    parser = expat.ParserCreate(namespace_separator="}")
    refuse = _refuse_doctype(path)
    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    return parser


def _xml_error(path: Path, err: expat.ExpatError) -> InputError:
    return InputError(f"{path}: not a well-formed XML (imzML) file ({expat.ErrorString(err.code)} "
                      f"at line {err.lineno}, column {err.offset})")


def _parse_header_tree(path: Path) -> tuple[ET.Element, int | None, int]:
    """Parse the imzML header up to ``<spectrumList>`` with a guarded expat parser.

    Returns
    -------
    root : xml.etree.ElementTree.Element
        The ``mzML`` element with everything before the spectrum list (tags without namespace).
    n_spectra : int or None
        The ``count`` attribute of ``<spectrumList>``.
    list_offset : int
        Byte offset of ``<spectrumList`` in the file.
    """
    builder = ET.TreeBuilder()
    state: dict = {"root": None, "count": None, "offset": None}
    parser = _guarded_parser(path)

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
            state["offset"] = parser.CurrentByteIndex
            raise _HeaderEnd
        elem = builder.start(local, {k.rpartition("}")[2]: v for k, v in attrs.items()})
        if state["root"] is None:
            state["root"] = elem

    def end(name):
        builder.end(name.rpartition("}")[2])

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
        raise _xml_error(path, err) from None
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err})") from None
    if state["offset"] is None:
        raise InputError(f"{path}: not an imzML file (no <spectrumList> element)")
    return state["root"], state["count"], state["offset"]


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


def _unit_factor(path: Path, param: ET.Element) -> float | None:
    """Factor from a pixel size's unit to micrometres, by unit accession and by unit name.

    A unit stated by name alone is used; an unknown unit is taken as micrometres (imzML's
    default) with a warning. A unit accession and unit name that contradict each other leave
    the pixel size unknown (None, with a warning naming both): the file cannot tell which holds.
    """
    acc = (param.get("unitAccession") or "").strip()
    name = (param.get("unitName") or "").strip()
    by_acc = _UNIT_TO_UM.get(acc)
    by_name = _UNIT_NAME_TO_UM.get(name.lower())
    what = f"{param.get('name') or param.get('accession')} {param.get('value')!r}"
    if by_acc is not None and by_name is not None and by_acc != by_name:
        log.warning("%s: %s: the unit accession %s contradicts the unit name %r; the pixel size "
                    "is treated as not stated (give it in the config)", path, what, acc, name)
        return None
    factor = by_acc if by_acc is not None else by_name
    if factor is None and (acc or name):
        log.warning("%s: %s: unknown unit %s; assuming micrometres", path, what,
                    " ".join(filter(None, (acc, repr(name) if name else ""))))
    return 1.0 if factor is None else factor


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
        factor = _unit_factor(path, p)
        if factor is None:
            continue
        value *= factor
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


@dataclass(frozen=True)
class ArrayParams:
    """What a ``referenceableParamGroup`` (or a binaryDataArray's own cvParams) says of an array.

    Attributes
    ----------
    kind : {"mz", "intensity"} or None
    dtype : numpy.dtype or None
        Little-endian 32/64-bit float or integer.
    compression : {"none", "zlib"}, another compression's name, or None when not stated.
    named : numpy.dtype or None
        The data type the data-type cvParam's *name* states when it contradicts its accession
        (``dtype``); settled by the encoded lengths (:func:`_settle_dtype`).
    """
    kind: str | None = None
    dtype: np.dtype | None = None
    compression: str | None = None
    named: np.dtype | None = None

    def update(self, accession: str, name: str | None) -> "ArrayParams":
        """These parameters with one more cvParam applied."""
        if accession in _ARRAY_KIND:
            return replace(self, kind=_ARRAY_KIND[accession])
        if accession in DTYPES:
            named = _DTYPE_BY_NAME.get((name or "").strip().lower())
            contradicts = named is not None and named != DTYPES[accession]
            return replace(self, dtype=DTYPES[accession], named=named if contradicts else None)
        if accession in _COMPRESSION:
            return replace(self, compression=_COMPRESSION[accession])
        if accession in _OTHER_COMPRESSIONS or (accession.startswith("MS:")
                                                and "compression" in (name or "").lower()):
            return replace(self, compression=name or accession)
        if accession == "MS:1000520":  # 16-bit float: not allowed by imzML
            return replace(self, dtype=np.dtype("<f2"), named=None)
        return self

    def merged(self, other: "ArrayParams") -> "ArrayParams":
        """``other``'s stated values over these."""
        typed = other if other.dtype is not None else self
        return ArrayParams(other.kind or self.kind, typed.dtype,
                           other.compression or self.compression, typed.named)


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
        ``compression`` : str or None, name of a binary-array compression other than none/zlib;
        ``instrument`` : str or None (best effort);
        ``array_groups`` : dict, group id -> :class:`ArrayParams` (groups describing an array);
        ``list_offset`` : int, byte offset of ``<spectrumList`` in the file.

    Raises
    ------
    InputError
        Missing file, not XML, not imzML, DOCTYPE/entities, no spectrum list.
    """
    path = Path(imzml_path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not an imzML file")
    if not path.is_file():
        raise InputError(f"{path}: imzML file not found")
    root, n_spectra, list_offset = _parse_header_tree(path)
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

    array_groups = {}
    for gid, group in groups.items():
        params = ArrayParams()
        for p in group.findall("cvParam"):
            params = params.update(p.get("accession") or "", p.get("name"))
        if params != ArrayParams():
            array_groups[gid] = params
    compression = next((p.compression for p in array_groups.values()
                        if p.compression not in (None, "none", "zlib")), None)

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
        "array_groups": array_groups,
        "list_offset": list_offset,
    }


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
    for cand in sorted(path.parent.glob(glob.escape(path.stem) + ".*")):
        if cand.suffix.lower() == ".ibd" and cand.stem == path.stem and cand.is_file():
            return cand
    raise InputError(f"{path}: binary data file {exact.name} not found beside it")


# --------------------------------------------------------------------------------------------------
# Spectrum index
# --------------------------------------------------------------------------------------------------

@dataclass
class SpectrumIndex:
    """Where every spectrum lies: flat arrays over the spectra in file order.

    Attributes
    ----------
    coords : ndarray, shape (n, 3), int64
        1-based (x, y, z) as stated in the file (z = 1 when the file states none).
    mz_offset, mz_length, mz_encoded : ndarray, shape (n,), int64
        Byte offset in the ``.ibd``, number of values, and number of stored bytes (-1 when the file
        does not state an encoded length) of each m/z array.
    int_offset, int_length, int_encoded : ndarray, shape (n,), int64
        The same for the intensity arrays.
    mz_dtype, int_dtype : numpy.dtype
        Little-endian data types of the m/z and intensity arrays.
    mz_compression, int_compression : str
        "none" or "zlib".
    method : str
        "fast" (vectorised scan) or "general" (expat parse).
    mz_named, int_named : numpy.dtype or None
        The data type the name of the data-type cvParam states where it contradicts the
        accession's (``mz_dtype`` / ``int_dtype``); :func:`read_index` settles it.
    """
    coords: np.ndarray
    mz_offset: np.ndarray
    mz_length: np.ndarray
    mz_encoded: np.ndarray
    int_offset: np.ndarray
    int_length: np.ndarray
    int_encoded: np.ndarray
    mz_dtype: np.dtype
    int_dtype: np.dtype
    mz_compression: str = "none"
    int_compression: str = "none"
    method: str = "fast"
    mz_named: np.dtype | None = None
    int_named: np.dtype | None = None

    @property
    def n(self) -> int:
        """Number of spectra."""
        return len(self.coords)

    def subset(self, sel) -> "SpectrumIndex":
        """The index of the spectra ``sel`` (a slice, indices or a boolean mask)."""
        fields = ("coords", "mz_offset", "mz_length", "mz_encoded", "int_offset", "int_length",
                  "int_encoded")
        return SpectrumIndex(**{f: getattr(self, f)[sel] for f in fields},
                             mz_dtype=self.mz_dtype, int_dtype=self.int_dtype,
                             mz_compression=self.mz_compression,
                             int_compression=self.int_compression, method=self.method,
                             mz_named=self.mz_named, int_named=self.int_named)

    def stored_bytes(self, kind: str) -> np.ndarray:
        """Bytes each ``kind`` ("mz" | "intensity") array occupies in the ``.ibd``, shape (n,)."""
        if kind == "mz":
            length, enc, dtype, comp = (self.mz_length, self.mz_encoded, self.mz_dtype,
                                        self.mz_compression)
        else:
            length, enc, dtype, comp = (self.int_length, self.int_encoded, self.int_dtype,
                                        self.int_compression)
        return enc if comp != "none" else length * dtype.itemsize


class _Unverified(Exception):
    """The fast scan could not verify a chunk; the general parser takes over."""


_NAME_END = np.zeros(256, bool)
_NAME_END[list(b" \t\r\n>/")] = True
_SPACE = np.zeros(256, bool)
_SPACE[list(b" \t\r\n")] = True
#: IMS:1000xxx accessions read from the spectrum list, by xxx.
_FIELDS = {50: "x", 51: "y", 52: "z", 102: "offset", 103: "length", 104: "encoded"}
_VALUE_RE = re.compile(rb"""\svalue\s*=\s*(?:"([^"]*)"|'([^']*)')""")


def _words(buf: bytearray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 view and unaligned little-endian uint64 view (one word per byte offset) of ``buf``.

    ``buf`` must extend at least 64 bytes past the data scanned, so that a pattern of up to 64
    bytes can be compared at any scanned offset.
    """
    a = np.frombuffer(buf, np.uint8)
    w8 = np.ndarray((len(buf) - 7,), dtype="<u8", buffer=buf, offset=0, strides=(1,))
    return a, w8


def _matches(w8: np.ndarray, pos: np.ndarray, pattern: bytes) -> np.ndarray:
    """Boolean mask: ``buf[p:p + len(pattern)] == pattern`` for each ``p`` in ``pos`` (>= 0).

    Compared 8 bytes at a time, each further word only at the positions that matched so far.
    """
    def word_equal(at, piece):
        word = w8[at]
        if len(piece) < 8:
            word = word & np.uint64((1 << (8 * len(piece))) - 1)
        return word == np.uint64(int.from_bytes(piece.ljust(8, b"\0"), "little"))

    ok = word_equal(pos, pattern[:8])
    if len(pattern) > 8:
        idx = np.flatnonzero(ok)
        for i in range(8, len(pattern), 8):
            idx = idx[word_equal(pos[idx] + i, pattern[i:i + 8])]
        ok[:] = False
        ok[idx] = True
    return ok


def _bytes_at(w8: np.ndarray, pos: np.ndarray, n_words: int) -> np.ndarray:
    """The ``8 * n_words`` bytes at each position, shape (len(pos), 8 * n_words), uint8."""
    words = w8[pos[:, None] + 8 * np.arange(n_words)]
    return np.ascontiguousarray(words).view(np.uint8).reshape(len(pos), 8 * n_words)


def _parse_uints(w8: np.ndarray, start: np.ndarray, quote: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised parse of unsigned decimal integers at byte offsets ``start`` ended by ``quote``.

    Returns values (int64) and a mask of the entries that are 1-18 digits followed by the quote.
    """
    k = len(start)
    if not k:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    window = _bytes_at(w8, start, 3)[:, :19]
    is_quote = window == quote
    length = np.argmax(is_quote, axis=1)                  # first quote (0 if none)
    ok = (length >= 1) & is_quote[np.arange(k), length]
    m = max(1, int(length[ok].max()) if ok.any() else 1)
    d = window[:, :m].astype(np.int64) - 48
    inside = np.arange(m) < length[:, None]
    ok &= np.all(~inside | ((d >= 0) & (d <= 9)), axis=1)
    d[~inside] = 0
    values = (d @ 10 ** np.arange(m - 1, -1, -1, dtype=np.int64)) // 10 ** (m - np.clip(length, 1, m))
    return values, ok


def _slow_value(buf: bytearray, pos: int) -> int:
    """The integer ``value`` attribute of the tag containing byte ``pos`` (any attribute order)."""
    lo, hi = buf.rfind(b"<", 0, pos + 1), buf.find(b">", pos)
    m = _VALUE_RE.search(bytes(buf[max(lo, 0):hi if hi >= 0 else len(buf)]))
    if lo < 0 or m is None:
        raise _Unverified("cvParam without a value")
    text = (m.group(1) if m.group(1) is not None else m.group(2)).strip()
    if not text.isdigit():
        raise _Unverified(f"non-integer value {text[:20]!r}")
    if int(text) >= _INT64_LIMIT:
        raise _Unverified(f"value {text[:25]} beyond the 64-bit range")
    return int(text)


def _accession_values(buf: bytearray, w8: np.ndarray, hits: np.ndarray) -> np.ndarray:
    """Integer values of the cvParams whose ``accession="`` attribute starts at ``hits`` (all of
    one accession).

    The bytes from the accession to ``value="`` of the first hit (accession, cvRef and name) are
    required at the same distance at every other hit, with the same 8 bytes before it (the end of
    the ``name`` attribute); hits laid out differently are read one by one.
    """
    if not len(hits):
        return np.zeros(0, np.int64)
    h0 = int(hits[0])
    end = buf.find(b">", h0)
    v0 = buf.find(b' value="', h0, end if end >= 0 else len(buf))
    if v0 < 0 or v0 + 8 - h0 > 120:
        same = np.zeros(len(hits), bool)
        values = np.zeros(len(hits), np.int64)
    else:
        tail = max(h0, v0 - 8)        # the end of the name attribute and ' value="'
        same = _matches(w8, hits + (tail - h0), bytes(buf[tail:v0 + 8]))
        values, ok = _parse_uints(w8, hits + (v0 + 8 - h0), ord('"'))
        same &= ok
    for i in np.flatnonzero(~same):
        values[i] = _slow_value(buf, int(hits[i]))
    return values


def _group_of(sorted_starts: np.ndarray, sorted_ends: np.ndarray | None, pos: np.ndarray
              ) -> np.ndarray:
    """Index of the element (start, end) containing each position, -1 when none."""
    j = np.searchsorted(sorted_starts, pos, side="right") - 1
    if sorted_ends is not None:
        inside = (j >= 0) & (pos < sorted_ends[np.maximum(j, 0)])
        j = np.where(inside, j, -1)
    return j


def _exactly(counts: np.ndarray, lo: int, hi: int, what: str) -> None:
    if len(counts) and (counts.min() < lo or counts.max() > hi):
        raise _Unverified(what)


def _accessions(buf: bytearray, a: np.ndarray, w8: np.ndarray, cv: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Position of ``accession="`` in each ``<cvParam`` tag at ``cv`` (-1 when absent) and the
    number xxx of IMS:1000xxx accessions (-1 for other accessions)."""
    at = np.full(len(cv), -1, np.int64)
    rest = np.arange(len(cv))
    for off in (21, 9, 20):        # after cvRef="IMS", first attribute, after cvRef="MS"
        if not len(rest):
            break
        pos = cv[rest] + off
        m = _matches(w8, pos + 1, b"ccession") & _SPACE[a[pos - 1]]  # '="' is checked below
        at[rest[m]] = pos[m]
        rest = rest[~m]
    for i in rest:                                        # other layouts, one by one
        end = buf.find(b">", int(cv[i]))
        j = buf.find(b' accession="', int(cv[i]), end if end >= 0 else len(buf))
        at[i] = j + 1 if j >= 0 else -1
    code = np.full(len(cv), -1, np.int64)
    ok = np.flatnonzero(at >= 0)
    pos = at[ok] + 11
    ims = (_matches(w8, pos - 2, b'="IMS:10') & (a[pos + 6] == 48) & (a[pos + 7] == 48)
           & (a[pos + 11] == 34))
    ok, pos = ok[ims], pos[ims]
    d = [a[pos + k].astype(np.int64) - 48 for k in (8, 9, 10)]
    digits = (d[0] >= 0) & (d[0] <= 9) & (d[1] >= 0) & (d[1] <= 9) & (d[2] >= 0) & (d[2] <= 9)
    code[ok[digits]] = (100 * d[0] + 10 * d[1] + d[2])[digits]
    return at, code


_ENTITIES = (b"&amp;", b"&lt;", b"&gt;", b"&quot;", b"&apos;", b"&#")
#: ``_LOW_BYTES[k]``: the mask of the low ``k`` bytes of a little-endian word, k = 0..8.
_LOW_BYTES = np.array([(1 << (8 * k)) - 1 for k in range(9)], np.uint64)


def _same_names(w8: np.ndarray, start: np.ndarray, stop: np.ndarray, length: np.ndarray
                ) -> np.ndarray:
    """Whether the ``length`` bytes after each ``<`` at ``start`` equal those after ``</`` at
    ``stop`` (compared 8 bytes at a time)."""
    same = np.ones(len(start), bool)
    for k in range(0, int(length.max(initial=0)), 8):
        mask = _LOW_BYTES[np.clip(length - k, 0, 8)]
        same &= ((w8[start + 1 + k] ^ w8[stop + 2 + k]) & mask) == 0
    return same


def _check_tags(buf: bytearray, a: np.ndarray, w8: np.ndarray, lt: np.ndarray, n: int) -> None:
    """Check, vectorised, that the markup of ``buf[:n]`` (whole spectra; in the first chunk after
    the ``<spectrumList`` tag that opens it) is well formed: each tag closed by ``>`` before the
    next ``<``, double quotes in pairs that each open after ``=``, start and end tags nested
    with the same names, only the predefined entities. Raises :class:`_Unverified` (the general parser
    then gives the precise error) on anything else, also on comments, CDATA, processing
    instructions and attributes written ``= "`` or in single quotes.
    """
    if len(lt) and lt[0] == 0 and _matches(w8, lt[:1], b"<spectrumList")[0]:
        lt = lt[1:]                                      # the list's own start tag
    gt = np.flatnonzero(a[:n] == 62)
    if len(gt) == len(lt):                               # no '>' outside the tags: one each
        end = gt
    else:
        k = np.searchsorted(gt, lt)
        if len(lt) and k[-1] >= len(gt):
            raise _Unverified("a tag is not closed")
        end = gt[np.minimum(k, max(len(gt) - 1, 0))]
    if len(lt) and (np.any(end < lt) or np.any(end[:-1] > lt[1:])):
        raise _Unverified("a tag is not closed before the next one")
    quotes = np.flatnonzero(a[:n] == 34)
    if len(quotes) % 2 or np.any(a[quotes[0::2] - 1] != 61):
        raise _Unverified("a double quote that does not open a value after '=' or close one")
    second = a[lt + 1]
    if np.any((second == ord("!")) | (second == ord("?"))):
        raise _Unverified("comment, CDATA or processing instruction in the spectrum list")
    closing = second == ord("/")
    opening = ~closing & (a[end - 1] != ord("/"))
    step = opening.astype(np.int32) - closing
    depth = np.cumsum(step)
    if len(depth) and (depth.min() < 0 or depth[-1] != 0):
        raise _Unverified("start and end tags do not balance")
    sel = np.flatnonzero(step)                           # start tags (not empty) and end tags
    pairs = sel[np.lexsort((sel, (depth + closing)[sel]))].reshape(-1, 2)  # by level, in order
    if pairs.size and not (opening[pairs[:, 0]].all() and closing[pairs[:, 1]].all()):
        raise _Unverified("start and end tags do not nest")
    start, stop = lt[pairs[:, 0]], lt[pairs[:, 1]]
    length = end[pairs[:, 1]] - stop - 2                 # end tag names: </name>
    if len(length) and (length.min() < 1 or length.max() > 48):
        raise _Unverified("an end tag written differently")
    if not (_same_names(w8, start, stop, length) & _NAME_END[a[start + 1 + length]]).all():
        raise _Unverified("an end tag does not match its start tag")
    amp = np.flatnonzero(a[:n] == 38) if buf.find(b"&", 0, n) >= 0 else ()
    if len(amp) and not np.any([_matches(w8, amp, e) for e in _ENTITIES], axis=0).all():
        raise _Unverified("an entity other than the predefined ones")


def _scan_chunk(buf: bytearray, n: int, groups: dict[str, ArrayParams]) -> dict:
    """Vectorised index of the complete ``<spectrum>`` elements in ``buf[:n]`` (see
    :func:`read_index`); ``buf`` extends at least 64 bytes further.

    Raises
    ------
    _Unverified
        When anything in the chunk does not have the expected structure.
    """
    a, w8 = _words(buf)
    lt = np.flatnonzero(a[:n] == 60)
    _check_tags(buf, a, w8, lt, n)
    nxt = a[lt + 1]
    c = lt[nxt == ord("s")]
    spec = c[_matches(w8, c, b"<spectrum") & _NAME_END[a[c + 9]]]
    c = lt[nxt == ord("b")]
    arr = c[_matches(w8, c, b"<binaryDataArray") & _NAME_END[a[c + 16]]]
    c = lt[nxt == ord("/")]
    arr_end = c[_matches(w8, c, b"</binaryDataArray>")]
    c = lt[nxt == ord("r")]
    refs = c[_matches(w8, c, b"<referenceableParamGroupRef") & _SPACE[a[c + 27]]]
    c = lt[nxt == ord("c")]
    cv = c[_matches(w8, c, b"<cvParam") & _SPACE[a[c + 8]]]
    ns, na = len(spec), len(arr)
    if len(arr_end) != na or (na and (np.any(arr_end <= arr)
                                      or np.any(arr[1:] <= arr_end[:-1]))):
        raise _Unverified("binaryDataArray elements are not nested as expected")
    arr_spec = _group_of(spec, None, arr)
    if na and arr_spec.min() < 0:
        raise _Unverified("binaryDataArray outside a spectrum")

    # array kinds: referenced groups, or m/z / intensity cvParams inside the arrays
    kind = np.zeros(na, np.int8)                             # 0 unknown, 1 m/z, 2 intensity
    if len(refs):
        if not _matches(w8, refs + 28, b'ref="').all():
            raise _Unverified("referenceableParamGroupRef written differently")
        ref_arr = _group_of(arr, arr_end, refs)
        for gid, params in groups.items():
            code = {"mz": 1, "intensity": 2}.get(params.kind)
            if code is None:
                continue
            hit = (ref_arr >= 0) & _matches(w8, refs + 33, gid.encode() + b'"')
            kind[ref_arr[hit]] = code
    acc_at, codes = _accessions(buf, a, w8, cv)
    cv_arr = _group_of(arr, arr_end, cv)
    inside = np.flatnonzero(cv_arr >= 0)
    known = np.isin(codes[inside], [102, 103, 104])
    for acc, k in ((b'MS:1000514"', 1), (b'MS:1000515"', 2)):
        sel = inside[~known]
        m = (acc_at[sel] >= 0) & _matches(w8, acc_at[sel] + 11, acc)
        kind[cv_arr[sel[m]]] = k
        known[np.flatnonzero(~known)[m]] = True
    if not known.all():
        raise _Unverified("data type, compression or another parameter stated inside a "
                          "binaryDataArray")

    out = {"n": ns}
    for acc, field in _FIELDS.items():
        pos = acc_at[codes == acc]
        values = _accession_values(buf, w8, pos)
        if field in ("x", "y", "z"):
            owner = _group_of(spec, None, pos)
            if len(pos) and owner.min() < 0:
                raise _Unverified("position outside a spectrum")
            counts = np.bincount(owner, minlength=ns)
            _exactly(counts, 0 if field == "z" else 1, 1, f"not one position {field} per spectrum")
            if field == "z" and 0 < len(pos) < ns:
                raise _Unverified("position z stated for some spectra only")
            col = np.ones(ns, np.int64) if field == "z" else np.zeros(ns, np.int64)
            col[owner] = values
            out[field] = col
        else:
            owner = _group_of(arr, arr_end, pos)
            if len(pos) and owner.min() < 0:
                raise _Unverified(f"external {field} outside a binaryDataArray")
            counts = np.bincount(owner, minlength=na)
            _exactly(counts, 0 if field == "encoded" else 1, 1, f"not one external {field} per array")
            col = np.full(na, -1, np.int64)
            col[owner] = values
            out[field] = col

    if (kind == 0).any():
        raise _Unverified("binaryDataArray of unknown kind")
    for code, name in ((1, "mz"), (2, "int")):
        sel = np.flatnonzero(kind == code)
        counts = np.bincount(arr_spec[sel], minlength=ns)
        _exactly(counts, 1, 1, f"not one {name} array per spectrum")
        order = arr_spec[sel]
        for field in ("offset", "length", "encoded"):
            col = np.empty(ns, np.int64)
            col[order] = out[field][sel]
            out[f"{name}_{field}"] = col
    for field in ("offset", "length", "encoded"):     # per-array values: no longer needed
        del out[field]
    return out


def _scan_fast(path: Path, header: dict, chunk_bytes: int, threads: int) -> SpectrumIndex:
    """Chunked vectorised scan of the spectrum list (raises :class:`_Unverified`).

    Chunks are scanned by ``threads`` worker threads (numpy releases the GIL); at most
    ``threads + 1`` chunks are held at a time.
    """
    groups = header["array_groups"]
    mz_p = [g for g in groups.values() if g.kind == "mz"]
    int_p = [g for g in groups.values() if g.kind == "intensity"]
    if len({(g.dtype, g.compression, g.named) for g in mz_p}) != 1 \
            or len({(g.dtype, g.compression, g.named) for g in int_p}) != 1:
        raise _Unverified("not exactly one description of the m/z and intensity arrays")
    if mz_p[0].dtype is None or int_p[0].dtype is None:
        raise _Unverified("no data type stated for the m/z or intensity arrays")
    chunk_bytes = max(1024, int(chunk_bytes))
    threads = max(1, int(threads))
    parts: list[dict] = []
    pending: deque = deque()
    carry = b""
    with open(path, "rb") as fh, ThreadPoolExecutor(threads) as pool:
        fh.seek(header["list_offset"])
        while True:
            buf = bytearray(len(carry) + chunk_bytes + 64)
            buf[:len(carry)] = carry
            got = fh.readinto(memoryview(buf)[len(carry):len(carry) + chunk_bytes])
            filled = len(carry) + got
            cut = buf.rfind(b"</spectrum>", 0, filled)
            if got == 0 or cut < 0:
                carry = bytes(buf[:filled])
                if got == 0:
                    break
                continue                          # a spectrum longer than a chunk: read on
            cut += len(b"</spectrum>")
            carry = bytes(buf[cut:filled])
            pending.append(pool.submit(_scan_chunk, buf, cut, groups))
            while len(pending) > threads:
                parts.append(pending.popleft().result())
        while pending:
            parts.append(pending.popleft().result())
    tail = carry
    if b"</spectrumList>" not in tail or re.search(rb"<spectrum[\s>/]", tail):
        raise _Unverified("the spectrum list does not end as expected")
    n = sum(p["n"] for p in parts)
    if header["n_spectra"] is not None and n != header["n_spectra"]:
        raise _Unverified(f"{n} spectra found, {header['n_spectra']} stated")

    def cat(key):
        return np.concatenate([p[key] for p in parts]) if parts else np.zeros(0, np.int64)

    return SpectrumIndex(
        coords=np.stack([cat("x"), cat("y"), cat("z")], axis=1) if n else np.zeros((0, 3), np.int64),
        mz_offset=cat("mz_offset"), mz_length=cat("mz_length"), mz_encoded=cat("mz_encoded"),
        int_offset=cat("int_offset"), int_length=cat("int_length"),
        int_encoded=cat("int_encoded"),
        mz_dtype=mz_p[0].dtype, int_dtype=int_p[0].dtype,
        mz_compression=mz_p[0].compression or "none",
        int_compression=int_p[0].compression or "none", method="fast",
        mz_named=mz_p[0].named, int_named=int_p[0].named)


class _GeneralScanner:
    """Streaming expat parse of the whole file into flat arrays (the reference implementation)."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.header = header
        self.groups = header["array_groups"]
        self.cols = {k: array("q") for k in ("x", "y", "z", "mz_offset", "mz_length", "mz_encoded",
                                             "int_offset", "int_length", "int_encoded")}
        self.params: dict[str, set] = {"mz": set(), "intensity": set()}
        self.spectrum: dict | None = None
        self.array: dict | None = None
        self.depth_scan = False

    def _error(self, problem: str) -> InputError:
        return InputError(f"{self.path}: spectrum {len(self.cols['x'])}: {problem}")

    def _int(self, attrs: dict, what: str) -> int:
        text = (attrs.get("value") or "").strip()
        try:
            value = int(text)
        except ValueError:
            raise self._error(f"{what} {text!r} is not an integer") from None
        if value < 0:
            raise self._error(f"{what} {value} is negative")
        if value >= _INT64_LIMIT:
            raise self._error(f"{what} {value} is beyond the 64-bit range (2^63); the file is "
                              "corrupt")
        return value

    def start(self, name: str, attrs: dict) -> None:
        local = name.rpartition("}")[2]
        if local == "spectrum":
            self.spectrum = {"arrays": []}
        elif self.spectrum is None:
            return
        elif local == "binaryDataArray":
            self.array = {"params": ArrayParams()}
        elif local == "referenceableParamGroupRef" and self.array is not None:
            group = self.groups.get(attrs.get("ref"))
            if group is None:
                raise self._error(f"binaryDataArray refers to unknown group {attrs.get('ref')!r}")
            self.array["params"] = self.array["params"].merged(group)
        elif local == "cvParam":
            acc = attrs.get("accession") or ""
            code = (int(acc[8:]) if acc.startswith("IMS:1000") and len(acc) == 11
                    and acc[8:].isdigit() else None)
            field = _FIELDS.get(code)
            if self.array is not None:
                if field in ("offset", "length", "encoded"):
                    if field in self.array:
                        raise self._error(f"binaryDataArray states its external {field} twice")
                    self.array[field] = self._int(attrs, f"external {field}")
                else:
                    self.array["params"] = self.array["params"].update(acc, attrs.get("name"))
            elif field in ("x", "y", "z"):
                if field in self.spectrum:
                    raise self._error(f"position {field} stated twice")
                self.spectrum[field] = self._int(attrs, f"position {field}")

    def end(self, name: str) -> None:
        local = name.rpartition("}")[2]
        if local == "binaryDataArray" and self.array is not None:
            self.spectrum["arrays"].append(self.array)
            self.array = None
        elif local == "spectrum" and self.spectrum is not None:
            self._finish(self.spectrum)
            self.spectrum = None

    def _finish(self, s: dict) -> None:
        for field in ("x", "y"):
            if field not in s:
                raise self._error(f"no position {field} (IMS:10000{50 + (field == 'y')})")
        arrays = {}
        for arr in s["arrays"]:
            kind = arr["params"].kind
            if kind is None:
                raise self._error("binaryDataArray is neither an m/z nor an intensity array")
            if kind in arrays:
                raise self._error(f"more than one {'m/z' if kind == 'mz' else kind} array")
            for field, acc in (("offset", "IMS:1000102"), ("length", "IMS:1000103")):
                if field not in arr:
                    raise self._error(f"{'m/z' if kind == 'mz' else kind} array has no external "
                                      f"{field} ({acc})")
            arrays[kind] = arr
        for kind in ("mz", "intensity"):
            if kind not in arrays:
                raise self._error(f"no {'m/z' if kind == 'mz' else kind} array")
        self.cols["x"].append(s["x"])
        self.cols["y"].append(s["y"])
        self.cols["z"].append(s.get("z", 1))
        for kind, prefix in (("mz", "mz"), ("intensity", "int")):
            arr = arrays[kind]
            self.cols[f"{prefix}_offset"].append(arr["offset"])
            self.cols[f"{prefix}_length"].append(arr["length"])
            self.cols[f"{prefix}_encoded"].append(arr.get("encoded", -1))
            params = arr["params"]
            self.params[kind].add((params.dtype, params.compression or "none", params.named))

    def run(self, chunk_bytes: int) -> SpectrumIndex:
        parser = _guarded_parser(self.path)
        parser.StartElementHandler = self.start
        parser.EndElementHandler = self.end
        try:
            with open(self.path, "rb") as fh:
                while True:
                    chunk = fh.read(max(1024, int(chunk_bytes)))
                    parser.Parse(chunk, not chunk)
                    if not chunk:
                        break
        except expat.ExpatError as err:
            raise _xml_error(self.path, err) from None
        described = {}
        for kind, found in self.params.items():
            label = "m/z" if kind == "mz" else kind
            if len(found) > 1:
                raise InputError(f"{self.path}: the {label} arrays of different spectra have "
                                 "different data types or compressions; not supported")
            described[kind] = found.pop() if found else (np.dtype("<f8"), "none", None)
            if described[kind][0] is None:
                raise InputError(f"{self.path}: no data type (32/64-bit float or integer) stated "
                                 f"for the {label} arrays")
        cols = {k: np.frombuffer(v, np.int64) if len(v) else np.zeros(0, np.int64)
                for k, v in self.cols.items()}
        stated = self.header["n_spectra"]
        if len(cols["x"]) == 0:
            raise InputError(f"{self.path}: the file contains zero spectra (the spectrumList "
                             f"states {stated})")
        if stated is not None and stated != len(cols["x"]):
            raise InputError(f"{self.path}: the spectrumList states {stated} spectra but holds "
                             f"{len(cols['x'])}")
        return SpectrumIndex(
            coords=np.stack([cols["x"], cols["y"], cols["z"]], axis=1),
            mz_offset=cols["mz_offset"], mz_length=cols["mz_length"],
            mz_encoded=cols["mz_encoded"], int_offset=cols["int_offset"],
            int_length=cols["int_length"], int_encoded=cols["int_encoded"],
            mz_dtype=described["mz"][0], int_dtype=described["intensity"][0],
            mz_compression=described["mz"][1], int_compression=described["intensity"][1],
            method="general", mz_named=described["mz"][2], int_named=described["intensity"][2])


def read_index(imzml_path: str | os.PathLike, header: dict | None = None, *,
               chunk_bytes: int = CHUNK_BYTES, method: str = "auto", threads: int = 2
               ) -> SpectrumIndex:
    """Index the spectrum list of an imzML file: positions, offsets and lengths of all spectra.

    Parameters
    ----------
    imzml_path : path-like
    header : dict, optional
        :func:`read_imzml_header` of the file (read when omitted).
    chunk_bytes : int
        XML bytes scanned at a time; memory use is about ``4 * (threads + 1) * chunk_bytes``
        plus the index (64 bytes per spectrum).
    method : {"auto", "fast", "general"}
        "auto": the vectorised scan, falling back to the general parser (with a log message) when
        the scan cannot verify the file's structure. "general": expat only (the reference, also a
        full well-formedness check). "fast": the scan only; raises when it cannot verify.
    threads : int
        Worker threads of the fast scan.

    Returns
    -------
    SpectrumIndex

    Raises
    ------
    InputError
        Malformed or hostile XML, a spectrum without a position or without its m/z / intensity
        array or external offset / length, non-integer values, mixed or missing data types; each
        message names the file and the spectrum index (0-based, in file order).
    """
    path = Path(imzml_path)
    header = read_imzml_header(path) if header is None else header
    if method not in ("auto", "fast", "general"):
        raise ValueError(f"method must be 'auto', 'fast' or 'general', not {method!r}")
    if method != "general":
        try:
            return _settle_dtypes(path, _scan_fast(path, header, chunk_bytes, threads))
        except _Unverified as why:
            if method == "fast":
                raise InputError(f"{path}: the fast index could not verify the file ({why})") \
                    from None
            log.info("%s: spectrum list indexed by the general XML parser (%s)", path, why)
    return _settle_dtypes(path, _GeneralScanner(path, header).run(chunk_bytes))


def _settle_dtype(path: Path, label: str, stated: np.dtype, named: np.dtype | None,
                  length: np.ndarray, encoded: np.ndarray, compression: str) -> np.dtype:
    """The data type of one kind of arrays whose data-type cvParam contradicts itself.

    The accession (``stated``) and the name (``named``) disagree: the external encoded lengths
    (IMS:1000104) of uncompressed arrays decide when they fit exactly one of the two (a warning
    names the contradiction); otherwise the file is refused.
    """
    if named is None:
        return stated
    what = (f"{path}: the {label} arrays' data type is contradictory: accession "
            f"{_DTYPE_ACC.get(stated, '?')} means {_DTYPE_NAME.get(_DTYPE_ACC.get(stated), stated)}"
            f" but the cvParam is named {_DTYPE_NAME[_DTYPE_ACC[named]]!r}")
    if compression != "none":
        reason = "the arrays are compressed, so their encoded lengths cannot decide"
    elif not len(encoded) or (encoded < 0).any():
        reason = "no external encoded length (IMS:1000104) decides"
    else:
        fits = [dt for dt in (stated, named)
                if np.all((encoded % dt.itemsize == 0) & (encoded // dt.itemsize == length))]
        if len(fits) == 1:
            log.warning("%s; the external encoded lengths (IMS:1000104) are those of %s values, "
                        "which are read", what, _DTYPE_NAME[_DTYPE_ACC[fits[0]]])
            return fits[0]
        reason = ("the external encoded lengths (IMS:1000104) fit "
                  + ("both" if fits else "neither"))
    raise InputError(f"{what}, and {reason}; correct the file's data type")


def _settle_dtypes(path: Path, index: SpectrumIndex) -> SpectrumIndex:
    """``index`` with contradictory data types settled (:func:`_settle_dtype`)."""
    if index.mz_named is None and index.int_named is None:
        return index
    mz = _settle_dtype(path, "m/z", index.mz_dtype, index.mz_named, index.mz_length,
                       index.mz_encoded, index.mz_compression)
    inten = _settle_dtype(path, "intensity", index.int_dtype, index.int_named, index.int_length,
                          index.int_encoded, index.int_compression)
    return replace(index, mz_dtype=mz, int_dtype=inten, mz_named=None, int_named=None)


# --------------------------------------------------------------------------------------------------
# Reading the .ibd
# --------------------------------------------------------------------------------------------------

def _excl_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros(len(x), np.int64)
    np.cumsum(x[:-1], out=out[1:])
    return out


def _gather(raw: bytes, rel: np.ndarray, lengths: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Concatenate the arrays of ``lengths[i]`` values of ``dtype`` at byte ``rel[i]`` of ``raw``."""
    isz = dtype.itemsize
    total = int(lengths.sum())
    out = np.empty(total, dtype)
    if total == 0:
        return out
    dst = _excl_cumsum(lengths)
    misalign = rel % isz
    for r in np.unique(misalign):
        sel = np.flatnonzero(misalign == r)
        view = np.frombuffer(raw, dtype, count=(len(raw) - int(r)) // isz, offset=int(r))
        ln = lengths[sel]
        tot = int(ln.sum())
        if tot == 0:
            continue
        step = np.arange(tot) - np.repeat(_excl_cumsum(ln), ln)
        out[np.repeat(dst[sel], ln) + step] = view[np.repeat((rel[sel] - r) // isz, ln) + step]
    return out


def _inflate(path: Path, raw: bytes, rel: np.ndarray, stored: np.ndarray, lengths: np.ndarray,
             dtype: np.dtype, first: int, label: str) -> np.ndarray:
    """Decompress zlib arrays ``raw[rel:rel + stored]`` and concatenate them."""
    parts = []
    for i, (r, s, n) in enumerate(zip(rel.tolist(), stored.tolist(), lengths.tolist())):
        try:
            data = zlib.decompress(raw[r:r + s])
        except zlib.error as err:
            raise InputError(f"{path}: spectrum {first + i}: {label} array cannot be "
                             f"decompressed ({err})") from None
        if len(data) != n * dtype.itemsize:
            raise InputError(f"{path}: spectrum {first + i}: {label} array inflates to "
                             f"{len(data)} bytes, expected {n} values x {dtype.itemsize} bytes")
        parts.append(np.frombuffer(data, dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def _read_range(fd: int, path: Path, lo: int, size: int) -> bytes:
    raw = os.pread(fd, size, lo)
    if len(raw) != size:
        raise InputError(f"{path}: {size} bytes expected at offset {lo}, only {len(raw)} read; "
                         "the file is truncated")
    return raw


def _block_bounds(nbytes: np.ndarray, block_bytes: int) -> list[tuple[int, int]]:
    """Consecutive (start, stop) ranges of spectra holding about ``block_bytes`` bytes each."""
    cum = np.cumsum(nbytes)
    bounds, start, n = [], 0, len(nbytes)
    while start < n:
        base = cum[start - 1] if start else 0
        stop = int(np.searchsorted(cum, base + block_bytes, side="right"))
        stop = min(n, max(stop, start + 1))
        bounds.append((start, stop))
        start = stop
    return bounds


def iter_spectra(ibd_path: str | os.PathLike, index: SpectrumIndex, *,
                 block_bytes: int = BLOCK_BYTES, read_mz: bool = True
                 ) -> Iterator[tuple[int, int, np.ndarray, np.ndarray | None, np.ndarray]]:
    """Read the spectra of an indexed file in blocks of consecutive spectra.

    Each block is read with one sequential read of the byte range its arrays span (or array by
    array when the arrays are scattered over the file) and cut into spectra by vectorised gathers.

    Parameters
    ----------
    ibd_path : path-like
    index : SpectrumIndex
    block_bytes : int
        Target number of ``.ibd`` bytes per block (at least one spectrum per block); memory use is
        about 3x this.
    read_mz : bool
        Read the m/z arrays (False for continuous files whose shared axis is read once).

    Yields
    ------
    start, stop : int
        Spectra ``start:stop`` of the file.
    indptr : ndarray, shape (stop - start + 1,), int64
        Offsets of each spectrum in the concatenated arrays.
    mz : ndarray, shape (nnz,), ``index.mz_dtype``, or None when ``read_mz`` is False
    intensity : ndarray, shape (nnz,), ``index.int_dtype``
    """
    path = Path(ibd_path)
    kinds = [("intensity", index.int_offset, index.int_length, index.int_dtype,
              index.int_compression)]
    if read_mz:
        kinds.insert(0, ("m/z", index.mz_offset, index.mz_length, index.mz_dtype,
                         index.mz_compression))
    stored = {label: index.stored_bytes("mz" if label == "m/z" else "intensity")
              for label, *_ in kinds}
    total = sum(stored.values())
    with open(path, "rb") as fh:
        fd = fh.fileno()
        for start, stop in _block_bounds(total, int(block_bytes)):
            offs = [k[1][start:stop] for k in kinds]
            sizes = [stored[k[0]][start:stop] for k in kinds]
            lo = min(int(o.min()) for o in offs)
            hi = max(int((o + s).max()) for o, s in zip(offs, sizes))
            needed = sum(int(s.sum()) for s in sizes)
            contiguous = hi - lo <= 2 * needed + (1 << 20)
            raw = _read_range(fd, path, lo, hi - lo) if contiguous else None
            out = []
            for (label, _o, length, dtype, comp), off, size in zip(kinds, offs, sizes):
                ln = length[start:stop]
                if raw is None:                      # scattered arrays: read them one by one
                    parts = [_read_range(fd, path, int(o), int(s)) for o, s in zip(off, size)]
                    buf, rel = b"".join(parts), _excl_cumsum(size)
                else:
                    buf, rel = raw, off - lo
                if comp == "zlib":
                    out.append(_inflate(path, buf, rel, size, ln, dtype, start, label))
                else:
                    out.append(_gather(buf, rel, ln, dtype))
            indptr = np.zeros(stop - start + 1, np.int64)
            np.cumsum(index.int_length[start:stop], out=indptr[1:])
            yield start, stop, indptr, (out[0] if read_mz else None), out[-1]


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

_HEADER = """<?xml version="1.0" encoding="ISO-8859-1"?>
<mzML xmlns="http://psi.hupo.org/ms/mzml" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" \
xsi:schemaLocation="http://psi.hupo.org/ms/mzml http://psidev.info/files/ms/mzML/xsd/mzML1.1.0_idx.xsd" \
version="1.1">
  <cvList count="3">
    <cv id="MS" fullName="Proteomics Standards Initiative Mass Spectrometry Ontology" version="4.1.0" \
uri="https://raw.githubusercontent.com/HUPO-PSI/psi-ms-CV/master/psi-ms.obo"/>
    <cv id="UO" fullName="Unit Ontology" version="09:04:2014" \
uri="http://ontologies.berkeleybop.org/uo.obo"/>
    <cv id="IMS" fullName="Mass Spectrometry Imaging Ontology" version="1.1.0" \
uri="https://raw.githubusercontent.com/imzML/imzML/master/imagingMS.obo"/>
  </cvList>
  <fileDescription>
    <fileContent>
      <cvParam cvRef="MS" accession="MS:1000579" name="MS1 spectrum" value=""/>
      {spectrum_type}
      <cvParam cvRef="IMS" accession="{mode_acc}" name="{mode}" value=""/>
      <cvParam cvRef="IMS" accession="IMS:1000080" name="universally unique identifier" value="{{{uuid}}}"/>
      <cvParam cvRef="IMS" accession="IMS:1000091" name="ibd SHA-1" value="{sha1}"/>
    </fileContent>
  </fileDescription>
  <referenceableParamGroupList count="3">
    <referenceableParamGroup id="mzArray">
      <cvParam cvRef="MS" accession="MS:1000514" name="m/z array" value="" unitCvRef="MS" \
unitAccession="MS:1000040" unitName="m/z"/>
      <cvParam cvRef="MS" accession="{mz_dtype_acc}" name="{mz_dtype_name}" value=""/>
      <cvParam cvRef="MS" accession="MS:1000576" name="no compression" value=""/>
      <cvParam cvRef="IMS" accession="IMS:1000101" name="external data" value="true"/>
    </referenceableParamGroup>
    <referenceableParamGroup id="intensityArray">
      <cvParam cvRef="MS" accession="MS:1000515" name="intensity array" value="" unitCvRef="MS" \
unitAccession="MS:1000131" unitName="number of detector counts"/>
      <cvParam cvRef="MS" accession="{int_dtype_acc}" name="{int_dtype_name}" value=""/>
      <cvParam cvRef="MS" accession="MS:1000576" name="no compression" value=""/>
      <cvParam cvRef="IMS" accession="IMS:1000101" name="external data" value="true"/>
    </referenceableParamGroup>
    <referenceableParamGroup id="spectrum">
      <cvParam cvRef="MS" accession="MS:1000579" name="MS1 spectrum" value=""/>
      <cvParam cvRef="MS" accession="MS:1000511" name="ms level" value="1"/>
      {spectrum_type}
      {polarity}
    </referenceableParamGroup>
  </referenceableParamGroupList>
  <softwareList count="1">
    <software id="msifusion" version="{version}">
      <cvParam cvRef="MS" accession="MS:1000799" name="custom unreleased software tool" value="msifusion"/>
    </software>
  </softwareList>
  <scanSettingsList count="1">
    <scanSettings id="scanSettings1">
      <cvParam cvRef="IMS" accession="IMS:1000042" name="max count of pixels x" value="{nx}"/>
      <cvParam cvRef="IMS" accession="IMS:1000043" name="max count of pixels y" value="{ny}"/>
{pixel_size}    </scanSettings>
  </scanSettingsList>
  <instrumentConfigurationList count="1">
    <instrumentConfiguration id="IC1">
{instrument}    </instrumentConfiguration>
  </instrumentConfigurationList>
  <dataProcessingList count="1">
    <dataProcessing id="msifusion_export">
      <processingMethod order="1" softwareRef="msifusion">
        <cvParam cvRef="MS" accession="MS:1000530" name="file format conversion" value="Output to imzML"/>
      </processingMethod>
    </dataProcessing>
  </dataProcessingList>
  <run defaultInstrumentConfigurationRef="IC1" id="{run_id}">
    <spectrumList count="{n}" defaultDataProcessingRef="msifusion_export">
"""

_SPECTRUM = """      <spectrum id="Scan={i1}" defaultArrayLength="0" index="{i}">
        <referenceableParamGroupRef ref="spectrum"/>
        <scanList count="1">
          <cvParam cvRef="MS" accession="MS:1000795" name="no combination" value=""/>
          <scan instrumentConfigurationRef="IC1">
            <cvParam cvRef="IMS" accession="IMS:1000050" name="position x" value="{x}"/>
            <cvParam cvRef="IMS" accession="IMS:1000051" name="position y" value="{y}"/>
{z}          </scan>
        </scanList>
        <binaryDataArrayList count="2">
          <binaryDataArray encodedLength="0">
            <referenceableParamGroupRef ref="mzArray"/>
            <cvParam cvRef="IMS" accession="IMS:1000103" name="external array length" value="{mn}"/>
            <cvParam cvRef="IMS" accession="IMS:1000104" name="external encoded length" value="{mb}"/>
            <cvParam cvRef="IMS" accession="IMS:1000102" name="external offset" value="{mo}"/>
            <binary/>
          </binaryDataArray>
          <binaryDataArray encodedLength="0">
            <referenceableParamGroupRef ref="intensityArray"/>
            <cvParam cvRef="IMS" accession="IMS:1000103" name="external array length" value="{n}"/>
            <cvParam cvRef="IMS" accession="IMS:1000104" name="external encoded length" value="{ib}"/>
            <cvParam cvRef="IMS" accession="IMS:1000102" name="external offset" value="{io}"/>
            <binary/>
          </binaryDataArray>
        </binaryDataArrayList>
      </spectrum>
"""
_Z = '            <cvParam cvRef="IMS" accession="IMS:1000052" name="position z" value="{}"/>\n'
_FOOTER = "    </spectrumList>\n  </run>\n</mzML>\n"


class ImzMLStreamWriter:
    """Write an imzML/ibd pair block by block (continuous or processed).

    Use as a context manager; both files appear (atomically, ``.ibd`` first) only when the block
    exits without error. The UUID is derived from ``uuid_seed`` so that the same inputs give the
    same files; the SHA-1 of the ``.ibd`` is computed while writing.

    Parameters
    ----------
    path : path-like
        Output ``.imzML`` path; the ``.ibd`` is written beside it.
    mode : {"continuous", "processed"}
    mz_dtype, intensity_dtype : dtype
        32/64-bit float or integer.
    mz_axis : ndarray, shape (n_mz,), optional
        The shared m/z axis (required for continuous files, written once).
    pixel_size_um : float, optional
    spectrum_type : {"profile", "centroid"} or None
    polarity : {"positive", "negative"} or None
    instrument : str, optional
        Written as a userParam of the instrument configuration.
    uuid_seed : str, optional
        Text the UUID is derived from (default: the output file name).
    """

    def __init__(self, path: str | os.PathLike, *, mode: str, mz_dtype=np.float64,
                 intensity_dtype=np.float32, mz_axis: np.ndarray | None = None,
                 pixel_size_um: float | None = None, spectrum_type: str | None = "profile",
                 polarity: str | None = None, instrument: str | None = None,
                 uuid_seed: str | None = None):
        self.path = Path(path)
        self.ibd_path = self.path.with_suffix(".ibd")
        if mode not in ("continuous", "processed"):
            raise ValueError(f"mode must be 'continuous' or 'processed', not {mode!r}")
        self.mode = mode
        self.mz_dtype = np.dtype(mz_dtype).newbyteorder("<")
        self.int_dtype = np.dtype(intensity_dtype).newbyteorder("<")
        for dt in (self.mz_dtype, self.int_dtype):
            if dt not in _DTYPE_ACC:
                raise ValueError(f"imzML arrays are 32/64-bit float or integer, not {dt}")
        if mode == "continuous" and mz_axis is None:
            raise ValueError("a continuous imzML needs mz_axis")
        self.mz_axis = None if mz_axis is None else np.asarray(mz_axis).astype(self.mz_dtype)
        self.pixel_size_um = pixel_size_um
        self.spectrum_type = spectrum_type
        self.polarity = polarity
        self.instrument = instrument
        self.uuid = uuidlib.uuid5(uuidlib.NAMESPACE_URL,
                                  "msifusion:" + (uuid_seed or self.path.name))
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> "ImzMLStreamWriter":
        stack = contextlib.ExitStack()
        try:
            xml_tmp = stack.enter_context(atomic_output(self.path))
            ibd_tmp = stack.enter_context(atomic_output(self.ibd_path))
            self._xml_tmp = xml_tmp
            self._ibd = stack.enter_context(open(ibd_tmp, "wb"))
            self._body = stack.enter_context(tempfile.TemporaryFile(dir=self.path.parent))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        self._sha1 = hashlib.sha1()
        self._pos = 0
        self._n = 0
        self._max_xy = (0, 0)
        self._write_ibd(self.uuid.bytes)
        if self.mz_axis is not None and self.mode == "continuous":
            self._axis_offset = self._pos
            self._write_ibd(self.mz_axis.tobytes())
        return self

    def _write_ibd(self, data: bytes) -> None:
        self._ibd.write(data)
        self._sha1.update(data)
        self._pos += len(data)

    def add_block(self, indptr: np.ndarray, mz: np.ndarray | None, intensity: np.ndarray,
                  xy: np.ndarray, z: np.ndarray | None = None) -> None:
        """Append spectra given as CSR arrays.

        Parameters
        ----------
        indptr : ndarray, shape (n + 1,)
            Offsets of each spectrum in ``mz`` / ``intensity`` (``indptr[0] == 0``).
        mz : ndarray, shape (nnz,) or None
            m/z values (ignored for continuous files, whose spectra are on ``mz_axis``).
        intensity : ndarray, shape (nnz,)
            For continuous files each spectrum holds ``len(mz_axis)`` values.
        xy : ndarray, shape (n, 2)
            0-based (x, y) pixel positions (written 1-based).
        z : ndarray, shape (n,), optional
            0-based z positions; written only when given.
        """
        indptr = np.asarray(indptr, np.int64)
        lengths = np.diff(indptr)
        n = len(lengths)
        xy = np.asarray(xy, np.int64).reshape(n, 2)
        intensity = np.asarray(intensity).astype(self.int_dtype, copy=False)
        if self.mode == "continuous":
            if np.any(lengths != len(self.mz_axis)):
                raise ValueError("continuous spectra must each hold len(mz_axis) values")
            mz_off = np.full(n, self._axis_offset, np.int64)
            mz_len = np.full(n, len(self.mz_axis), np.int64)
        else:
            mz = np.asarray(mz).astype(self.mz_dtype, copy=False)
            mz_off = self._pos + _excl_cumsum(lengths) * self.mz_dtype.itemsize
            mz_len = lengths
            self._write_ibd(mz[indptr[0]:indptr[-1]].tobytes())
        int_off = self._pos + _excl_cumsum(lengths) * self.int_dtype.itemsize
        self._write_ibd(intensity[indptr[0]:indptr[-1]].tobytes())
        zs = None if z is None else (np.asarray(z, np.int64) + 1).tolist()
        text = []
        for k, (x, y, mo, mn, io, ln) in enumerate(zip(
                (xy[:, 0] + 1).tolist(), (xy[:, 1] + 1).tolist(), mz_off.tolist(),
                mz_len.tolist(), int_off.tolist(), lengths.tolist())):
            text.append(_SPECTRUM.format(
                i=self._n + k, i1=self._n + k + 1, x=x, y=y, z="" if zs is None else _Z.format(zs[k]),
                mn=mn, mb=mn * self.mz_dtype.itemsize, mo=mo,
                n=ln, ib=ln * self.int_dtype.itemsize, io=io))
        self._body.write("".join(text).encode("latin-1"))
        self._n += n
        if n:
            self._max_xy = (max(self._max_xy[0], int(xy[:, 0].max()) + 1),
                            max(self._max_xy[1], int(xy[:, 1].max()) + 1))

    def _header(self) -> str:
        from . import __version__

        stype = {"profile": ('MS:1000128', "profile spectrum"),
                 "centroid": ('MS:1000127', "centroid spectrum")}.get(self.spectrum_type)
        pol = {"positive": ("MS:1000130", "positive scan"),
               "negative": ("MS:1000129", "negative scan")}.get(self.polarity)

        def cv(acc_name):
            return ("" if acc_name is None else
                    f'<cvParam cvRef="MS" accession="{acc_name[0]}" name="{acc_name[1]}" value=""/>')
        pixel = ""
        if self.pixel_size_um is not None and math.isfinite(self.pixel_size_um) \
                and self.pixel_size_um > 0:
            pixel = "".join(
                f'      <cvParam cvRef="IMS" accession="IMS:{acc}" name="{name}" '
                f'value="{self.pixel_size_um!r}" unitCvRef="UO" unitAccession="UO:0000017" '
                'unitName="micrometer"/>\n'
                for acc, name in (("1000046", "pixel size (x)"), ("1000047", "pixel size y")))
        instrument = ("" if self.instrument in (None, "", "unknown") else
                      f"      <userParam name={quoteattr(str(self.instrument))}/>\n")
        mz_acc, int_acc = _DTYPE_ACC[self.mz_dtype], _DTYPE_ACC[self.int_dtype]
        return _HEADER.format(
            spectrum_type=cv(stype), polarity=cv(pol),
            mode=self.mode,
            mode_acc="IMS:1000030" if self.mode == "continuous" else "IMS:1000031",
            uuid=str(self.uuid), sha1=self._sha1.hexdigest(),
            mz_dtype_acc=mz_acc, mz_dtype_name=_DTYPE_NAME[mz_acc],
            int_dtype_acc=int_acc, int_dtype_name=_DTYPE_NAME[int_acc],
            version=__version__, nx=self._max_xy[0], ny=self._max_xy[1], pixel_size=pixel,
            instrument=instrument, run_id=quoteattr(self.path.stem)[1:-1], n=self._n)

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        if exc_type is None:
            try:
                if self._n == 0:
                    raise InputError(f"{self.path}: no spectra to write")
                self._ibd.flush()
                with open(self._xml_tmp, "wb") as out:
                    out.write(self._header().encode("latin-1"))
                    self._body.seek(0)
                    shutil.copyfileobj(self._body, out, 1 << 22)
                    out.write(_FOOTER.encode("latin-1"))
            except BaseException as err:
                stack.__exit__(type(err), err, err.__traceback__)
                raise
        return bool(stack.__exit__(exc_type, exc, tb))
