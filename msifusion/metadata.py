"""Acquisition metadata decisions: what a file states against what the config gives.

The rule everywhere: the file's own metadata wins, the config fills only what a file lacks, and
an explicit override key forces a value. One function per decision, called by every stage that
needs it (and by the start-up check, which logs each decision once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class PixelSize:
    """The pixel size of one acquisition as decided by :func:`resolve_pixel_size`.

    Attributes
    ----------
    um : float
        Pixel size in micrometres (NaN when unknown and not required).
    source : str
        ``"imzML"`` or ``"image"`` (the file's metadata), ``"config"`` (the file states none),
        ``"config (forced)"`` or ``"none"`` (unknown: an image level whose scale the
        registration finds).
    note : str
        Why, when the config and the file disagree (empty otherwise).
    """

    um: float
    source: str
    note: str = ""


def resolve_pixel_size(stated: float | None, configured: float | None, *, force: bool = False,
                       where: str = "", key: str = "pixel_size_um",
                       required: bool = True, origin: str = "imzML") -> PixelSize:
    """Which pixel size an acquisition has: the one decision every stage calls.

    The file's own metadata wins; the configured value fills only what the file lacks; with
    ``force`` the configured value replaces the file's.

    Parameters
    ----------
    stated : float or None
        Pixel size (um) the file states (None or NaN: none).
    configured : float or None
        ``modalities.<name>.pixel_size_um`` of the config (um).
    force : bool
        ``modalities.<name>.force_pixel_size``: the configured value overrides the file's.
    where : str
        The file (and modality) for messages.
    key : str
        The config key named in messages.
    required : bool
        Raise when neither gives a size (else NaN with source ``"none"``).
    origin : str
        What states ``stated``: ``"imzML"`` or ``"image"`` (a microscopy image's metadata); the
        source of a file's own value, and the word used in messages.

    Returns
    -------
    PixelSize

    Raises
    ------
    InputError
        ``required`` and no size from the file nor the config; ``force`` without a value.

    >>> resolve_pixel_size(1.0, 5.0).um, resolve_pixel_size(None, 5.0).source
    (1.0, 'config')
    """
    stated = float(stated) if stated is not None and math.isfinite(float(stated)) else None
    configured = float(configured) if configured is not None else None
    force_key = key.rpartition(".")[0] + ".force_pixel_size" if "." in key else "force_pixel_size"
    if force:
        if configured is None:
            raise InputError(f"{where}: '{force_key}' is set but '{key}' is not")
        note = (f"configured {configured:g} um forced over the {origin}'s {stated:g} um"
                if stated is not None and not _close(stated, configured) else "")
        return PixelSize(configured, "config (forced)", note)
    if stated is not None:
        note = ""
        if configured is not None and not _close(stated, configured):
            note = (f"'{key}: {configured:g}' ignored: the {origin} states {stated:g} um (set "
                    f"'{force_key}: true' to override the file)")
        return PixelSize(stated, origin, note)
    if configured is not None:
        return PixelSize(configured, "config")
    if required:
        raise InputError(f"{where}: pixel size unknown: the {origin} states none; set '{key}' "
                         "in the config")
    return PixelSize(float("nan"), "none")


def _close(a: float, b: float, rtol: float = 0.01) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b))


def working_roi(roi: tuple[int, int, int, int], downsample: int) -> tuple[int, int, int, int]:
    """An ROI ``(x0, x1, y0, y1)`` given in level-0 pixels of an image, on its working grid
    (block-averaged by ``downsample``): every working pixel the ROI touches. The sheet gives an
    image level's ROIs in the pixels of the file (what a viewer shows); every stage that needs
    them on the working grid calls this.

    >>> working_roi((10, 95, 0, 40), 4)
    (2, 24, 0, 10)
    """
    f = int(downsample)
    x0, x1, y0, y1 = (int(v) for v in roi)
    return x0 // f, -(-x1 // f), y0 // f, -(-y1 // f)
