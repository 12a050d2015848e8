"""Tissue masks, sections and regions of interest from a total-ion-like image.

The tissue mask follows the published recipe: an Otsu threshold on the (log) total-ion-like image,
then the morphological clean-up (dilation, hole filling) and removal of small objects. Two
additions make it robust on MSI data: a light NaN-aware smoothing of the log image against pixel
noise, and Otsu's threshold centred on its plateau (well-separated classes). Connected
components of the mask are the tissue sections; :func:`propose_rois` turns them into ROIs
``(x0, x1, y0, y1)`` (half-open, pixels, see ``docs/design.md``).

All functions take images indexed ``[y, x]``; ``NaN`` marks pixels that were not acquired and is
never counted as tissue.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage as ndi

from .schema import default

log = logging.getLogger("msifusion.tissue")

__all__ = ["tissue_mask", "tissue_mask_from_maps", "field_inside_tissue", "interleaving", "label_sections",
           "propose_rois", "soft_mask"]


def _disk(radius: int) -> np.ndarray:
    """Boolean disk footprint of integer ``radius`` (pixels), shape (2r+1, 2r+1)."""
    r = int(radius)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return xx * xx + yy * yy <= r * r + r  # "+ r" rounds the rim like skimage.morphology.disk


def _log_image(values: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """``log(image + eps)`` with ``eps`` = half the median of the positive finite values.

    Negative values (baseline-corrected data) are clipped to 0 first; non-finite pixels stay NaN.
    The offset keeps empty pixels (exact zeros, common in sparse MSI backgrounds) next to the
    low-count background instead of forming a class of their own, while hot spots are compressed.
    """
    v = np.where(finite, np.clip(values, 0.0, None), np.nan)
    pos = v[finite & (v > 0)]
    eps = 0.5 * float(np.median(pos)) if pos.size else 1.0
    return np.log(v + eps)


def otsu_threshold(values: np.ndarray, nbins: int = 256, tol: float = 1e-3) -> float:
    """Otsu's threshold, centred on the plateau of (near-)maximal between-class variance.

    With well-separated classes the criterion is flat over the whole gap between them and plain
    Otsu takes its first bin (right above the lower class); the centre of the plateau is the
    natural choice there and equals Otsu's threshold otherwise.

    Parameters
    ----------
    values : ndarray
        Finite values (any shape).
    nbins : int
        Histogram bins.
    tol : float
        Relative tolerance defining the plateau: bins within ``tol`` of the maximum criterion.

    Returns
    -------
    float
        Threshold: values above it form the upper class.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    hist, edges = np.histogram(v, bins=nbins)
    hist = hist.astype(np.float64)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)[:-1]  # lower class = bins 0..i, threshold between bin i and i + 1
    w1 = hist.sum() - w0
    s0 = np.cumsum(hist * centres)[:-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        crit = w0 * w1 * (s0 / w0 - (np.dot(hist, centres) - s0) / w1) ** 2
    crit = np.nan_to_num(crit, nan=-1.0)
    best = int(np.argmax(crit))
    lo = hi = best
    top = crit[best] * (1.0 - tol)
    while lo > 0 and crit[lo - 1] >= top:
        lo -= 1
    while hi < len(crit) - 1 and crit[hi + 1] >= top:
        hi += 1
    return float(0.5 * (edges[lo + 1] + edges[hi + 1]))


def remove_small_components(mask: np.ndarray, min_size_px: int, connectivity: int = 2) -> np.ndarray:
    """Drop connected components of ``mask`` with fewer than ``min_size_px`` pixels.

    Parameters
    ----------
    mask : ndarray of bool, shape (ny, nx)
    min_size_px : int
        Smallest component kept, in pixels.
    connectivity : {1, 2}
        1: 4-connected, 2: 8-connected.

    Returns
    -------
    ndarray of bool, shape (ny, nx)
    """
    labels, n = ndi.label(mask, structure=ndi.generate_binary_structure(2, connectivity))
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= int(min_size_px)
    keep[0] = False
    return keep[labels]


def tissue_mask(
    image: np.ndarray,
    *,
    dilation_px: int = 1,
    min_size_px: int | None = None,
    threshold: float | None = None,
    log_scale: bool = True,
    smooth_px: float = 1.0,
    fill_holes: bool = True,
) -> np.ndarray:
    """Tissue mask of a total-ion-like image: Otsu threshold, dilation, hole filling, small objects out.

    Parameters
    ----------
    image : ndarray, shape (ny, nx)
        Total-ion-like image (e.g. TIC or the sum of NMF component maps), any non-negative units;
        ``NaN`` where not acquired.
    dilation_px : int
        Radius (pixels) of the disk the thresholded mask is dilated with (0: none). Keep it small:
        it grows the mask by this many pixels of *this* modality.
    min_size_px : int, optional
        Connected components smaller than this (pixels) are removed. Default: 0.5 % of the acquired
        pixels, at least 4.
    threshold : float, optional
        Fixed threshold in the units of ``image`` (tissue is ``image > threshold``); default Otsu.
    log_scale : bool
        Apply Otsu to ``log(image + eps)`` (robust to hot spots) instead of the plain image. Ignored
        when ``threshold`` is given.
    smooth_px : float
        Gaussian sigma (pixels) applied to the (log) image before thresholding, ignoring non-acquired
        pixels; tames pixel noise (0: none). Smoothing the log image keeps a tissue edge where it is.
    fill_holes : bool
        Fill holes enclosed by tissue.

    Returns
    -------
    ndarray of bool, shape (ny, nx)
        True on tissue; always False where ``image`` is not finite. All False when nothing separates
        tissue from background (constant or empty image): the caller decides what to do.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"tissue_mask: expected a 2-D image (ny, nx), got shape {img.shape}")
    finite = np.isfinite(img)
    empty = np.zeros(img.shape, dtype=bool)
    if not finite.any():
        log.warning("tissue_mask: image has no finite pixel; returning an empty mask")
        return empty
    if threshold is not None:
        mask = finite & (np.where(finite, img, -np.inf) > float(threshold))
    else:
        work = _log_image(img, finite) if log_scale else np.where(finite, img, np.nan)
        if smooth_px and smooth_px > 0:
            w = finite.astype(np.float64)
            num = ndi.gaussian_filter(np.where(finite, work, 0.0), float(smooth_px), mode="nearest")
            den = ndi.gaussian_filter(w, float(smooth_px), mode="nearest")
            work = np.where(finite, num / np.maximum(den, 1e-12), np.nan)
        vals = work[finite]
        if float(vals.max()) <= float(vals.min()):
            log.warning("tissue_mask: constant image; returning an empty mask")
            return empty
        t = otsu_threshold(vals)
        mask = finite & (np.where(finite, work, -np.inf) > t)
    if dilation_px and dilation_px > 0:
        mask = ndi.binary_dilation(mask, structure=_disk(dilation_px))
    if fill_holes:
        mask = ndi.binary_fill_holes(mask)
    mask &= finite
    if min_size_px is None:
        min_size_px = max(4, int(round(0.005 * finite.sum())))
    mask = remove_small_components(mask, min_size_px)
    log.debug("tissue_mask: %d tissue pixels of %d acquired", int(mask.sum()), int(finite.sum()))
    return mask


def label_sections(mask: np.ndarray, connectivity: int = 2) -> tuple[np.ndarray, int]:
    """Connected components of a tissue mask, numbered by decreasing size.

    Parameters
    ----------
    mask : ndarray of bool, shape (ny, nx)
    connectivity : {1, 2}
        1: 4-connected, 2: 8-connected.

    Returns
    -------
    labels : ndarray of int32, shape (ny, nx)
        0 on background, 1 on the largest component, 2 on the next, ...
    n : int
        Number of components.
    """
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndi.label(mask, structure=ndi.generate_binary_structure(2, connectivity))
    if n == 0:
        return labels.astype(np.int32), 0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-sizes, kind="stable")  # old label - 1, largest first
    relabel = np.zeros(n + 1, dtype=np.int32)
    relabel[order + 1] = np.arange(1, n + 1, dtype=np.int32)
    return relabel[labels], int(n)


def propose_rois(mask: np.ndarray, margin_px: int = 0) -> list[tuple[int, int, int, int]]:
    """One bounding box per tissue section, largest section first.

    Parameters
    ----------
    mask : ndarray of bool, shape (ny, nx)
    margin_px : int
        Pixels added on every side (clipped to the image).

    Returns
    -------
    list of (x0, x1, y0, y1)
        Half-open pixel ranges: the section lies in ``image[y0:y1, x0:x1]``.
    """
    labels, n = label_sections(mask)
    ny, nx = labels.shape
    m = int(margin_px)
    rois = []
    for sl in ndi.find_objects(labels, max_label=n):  # index i -> label i + 1 (largest first)
        ys, xs = sl
        rois.append((max(0, xs.start - m), min(nx, xs.stop + m), max(0, ys.start - m), min(ny, ys.stop + m)))
    return rois


def soft_mask(mask: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian-smoothed mask in [0, 1].

    Parameters
    ----------
    mask : ndarray of bool, shape (ny, nx)
    sigma_px : float
        Gaussian sigma in pixels (0: no smoothing).

    Returns
    -------
    ndarray of float32, shape (ny, nx)
    """
    m = np.asarray(mask, dtype=np.float32)
    if sigma_px and sigma_px > 0:
        m = ndi.gaussian_filter(m, float(sigma_px), mode="constant", cval=0.0)
    return np.clip(m, 0.0, 1.0).astype(np.float32, copy=False)


#: Smallest share of its fair part of the image border the tissue class must touch for the field
#: to possibly lie inside the tissue: a section inside the field touches it hardly at all (phantoms:
#: below 0.05), while the classes of a texture touch it about as often as their shares predict (1,
#: give or take a lot on a field of a few hundred pixels).
INSIDE_BORDER_RATIO = 0.25
#: Normalised boundary density (:func:`interleaving`) above which the two classes are a texture of
#: one tissue rather than tissue and background (regions: below 0.11 on phantoms; wood: 0.14-0.5).
INSIDE_INTERLEAVING = 0.1
#: Share of the acquired pixels below which what is left of the background class after the
#: majority smoothing of :func:`interleaving` is no background (isolated dark pixels or vessels).
INSIDE_MAX_BACKGROUND = 0.05


def _border(img: np.ndarray) -> np.ndarray:
    """The image border as one loop of pixels (each once), shape (2 (ny + nx) - 4,)."""
    if min(img.shape) < 2:
        return img.ravel()
    return np.concatenate([img[0, :], img[1:, -1], img[-1, -2::-1], img[-2:0:-1, 0]])


def interleaving(cls: np.ndarray, acquired: np.ndarray, sigma_px: float = 1.0) -> tuple[float, float]:
    """How finely one class of a two-class labelling is interleaved with the other.

    The class indicator is smoothed (Gaussian ``sigma_px``, NaN-aware) and thresholded at 1/2 (a
    local majority vote: isolated pixels, e.g. counting noise, go to the surrounding class); the
    number of 4-neighbour pairs of acquired pixels with different labels is then divided by its
    expectation ``2 p (1 - p)`` per pair for a spatially random labelling with the same share ``p``.

    Parameters
    ----------
    cls : ndarray of bool, shape (ny, nx)
        The class (False where not acquired).
    acquired : ndarray of bool, shape (ny, nx)
    sigma_px : float
        Scale of the majority vote, pixels.

    Returns
    -------
    density : float
        About 0 for large regions (a section and its background: the pairs across one outline),
        towards 1 for a salt-and-pepper pattern; 0 when the smoothed class is empty or full.
    share : float
        Share ``p`` of the acquired pixels in the smoothed class.
    """
    w = acquired.astype(np.float64)
    num = ndi.gaussian_filter(np.where(acquired, cls, 0.0).astype(np.float64), sigma_px, mode="nearest")
    den = ndi.gaussian_filter(w, sigma_px, mode="nearest")
    major = acquired & (num > 0.5 * np.maximum(den, 1e-12))
    p = float(major.sum() / max(1, acquired.sum()))
    both = (acquired[1:] & acquired[:-1], acquired[:, 1:] & acquired[:, :-1])
    pairs = int(both[0].sum() + both[1].sum())
    differ = int(((major[1:] != major[:-1]) & both[0]).sum() + ((major[:, 1:] != major[:, :-1]) & both[1]).sum())
    if pairs == 0 or p * (1.0 - p) == 0:
        return 0.0, p
    return float(differ / (pairs * 2.0 * p * (1.0 - p))), p


def field_inside_tissue(labels_img: np.ndarray, tissue: int, acquired: np.ndarray) -> bool:
    """Whether a two-class labelling shows a field of view lying inside the tissue (no background).

    A section with background around it, or beside it (a field of view that crosses the section's
    edge), makes a background *region*: the tissue class touches the border less than its share
    would predict, or the classes meet along outlines only. Inside the tissue (e.g. a wood section
    filling the field), both classes are parts of the tissue's texture (cell walls, empty vessel
    lumens, counting noise): the tissue class reaches the border (:data:`INSIDE_BORDER_RATIO`) and
    the classes interleave finely (:func:`interleaving` above :data:`INSIDE_INTERLEAVING`), or
    hardly any background is left after a majority vote (:data:`INSIDE_MAX_BACKGROUND`).

    Parameters
    ----------
    labels_img : ndarray of int, shape (ny, nx)
        Class 0 or 1 per acquired pixel, -1 elsewhere.
    tissue : int
        The class taken for tissue.
    acquired : ndarray of bool, shape (ny, nx)

    Returns
    -------
    bool
    """
    border = _border(labels_img)
    border = border[border >= 0]
    share = float(np.mean(labels_img[acquired] == tissue))
    if not len(border) or share <= 0:
        return False
    ratio = float(np.mean(border == tissue)) / share
    density, bg_share = interleaving((labels_img != tissue) & acquired, acquired)
    log.debug("tissue classes: tissue border ratio %.2f, interleaving %.3f, smoothed background %.3f",
              ratio, density, bg_share)
    return ratio >= INSIDE_BORDER_RATIO and (density >= INSIDE_INTERLEAVING
                                             or bg_share < INSIDE_MAX_BACKGROUND)


def tissue_mask_from_maps(
    maps: np.ndarray,
    *,
    dilation_px: int = default("tissue.dilation_px"),
    min_size_px: int | None = default("tissue.min_size_px"),
    seed: int = default("seed"),
) -> np.ndarray:
    """Tissue mask from component maps: two-cluster k-means on signal level and composition.

    The total-ion image alone does not always tell tissue from background (a MALDI matrix gives as
    much signal off tissue as on it), but the *composition* of the spectra does: background pixels
    are made of other components than tissue pixels. Each acquired pixel is described by its
    standardised log total signal and its component fractions; k-means splits them in two and the
    cluster that covers less of the image border is tissue. Holes are filled, small objects removed.
    When the two clusters are parts of one tissue's texture instead (a field of view inside the
    tissue, :func:`field_inside_tissue`), every acquired pixel is tissue.

    Parameters
    ----------
    maps : ndarray, shape (k, ny, nx)
        Non-negative component maps (NMF ``W`` as images), ``NaN`` where not acquired.
    dilation_px : int
        Radius (pixels) of a dilation of the mask (0: none).
    min_size_px : int, optional
        Components smaller than this are removed (default: 0.5 % of the acquired pixels, >= 4).
    seed : int
        Seed of the k-means initialisation.

    Returns
    -------
    ndarray of bool, shape (ny, nx)
        All False when the image holds fewer than 8 acquired pixels or no signal.
    """
    from sklearn.cluster import KMeans

    maps = np.asarray(maps, dtype=np.float64)
    acquired = np.isfinite(maps).all(axis=0)
    empty = np.zeros(acquired.shape, dtype=bool)
    if acquired.sum() < 8:
        return empty
    w = np.clip(maps[:, acquired].T, 0.0, None)  # (n, k)
    total = w.sum(axis=1)
    if not (total > 0).any():
        return empty
    top = float(np.percentile(total, 99))
    level = np.log(total + 1e-3 * top)
    comp = w / np.maximum(total, 1e-12)[:, None]
    feats = np.column_stack([(level - level.mean()) / (level.std() + 1e-12),
                             comp / (comp.std(axis=0).mean() + 1e-12) * 0.5])
    labels = KMeans(2, n_init=4, random_state=seed).fit_predict(feats)
    img = np.full(acquired.shape, -1)
    img[acquired] = labels
    border = _border(img)
    border = border[border >= 0]
    frac = [np.mean(border == c) if len(border) else 0.5 for c in (0, 1)]
    share = [np.mean(labels == c) for c in (0, 1)]
    if abs(frac[0] - frac[1]) < 1e-9:
        tissue = int(np.argmax([level[labels == c].mean() for c in (0, 1)]))
    else:
        # less border per pixel of the cluster = tissue
        tissue = int(np.argmin([frac[c] / max(share[c], 1e-12) for c in (0, 1)]))
    if field_inside_tissue(img, tissue, acquired):
        log.info("tissue_mask_from_maps: the two classes are a texture of the tissue (the field of "
                 "view lies inside it): all %d acquired pixels are tissue", int(acquired.sum()))
        return acquired
    mask = img == tissue
    if dilation_px and dilation_px > 0:
        mask = ndi.binary_dilation(mask, structure=_disk(dilation_px))
    mask = ndi.binary_fill_holes(mask) & acquired
    if min_size_px is None:
        min_size_px = max(4, int(round(0.005 * acquired.sum())))
    return remove_small_components(mask, min_size_px)
