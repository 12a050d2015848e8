"""Operations on stacks of component maps ``(k, ny, nx)`` shared by several stages."""

from __future__ import annotations

import numpy as np

__all__ = ["principal_maps"]


def principal_maps(maps: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` leading principal component maps of standardised component maps.

    A finer modality's NMF maps are many (40 by default) and redundant: the reduced-scale test
    (:mod:`msifusion.sharpen`) regresses on these when the section one scale down has too few
    pixels for all the maps, and so does the registration of an MSI pair by regression
    (:mod:`msifusion.steps.register`).

    Parameters
    ----------
    maps : ndarray, shape (k, ny, nx)
        NaN where not acquired.
    n : int
        Components kept (at most ``k``).

    Returns
    -------
    ndarray, shape (min(n, k), ny, nx), float64
        Scores of the acquired pixels on the leading eigenvectors of the maps' correlation
        matrix (sign fixed: largest loading positive); NaN where not acquired.
    """
    m = np.asarray(maps, dtype=np.float64)
    k = len(m)
    valid = np.isfinite(m).all(0)
    n = int(min(n, k))
    out = np.full((n,) + m.shape[1:], np.nan)
    if not valid.any():
        return out
    x = m[:, valid].T
    sd = x.std(axis=0)
    z = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    w, v = np.linalg.eigh(z.T @ z / len(z))
    v = v[:, np.argsort(w)[::-1][:n]]
    v *= np.sign(v[np.argmax(np.abs(v), axis=0), np.arange(n)])
    out[:, valid] = (z @ v).T
    return out
