"""Figures: images with colour and scale bars, before/after pairs, spectra and NMF components.

Drawn with matplotlib's object API on an Agg canvas (no pyplot state) and written through
:func:`msifusion.store.atomic_output`.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from .errors import InputError
from .store import atomic_output


def _robust_limits(img: np.ndarray, lo: float = 1.0, hi: float = 99.5) -> tuple[float, float]:
    """Colour limits at the ``lo`` / ``hi`` percentiles of the finite values (never equal)."""
    vals = np.asarray(img, dtype=np.float64)
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    vmin, vmax = np.percentile(vals, [lo, hi])
    if vmax <= vmin:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    return float(vmin), float(vmax)


def _nice_length(target: float) -> float:
    """Round length 1, 2 or 5 x 10^n not above ``target`` (> 0)."""
    exp = np.floor(np.log10(target))
    for step in (5.0, 2.0, 1.0):
        if step * 10 ** exp <= target:
            return float(step * 10 ** exp)
    return float(10 ** exp)


def _draw_map(fig, ax, img, *, pixel_size_um: float, cmap: str, label: str | None,
              title: str | None = None) -> None:
    """Image with robust limits, NaN in light grey, a colour bar and a scale bar in um."""
    import matplotlib
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    img = np.asarray(img, dtype=np.float64)
    cm = matplotlib.colormaps[cmap].with_extremes(bad="lightgrey")
    vmin, vmax = _robust_limits(img)
    im = ax.imshow(np.ma.masked_invalid(img), cmap=cm, vmin=vmin, vmax=vmax,
                   interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    if label:
        cb.set_label(label, fontsize=8)
    cb.ax.tick_params(labelsize=7)
    if pixel_size_um and np.isfinite(pixel_size_um) and pixel_size_um > 0:
        length_um = _nice_length(img.shape[1] * pixel_size_um / 4.0)
        text = f"{length_um:g} um" if length_um < 1000 else f"{length_um / 1000:g} mm"
        bar = AnchoredSizeBar(ax.transData, length_um / pixel_size_um, text, "lower right",
                              pad=0.3, color="white", frameon=False, size_vertical=max(
                                  1.0, img.shape[0] / 80), fontproperties={"size": 8})
        ax.add_artist(bar)


def _new_figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path) -> None:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def save_image_png(img: np.ndarray, path: str | os.PathLike, *, pixel_size_um: float,
                   title: str = "", cmap: str = "viridis",
                   label: str = "intensity (a.u.)") -> None:
    """Save one image (ny, nx) as PNG with a colour bar and a scale bar in um.

    Colour limits are the 1 and 99.5 percentiles of the finite values; NaN (not acquired) is
    drawn light grey.
    """
    img = np.asarray(img)
    if img.ndim != 2:
        raise InputError(f"{path}: PNG image must be (ny, nx), got {img.shape}")
    ny, nx = img.shape
    fig = _new_figure(5.0, max(2.0, 5.0 * ny / max(nx, 1)))
    ax = fig.add_subplot()
    _draw_map(fig, ax, img, pixel_size_um=pixel_size_um, cmap=cmap, label=label, title=title)
    _save_figure(fig, path)


def plot_before_after(before: np.ndarray, after: np.ndarray, path: str | os.PathLike, *,
                      pixel_size_um: float, titles=("before", "after"), suptitle: str = "",
                      label: str = "intensity (a.u.)") -> None:
    """Two images (ny, nx) side by side on one colour scale each, with scale bars (QC figure)."""
    before, after = np.asarray(before), np.asarray(after)
    if before.ndim != 2 or before.shape != after.shape:
        raise InputError(f"{path}: before/after images must both be (ny, nx), got {before.shape} "
                         f"and {after.shape}")
    ny, nx = before.shape
    fig = _new_figure(10.0, max(2.5, 4.0 * ny / max(nx, 1)) + 0.6)
    for i, (img, title) in enumerate(zip((before, after), titles)):
        _draw_map(fig, fig.add_subplot(1, 2, i + 1), img, pixel_size_um=pixel_size_um,
                  cmap="viridis", label=label, title=title)
    if suptitle:
        fig.suptitle(suptitle)
    _save_figure(fig, path)


def _stems(ax, mz, values, **kw):
    """Stick spectrum (vertical lines from 0), suited to binned peak lists."""
    ax.vlines(np.asarray(mz), 0, np.asarray(values), linewidth=0.8, **kw)


def plot_spectrum(mz: np.ndarray, spectra_dict: Mapping, path: str | os.PathLike, *,
                  title: str = "", targets=None) -> None:
    """Stick plot of ROI mean spectra, one series per level / ROI.

    Parameters
    ----------
    mz : ndarray, shape (n_mz,)
        Shared m/z axis.
    spectra_dict : mapping name -> ndarray (n_mz,) or (mz_i, values_i)
        Series to draw; a tuple gives a series its own m/z axis.
    path : path-like
        PNG output.
    targets : sequence of float, optional
        m/z values to mark with dashed lines.
    """
    fig = _new_figure(8.0, 3.5)
    ax = fig.add_subplot()
    colors = [f"C{i}" for i in range(10)]
    for i, (name, series) in enumerate(spectra_dict.items()):
        if isinstance(series, tuple):
            x, y = series
        else:
            x, y = mz, series
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        if x.shape != y.shape:
            raise InputError(f"{path}: series {name!r} has {y.shape} values for m/z {x.shape}")
        _stems(ax, x, y, color=colors[i % 10], alpha=0.75, label=str(name))
    for t in targets or ():
        ax.axvline(float(t), color="k", linestyle="--", linewidth=0.7, alpha=0.6)
        ax.annotate(f"{float(t):.4f}", (float(t), 1.0), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=7)
    ax.set_xlabel("m/z")
    ax.set_ylabel("mean intensity (a.u.)")
    ax.set_ylim(bottom=0)
    if title:
        ax.set_title(title)
    if spectra_dict:
        ax.legend(fontsize=8, frameon=False)
    _save_figure(fig, path)


def plot_components(maps: np.ndarray, spectra: np.ndarray, mz: np.ndarray,
                    path: str | os.PathLike, *, pixel_size_um: float,
                    max_components: int = 8, title: str = "") -> None:
    """Component figure: each map beside its spectrum, and the summed map with the total spectrum.

    Parameters
    ----------
    maps : ndarray, shape (k, ny, nx)
    spectra : ndarray, shape (k, n_mz)
    mz : ndarray, shape (n_mz,)
    path : path-like
        PNG output.
    pixel_size_um : float
        For the scale bars.
    max_components : int
        Components drawn (the first ones); the summed row always uses all ``k``.
    """
    maps = np.asarray(maps, dtype=np.float64)
    spectra = np.asarray(spectra, dtype=np.float64)
    if maps.ndim != 3 or spectra.shape != (maps.shape[0], np.asarray(mz).shape[0]):
        raise InputError(f"{path}: maps {maps.shape}, spectra {spectra.shape} and mz "
                         f"{np.asarray(mz).shape} do not match")
    k = maps.shape[0]
    shown = min(k, max(1, int(max_components)))
    rows = shown + 1
    fig = _new_figure(10.0, 2.2 * rows)
    grid = fig.add_gridspec(rows, 2, width_ratios=(1, 2))
    valid = np.isfinite(maps).all(0)
    for i in range(shown):
        _draw_map(fig, fig.add_subplot(grid[i, 0]), maps[i], pixel_size_um=pixel_size_um,
                  cmap="viridis", label=None, title=f"component {i + 1}")
        ax = fig.add_subplot(grid[i, 1])
        _stems(ax, mz, spectra[i], color=f"C{i % 10}")
        ax.set_ylim(bottom=0)
        ax.tick_params(labelsize=7)
    total_map = np.where(valid, np.nansum(maps, axis=0), np.nan)
    _draw_map(fig, fig.add_subplot(grid[shown, 0]), total_map, pixel_size_um=pixel_size_um,
              cmap="viridis", label=None, title=f"sum of {k} components")
    ax = fig.add_subplot(grid[shown, 1])
    abundance = np.nansum(maps.reshape(k, -1), axis=1)
    _stems(ax, mz, abundance @ spectra / max(int(valid.sum()), 1), color="k")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("m/z")
    ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title)
    _save_figure(fig, path)


def plot_image_level(image: np.ndarray, features: np.ndarray, names, tissue: np.ndarray,
                     path: str | os.PathLike, *, pixel_size_um: float, title: str = "") -> None:
    """Figure of an image level as the workflow uses it: the image on its working grid with the
    outline of its tissue mask, and each feature channel (the level's components).

    Parameters
    ----------
    image : ndarray, shape (ny, nx, c)
        The image as read (file units); RGB (c = 3) is drawn in colour (scaled to its own
        99.5th percentile), other images as the sum of their channels.
    features : ndarray, shape (k, ny, nx)
    names : sequence of str
        ``k`` channel names.
    tissue : ndarray of bool, shape (ny, nx)
    path : path-like
        PNG output.
    pixel_size_um : float
        Working pixel size for the scale bars (NaN: none drawn).
    """
    image = np.asarray(image, dtype=np.float64)
    features = np.asarray(features, dtype=np.float64)
    if image.ndim != 3 or features.ndim != 3 or features.shape[1:] != image.shape[:2] \
            or tuple(np.shape(tissue)) != image.shape[:2] or len(names) != features.shape[0]:
        raise InputError(f"{path}: image {image.shape}, features {features.shape}, "
                         f"{len(names)} names and tissue {np.shape(tissue)} do not match")
    k = features.shape[0]
    cols = min(k + 1, 4)
    rows = -(-(k + 1) // cols)
    ny, nx = image.shape[:2]
    width = 3.2 * cols
    fig = _new_figure(width, rows * (width / cols) * ny / nx + 0.6 * rows)
    ax = fig.add_subplot(rows, cols, 1)
    if image.shape[2] == 3:
        top = max(float(np.percentile(image, 99.5)), 1e-12)
        ax.imshow(np.clip(image / top, 0, 1), interpolation="nearest")
    else:
        ax.imshow(image.sum(axis=2), cmap="gray", interpolation="nearest")
    ax.contour(np.asarray(tissue, dtype=float), levels=[0.5], colors="yellow", linewidths=0.6)
    ax.set_title(f"image ({nx} x {ny} px), tissue {100 * np.mean(tissue):.0f} %", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    for i in range(k):
        _draw_map(fig, fig.add_subplot(rows, cols, i + 2), features[i], pixel_size_um=pixel_size_um,
                  cmap="magma", label=None, title=str(names[i]))
    if title:
        fig.suptitle(title)
    _save_figure(fig, path)
