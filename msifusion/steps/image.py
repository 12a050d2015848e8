"""Step of the image rule: one microscopy image as a level of the chain.

The image is read block-averaged to its working grid (from the pyramid level that allows it, in
bounded memory), turned into its features (stain features for bright-field, background-subtracted
channels for fluorescence) and its tissue-versus-background mask, and written in the layout of an
NMF file (``docs/design.md``): the features are the level's component maps, their "spectra" the
identity, so that the section, registration and fusion stages treat it as any other level.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ..errors import InputError
from ..figures import plot_image_level
from ..image import background_mask, choose_downsample, read_image, read_image_info, stain_features
from ..metadata import resolve_pixel_size
from ..schema import default
from ..store import write_nmf

log = logging.getLogger("msifusion.steps.image")


def image_step(image: str, out: str, *, modality: str, file_id: str,
               pixel_size_um: float | None = default("modality.pixel_size_um"),
               force_pixel_size: bool = default("modality.force_pixel_size"),
               stain: str = default("modality.image.stain"),
               max_pixels: int = default("modality.image.max_pixels"),
               memory_mb: float = default("modality.image.memory_mb"),
               figure: str | None = None) -> None:
    """Read one image of an image level and write its features, tissue mask and pixel size.

    Parameters
    ----------
    image : str
        TIFF / OME-TIFF / PNG / JPEG file.
    out : str
        Output file (NMF layout): ``/maps/{file_id}`` the features (k, ny, nx) on the working
        grid, ``/tissue/{file_id}`` its tissue mask, ``/spectra`` the identity (k, k), ``/mz``
        the channel numbers 1..k; the maps' attributes hold the working ``pixel_size_um`` (NaN
        when unknown: the registration finds the scale), its ``pixel_size_source``, the
        ``downsample`` factor and the ``channel_names`` (tab-separated).
    pixel_size_um, force_pixel_size : float or None, bool
        The configured level-0 pixel size (um) and whether it overrides the file's
        (:func:`msifusion.metadata.resolve_pixel_size`, origin ``"image"``).
    stain : {"auto", "brightfield", "fluorescence"}
        ``auto``: the kind the file's header gives (RGB colour images are bright-field).
    max_pixels, memory_mb : int, float
        Working grid size bound (:func:`msifusion.image.choose_downsample`) and reading memory.
    figure : str, optional
        PNG of the image, its tissue outline and features (:func:`plot_image_level`).
    """
    info = read_image_info(image)
    px = resolve_pixel_size(info.pixel_size_um, pixel_size_um, force=force_pixel_size,
                            where=f"{image} ({modality})",
                            key=f"modalities.{modality}.pixel_size_um", required=False,
                            origin="image")
    kind = info.kind if stain == "auto" else stain
    if kind == "brightfield" and info.channels != 3:
        raise InputError(f"{image}: 'modalities.{modality}.image.stain' is brightfield but the "
                         f"image has {info.channels} channel(s), not RGB")
    f = choose_downsample(info, max_pixels=max_pixels)
    img = read_image(image, f, memory_mb=memory_mb, info=info)
    features, names = stain_features(img, kind, channel_names=info.channel_names)
    tissue = background_mask(img, kind)
    work_px = px.um * f if math.isfinite(px.um) else float("nan")
    note = "; ".join(n for n in (px.note, info.pixel_size_note if px.source in ("image", "none")
                                 else "") if n)
    log.info("%s: %d x %d px (%s, %d channels), read block-averaged by %d -> %d x %d; pixel "
             "size %s; %d features (%s), tissue %.1f %% of the field", image, info.shape[1],
             info.shape[0], kind, info.channels, f, img.shape[1], img.shape[0],
             f"{px.um:g} um ({px.source}) -> {work_px:g} um" if math.isfinite(px.um)
             else "unknown (the registration finds the scale)", len(names), ", ".join(names),
             100 * tissue.mean())
    if note:
        log.info("%s: %s", image, note)
    k = features.shape[0]
    attrs = {"source": str(image), "pixel_size_um": work_px, "pixel_size_source": px.source,
             "pixel_size_note": note, "level0_pixel_size_um": px.um, "downsample": int(f),
             "channel_names": "\t".join(names), "kind": kind}
    write_nmf(out, spectra=np.eye(k, dtype=np.float32), mz=np.arange(1, k + 1, dtype=np.float64),
              errors=np.zeros(0), maps={file_id: features}, map_attrs={file_id: attrs},
              tissue={file_id: tissue}, attrs={"modality": modality, "kind": "image",
                                               "stain": kind, "rank": k})
    if figure:
        plot_image_level(img, features, names, tissue, figure, pixel_size_um=work_px,
                         title=f"{modality}: {file_id}")
