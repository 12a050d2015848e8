"""Rigid (or affine) registration of one section between a coarse and a fine MSI modality.

Each adjacent pair of the modality chain is registered separately: a *coarse* modality (e.g. FT-ICR,
80 um pixels) and a *fine* one (e.g. MALDI-TOF 20 um or ToF-SIMS 5 um), from their total-ion-like
ROI images (NaN where not acquired) and tissue masks. The modalities detect different ions, so
intensities are not compared directly; both images are normalised (background 0, tissue core 1),
brought to the same physical blur and turned into modality-independent features (:func:`_features`):
a soft tissue map and edge maps (gradient magnitudes of the log and of the linear intensity).
The similarity is the weighted normalised cross-correlation (NCC) of these features, computed only
where the fine image was acquired (the fine modality often sees only part of the section); outside its
ROI the coarse modality counts as background (unknown beyond ROI borders that tissue touches).
Every similarity is weighted by ``sqrt`` of the share of the fine field of view the coarse modality
knows there (:func:`_overlap_weight`): a correlation over a few points fits chance better, and a
placement pushing most of the fine view where the coarse one is unknown (a view inside the tissue,
whose tissue touches every ROI border) would otherwise beat the right one on a small overlap.

Search (the scale is fixed by the pixel sizes):

1. exhaustive translation search by FFT (masked NCC, Padfield 2012) for ``n_starts`` rotations over
   the full circle, and for their mirror images, two peaks per rotation (:func:`_fft_search`);
2. all those starts are refined together as one batch by gradient ascent in torch (``grid_sample``
   on a fine sample-point set, Adam), :data:`LEVEL_START`;
3. the best distinct candidates are refined on finer levels (:data:`LEVELS_REFINE`), the best one
   is polished on sharp edges (:data:`LEVELS_POLISH`), optionally followed by an affine refinement.

The fine image is first block-averaged (anti-aliased) to about half the coarse pixel size.

Quality: ``score`` is the Dice coefficient of the tissue masks after registration (over the fine
field of view); ``margin`` is the similarity gap between the winner and the best candidate placing
the fine tissue elsewhere, mirrored placements included (small or negative: ambiguous, e.g. an
unrelated pair, a featureless field of view, or a mirrored section with ``mirror=False``).
``boundary`` is the F-score of the tissue outlines seen in the fine field of view (within
1.5 coarse px). ``passed`` requires ``score >= min_score``, ``margin >= min_margin`` and positive
evidence that the placement is right: agreeing outlines (``boundary >= min_boundary``) or similar
images (final similarity ``ncc >= min_ncc``; needed when the field of view lies inside the tissue).

Coordinates follow ``docs/design.md``: pixel ``(x, y)`` has its centre at integer ``(x, y)`` and
``matrix`` (2, 3) maps fine ROI pixel coordinates ``(x, y, 1)`` to coarse ROI pixel coordinates.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import fft as sfft
from scipy import ndimage as ndi

from .affine import (_wrap_deg, chain_to_reference, compose, invert, linear_scale, pose,
                     rotation_deg, transform_points)
from .errors import InputError
from .schema import default

log = logging.getLogger("msifusion.register")

__all__ = [
    "Registration",
    "register_pair",
    "chain_to_reference",
    "compose",
    "invert",
    "transform_points",
    "warp_to_coarse",
    "plot_overlay",
    "pose",
]

#: Background padding around the coarse ROI (coarse px); larger than the widest smoothing support.
COARSE_PAD = 8
#: Distance (coarse px) within which tissue outlines agree, for the boundary F-score.
BOUNDARY_TOL = 1.5
#: Most fine sample points per level (the spacing grows beyond it).
MAX_POINTS = 40_000
#: Variance floor of each feature, as a fraction of its squared unit-edge response
#: (see :func:`_feature_floors`); edge maps are sparse, hence the smaller fractions.
FLOOR_FRACTIONS = (0.02, 0.005, 0.005)
#: Similarity features, in channel order (see :func:`_features`).
FEATURES = ("tissue", "edges_log", "edges_linear")


@dataclass(frozen=True)
class LevelConfig:
    """One level of the coarse-to-fine schedule.

    Attributes
    ----------
    sigma : float
        Gaussian scale, coarse px.
    spacing : float
        Spacing of the fine sample points, coarse px.
    lr : float
        Adam step, coarse px (rotations: arc length at the tissue's RMS radius).
    weights : tuple of float
        Weight of each feature of :data:`FEATURES`.
    channels : float
        Weight (0-1) of the multichannel similarity (:func:`_pillai`) of the component maps, when
        they are given; the features share the rest.
    """

    sigma: float
    spacing: float
    lr: float
    weights: tuple
    channels: float = 0.0


#: Search and batched refinement of all starts: wide capture (tissue outline, contrast-free edges).
LEVEL_START = LevelConfig(1.5, 1.0, 0.5, (0.5, 0.5, 0.0))
#: Refinement of the distinct candidates (the margin is measured after these).
LEVELS_REFINE = (LevelConfig(0.8, 0.5, 0.2, (0.2, 0.4, 0.4), channels=0.5),
                 LevelConfig(0.5, 0.5, 0.05, (0.0, 0.5, 0.5), channels=0.5))
#: Polish of the winner on sharp edges (small blur: nearby edges with different contrasts in the two
#: modalities interfere less).
LEVELS_POLISH = (LevelConfig(0.35, 0.5, 0.03, (0.0, 0.5, 0.5), channels=0.8),)
#: Ridge on the channel covariances of :func:`_pillai`, relative to their mean variance.
CHANNEL_RIDGE = 1e-3


# --------------------------------------------------------------------------------------------
# Result type and matrix helpers
# --------------------------------------------------------------------------------------------


@dataclass
class Registration:
    """Result of :func:`register_pair`.

    Attributes
    ----------
    matrix : ndarray, shape (2, 3), float64
        Maps fine ROI pixel coordinates ``(x, y, 1)`` to coarse ROI pixel coordinates ``(x, y)``.
    rotation_deg : float
        Rotation angle of the fine image in the coarse frame, degrees in (-180, 180]; positive turns
        +x towards +y (clockwise on screen, y pointing down).
    translation_um : tuple of float
        Position of fine ROI pixel (0, 0) in the coarse ROI frame, micrometres ``(x, y)``.
    scale : float
        Coarse pixels per fine pixel (``sqrt(|det A|)``); ``fine_px_um / coarse_px_um`` when rigid.
    mirror : bool
        True when the fine image is mirrored (x flipped before the rotation).
    score : float
        Dice coefficient of the tissue masks after registration, over the fine field of view, [0, 1].
    ncc : float
        Final similarity (weighted NCC of the features times :func:`_overlap_weight`), [-1, 1].
    margin : float
        Similarity of the winner minus that of the best candidate placing the fine tissue elsewhere.
    passed : bool
        ``score >= min_score``, ``margin >= min_margin`` and (``boundary >= min_boundary`` or
        ``ncc >= min_ncc``).
    coarse_px_um, fine_px_um : float
        Pixel sizes (micrometres).
    model : str
        ``"rigid"`` or ``"affine"``.
    boundary : float
        Boundary F-score in [0, 1]: agreement of the tissue outlines seen in the fine field of view
        (within 1.5 coarse px); NaN when too little outline is in view.
    coarse_shape, fine_shape : tuple of int
        ``(ny, nx)`` of the two ROI images.
    details : dict
        Diagnostics: per-feature NCCs, similarity at each level (``ncc_levels``), level-0 margin,
        the thresholds used, block factors, ``coverage`` (share of the fine sample points where
        the coarse modality is known); ``reason`` when the pair could not be registered.
    """

    matrix: np.ndarray
    rotation_deg: float
    translation_um: tuple[float, float]
    scale: float
    mirror: bool
    score: float
    ncc: float
    margin: float
    passed: bool
    coarse_px_um: float
    fine_px_um: float
    model: str = "rigid"
    boundary: float = float("nan")
    coarse_shape: tuple[int, int] = (0, 0)
    fine_shape: tuple[int, int] = (0, 0)
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """JSON-serialisable dict: pixel matrix, physical matrix, pixel sizes, scores."""
        c, f = float(self.coarse_px_um), float(self.fine_px_um)
        return {
            "format": "msifusion-registration",
            "format_version": 1,
            "model": self.model,
            **{k: v for k, v in pose(self.matrix, f, c).items() if k != "rotation_deg"},
            "rotation_deg": float(self.rotation_deg),
            "translation_um": [float(v) for v in self.translation_um],
            "scale": float(self.scale),
            "mirror": bool(self.mirror),
            "score": float(self.score),
            "ncc": float(self.ncc),
            "margin": float(self.margin),
            "boundary": None if not math.isfinite(self.boundary) else float(self.boundary),
            "passed": bool(self.passed),
            "coarse_pixel_size_um": c,
            "fine_pixel_size_um": f,
            "coarse_shape": [int(v) for v in self.coarse_shape],
            "fine_shape": [int(v) for v in self.fine_shape],
            "details": {k: _jsonable(v) for k, v in self.details.items()},
        }

    @classmethod
    def from_json(cls, d: dict) -> "Registration":
        """Inverse of :meth:`to_json`; raises ``InputError`` naming a missing or malformed key."""
        try:
            m = np.asarray(d["matrix_px"], dtype=np.float64)
            if m.shape != (2, 3):
                raise InputError(f"registration JSON: 'matrix_px' must be 2 x 3, got {m.shape}")
            return cls(
                matrix=m,
                rotation_deg=float(d["rotation_deg"]),
                translation_um=tuple(float(v) for v in d["translation_um"]),
                scale=float(d["scale"]),
                mirror=bool(d["mirror"]),
                score=float(d["score"]),
                ncc=float(d["ncc"]),
                margin=float(d.get("margin", float("nan"))),
                passed=bool(d["passed"]),
                coarse_px_um=float(d["coarse_pixel_size_um"]),
                fine_px_um=float(d["fine_pixel_size_um"]),
                model=str(d.get("model", "rigid")),
                boundary=float("nan") if d.get("boundary") is None else float(d["boundary"]),
                coarse_shape=tuple(int(v) for v in d.get("coarse_shape", (0, 0))),
                fine_shape=tuple(int(v) for v in d.get("fine_shape", (0, 0))),
                details=dict(d.get("details", {})),
            )
        except KeyError as e:
            raise InputError(f"registration JSON: missing key {e.args[0]!r}") from None


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _rotation_matrix(theta: float, mirror: bool) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    r = np.array([[c, -s], [s, c]])
    return r @ np.diag([-1.0, 1.0]) if mirror else r


# --------------------------------------------------------------------------------------------
# Feature preparation (numpy)
# --------------------------------------------------------------------------------------------


def _block_mean(img: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """NaN-aware b x b block mean. Returns (mean (NaN where < half acquired), acquired fraction)."""
    if b == 1:
        v = np.isfinite(img)
        return np.where(v, img, np.nan), v.astype(np.float64)
    ny, nx = img.shape
    py, px = (-ny) % b, (-nx) % b
    a = np.pad(img, ((0, py), (0, px)), constant_values=np.nan)
    v = np.isfinite(a)
    a = np.where(v, a, 0.0)
    shp = (a.shape[0] // b, b, a.shape[1] // b, b)
    s = a.reshape(shp).sum(axis=(1, 3))
    n = v.reshape(shp).sum(axis=(1, 3)).astype(np.float64)
    frac = n / (b * b)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(frac >= 0.5, s / np.maximum(n, 1), np.nan)
    return mean, frac


def _normalise(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rescale so that the background median is 0 and the median of the tissue core is 1; NaN kept.

    The tissue core is the mask eroded by 2 px (partial-volume pixels at the edge excluded, as the
    two modalities have very different shares of them); the same intensity scale in both modalities
    keeps nonlinear features (log) comparable."""
    valid = np.isfinite(img)
    tis = mask & valid
    for it in (2, 1):
        core = ndi.binary_erosion(tis, iterations=it)
        if core.sum() >= 10:
            tis = core
            break
    bg = valid & ~ndi.binary_dilation(mask, iterations=2)
    # no background in view (e.g. a field of view inside the tissue): assume a background of 0
    lo = float(np.median(img[bg])) if bg.sum() >= 4 else min(0.0, float(np.nanmin(img)))
    hi = float(np.median(img[tis]))
    if not hi > lo:
        hi = float(np.percentile(img[tis], 90.0))
    if not hi > lo:  # no contrast: fall back to the mask itself
        return np.where(valid, mask.astype(np.float64), np.nan)
    return (img - lo) / (hi - lo)


def _smooth_nan(values: np.ndarray, valid: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Normalised convolution: Gaussian smoothing that ignores invalid pixels.

    Returns (smoothed values (0 where invalid), smoothed validity)."""
    w = valid.astype(np.float64)
    v = np.where(valid, values, 0.0)
    if sigma > 0:
        num = ndi.gaussian_filter(v * w, sigma, mode="constant")
        den = ndi.gaussian_filter(w, sigma, mode="constant")
    else:
        num, den = v * w, w
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 1e-6, num / np.maximum(den, 1e-6), 0.0)
    return out, den


def _features(norm: np.ndarray, mask: np.ndarray, sigma: float, px: float = 1.0) -> np.ndarray:
    """Registration features (4, ny, nx) float32 at Gaussian scale ``sigma`` (pixels of this grid).

    ``px`` is the grid pixel in coarse px: gradients are per coarse px, so that feature magnitudes
    are comparable between the modalities (see :func:`_feature_floors`).

    Channels (:data:`FEATURES`, then validity):

    * ``tissue``: smoothed normalised intensity clipped to [0, 1] (0 background, 1 tissue), kept
      near the tissue mask only (debris suppressed);
    * ``edges_log``: gradient magnitude of ``log(intensity + 0.5)``: all boundaries with a contrast-
      independent weight; robust for the search, but a log applied after blurring moves an edge by a
      contrast-dependent fraction of the blur (differently in each modality);
    * ``edges_linear``: gradient magnitude of the linear intensity, whose peak sits on the edge
      whatever its contrast: the unbiased feature for the final levels;
    * validity: 1 where the smoothing window lies (almost) entirely in acquired pixels; one-sided
      smoothing at the border of a partial field of view would shift edges.
    """
    valid = np.isfinite(norm)
    sm, den = _smooth_nan(norm, valid, sigma)
    ok = valid & (den > 0.98)
    near = ndi.binary_dilation(mask, iterations=int(math.ceil(2 + 2 * sigma))) if mask.any() else mask
    ok_g = ndi.binary_erosion(ok, iterations=1, border_value=1)
    tissue = np.where(ok, np.clip(sm, 0.0, 1.0) * near, 0.0)
    out = [tissue]
    for img in (np.log(np.clip(sm, 0.0, None) + 0.5), np.clip(sm, -1.0, 4.0)):
        gy, gx = np.gradient(img)
        out.append(np.where(ok_g, np.hypot(gx, gy) / px, 0.0))
    out.append(ok_g.astype(np.float64))
    return np.stack(out).astype(np.float32)


@dataclass
class _Grid:
    """One modality prepared for registration on a (possibly block-reduced, padded) grid.

    Grid pixel ``(u, v)`` has its centre at ROI pixel ``b (u, v) + (b - 1) / 2 - pad``.
    """

    norm: np.ndarray  # (ny, nx) normalised intensity, NaN where unusable
    mask: np.ndarray  # (ny, nx) bool tissue
    b: int = 1  # block factor
    pad: int = 0  # ROI pixels of padding on each side

    def to_roi(self, uv: np.ndarray) -> np.ndarray:
        """Grid pixel coordinates (n, 2) -> ROI pixel coordinates."""
        return self.b * np.asarray(uv, dtype=np.float64) + (self.b - 1) / 2.0 - self.pad

    def from_roi(self, xy: np.ndarray) -> np.ndarray:
        """ROI pixel coordinates (n, 2) -> grid pixel coordinates."""
        return (np.asarray(xy, dtype=np.float64) + self.pad - (self.b - 1) / 2.0) / self.b


def _pad_coarse(img: np.ndarray, mask: np.ndarray, pad: int) -> _Grid:
    """Coarse grid padded by ``pad`` px of background (normalised 0, valid).

    Outside the ROI the coarse modality is assumed to see background, except beyond ROI borders that
    tissue touches (the section was clipped): there the padding is NaN (unknown), so that fine tissue
    mapped there is neither rewarded nor penalised."""
    norm = _normalise(img, mask)
    inside = np.pad(np.ones(mask.shape, dtype=bool), pad, constant_values=False)
    clipped = np.pad(mask, pad, mode="edge") & ~inside
    if clipped.any():
        clipped = ndi.binary_dilation(clipped, iterations=2) & ~inside
    normp = np.pad(norm, pad, constant_values=0.0)
    normp[clipped] = np.nan
    return _Grid(norm=normp, mask=np.pad(mask, pad, constant_values=False), b=1, pad=pad)


def _prepare(img: np.ndarray, mask: np.ndarray, b: int) -> _Grid:
    mean, frac = _block_mean(img, b)
    if b == 1:
        m = mask & np.isfinite(img)
    else:
        mm, _ = _block_mean(np.where(np.isfinite(img), mask.astype(np.float64), np.nan), b)
        m = np.nan_to_num(mm) >= 0.5
    norm = _normalise(mean, m)
    return _Grid(norm=norm, mask=m, b=b)


# --------------------------------------------------------------------------------------------
# Torch core
# --------------------------------------------------------------------------------------------


def _weighted_ncc(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, eps_a: float, eps_b: float) -> torch.Tensor:
    """Weighted NCC along the last axis. a: (B, N), b: (B or 1, N), w: (B, N). Returns (B,)."""
    sw = w.sum(-1).clamp_min(1e-9)
    ma = (w * a).sum(-1) / sw
    mb = (w * b).sum(-1) / sw
    da, db = a - ma[:, None], b - mb[:, None]
    cov = (w * da * db).sum(-1)
    va = (w * da * da).sum(-1) + eps_a * sw
    vb = (w * db * db).sum(-1) + eps_b * sw
    return cov / torch.sqrt(va * vb)


def _pillai(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, ridge: float = CHANNEL_RIDGE) -> torch.Tensor:
    """Weighted Pillai trace: the mean squared canonical correlation of two sets of channels.

    ``tr(Cxx^-1 Cxy Cyy^-1 Cyx) / min(kx, ky)``, in [0, 1]: how much of each modality's channels a
    linear map of the other's explains, whatever the contrasts (different instruments see
    different ions in different proportions). Unlike the NCC of one total image, it rewards every
    shared pattern: a wrong placement may match the total image, but rarely all the components.

    Parameters
    ----------
    x : Tensor, shape (B, N, kx)
        Channels of one modality at N points, for B poses.
    y : Tensor, shape (N, ky)
        Channels of the other modality at the same points.
    w : Tensor, shape (B, N)
        Point weights.
    ridge : float
        Added to the covariance diagonals, relative to their mean variance.

    Returns
    -------
    Tensor, shape (B,)
    """
    x, y, w = x.double(), y.double(), w.double()
    sw = w.sum(-1).clamp_min(1e-9)[:, None, None]
    wx = w[..., None] * x
    mx = wx.sum(1, keepdim=True) / sw
    my = torch.einsum("bn,nk->bk", w, y)[:, None] / sw
    xc = x - mx
    yc = y[None] - my
    cxx = torch.einsum("bni,bnj->bij", wx, xc) / sw
    cyy = torch.einsum("bn,bni,bnj->bij", w, yc, yc) / sw
    cxy = torch.einsum("bni,bnj->bij", wx, yc) / sw
    kx, ky = x.shape[-1], y.shape[-1]

    def reg(c, k):
        lam = ridge * torch.diagonal(c, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
        return c + lam[:, None, None] * torch.eye(k, dtype=c.dtype, device=c.device)

    a = torch.linalg.solve(reg(cxx, kx), cxy)
    b = torch.linalg.solve(reg(cyy, ky), cxy.transpose(-1, -2))
    return (torch.diagonal(a @ b, dim1=-2, dim2=-1).sum(-1) / min(kx, ky)).float()


def _channel_stack(stack: np.ndarray, b: int, pad: int = 0) -> np.ndarray:
    """Component maps ``(k, ny, nx)`` for :func:`_pillai`: b x b block means, each channel divided
    by its 99th percentile, NaN where not acquired, padded with ``pad`` px of NaN (unknown)."""
    out = []
    for m in np.asarray(stack, dtype=np.float64):
        mean, _ = _block_mean(m, b)
        fin = np.isfinite(mean)
        scale = float(np.percentile(np.abs(mean[fin]), 99.0)) if fin.any() else 0.0
        out.append(mean / scale if scale > 0 else np.where(fin, 0.0, np.nan))
    out = np.array(out)
    return np.pad(out, ((0, 0), (pad, pad), (pad, pad)), constant_values=np.nan) if pad else out


def _smooth_channels(stack: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """NaN-aware smoothing of every channel; returns (values, 0 where invalid; validity (ny, nx))."""
    valid = np.isfinite(stack).all(axis=0)
    out = np.empty(stack.shape, dtype=np.float64)
    den = None
    for i, ch in enumerate(stack):
        out[i], den = _smooth_nan(ch, valid, sigma)
    ok = valid & (den > 0.98)
    return np.where(ok, out, 0.0), ok


class _Level:
    """Features of one resolution level, ready for batched similarity evaluation.

    Parameters
    ----------
    coarse, fine : _Grid
    cfg : LevelConfig
    s_work : float
        Coarse pixels per fine working pixel.
    device : torch.device
    channels : (ndarray, ndarray), optional
        Component maps of the coarse modality on its padded grid and of the fine modality on its
        working grid (:func:`_channel_stack`), for the multichannel term (``cfg.channels``).
    """

    def __init__(self, coarse: _Grid, fine: _Grid, cfg: LevelConfig, s_work: float, device: torch.device,
                 channels: tuple | None = None):
        sigma_c, spacing_c = cfg.sigma, cfg.spacing
        self.weights = np.asarray(cfg.weights, dtype=np.float64) / float(np.sum(cfg.weights))
        self.used = [k for k in range(len(FEATURES)) if self.weights[k] > 0]
        self.pad = coarse.pad
        fc = _features(coarse.norm, coarse.mask, sigma_c)
        ff = _features(fine.norm, fine.mask, _matched_sigma(sigma_c, s_work), px=s_work)
        nf = len(FEATURES)
        # coarse channels: used features, then "invalid" (zero padding => outside the ROI counts as
        # valid background)
        cfe = np.concatenate([fc[self.used], 1.0 - fc[nf:]])
        self.coarse = torch.as_tensor(cfe[None], dtype=torch.float32, device=device)
        self.ny, self.nx = fc.shape[1:]
        n_ok = int((ff[nf] > 0.5).sum())
        spacing_c = max(spacing_c, s_work * math.sqrt(n_ok / MAX_POINTS))  # cap the point count
        stride = max(1, int(round(spacing_c / s_work)))
        sub = ff[:, ::stride, ::stride]
        vv, uu = np.nonzero(sub[nf] > 0.5)
        uv = np.stack([uu * stride, vv * stride], axis=1).astype(np.float64)
        self.points = torch.as_tensor(fine.to_roi(uv), dtype=torch.float32, device=device)  # (N, 2) ROI px
        self.fine_vals = torch.as_tensor(sub[self.used][:, vv, uu], dtype=torch.float32, device=device)
        # variance floors (keep NCC finite on featureless overlaps)
        floors = _feature_floors(sigma_c)
        self.eps = [float(floors[k]) for k in self.used]
        self.w_used = torch.as_tensor(self.weights[self.used], dtype=torch.float32, device=device)
        self.w_channels = float(cfg.channels) if channels is not None else 0.0
        if self.w_channels > 0:
            cc, cok = _smooth_channels(channels[0], sigma_c)
            fc_, fok = _smooth_channels(channels[1], _matched_sigma(sigma_c, s_work))
            self.coarse_ch = torch.as_tensor(np.concatenate([cc, cok[None]])[None], dtype=torch.float32,
                                             device=device)
            fc_, fok = fc_[:, ::stride, ::stride], fok[::stride, ::stride]
            self.fine_ch = torch.as_tensor(fc_[:, vv, uu].T, dtype=torch.float32, device=device)  # (N, kf)
            self.fine_ch_ok = torch.as_tensor(fok[vv, uu], dtype=torch.float32, device=device)

    def sample(self, q: torch.Tensor, source: torch.Tensor | None = None) -> torch.Tensor:
        """Coarse channels at coarse ROI pixel coordinates ``q`` (B, N, 2) -> (B, n_used + 1, N)
        (or the channels of ``source`` (1, c, ny, nx))."""
        gx = 2.0 * (q[..., 0] + self.pad) / max(self.nx - 1, 1) - 1.0
        gy = 2.0 * (q[..., 1] + self.pad) / max(self.ny - 1, 1) - 1.0
        grid = torch.stack([gx, gy], dim=-1)[:, None]  # (B, 1, N, 2)
        src = (self.coarse if source is None else source).expand(q.shape[0], -1, -1, -1)
        out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        return out[:, :, 0, :]

    def channel_similarity(self, q: torch.Tensor) -> torch.Tensor:
        """Multichannel similarity (:func:`_pillai`, B,) of the component maps at ``q`` (B, N, 2)."""
        smp = self.sample(q, self.coarse_ch)
        w = (smp[:, -1] > 0.99).float() * self.fine_ch_ok[None]
        return _pillai(smp[:, :-1].transpose(1, 2), self.fine_ch, w)

    def _nccs(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NCC (B, n_used) of each feature in use, fine points mapped to ``q`` (B, N, 2), and the
        coverage (B,): the share of the points that land where the coarse modality is known."""
        smp = self.sample(q)
        w = (1.0 - smp[:, -1]).clamp(0.0, 1.0)
        nccs = torch.stack([_weighted_ncc(smp[:, i], self.fine_vals[i][None], w, self.eps[i], self.eps[i])
                            for i in range(len(self.used))], dim=-1)
        return nccs, w.mean(-1)

    def feature_similarity(self, q: torch.Tensor) -> torch.Tensor:
        """The weighted NCC of the features alone (B,), weighted by the overlap
        (:func:`_overlap_weight`)."""
        nccs, coverage = self._nccs(q)
        return (nccs * self.w_used).sum(-1) * _overlap_weight(coverage)

    def coverage(self, q: torch.Tensor) -> torch.Tensor:
        """Share (B,) of the fine points mapped to ``q`` (B, N, 2) where the coarse modality is known."""
        return self._nccs(q)[1]

    def similarity(self, q: torch.Tensor, components: bool = False) -> torch.Tensor:
        """Similarity (B,) of the fine points mapped to ``q`` (B, N, 2): the weighted NCC of the
        features, mixed with the multichannel similarity when component maps were given, weighted
        by the overlap (:func:`_overlap_weight`).

        With ``components=True``: a dict feature name -> NCC (B,) of the features in use (and
        ``channels`` -> multichannel similarity)."""
        nccs, coverage = self._nccs(q)
        if components:
            out = {FEATURES[k]: nccs[:, i] for i, k in enumerate(self.used)}
            if self.w_channels > 0:
                out["channels"] = self.channel_similarity(q)
            return out
        sim = (nccs * self.w_used).sum(-1)
        if self.w_channels > 0:
            sim = (1.0 - self.w_channels) * sim + self.w_channels * self.channel_similarity(q)
        return sim * _overlap_weight(coverage)


def _overlap_weight(coverage):
    """Weight ``sqrt(coverage)`` of a similarity measured on a share ``coverage`` of the fine points.

    A correlation over fewer points fits chance better (its spread under chance grows as
    ``1 / sqrt(n)``): without the weight, a placement that leaves most of the fine field of view
    where the coarse modality is unknown (beyond an ROI border that tissue touches) can beat the
    right one on a few points, above all when both images show the inside of a tissue. Scaled by
    ``sqrt(coverage)``, the similarity is a z-score of the overlap over the whole field: the same
    chance level whatever the overlap, unchanged for a fine view the coarse modality sees all of.
    """
    return coverage.clamp_min(0.0).sqrt()


def _feature_floors(sigma_c: float) -> np.ndarray:
    """Absolute variance floors of the :data:`FEATURES` (normalised units, coarse px).

    Fractions :data:`FLOOR_FRACTIONS` of the squared response to a unit tissue edge (background 0 ->
    tissue 1) at this blur: the NCC of a window whose feature varies less than that (noise in a
    featureless field of view) is damped towards 0 instead of rewarding a fit to noise."""
    g0 = 1.0 / (math.sqrt(2.0 * math.pi) * math.sqrt(sigma_c ** 2 + 1.0 / 12.0))  # unit-edge gradient peak
    return np.asarray(FLOOR_FRACTIONS) * np.array([0.25, g0 ** 2, g0 ** 2])


def _matched_sigma(sigma_c: float, s_work: float) -> float:
    """Gaussian sigma (fine working px) giving the fine image the blur of the coarse one.

    The blur *before* the nonlinear feature transforms must match (afterwards a symmetric blur does
    not move an isolated edge): the coarse image is a box average over its pixel (variance 1/12
    coarse px^2) smoothed with ``sigma_c``; the fine working grid already has a box of ``s_work``."""
    var_f = sigma_c ** 2 + 1.0 / 12.0 - s_work ** 2 / 12.0
    return math.sqrt(max(var_f, 0.0)) / s_work


@dataclass
class _Poses:
    """A batch of poses: q = A (p - c) + t0 + delta, A = s R(theta0 + phi / r) Mirror (I + E / r)."""

    theta0: torch.Tensor  # (B,)
    mirror: torch.Tensor  # (B,) bool
    t0: torch.Tensor  # (B, 2) coarse px
    centre: torch.Tensor  # (2,) fine ROI px (rotation centre)
    s: float
    r: float  # RMS radius of the fine tissue, coarse px (parameter scaling)

    def matrices(self, phi, delta, e=None):
        th = self.theta0 + phi / self.r
        c, sn = torch.cos(th), torch.sin(th)
        sx = torch.where(self.mirror, -1.0, 1.0).to(c.dtype)
        a = torch.stack([torch.stack([c * sx, -sn], -1), torch.stack([sn * sx, c], -1)], -2) * self.s
        if e is not None:
            eye = torch.eye(2, dtype=a.dtype, device=a.device)
            a = a @ (eye + e / self.r)
        return a, self.t0 + delta

    def map(self, pts, phi, delta, e=None):
        a, t = self.matrices(phi, delta, e)
        return torch.einsum("bij,nj->bni", a, pts - self.centre) + t[:, None, :]


def _optimise(level: _Level, poses: _Poses, *, iterations: int, lr: float, affine: bool = False,
              init=None):
    """Batched gradient ascent of the similarity; returns (phi, delta, e, final similarity)."""
    b = poses.theta0.shape[0]
    dev = poses.t0.device
    if init is None:
        phi = torch.zeros(b, device=dev)
        delta = torch.zeros(b, 2, device=dev)
        e = torch.zeros(b, 2, 2, device=dev)
    else:
        phi, delta, e = (x.detach().clone() for x in init[:3])
    params = [phi.requires_grad_(), delta.requires_grad_()]
    if affine:
        params.append(e.requires_grad_())
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(iterations, 1), eta_min=lr * 0.02)
    for _ in range(iterations):
        opt.zero_grad()
        sim = level.similarity(poses.map(level.points, phi, delta, e if affine else None))
        (-sim.sum()).backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        sim = level.similarity(poses.map(level.points, phi, delta, e if affine else None))
    return phi.detach(), delta.detach(), e.detach(), sim


# --------------------------------------------------------------------------------------------
# FFT translation search
# --------------------------------------------------------------------------------------------


def _masked_ncc_maps(fixed: np.ndarray, moving: torch.Tensor, weights, floors) -> torch.Tensor:
    """Masked NCC (Padfield 2012) for every integer translation, averaged over features.

    Parameters
    ----------
    fixed : ndarray, shape (n + 1, H, W)
        Padded coarse features: ``n`` feature channels, then a weight (0/1) channel.
    moving : Tensor, shape (R, n + 1, h, w)
        Rotated fine canvases: ``n`` feature channels, then a weight channel.
    weights : sequence of float, length n
        Feature weights (sum 1).
    floors : sequence of float, length n
        Variance floors of the features (:func:`_feature_floors`).

    Returns
    -------
    Tensor, shape (R, H - h + 1, W - w + 1)
        Similarity when the canvas' top-left corner sits at (sy, sx) of ``fixed``, weighted by
        :func:`_overlap_weight` of the share of the canvas that overlaps counted coarse pixels.
    """
    H, W = fixed.shape[1:]
    R, c, h, w = moving.shape
    nf = c - 1
    fh, fw = sfft.next_fast_len(H), sfft.next_fast_len(W)
    fx = torch.as_tensor(fixed, dtype=torch.float64)
    mv = moving.to(torch.float64).cpu()

    def ft(x):
        return torch.fft.rfft2(x, s=(fh, fw))

    def corr(fa, fb):  # sum_x A(x) B(x - s), read at s in [0, H-h] x [0, W-w] (no wrap-around)
        return torch.fft.irfft2(fa * torch.conj(fb), s=(fh, fw))[..., :H - h + 1, :W - w + 1]

    mf, mg = fx[nf], mv[:, nf]
    f_mf, f_mg = ft(mf), ft(mg)
    n = corr(f_mf, f_mg).clamp_min(1.0)
    total = torch.zeros_like(n)
    for k in range(nf):
        a, g = fx[k] * mf, mv[:, k] * mg
        fa = ft(a)
        fg = ft(g)
        s_f, s_ff = corr(fa, f_mg), corr(ft(a * fx[k]), f_mg)
        s_g, s_gg = corr(f_mf, fg), corr(f_mf, ft(g * mv[:, k]))
        num = corr(fa, fg) - s_f * s_g / n
        var_f = (s_ff - s_f ** 2 / n).clamp_min(0.0)
        var_g = (s_gg - s_g ** 2 / n).clamp_min(0.0)
        eps = floors[k] * n
        total += weights[k] * num / torch.sqrt((var_f + eps) * (var_g + eps))
    coverage = n / mg.sum(dim=(-2, -1)).clamp_min(1.0)[:, None, None]
    return (total * _overlap_weight(coverage.clamp(0.0, 1.0))).float()


def _render_canvases(fine_feats: np.ndarray, fine: _Grid, centre: np.ndarray, angles: np.ndarray,
                     mirrors: np.ndarray, s: float, d: int, half: int, device) -> torch.Tensor:
    """Fine features rotated into the (search) coarse frame, centred on the fine tissue centre.

    Parameters
    ----------
    fine_feats : ndarray, shape (n + 1, nyw, nxw)
        Features on the fine working grid, validity last.
    angles, mirrors : ndarray, shape (R,)
        Start rotations (radians) and mirror flags.
    s : float
        Coarse px per fine ROI px.
    d : int
        Search grid pixel, coarse px.
    half : int
        Canvas half size: canvas pixel (i, j) sits at coarse offset ``d * (j - half, i - half)`` from
        the mapped centre.

    Returns
    -------
    Tensor, shape (R, n + 1, 2 half + 1, 2 half + 1)
    """
    size = 2 * half + 1
    off = d * (np.arange(size) - half).astype(np.float64)
    ox, oy = np.meshgrid(off, off)
    o = np.stack([ox.ravel(), oy.ravel()], axis=1)  # (P, 2) coarse px offsets
    ny, nx = fine_feats.shape[1:]
    grids = []
    for th, mi in zip(angles, mirrors):
        a = s * _rotation_matrix(float(th), bool(mi))
        uv = fine.from_roi(o @ np.linalg.inv(a).T + centre)  # fine working grid px
        gx = 2.0 * uv[:, 0] / max(nx - 1, 1) - 1.0
        gy = 2.0 * uv[:, 1] / max(ny - 1, 1) - 1.0
        grids.append(np.stack([gx, gy], axis=1).reshape(size, size, 2))
    grid = torch.as_tensor(np.stack(grids), dtype=torch.float32, device=device)
    src = torch.as_tensor(fine_feats[None], dtype=torch.float32, device=device).expand(len(grids), -1, -1, -1)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    ok = (out[:, -1:] > 0.99).float()
    return torch.cat([out[:, :-1] * ok, ok], dim=1)


def _fft_search(coarse: _Grid, fine: _Grid, centre: np.ndarray, angles, mirrors, *, s: float, s_work: float,
                d: int, sigma_c: float, radius_c: float, min_sep_c: float, weights, device,
                peaks_per_rotation: int = 2, chunk: int = 12):
    """Exhaustive translation search for each start rotation (masked NCC by FFT).

    Returns
    -------
    list of (start index, q, value)
        ``q`` (2,): coarse px position of the fine rotation centre; up to ``peaks_per_rotation``
        peaks per start, at least ``min_sep_c`` coarse px apart.
    """
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    used = [k for k in range(len(FEATURES)) if w[k] > 0]
    nf = len(FEATURES)
    chans = used + [nf]
    fc = _features(coarse.norm, coarse.mask, sigma_c)[chans][:, ::d, ::d]
    ff = _features(fine.norm, fine.mask, _matched_sigma(sigma_c, s_work), px=s_work)[chans]
    hs, ws = fc.shape[1:]
    half = int(math.ceil(radius_c / d)) + 1
    size = 2 * half + 1
    fixed = np.zeros((len(chans), hs + 2 * size, ws + 2 * size), dtype=np.float64)
    fixed[-1] = 1.0  # outside the coarse ROI: background, counted
    fixed[:, size:size + hs, size:size + ws] = fc
    # canvas top-left at (sy, sx)  =>  centre at search index (sx + half - size, sy + half - size)
    o0 = size - half
    cands = []
    sep = max(1, int(round(min_sep_c / d)))
    for c0 in range(0, len(angles), chunk):
        canv = _render_canvases(ff, fine, centre, angles[c0:c0 + chunk], mirrors[c0:c0 + chunk],
                                s, d, half, device)
        maps = _masked_ncc_maps(fixed, canv, w[used], _feature_floors(sigma_c)[used])
        maps = maps[:, o0:o0 + hs, o0:o0 + ws].clone()  # the centre stays inside the coarse ROI
        for r in range(maps.shape[0]):
            m = maps[r]
            for _ in range(peaks_per_rotation):
                idx = int(torch.argmax(m))
                val = float(m.view(-1)[idx])
                if not math.isfinite(val) or val <= -1.0:
                    break
                iy, ix = divmod(idx, m.shape[1])
                q = coarse.to_roi([[d * ix + (d - 1) / 2.0, d * iy + (d - 1) / 2.0]])[0]
                cands.append((c0 + r, q, val))
                m[max(0, iy - sep):iy + sep + 1, max(0, ix - sep):ix + sep + 1] = -2.0
    return cands


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _pose_distance(a1, q1, a2, q2, cov):
    """RMS distance (coarse px) between two poses' images of the fine tissue (centre-relative)."""
    da = a1 - a2
    return math.sqrt(float(np.sum((q1 - q2) ** 2)) + float(np.trace(da @ cov @ da.T)))


def _check_pair(img, mask, name):
    img = np.asarray(img, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if img.ndim != 2:
        raise InputError(f"register_pair: {name} image must be 2-D (ny, nx), got shape {img.shape}")
    if mask.shape != img.shape:
        raise InputError(f"register_pair: {name} mask shape {mask.shape} != image shape {img.shape}")
    return img, mask & np.isfinite(img)


def _failed(coarse_shape, fine_shape, coarse_px, fine_px, model, why) -> Registration:
    log.warning("register_pair: %s; registration not possible", why)
    s = fine_px / coarse_px
    cy, cx = (np.asarray(coarse_shape) - 1) / 2.0
    fy, fx = (np.asarray(fine_shape) - 1) / 2.0
    m = np.array([[s, 0.0, cx - s * fx], [0.0, s, cy - s * fy]])
    return Registration(matrix=m, rotation_deg=0.0, translation_um=(m[0, 2] * coarse_px, m[1, 2] * coarse_px),
                        scale=s, mirror=False, score=0.0, ncc=0.0, margin=0.0, passed=False,
                        coarse_px_um=coarse_px, fine_px_um=fine_px, model=model,
                        coarse_shape=tuple(coarse_shape), fine_shape=tuple(fine_shape),
                        details={"reason": why})


def register_pair(
    coarse_img: np.ndarray,
    coarse_mask: np.ndarray,
    coarse_px_um: float,
    fine_img: np.ndarray,
    fine_mask: np.ndarray,
    fine_px_um: float,
    *,
    model: str = default("registration.model"),
    n_starts: int = default("registration.n_starts"),
    mirror: bool = default("registration.mirror"),
    iterations: int = default("registration.iterations"),
    min_score: float = default("registration.min_score"),
    min_margin: float = default("registration.min_margin"),
    min_ncc: float = default("registration.min_ncc"),
    min_boundary: float = default("registration.min_boundary"),
    n_refine: int = 4,
    check_mirror: bool = True,
    seed: int = default("seed"),
    device: str | torch.device | None = None,
    coarse_channels: np.ndarray | None = None,
    fine_channels: np.ndarray | None = None,
) -> Registration:
    """Register a fine-modality ROI image onto a coarse-modality ROI image of the same section.

    Parameters
    ----------
    coarse_img : ndarray, shape (nyc, nxc)
        Total-ion-like image of the coarse modality (e.g. sum of NMF maps); NaN where not acquired.
    coarse_mask : ndarray of bool, shape (nyc, nxc)
        Tissue mask of the coarse image (:func:`msifusion.tissue.tissue_mask`).
    coarse_px_um : float
        Coarse pixel size, micrometres.
    fine_img : ndarray, shape (nyf, nxf)
        Total-ion-like image of the fine modality; NaN where not acquired (partial field of view).
    fine_mask : ndarray of bool, shape (nyf, nxf)
        Tissue mask of the fine image.
    fine_px_um : float
        Fine pixel size, micrometres (smaller than or equal to ``coarse_px_um``).
    model : {"rigid", "affine"}
        Rigid: rotation + translation, scale fixed by the pixel sizes. Affine: the rigid result
        refined with a free 2 x 2 matrix.
    n_starts : int
        Start rotations, evenly spaced over 360 degrees.
    mirror : bool
        Also try the mirrored fine image (a section mounted upside down).
    check_mirror : bool
        With ``mirror=False``, still evaluate mirrored placements as alternatives: when one fits
        better than the best unmirrored one, the margin is negative and the pair fails.
    iterations : int
        Gradient steps per refinement level.
    min_score : float
        Smallest Dice coefficient of the registered tissue masks that passes.
    min_margin : float
        Smallest similarity gap to the best alternative placement (one mapping the fine tissue more
        than a few coarse pixels elsewhere) that passes.
    min_boundary : float
        Boundary F-score that counts as evidence of a right placement (modalities with little in
        common, e.g. MALDI and ToF-SIMS totals, register well on the outline at an NCC of 0.25).
        On phantoms right answers score 0.85-1, wrong placements and unrelated shapes 0-0.72.
    min_ncc : float
        Final similarity (``Registration.ncc``) that counts as evidence of a right placement (the
        only one when the field of view lies inside the tissue). On phantoms right answers score
        0.5-0.85 (0.69 on real ToF-SIMS mass ranges), wrong ones 0-0.50.
    n_refine : int
        Distinct candidates refined on the finer levels.
    seed : int
        Accepted for the pipeline's uniform signature; unused (the search is deterministic).
    device : str or torch.device, optional
        Default: ``"cuda"`` when available, else ``"cpu"``.
    coarse_channels, fine_channels : ndarray, shape (k, ny, nx), optional
        Component maps of each modality on the grids of ``coarse_img`` / ``fine_img`` (NaN where
        not acquired). With both, every level after the search also scores the placement by the
        multichannel similarity of the maps (mean squared canonical correlation, weight
        ``LevelConfig.channels``), which tells a placement that matches all the shared patterns
        from one that only matches the total image; ``ncc`` stays the features' similarity.

    Returns
    -------
    Registration
        ``passed=False`` (never an exception) when the images do not support a confident answer.
    """
    if model not in ("rigid", "affine"):
        raise InputError(f"register_pair: model must be 'rigid' or 'affine', got {model!r}")
    coarse_px, fine_px = float(coarse_px_um), float(fine_px_um)
    if not (coarse_px > 0 and fine_px > 0 and math.isfinite(coarse_px) and math.isfinite(fine_px)):
        raise InputError(f"register_pair: pixel sizes must be positive, got coarse={coarse_px_um}, "
                         f"fine={fine_px_um}")
    if n_starts < 1:
        raise InputError(f"register_pair: n_starts must be >= 1, got {n_starts}")
    cimg, cmask = _check_pair(coarse_img, coarse_mask, "coarse")
    fimg, fmask = _check_pair(fine_img, fine_mask, "fine")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    del seed  # nothing is random: the start grid and the FFT search are deterministic
    if cmask.sum() < 4:
        return _failed(cimg.shape, fimg.shape, coarse_px, fine_px, model, "coarse tissue mask is empty")
    if fmask.sum() < 4:
        return _failed(cimg.shape, fimg.shape, coarse_px, fine_px, model, "fine tissue mask is empty")

    s = fine_px / coarse_px  # coarse px per fine px
    if s > 1.0:
        log.warning("register_pair: the 'fine' pixels (%g um) are larger than the 'coarse' ones (%g um)",
                    fine_px, coarse_px)
    b = max(1, int(math.floor(0.5 / s + 1e-9)))  # fine working pixel ~ coarse / 2
    s_work = s * b  # coarse px per working px
    coarse = _pad_coarse(cimg, cmask, COARSE_PAD)
    fine = _prepare(fimg, fmask, b)
    chs = None
    if coarse_channels is not None and fine_channels is not None:
        cch, fch = np.asarray(coarse_channels), np.asarray(fine_channels)
        if cch.ndim != 3 or cch.shape[1:] != cimg.shape or fch.ndim != 3 or fch.shape[1:] != fimg.shape:
            raise InputError(f"register_pair: channels must be stacks (k, ny, nx) on the image grids: "
                             f"coarse {cch.shape} vs {cimg.shape}, fine {fch.shape} vs {fimg.shape}")
        chs = (_channel_stack(cch, 1, COARSE_PAD), _channel_stack(fch, b))
    if fine.mask.sum() < 4:
        return _failed(cimg.shape, fimg.shape, coarse_px, fine_px, model, "fine tissue too small")

    # tissue geometry (fine ROI px): rotation centre, covariance, radius in coarse px
    fy, fx = np.nonzero(fmask)
    pts = np.stack([fx, fy], axis=1).astype(np.float64)
    centre = pts.mean(axis=0)
    cov = np.cov(pts.T, bias=True) + np.eye(2) * (1.0 / 12.0)
    r_rms = max(1.0, s * math.sqrt(float(np.trace(cov))))
    vy, vx = np.nonzero(np.isfinite(fimg))
    radius_c = s * float(np.sqrt(((np.stack([vx, vy], 1) - centre) ** 2).sum(1)).max()) + 3.0
    far = max(3.0, 0.1 * r_rms)  # pose distance (coarse px) beyond which two solutions differ

    cfg = LEVEL_START
    lv0 = _Level(coarse, fine, cfg, s_work, dev, chs)
    if lv0.points.shape[0] < 16:
        return _failed(cimg.shape, fimg.shape, coarse_px, fine_px, model,
                       "fine field of view too small for the coarse resolution")

    # 1. FFT translation search for every start rotation (and mirror)
    angles = np.arange(n_starts) * (2 * math.pi / n_starts)
    mirrors = np.zeros(n_starts, dtype=bool)
    if mirror or check_mirror:
        angles = np.concatenate([angles, angles])
        mirrors = np.concatenate([mirrors, np.ones(n_starts, dtype=bool)])
    d = max(1, int(math.ceil(max(cimg.shape) / 160.0)))
    sigma_search = LEVEL_START.sigma * d
    cands = _fft_search(coarse, fine, centre, angles, mirrors, s=s, s_work=s_work, d=d, sigma_c=sigma_search,
                        radius_c=radius_c, min_sep_c=far, weights=LEVEL_START.weights, device=dev)
    if not cands:
        return _failed(cimg.shape, fimg.shape, coarse_px, fine_px, model, "no candidate placement")
    log.info("register_pair: %d candidates from %d start rotations (FFT search, best %.3f)",
             len(cands), len(angles), max(c[2] for c in cands))

    centre_t = torch.as_tensor(centre, dtype=torch.float32, device=dev)

    def poses_of(idx_theta, mirror_flags, q0):
        return _Poses(theta0=torch.as_tensor(idx_theta, dtype=torch.float32, device=dev),
                      mirror=torch.as_tensor(mirror_flags, dtype=torch.bool, device=dev),
                      t0=torch.as_tensor(np.asarray(q0), dtype=torch.float32, device=dev),
                      centre=centre_t, s=s, r=r_rms)

    def pose_arrays(poses, phi, delta, e=None):
        a, t = poses.matrices(phi, delta, e)
        return a.double().cpu().numpy(), t.double().cpu().numpy()

    # 2. batched refinement of all starts at a coarse level
    p0 = poses_of([angles[c[0]] for c in cands], [mirrors[c[0]] for c in cands], [c[1] for c in cands])
    phi, delta, e, sim0 = _optimise(lv0, p0, iterations=iterations, lr=cfg.lr)
    a_all, q_all = pose_arrays(p0, phi, delta)
    sim0 = sim0.double().cpu().numpy()
    allowed = np.array([mirror or not mirrors[c[0]] for c in cands])
    order = np.argsort(-sim0)
    best = int(next(i for i in order if allowed[i]))
    dists = np.array([_pose_distance(a_all[best], q_all[best], a_all[i], q_all[i], cov) for i in range(len(cands))])
    far_sims = sim0[dists > far]
    margin0 = float(sim0[best] - far_sims.max()) if far_sims.size else 1.0
    # distinct candidates for the finer levels (greedy non-maximum suppression); when mirrors are
    # only checked, the best two mirrored placements are refined as alternatives
    keep = []
    quota = {True: n_refine, False: 2 if not mirror else 0}
    for i in order:
        if quota[bool(allowed[i])] > 0 and all(
                _pose_distance(a_all[i], q_all[i], a_all[j], q_all[j], cov) > far for j in keep):
            keep.append(int(i))
            quota[bool(allowed[i])] -= 1
    log.info("register_pair: level 0 best %.3f, margin %.3f, %d distinct candidates", sim0[best], margin0,
             len(keep))

    # 3. finer levels on the distinct candidates; the best one wins and is polished
    theta_k = (p0.theta0[keep] + phi[keep] / r_rms).cpu().numpy()
    p1 = poses_of(theta_k, mirrors[[cands[i][0] for i in keep]], q_all[keep])
    state = None
    levels = [lv0]
    for cfg in LEVELS_REFINE:
        lv = _Level(coarse, fine, cfg, s_work, dev, chs)
        levels.append(lv)
        state = _optimise(lv, p1, iterations=iterations, lr=cfg.lr, init=state)
    phi1, delta1, e1, sim1 = state
    a_k, q_k = pose_arrays(p1, phi1, delta1)
    sim1 = sim1.double().cpu().numpy()
    w = int(np.argmax(np.where(allowed[keep], sim1, -np.inf)))
    others = [sim1[j] for j in range(len(keep)) if _pose_distance(a_k[w], q_k[w], a_k[j], q_k[j], cov) > far]
    margin = float(sim1[w] - max(others)) if others else margin0
    sel = [w]
    p2 = poses_of(p1.theta0[sel].cpu().numpy(), p1.mirror[sel].cpu().numpy(), p1.t0[sel].cpu().numpy())
    state = (phi1[sel], delta1[sel], e1[sel], None)
    for cfg in LEVELS_POLISH:
        lv = _Level(coarse, fine, cfg, s_work, dev, chs)
        state = _optimise(lv, p2, iterations=iterations, lr=cfg.lr, init=state)
    if model == "affine":
        state = _optimise(lv, p2, iterations=2 * iterations, lr=LEVELS_POLISH[-1].lr, affine=True, init=state)
    phi_f, delta_f, e_f, _ = state
    e_use = e_f if model == "affine" else None
    q_pts = p2.map(lv.points, phi_f, delta_f, e_use)
    with torch.no_grad():
        comps = {k: float(v[0]) for k, v in lv.similarity(q_pts, components=True).items()}
        ncc = float(lv.feature_similarity(q_pts)[0])
        coverage = float(lv.coverage(q_pts)[0])
        ncc_levels = [float(lvx.feature_similarity(p2.map(lvx.points, phi_f, delta_f, e_use))[0])
                      for lvx in levels]
    a_fin, q_fin = pose_arrays(p2, phi_f, delta_f, e_use)
    a_fin, q_fin = a_fin[0], q_fin[0]
    matrix = np.concatenate([a_fin, (q_fin - a_fin @ centre)[:, None]], axis=1)
    mirrored = bool(p2.mirror[0])

    dice = _dice(coarse, fmask, np.isfinite(fimg), matrix, fine.b)
    theta = rotation_deg(a_fin, mirrored)
    scale = linear_scale(a_fin)
    boundary = _boundary_f(coarse, fmask, np.isfinite(fimg), matrix, s)
    # evidence that the placement is right: the outlines agree, or the images themselves do
    quality_ok = (math.isfinite(boundary) and boundary >= min_boundary) or ncc >= min_ncc
    passed = bool(dice >= min_score and margin >= min_margin and quality_ok)
    reg = Registration(
        matrix=matrix, rotation_deg=_wrap_deg(theta),
        translation_um=(float(matrix[0, 2] * coarse_px), float(matrix[1, 2] * coarse_px)),
        scale=scale, mirror=mirrored, score=float(dice), ncc=ncc, margin=margin,
        passed=passed, coarse_px_um=coarse_px, fine_px_um=fine_px, model=model, boundary=boundary,
        coarse_shape=tuple(cimg.shape), fine_shape=tuple(fimg.shape),
        details={"n_candidates": len(cands), "level0_best": float(sim0[best]), "level0_margin": margin0,
                 **{f"ncc_{k}": v for k, v in comps.items()}, "ncc_levels": ncc_levels,
                 "min_score": float(min_score), "min_margin": float(min_margin), "min_ncc": float(min_ncc),
                 "min_boundary": float(min_boundary),
                 "fine_block": int(b), "search_block": int(d), "coverage": coverage},
    )
    log.info("register_pair: rotation %.2f deg, mirror %s, dice %.3f, boundary %.3f, ncc %.3f, margin %.3f"
             " -> %s", reg.rotation_deg, reg.mirror, dice, boundary, ncc, margin, "passed" if passed else "FAILED")
    return reg


def _boundary_f(coarse: _Grid, fmask: np.ndarray, fvalid: np.ndarray, matrix: np.ndarray, s: float,
                tol: float = BOUNDARY_TOL, min_length: float = 8.0) -> float:
    """Boundary F-score of the tissue outlines in the fine field of view.

    Outline pixels: mask pixels with a 4-neighbour outside the mask, away from non-acquired pixels
    and the field-of-view border (by ``tol`` coarse px). Precision: share of fine outline pixels
    mapped within ``tol`` coarse px of the coarse outline; recall: share of coarse outline pixels
    inside the fine field of view within ``tol`` of the mapped fine outline.

    Returns
    -------
    float
        F-score in [0, 1]; NaN when less than ``min_length`` coarse px of outline are in view.
    """
    margin_f = tol / s + 1.0  # fine px
    inner_f = ndi.distance_transform_edt(fvalid) > margin_f
    fb = fmask & ~ndi.binary_erosion(fmask, border_value=1) & inner_f
    cm, cvalid = coarse.mask, np.isfinite(coarse.norm)
    cb = cm & ~ndi.binary_erosion(cm, border_value=1) & ndi.binary_erosion(cvalid, border_value=1)
    if fb.sum() * s < min_length or not cb.any():
        return float("nan")
    yy, xx = np.nonzero(fb)
    g = coarse.from_roi(transform_points(matrix, np.stack([xx, yy], 1).astype(np.float64)))
    dist_c = ndi.distance_transform_edt(~cb)
    d_f = ndi.map_coordinates(dist_c, [g[:, 1], g[:, 0]], order=1, mode="constant", cval=1e9)
    precision = float(np.mean(d_f <= tol))
    cy, cx = np.nonzero(cb)
    p = transform_points(invert(matrix), coarse.to_roi(np.stack([cx, cy], 1)))
    seen = ndi.map_coordinates(inner_f.astype(np.float64), [p[:, 1], p[:, 0]], order=0, mode="constant",
                               cval=0.0) > 0.5
    if seen.sum() * 1.0 < min_length:
        return float("nan")
    dist_f = ndi.distance_transform_edt(~fb) * s  # coarse px
    d_c = ndi.map_coordinates(dist_f, [p[seen, 1], p[seen, 0]], order=1, mode="constant", cval=1e9)
    recall = float(np.mean(d_c <= tol))
    return 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _dice(coarse: _Grid, fmask, fvalid, matrix, b):
    """Dice of the fine tissue mask and the coarse mask sampled at the mapped fine pixels.

    Evaluated on the fine field of view (block-reduced by ``b``) where the coarse modality is known
    (acquired, or background outside its ROI)."""
    fm, _ = _block_mean(np.where(fvalid, fmask.astype(np.float64), np.nan), b)
    ok = np.isfinite(fm)
    vv, uu = np.nonzero(ok)
    uv = np.stack([uu, vv], 1) * b + (b - 1) / 2.0
    g = coarse.from_roi(transform_points(matrix, uv))
    coords = [g[:, 1], g[:, 0]]
    cm = ndi.map_coordinates(coarse.mask.astype(np.float64), coords, order=1, mode="constant", cval=0.0)
    unknown = ndi.map_coordinates((~np.isfinite(coarse.norm)).astype(np.float64), coords, order=1,
                                  mode="constant", cval=0.0)
    use = unknown < 0.5
    a = fm[ok][use] >= 0.5
    c = cm[use] >= 0.5
    tot = a.sum() + c.sum()
    return float(2.0 * np.logical_and(a, c).sum() / tot) if tot else 0.0


# --------------------------------------------------------------------------------------------
# Resampling and QC plot
# --------------------------------------------------------------------------------------------


def warp_to_coarse(fine_stack: np.ndarray, matrix: np.ndarray, coarse_shape: tuple[int, int],
                   *, upsample: int = 1) -> np.ndarray:
    """Sample fine images at coarse pixel positions (anti-aliased, bilinear); NaN outside the fine FOV.

    Parameters
    ----------
    fine_stack : ndarray, shape (k, nyf, nxf) or (nyf, nxf)
        Fine images (NaN where not acquired).
    matrix : ndarray, shape (2, 3)
        Fine ROI pixel -> coarse ROI pixel map.
    coarse_shape : (nyc, nxc)
        Shape of the coarse ROI.
    upsample : int
        Output pixels per coarse pixel along each axis (for display).

    Returns
    -------
    ndarray, float32, shape (k, nyc * upsample, nxc * upsample) (or 2-D for a 2-D input)
        Point samples of the Gaussian-smoothed fine images (sigma: half an output pixel).
    """
    stack = np.asarray(fine_stack, dtype=np.float64)
    two_d = stack.ndim == 2
    if two_d:
        stack = stack[None]
    nyc, nxc = coarse_shape
    u = int(upsample)
    oy, ox = np.mgrid[0:nyc * u, 0:nxc * u].astype(np.float64)
    q = np.stack([(ox.ravel() - (u - 1) / 2.0) / u, (oy.ravel() - (u - 1) / 2.0) / u], 1)
    p = transform_points(invert(matrix), q)
    scale = linear_scale(matrix)  # coarse px per fine px
    sigma = 0.5 / (scale * u) if scale * u < 1 else 0.0
    out = np.empty((stack.shape[0], nyc * u, nxc * u), dtype=np.float32)
    for k, img in enumerate(stack):
        sm, den = _smooth_nan(img, np.isfinite(img), sigma)
        val = ndi.map_coordinates(sm, [p[:, 1], p[:, 0]], order=1, mode="constant", cval=0.0)
        wgt = ndi.map_coordinates(den, [p[:, 1], p[:, 0]], order=1, mode="constant", cval=0.0)
        out[k] = np.where(wgt > 0.5, val, np.nan).reshape(nyc * u, nxc * u)
    return out[0] if two_d else out


def plot_overlay(coarse_img: np.ndarray, fine_img: np.ndarray, reg: Registration, path) -> None:
    """Write a QC PNG: coarse image (grey) with the registered fine image, as an edge overlay and a
    checkerboard, the score in the title.

    Parameters
    ----------
    coarse_img : ndarray, shape (nyc, nxc)
    fine_img : ndarray, shape (nyf, nxf)
    reg : Registration
    path : path-like
        Output PNG (written through :func:`msifusion.store.atomic_output`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.feature import canny

    from .store import atomic_output

    u = int(max(1, min(8, round(600 / max(coarse_img.shape)))))
    warped = warp_to_coarse(fine_img, reg.matrix, coarse_img.shape, upsample=u)
    big = np.kron(np.asarray(coarse_img, dtype=np.float64), np.ones((u, u)))

    def scaled(a):
        v = np.log1p(np.clip(np.where(np.isfinite(a), a, np.nan), 0, None))
        lo, hi = np.nanpercentile(v, [1, 99]) if np.isfinite(v).any() else (0.0, 1.0)
        return np.clip((v - lo) / max(hi - lo, 1e-12), 0, 1)

    cs, ws = scaled(big), scaled(warped)
    inside = ndi.binary_erosion(np.isfinite(ws), iterations=2 * u)  # no edges along the FOV border
    edges = canny(np.nan_to_num(ws), sigma=max(1.0, u / 2.0)) & inside
    rgb = np.dstack([np.nan_to_num(cs)] * 3)
    rgb[edges] = (1.0, 0.1, 0.8)
    tile = max(4, u * 4, max(cs.shape) // 12)  # about 12 squares per side, whatever the image size
    yy, xx = np.mgrid[0:cs.shape[0], 0:cs.shape[1]]
    check = ((yy // tile + xx // tile) % 2 == 0) & np.isfinite(ws)
    chk = np.where(check, ws, cs)
    fig, ax = plt.subplots(1, 2, figsize=(11, 5.5))
    ax[0].imshow(rgb, interpolation="nearest")
    ax[0].set_title("coarse + fine edges (magenta)")
    ax[1].imshow(chk, cmap="gray", interpolation="nearest")
    ax[1].set_title("checkerboard coarse / fine")
    for a in ax:
        a.set_axis_off()
    fig.suptitle(f"{'PASSED' if reg.passed else 'FAILED'}  Dice {reg.score:.3f}  similarity {reg.ncc:.3f}  "
                 f"margin {reg.margin:.3f}  rot {reg.rotation_deg:.1f} deg  mirror {reg.mirror}")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
