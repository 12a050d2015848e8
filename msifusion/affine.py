"""2 x 3 affine pixel maps between image grids: composition, inversion, points, physical pose.

A matrix ``m`` (2, 3) maps pixel coordinates ``(x, y, 1)`` of one grid to pixel coordinates
``(x, y)`` of another (the registrations of :mod:`msifusion.register`, a fused product's
``matrix_to_reference``). NumPy only, so that products and figures need not import torch.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["compose", "invert", "transform_points", "chain_to_reference", "pose", "block_matrix"]


def _as_3x3(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (2, 3):
        raise ValueError(f"expected a 2 x 3 affine matrix, got shape {m.shape}")
    return np.vstack([m, [0.0, 0.0, 1.0]])


def compose(m_ab: np.ndarray, m_bc: np.ndarray) -> np.ndarray:
    """Chain two 2 x 3 affine maps: ``a -> b`` then ``b -> c`` gives ``a -> c``.

    Parameters
    ----------
    m_ab : ndarray, shape (2, 3)
        Maps frame ``a`` pixel coordinates to frame ``b``.
    m_bc : ndarray, shape (2, 3)
        Maps frame ``b`` pixel coordinates to frame ``c``.

    Returns
    -------
    ndarray, shape (2, 3)
        ``m_bc @ m_ab`` in homogeneous form: maps frame ``a`` to frame ``c``.
    """
    return (_as_3x3(m_bc) @ _as_3x3(m_ab))[:2]


def chain_to_reference(matrices) -> list[np.ndarray]:
    """Compose the matrices of a registration chain into maps to the chain's first frame.

    Parameters
    ----------
    matrices : sequence of ndarray, shape (2, 3)
        ``matrices[i]`` maps level ``i + 1`` pixel coordinates to level ``i``.

    Returns
    -------
    list of ndarray, shape (2, 3)
        Element ``i`` maps level ``i + 1`` pixel coordinates to level 0 (the reference).
    """
    out, acc = [], np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    for m in matrices:
        acc = compose(m, acc)
        out.append(acc)
    return out


def pose(m: np.ndarray, from_px_um: float, to_px_um: float) -> dict:
    """A pixel matrix described in physical units.

    Parameters
    ----------
    m : ndarray, shape (2, 3)
        Maps ``from`` pixel coordinates ``(x, y, 1)`` to ``to`` pixel coordinates.
    from_px_um, to_px_um : float
        Pixel sizes of the two frames, micrometres.

    Returns
    -------
    dict
        ``matrix_px`` (2 x 3), ``matrix_um`` (2 x 3, micrometres to micrometres),
        ``rotation_deg`` (of the linear part, mirror removed), ``mirror``, ``scale`` (to px per
        from px), ``translation_um`` (where ``from`` pixel (0, 0) lies in ``to``, micrometres).
    """
    m = np.asarray(m, dtype=np.float64)
    f, c = float(from_px_um), float(to_px_um)
    m_um = np.concatenate([m[:, :2] * (c / f), m[:, 2:] * c], axis=1)
    mirror = bool(np.linalg.det(m[:, :2]) < 0)
    return {"matrix_px": m.tolist(), "matrix_um": m_um.tolist(),
            "rotation_deg": _wrap_deg(rotation_deg(m, mirror)),
            "mirror": mirror, "scale": linear_scale(m),
            "translation_um": [float(m[0, 2] * c), float(m[1, 2] * c)]}


def linear_scale(m: np.ndarray) -> float:
    """Isotropic scale ``sqrt(|det|)`` of the linear part of a 2 x 3 (or 2 x 2) map: for a
    fine -> coarse pixel map, coarse pixels per fine pixel along a side."""
    return math.sqrt(abs(float(np.linalg.det(np.asarray(m, dtype=np.float64)[:, :2]))))


def rotation_deg(m: np.ndarray, mirror: bool) -> float:
    """Rotation (degrees, in (-180, 180]) of the linear part of a 2 x 3 map, once the x mirror is
    taken out when ``mirror``."""
    a = np.asarray(m, dtype=np.float64)[:, :2]
    r = a @ np.diag([-1.0, 1.0]) if mirror else a
    return math.degrees(math.atan2(r[1, 0] - r[0, 1], r[0, 0] + r[1, 1]))


def invert(m: np.ndarray) -> np.ndarray:
    """Inverse of a 2 x 3 affine map (shape (2, 3))."""
    return np.linalg.inv(_as_3x3(m))[:2]


def transform_points(m: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a 2 x 3 affine map to points ``xy`` of shape (n, 2) (x, y); returns (n, 2)."""
    m = np.asarray(m, dtype=np.float64)
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return xy @ m[:, :2].T + m[:, 2]


def block_matrix(f: float) -> np.ndarray:
    """Pixel ``(x, y, 1)`` of a grid -> pixel of the grid of its ``f x f`` block means.

    Pixel centres lie at integers, so block ``i`` (pixels ``f i`` .. ``f i + f - 1``) is centred
    at pixel ``f i + (f - 1) / 2``: ``x -> x / f + (1 / f - 1) / 2``.

    Returns
    -------
    ndarray, shape (2, 3)
    """
    o = (1.0 / f - 1.0) / 2.0
    return np.array([[1.0 / f, 0.0, o], [0.0, 1.0 / f, o]])


def _wrap_deg(a: float) -> float:
    a = (a + 180.0) % 360.0 - 180.0
    return 180.0 if a == -180.0 else a
