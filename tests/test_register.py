"""Tests of msifusion.register on phantom sections with a known transform.

The phantom is a continuous, asymmetric tissue shape (ellipse + lobe - notch) with internal
regions. Both modalities render it by box integration over their pixels, with different intensity
levels per region (one region inverts its contrast), different backgrounds and noise. The fine
image is rendered through a known fine -> coarse pixel map, optionally seeing only part of the
section (partial field of view, NaN elsewhere).

``make_pair`` is also used by ``benchmarks/bench_register.py``. ``textured_field`` (a field of view
inside a textured tissue, e.g. wood, seen by a block-averaged coarse modality) and ``real_split``
(the real ToF-SIMS cube split into two such modalities) are also used by ``tests/test_tissue.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from msifusion import register as reg_mod
from msifusion.affine import block_matrix
from msifusion.register import Registration, compose, invert, register_pair, transform_points
from msifusion.tissue import tissue_mask, tissue_mask_from_maps


REAL_TOFSIMS = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real" / "tofsims_poplar"
                / "tofsims_trift_poplar_256x256.h5")


# ------------------------------------------------------------------------------------------
# phantom
# ------------------------------------------------------------------------------------------


def _ellipse(x, y, cx, cy, a, b, ang):
    c, s = math.cos(ang), math.sin(ang)
    u = (x - cx) * c + (y - cy) * s
    v = -(x - cx) * s + (y - cy) * c
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


class Phantom:
    """Section in physical coordinates (um, centred on 0) with per-modality intensities."""

    def __init__(self, radius_um: float, rng: np.random.Generator, kind: int = 0):
        r = radius_um
        self.r = r
        self.kind = kind
        self.orient = rng.uniform(0, 2 * math.pi)
        # regions: (cx, cy, a, b, angle) in units of r, in section coordinates before orientation
        self.regions = [(-0.25, 0.05, 0.35, 0.22, 0.4), (0.35, -0.2, 0.25, 0.15, -0.7),
                        (0.1, 0.35, 0.18, 0.12, 1.2), (0.8, 0.45, 0.2, 0.2, 0.0)]

    def _rot(self, x, y):
        c, s = math.cos(self.orient), math.sin(self.orient)
        return (x * c + y * s) / self.r, (-x * s + y * c) / self.r

    def tissue(self, x, y):
        u, v = self._rot(x, y)
        if self.kind == 0:
            t = _ellipse(u, v, 0, 0, 1.0, 0.62, 0.0) | _ellipse(u, v, 0.75, 0.45, 0.42, 0.42, 0.0)
            t &= ~_ellipse(u, v, -0.95, -0.25, 0.3, 0.3, 0.0)
        else:  # an unrelated shape: a bent bar
            t = _ellipse(u, v, 0, 0, 1.1, 0.22, 0.0) | _ellipse(u, v, 0.9, 0.5, 0.2, 0.6, 0.0)
        return t

    def intensity(self, x, y, levels, base, background):
        u, v = self._rot(x, y)
        t = self.tissue(x, y)
        out = np.where(t, base, background).astype(np.float64)
        for (cx, cy, a, b, ang), lev in zip(self.regions, levels):
            out += np.where(t & _ellipse(u, v, cx, cy, a, b, ang), lev, 0.0)
        return out


def _render(ph, shape, to_phys, ss, levels, base, background):
    """Box-integrate the phantom over pixels; ``to_phys`` maps pixel coords (n, 2) -> um."""
    ny, nx = shape
    off = (np.arange(ss) + 0.5) / ss - 0.5
    acc = np.zeros(shape)
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    for dy in off:
        for dx in off:
            p = to_phys(np.stack([(xx + dx).ravel(), (yy + dy).ravel()], 1))
            acc += ph.intensity(p[:, 0], p[:, 1], levels, base, background).reshape(shape)
    return acc / ss ** 2


def make_pair(ratio, rotation_deg, shift_um=(0.0, 0.0), *, coarse_px=80.0, coarse_shape=(40, 50),
              radius_px=15.0, fov="full", seed=0, kind_fine=0, mirror=False, fine_shape=None,
              noise=0.08, stretch=None, levels=((0.8, -0.5, 1.2, 0.6), (-0.4, 0.9, 0.5, 2.0))):
    """Coarse/fine phantom pair with a known fine -> coarse pixel matrix.

    Parameters
    ----------
    ratio : float
        coarse_px / fine_px.
    rotation_deg : float
        Rotation of the fine frame in the coarse frame.
    shift_um : (float, float)
        Offset of the fine FOV centre from the section centre (um).
    fov : {"full", "half", "none"}
        Fine field of view: the whole section, about half of it, or off the tissue.
    kind_fine : int
        0: same section; 1: an unrelated shape in the fine image.
    stretch : (float, float), optional
        Scale factors of the fine x and y pixel axes (an affine, non-rigid ground truth).

    Returns
    -------
    dict with coarse_img, coarse_mask, fine_img, fine_mask, coarse_px, fine_px, matrix (true).
    """
    rng = np.random.default_rng(seed)
    fine_px = coarse_px / ratio
    nyc, nxc = coarse_shape
    r_um = radius_px * coarse_px
    ph = Phantom(r_um, rng)
    centre_c = np.array([(nxc - 1) / 2.0, (nyc - 1) / 2.0]) + rng.uniform(-2, 2, 2)  # section centre, coarse px

    def coarse_to_phys(p):
        return (p - centre_c) * coarse_px

    coarse = _render(ph, (nyc, nxc), coarse_to_phys, 8, levels=levels[0], base=1.0,
                     background=0.04)
    coarse *= 1 + noise * rng.standard_normal(coarse.shape)
    coarse += 0.25 * noise * rng.standard_normal(coarse.shape)
    coarse = np.clip(coarse, 0, None)

    # fine grid: size and true matrix
    ext = 2.0 * 1.35 * r_um  # um covering the section at any rotation
    if fine_shape is None:
        n = int(math.ceil(ext / fine_px))
        fine_shape = (n, n) if fov != "half" else (n // 2, n)
    nyf, nxf = fine_shape
    th = math.radians(rotation_deg)
    a = (fine_px / coarse_px) * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    if mirror:
        a = a @ np.diag([-1.0, 1.0])
    if stretch is not None:  # anisotropic fine pixels (affine ground truth)
        a = a @ np.diag(stretch)
    fine_centre = np.array([(nxf - 1) / 2.0, (nyf - 1) / 2.0])
    target = np.array(shift_um, dtype=np.float64)
    if fov == "half":  # FOV centre on one half of the section
        target = target + np.array([0.0, -0.45 * r_um])
        # rotate the half-size FOV with the frame so that it covers about half the section
        target = _rot2(th) @ target if not mirror else target
    if fov == "none":
        target = target + np.array([2.5 * r_um, 0.0])
    t = centre_c + target / coarse_px - a @ fine_centre
    m_true = np.concatenate([a, t[:, None]], 1)
    ph_f = ph if kind_fine == 0 else Phantom(r_um, rng, kind=1)

    def fine_to_phys(p):
        return coarse_to_phys(transform_points(m_true, p))

    fine = _render(ph_f, (nyf, nxf), fine_to_phys, 2, levels=levels[1], base=0.7,
                   background=0.1)
    fine *= 1 + noise * rng.standard_normal(fine.shape)
    fine += 0.4 * noise * rng.standard_normal(fine.shape)
    fine = np.clip(fine, 0, None)
    if fov == "half":  # also a non-acquired corner
        fine[: nyf // 5, : nxf // 6] = np.nan
    return dict(coarse_img=coarse, coarse_mask=tissue_mask(coarse), fine_img=fine,
                fine_mask=tissue_mask(fine), coarse_px=coarse_px, fine_px=fine_px, matrix=m_true)


def _rot2(th):
    return np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])


def textured_field(ratio: int, n_coarse: int, seed: int = 0, *, k: int = 4, counts: float = 30.0):
    """A field of view inside a textured tissue (no background), seen by two modalities.

    Three log-normal patterns (Gaussian scales 2, 4 and 8 fine px: cell walls to vessels) are
    mixed into ``k`` channels per modality, each with its own positive weights, and drawn as
    Poisson counts (``counts`` per fine pixel and modality); the coarse modality is the block mean
    by ``ratio`` of its channels.

    Returns
    -------
    coarse : ndarray, shape (k, n_coarse, n_coarse)
    fine : ndarray, shape (k, n_coarse * ratio, n_coarse * ratio)
    """
    rng = np.random.default_rng(seed)
    n = n_coarse * ratio
    patterns = []
    for scale in (2.0, 4.0, 8.0):
        g = ndi.gaussian_filter(rng.standard_normal((n, n)), scale, mode="wrap")
        patterns.append(np.exp(g / g.std()))
    patterns = np.array(patterns)

    def channels():
        lam = np.einsum("cp,pyx->cyx", 0.5 + 0.5 * rng.random((k, len(patterns))), patterns)
        return rng.poisson(lam * counts / lam.sum(0).mean()).astype(np.float64)

    coarse = channels().reshape(k, n_coarse, ratio, n_coarse, ratio).mean(axis=(2, 4))
    return coarse, channels()


def real_split(factor: int, crop: int, n_channels: int = 40):
    """The real ToF-SIMS cube's top-left ``crop`` x ``crop`` pixels as two modalities: its
    ``n_channels`` strongest channels alternately (by total count) in group A, block-averaged by
    ``factor`` (coarse), and group B at full resolution (fine); each (k, ny, nx)."""
    import h5py

    with h5py.File(REAL_TOFSIMS, "r") as f:
        cube = f["intensities"][:crop, :crop].astype(np.float64).transpose(2, 0, 1)
    order = np.argsort(cube.sum(axis=(1, 2)))[::-1][:n_channels]
    a, b = cube[np.sort(order[0::2])], cube[np.sort(order[1::2])]
    n = crop // factor
    return a.reshape(len(a), n, factor, n, factor).mean(axis=(2, 4)), b


def fine_pixel_errors(reg, truth: np.ndarray, fine_shape) -> np.ndarray:
    """Distance (coarse px) between every fine pixel mapped by ``reg`` and by ``truth``."""
    yy, xx = np.mgrid[0:fine_shape[0], 0:fine_shape[1]]
    p = np.stack([xx.ravel(), yy.ravel()], 1).astype(np.float64)
    return np.linalg.norm(transform_points(reg.matrix, p) - transform_points(truth, p), axis=1)


def register_maps(coarse: np.ndarray, coarse_px: float, fine: np.ndarray, fine_px: float, **kw):
    """register_pair as the workflow calls it on two sections' component maps (k, ny, nx): the
    summed maps, the automatic tissue masks, the maps as channels."""
    return register_pair(coarse.sum(0), tissue_mask_from_maps(coarse), coarse_px, fine.sum(0),
                         tissue_mask_from_maps(fine), fine_px, coarse_channels=coarse, fine_channels=fine,
                         **kw)


def errors(pair, reg):
    """(rotation error deg, RMS and max mapped-position error over fine tissue, coarse px)."""
    m_true, m_est = pair["matrix"], reg.matrix
    yy, xx = np.nonzero(pair["fine_mask"])
    p = np.stack([xx, yy], 1).astype(np.float64)
    d = np.linalg.norm(transform_points(m_true, p) - transform_points(m_est, p), axis=1)
    rot_err = abs((reg.rotation_deg - _true_rotation(m_true, reg.mirror) + 180) % 360 - 180)
    return rot_err, float(np.sqrt((d ** 2).mean())), float(d.max())


def _true_rotation(m, mirror):
    a = m[:, :2] @ np.diag([-1.0, 1.0]) if mirror else m[:, :2]
    return math.degrees(math.atan2(a[1, 0] - a[0, 1], a[0, 0] + a[1, 1]))


def run_pair(pair, **kw):
    return register_pair(pair["coarse_img"], pair["coarse_mask"], pair["coarse_px"], pair["fine_img"],
                         pair["fine_mask"], pair["fine_px"], **kw)


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------


def _random_case(seed):
    rng = np.random.default_rng(seed)
    return float(rng.uniform(-180.0, 180.0)), tuple(rng.uniform(-300.0, 300.0, 2))


@pytest.mark.parametrize("ratio, fov, seed", [(2, "full", 1), (4, "half", 2), (10, "full", 3), (10, "half", 4)])
def test_register_recovers_known_transform(ratio, fov, seed):
    """Random rotation over the full circle and shift; full or partial (about half) fine FOV."""
    rot, shift = _random_case(seed)
    pair = make_pair(ratio, rot, shift, fov=fov, seed=seed)
    reg = run_pair(pair)
    rot_err, rms, mx = errors(pair, reg)
    assert reg.passed, (reg.score, reg.margin, reg.ncc)
    assert rot_err <= 0.5, rot_err
    assert rms <= 0.25, (rms, mx)
    assert reg.scale == pytest.approx(1.0 / ratio, rel=1e-6)
    assert reg.score > 0.85 and reg.margin > 0.1 and reg.boundary > 0.8
    assert not reg.mirror


def test_section_clipped_by_the_coarse_roi():
    """Tissue touching the coarse ROI border: outside it is unknown, not background."""
    pair = make_pair(4, 110.0, seed=31, coarse_shape=(28, 30))
    m = pair["coarse_mask"]
    assert m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any()
    reg = run_pair(pair)
    rot_err, rms, _ = errors(pair, reg)
    assert reg.passed and rot_err <= 0.5 and rms <= 0.25


def test_affine_model_recovers_anisotropic_pixels():
    pair = make_pair(4, 40.0, (100.0, -50.0), seed=21, stretch=(1.04, 0.97))
    rigid = run_pair(pair)
    affine = run_pair(pair, model="affine")
    assert errors(pair, rigid)[1] > 0.25  # a rigid map cannot fit a 4 % stretch
    assert errors(pair, affine)[1] <= 0.1
    np.testing.assert_allclose(affine.matrix[:, :2], pair["matrix"][:, :2], atol=2e-3)
    assert affine.model == "affine" and affine.passed


def test_mirror_start_finds_flipped_section():
    pair = make_pair(4, 33.0, (50.0, 0.0), mirror=True, seed=5)
    reg = run_pair(pair, mirror=True)
    rot_err, rms, _ = errors(pair, reg)
    assert reg.mirror and reg.passed
    assert rot_err <= 0.5 and rms <= 0.25
    # without mirror starts the flipped section must not pass (the mirrored alternative fits better)
    no_mirror = run_pair(pair)
    assert not no_mirror.passed and no_mirror.margin < 0


def test_unrelated_images_fail():
    pair = make_pair(4, 20.0, seed=7, kind_fine=1)
    reg = run_pair(pair)
    assert not reg.passed, (reg.score, reg.margin, reg.ncc)
    assert reg.boundary < 0.5  # the outlines do not agree wherever the shape is put


def test_interior_view_placed_wrongly_fails():
    """A field of view inside the tissue whose internal structure (with contrasts that differ
    between the modalities) does not place it: whatever comes out must not pass."""
    pair = make_pair(4, 60.0, seed=42, fine_shape=(80, 80), radius_px=20, coarse_shape=(56, 64))
    reg = run_pair(pair)
    rot_err, rms, _ = errors(pair, reg)
    assert not reg.passed or (rot_err <= 0.5 and rms <= 0.25)


def test_no_overlap_fails():
    """The fine field of view lies off the tissue (its mask is noise)."""
    pair = make_pair(4, 0.0, seed=8, fov="none", fine_shape=(60, 60))
    reg = run_pair(pair)
    assert not reg.passed
    assert reg.ncc < 0.3 and reg.margin < 0.05


def test_featureless_view_inside_tissue_fails():
    """A small field of view entirely inside uniform tissue cannot be placed."""
    pair = make_pair(4, 30.0, seed=42, fine_shape=(50, 50), levels=((0, 0, 0, 0), (0, 0, 0, 0)),
                     radius_px=20, coarse_shape=(56, 64))
    assert pair["fine_mask"].mean() > 0.9
    reg = run_pair(pair)
    assert not reg.passed and reg.ncc < 0.2


def test_empty_masks_fail_without_exception():
    pair = make_pair(2, 0.0, seed=9)
    reg = register_pair(pair["coarse_img"], pair["coarse_mask"], 80.0, pair["fine_img"],
                        np.zeros_like(pair["fine_mask"]), 40.0)
    assert not reg.passed and reg.score == 0.0
    assert "reason" in reg.details


def test_json_round_trip(tmp_path):
    pair = make_pair(2, 45.0, seed=11)
    reg = run_pair(pair, n_starts=12)
    d = reg.to_json()
    text = json.dumps(d)
    back = Registration.from_json(json.loads(text))
    np.testing.assert_allclose(back.matrix, reg.matrix)
    assert back.rotation_deg == reg.rotation_deg and back.passed == reg.passed
    assert back.translation_um == pytest.approx(reg.translation_um)
    assert back.boundary == pytest.approx(reg.boundary)
    nan_boundary = Registration.from_json(json.loads(json.dumps(dict(d, boundary=None))))
    assert math.isnan(nan_boundary.boundary)  # "no outline in view" survives strict JSON
    # physical matrix: fine um -> coarse um
    m_um = np.asarray(d["matrix_um"])
    p_px = np.array([[3.0, 7.0]])
    q_um = transform_points(m_um, p_px * 40.0)
    np.testing.assert_allclose(q_um, transform_points(reg.matrix, p_px) * 80.0)
    # translation_um is the position of fine pixel (0, 0)
    np.testing.assert_allclose(transform_points(reg.matrix, [[0.0, 0.0]])[0] * 80.0, reg.translation_um)


def test_from_json_missing_key():
    from msifusion.errors import InputError

    with pytest.raises(InputError, match="rotation_deg"):
        Registration.from_json({"matrix_px": np.eye(2, 3).tolist()})


def test_compose_and_invert():
    rng = np.random.default_rng(0)
    m_ab = np.concatenate([rng.normal(size=(2, 2)), rng.normal(size=(2, 1))], 1)
    m_bc = np.concatenate([rng.normal(size=(2, 2)), rng.normal(size=(2, 1))], 1)
    p = rng.normal(size=(5, 2))
    np.testing.assert_allclose(transform_points(compose(m_ab, m_bc), p),
                               transform_points(m_bc, transform_points(m_ab, p)))
    np.testing.assert_allclose(compose(m_ab, invert(m_ab)), np.eye(2, 3), atol=1e-12)
    # chain of pixel-size scalings: 5 um -> 20 um -> 80 um is a factor 1/16
    s1 = np.array([[0.25, 0, 1.0], [0, 0.25, 2.0]])
    s2 = np.array([[0.25, 0, 0.5], [0, 0.25, 0.0]])
    np.testing.assert_allclose(compose(s1, s2), [[1 / 16, 0, 0.75], [0, 1 / 16, 0.5]])


def test_chain_to_reference_and_pose():
    """Composition along a chain 5 um -> 20 um -> 80 um and its physical description."""
    th = math.radians(30.0)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    m_10 = np.concatenate([0.25 * rot, [[2.0], [3.0]]], 1)          # level 1 (20 um) -> 0 (80 um)
    m_21 = np.concatenate([0.25 * np.eye(2), [[4.0], [0.0]]], 1)     # level 2 (5 um) -> 1
    to0 = reg_mod.chain_to_reference([m_10, m_21])
    np.testing.assert_allclose(to0[0], m_10)
    p = np.array([[8.0, 12.0]])
    np.testing.assert_allclose(transform_points(to0[1], p),
                               transform_points(m_10, transform_points(m_21, p)))
    d = reg_mod.pose(to0[1], 5.0, 80.0)
    assert d["rotation_deg"] == pytest.approx(30.0) and not d["mirror"]
    assert d["scale"] == pytest.approx(1 / 16)
    # matrix_um maps micrometres to micrometres: a 5-um step is a 5-um step rotated by 30 deg
    step = transform_points(np.asarray(d["matrix_um"]), [[5.0, 0.0]]) - \
        transform_points(np.asarray(d["matrix_um"]), [[0.0, 0.0]])
    np.testing.assert_allclose(step[0], 5.0 * np.array([math.cos(th), math.sin(th)]), atol=1e-12)
    np.testing.assert_allclose(d["translation_um"], transform_points(to0[1], [[0, 0]])[0] * 80.0)
    assert reg_mod.pose(m_10 @ np.diag([-1.0, 1.0, 1.0]), 20.0, 80.0)["mirror"]


def test_pillai_trace_exact_cases():
    """Mean squared canonical correlation: 1 for channels that are linear maps of each other
    (whatever the mixing), about k/N for independent noise, and blind to scaling of a channel."""
    rng = np.random.default_rng(0)
    n = 4000
    x = torch.as_tensor(rng.normal(size=(1, n, 3)))
    mix = torch.as_tensor(rng.normal(size=(3, 3)))
    w = torch.ones(1, n)
    y = x[0] @ mix + 5.0
    assert float(reg_mod._pillai(x, y, w, ridge=0.0)[0]) == pytest.approx(1.0, abs=1e-5)
    y_noise = torch.as_tensor(rng.normal(size=(n, 3)))
    assert float(reg_mod._pillai(x, y_noise, w, ridge=0.0)[0]) < 0.01
    # one shared channel out of three: 1/3
    y_one = torch.cat([x[0, :, :1] * 7.0, y_noise[:, 1:]], dim=1)
    assert float(reg_mod._pillai(x, y_one, w, ridge=0.0)[0]) == pytest.approx(1 / 3, abs=0.01)
    # zero weights drop points: corrupting the dropped half changes nothing
    w_half = torch.cat([torch.ones(1, n // 2), torch.zeros(1, n // 2)], dim=1)
    y_bad = y.clone()
    y_bad[n // 2:] = torch.as_tensor(rng.normal(size=(n - n // 2, 3)))
    assert float(reg_mod._pillai(x, y_bad, w_half, ridge=0.0)[0]) == pytest.approx(1.0, abs=1e-5)


def _channels(ratio, rot, shift, **kw):
    """make_pair with component-like channels: the same geometry rendered with other region
    contrasts (the geometry draws do not depend on the levels)."""
    sets = [((0.8, -0.5, 1.2, 0.6), (-0.4, 0.9, 0.5, 2.0)), ((2.0, 0.0, 0.0, 0.0), (1.5, 0.0, 0.0, 0.0)),
            ((0.0, 1.5, 0.0, -0.5), (0.0, 0.0, 1.0, 1.0)), ((0.0, 0.0, 2.0, 1.0), (0.0, 2.0, 0.0, -0.6))]
    pairs = [make_pair(ratio, rot, shift, levels=lv, **kw) for lv in sets]
    return pairs[0], np.stack([p["coarse_img"] for p in pairs]), np.stack([p["fine_img"] for p in pairs])


@pytest.mark.parametrize("ratio, fov, seed", [(4, "half", 5), (10, "full", 6)])
def test_register_with_component_channels(ratio, fov, seed):
    """With component maps the placement is as accurate, and the margin over the next placement
    wider, than with the total images alone."""
    rot, shift = _random_case(seed)
    pair, cch, fch = _channels(ratio, rot, shift, fov=fov, seed=seed)
    plain = run_pair(pair)
    reg = run_pair(pair, coarse_channels=cch, fine_channels=fch)
    rot_err, rms, _ = errors(pair, reg)
    assert reg.passed and rot_err <= 0.5 and rms <= 0.25, (rot_err, rms)
    assert reg.margin > plain.margin
    assert 0.5 < reg.details["ncc_channels"] <= 1.0
    with pytest.raises(reg_mod.InputError, match="channels must be stacks"):
        run_pair(pair, coarse_channels=cch[:, :-1], fine_channels=fch)


def test_warp_to_coarse_and_overlay(tmp_path):
    pair = make_pair(4, 30.0, seed=12)
    m = pair["matrix"]
    w = reg_mod.warp_to_coarse(pair["fine_img"], m, pair["coarse_img"].shape)
    assert w.shape == pair["coarse_img"].shape and np.isfinite(w).mean() > 0.3
    # the fine tissue mask warped with the true matrix lands on the coarse tissue (edge ring aside)
    fm = reg_mod.warp_to_coarse(pair["fine_mask"].astype(float), m, pair["coarse_img"].shape)
    ok = np.isfinite(fm)
    inner = ndi.binary_erosion(pair["coarse_mask"], iterations=2) & ok
    outer = ~ndi.binary_dilation(pair["coarse_mask"], iterations=1) & ok
    assert (fm[inner] > 0.5).mean() > 0.98 and (fm[outer] < 0.5).mean() > 0.98
    # stacks: (k, ny, nx) in, (k, nyc, nxc) out; upsampling
    w2 = reg_mod.warp_to_coarse(np.stack([pair["fine_img"], pair["fine_img"]]), m, pair["coarse_img"].shape,
                                upsample=2)
    assert w2.shape == (2, 2 * pair["coarse_img"].shape[0], 2 * pair["coarse_img"].shape[1])
    reg = Registration(matrix=m, rotation_deg=30.0, translation_um=(0.0, 0.0), scale=0.25, mirror=False,
                       score=0.9, ncc=0.8, margin=0.3, passed=True, coarse_px_um=80.0, fine_px_um=20.0)
    out = tmp_path / "qc" / "overlay.png"
    reg_mod.plot_overlay(pair["coarse_img"], pair["fine_img"], reg, out)
    assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob("*.part"))


def test_bad_input():
    from msifusion.errors import InputError

    with pytest.raises(InputError, match="mask shape"):
        register_pair(np.ones((5, 5)), np.ones((4, 5), bool), 80, np.ones((5, 5)), np.ones((5, 5), bool), 20)
    with pytest.raises(InputError, match="pixel sizes"):
        register_pair(np.ones((5, 5)), np.ones((5, 5), bool), 0, np.ones((5, 5)), np.ones((5, 5), bool), 20)


@pytest.mark.real
@pytest.mark.skipif(not REAL_TOFSIMS.exists(), reason="real data ../shared/data/real absent")
def test_real_tofsims_split_mass_ranges():
    """Real ToF-SIMS poplar section: m/z 1-100 as a 4x coarser, rotated 'modality', m/z 101-200 as
    the fine one (cropped: partial view, no tissue outline). Known transform by construction."""
    import h5py

    with h5py.File(REAL_TOFSIMS, "r") as f:
        cube = f["intensities"][...].astype(np.float64)  # (y, x, m/z)
    low, high = cube[:, :, :100].sum(-1), cube[:, :, 100:].sum(-1)
    th, r, nc, c0, nf = math.radians(-131.0), 4.0, 56, 40, 176
    rm = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]]) / r
    qc, cen = np.array([28.3, 26.9]), np.array([127.5, 127.5])
    off = (np.arange(4) + 0.5) / 4 - 0.5  # box-integrate the coarse pixels
    yy, xx = np.mgrid[0:nc, 0:nc].astype(np.float64)
    coarse = np.zeros((nc, nc))
    for dy in off:
        for dx in off:
            q = np.stack([(xx + dx).ravel(), (yy + dy).ravel()], 1)
            p = (q - qc) @ np.linalg.inv(rm).T + cen
            coarse += ndi.map_coordinates(low, [p[:, 1], p[:, 0]], order=1, mode="constant",
                                          cval=np.nan).reshape(nc, nc) / 16
    fine = high[c0:c0 + nf, c0:c0 + nf]
    truth = np.concatenate([rm, (qc - rm @ cen + rm @ np.array([c0, c0]))[:, None]], 1)
    reg = register_pair(coarse, tissue_mask(coarse), 4.0, fine, tissue_mask(fine), 1.0)
    rot_err, rms, _ = errors(dict(matrix=truth, fine_mask=np.ones_like(fine, dtype=bool)), reg)
    assert reg.passed and rot_err <= 0.5 and rms <= 0.25, (rot_err, rms, reg.score, reg.boundary, reg.ncc, reg.margin)


@pytest.mark.parametrize("ratio, n_coarse, seed", [(4, 32, 0), (8, 16, 1), (12, 12, 2)])
def test_textured_field_inside_tissue(ratio, n_coarse, seed):
    """A field of view inside a textured tissue, no outline anywhere: the coarse image (12-32 px
    per side) is too small for its own structure to place the fine one, the fine structure it
    averages does. Every fine pixel lands within 0.25 coarse px of its true place."""
    coarse, fine = textured_field(ratio, n_coarse, seed)
    reg = register_maps(coarse, 2.0 * ratio, fine, 2.0)
    err = fine_pixel_errors(reg, block_matrix(ratio), fine.shape[1:])
    assert reg.passed, (reg.score, reg.margin, reg.ncc)
    assert err.max() <= 0.25 and abs(reg.rotation_deg) <= 1.0, (err.max(), reg.rotation_deg)
    assert reg.scale == pytest.approx(1.0 / ratio, rel=1e-6) and reg.details["coverage"] > 0.95


def test_unrelated_textures_fail():
    """Two textures of different fields: no placement may pass, however good its small overlap."""
    coarse, _ = textured_field(8, 16, 0)
    _, fine = textured_field(8, 16, 100)
    reg = register_maps(coarse, 16.0, fine, 2.0)
    assert not reg.passed and reg.margin < 0.05


@pytest.mark.real
@pytest.mark.skipif(not REAL_TOFSIMS.exists(), reason="real data ../shared/data/real absent")
@pytest.mark.parametrize("crop", [128, 256])
def test_real_tofsims_split_block_mean_by_8(crop):
    """Real ToF-SIMS poplar wood (the whole field is wood): group A of the strongest channels
    block-averaged by 8 (16 x 16 or 32 x 32 px) against group B at full resolution, channels as
    the component maps, automatic masks: the exact scaling, every fine pixel within 0.25 px."""
    coarse, fine = real_split(8, crop)
    reg = register_maps(coarse, 16.0, fine, 2.0)
    err = fine_pixel_errors(reg, block_matrix(8), fine.shape[1:])
    assert reg.passed and err.max() <= 0.25, (err.max(), reg.rotation_deg, reg.margin, reg.ncc)


def test_registration_table_rows_and_failed_pairs(tmp_path, caplog):
    """One row per pair in sheet order, NA for absent figures, failures logged by section."""
    from msifusion.errors import InputError
    from msifusion.steps.register import REGISTRATION_COLUMNS, registration_table_step

    good = {"passed": True, "score": 0.91, "margin": 0.2, "ncc": 0.8, "rotation_deg": 12.5,
            "scale": 0.25, "mirror": False, "translation_um": [10.0, -4.0]}
    bad = {"passed": False, "score": 0.4}
    paths = []
    for name, doc in (("a.json", good), ("b.json", bad)):
        (tmp_path / name).write_text(json.dumps(doc))
        paths.append(str(tmp_path / name))
    out = tmp_path / "registration.tsv"
    registration_table_step(paths, [["s01", "fticr", "maldi"], ["s02", "fticr", "maldi"]], str(out))
    lines = out.read_text().splitlines()
    assert lines[0].split("\t") == list(REGISTRATION_COLUMNS)
    row = dict(zip(REGISTRATION_COLUMNS, lines[1].split("\t")))
    assert row == {"section": "s01", "coarse": "fticr", "fine": "maldi", "passed": "true",
                   "score": "0.9100", "margin": "0.2000", "ncc": "0.8000",
                   "rotation_deg": "12.5000", "scale": "0.2500", "mirror": "false",
                   "translation_x_um": "10.0000", "translation_y_um": "-4.0000"}
    row = dict(zip(REGISTRATION_COLUMNS, lines[2].split("\t")))
    assert row["passed"] == "false" and row["margin"] == "NA" and row["translation_x_um"] == "NA"
    assert "section s02: maldi -> fticr did not pass" in caplog.text
    with pytest.raises(InputError, match="2 transform files for 1 pairs"):
        registration_table_step(paths, [["s01", "fticr", "maldi"]], str(out))
