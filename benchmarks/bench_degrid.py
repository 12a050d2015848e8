"""Benchmark of the ToF-SIMS tile-grid removal (msifusion.degrid).

1. Phantoms: a smooth image times a planted tile gain (vignetting, depth 0.3) for tiles of 40, 64
   and 80 pixels; the tile is detected automatically, then ``gain`` and ``subtract`` corrections
   are compared: tile-harmonic energy before/after (:func:`grid_energy`) and correlation with the
   gain-free truth.
2. The real ToF-SIMS cube (``../shared/data/real/tofsims_poplar``, 256 x 256 x 200) with a
   multiplicative tile pattern injected (``--tiles``, ``--depth``): corrected on the TIC image by
   ``gain`` and ``subtract`` (after-NMF path) and value by value on the converted spectra by
   ``gain`` (before-NMF path). Printed: relative L2 error of the TIC image against the untouched
   original after the best constant scale, correlation, grid energy, time and peak memory traced;
   then the ``gain`` TIC error for other pattern shapes, and the rms deviation of the original's
   own mean tile from flat (the texture's tile-periodic part, which no estimate can tell from a
   gain).

Usage::

    python benchmarks/bench_degrid.py [--tiles 16 32] [--depth 0.6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from msifusion.degrid import (degrid_converted, detect_tile_period, grid_energy,  # noqa: E402
                              mean_tile, remove_grid)
from msifusion.store import ConvertedReader, write_converted  # noqa: E402
from test_degrid import smooth_image, tiled, vignette  # noqa: E402

CUBE = ROOT.parent / "shared" / "data" / "real" / "tofsims_poplar" / "tofsims_trift_poplar_256x256.h5"


def rel_error(img: np.ndarray, truth: np.ndarray) -> float:
    """||s img - truth|| / ||truth|| with the best constant s (the gain is known up to a scale)."""
    s = float((img * truth).sum() / (img * img).sum())
    return float(np.linalg.norm(s * img - truth) / np.linalg.norm(truth))


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def phantoms() -> None:
    print("phantoms (smooth image x vignetting of depth 0.3, tile detected automatically)")
    print(f"{'tile':>5s}{'detected':>10s}{'energy before':>15s}{'gain: after':>13s}{'drop':>8s}"
          f"{'subtract: after':>17s}{'r observed':>12s}{'r gain':>9s}{'r subtract':>12s}")
    for tile in (40, 64, 80):
        shape = (4 * tile, 5 * tile)
        clean = smooth_image(*shape, seed=tile)
        obs = clean * tiled(vignette(tile, tile), shape)
        t = detect_tile_period(obs)
        gain, sub = remove_grid(obs, t, "gain"), remove_grid(obs, t, "subtract")
        e0, eg, es = grid_energy(obs, t), grid_energy(gain, t), grid_energy(sub, t)
        print(f"{tile:5d}{f'{t[0]}x{t[1]}':>10s}{e0:15.4f}{eg:13.5f}{1 - eg / e0:8.1%}{es:17.5f}"
              f"{corr(obs, clean):12.4f}{corr(gain, clean):9.5f}{corr(sub, clean):12.5f}")


def real_cube(tile: int, depth: float) -> None:
    if not CUBE.exists():
        print(f"\nreal cube not found at {CUBE}; skipped")
        return
    with h5py.File(CUBE, "r") as f:
        cube, mz_axis = f["intensities"][:].astype(np.float32), f["mz"][:]
    ny, nx, n_mz = cube.shape
    truth = cube.sum(axis=2).astype(np.float64)
    gain = tiled(vignette(tile, tile, depth), (ny, nx)).astype(np.float32)
    observed_cube = cube * gain[..., None]
    observed = observed_cube.sum(axis=2).astype(np.float64)
    print(f"\nreal ToF-SIMS cube {ny} x {nx} x {n_mz} (TIC texture CV "
          f"{truth.std() / truth.mean():.2f}), injected tile {tile} px, vignetting depth {depth}")
    print(f"{'path':<34s}{'TIC rel. error':>15s}{'r':>9s}{'grid energy':>13s}{'s':>7s}"
          f"{'traced MB':>11s}")
    print(f"{'observed (no correction)':<34s}{rel_error(observed, truth):15.4f}"
          f"{corr(observed, truth):9.4f}{grid_energy(observed, tile):13.5f}")
    for method in ("gain", "subtract"):
        t0 = time.perf_counter()
        out = remove_grid(observed, tile, method)
        dt = time.perf_counter() - t0
        print(f"{'TIC image, ' + method:<34s}{rel_error(out, truth):15.4f}{corr(out, truth):9.4f}"
              f"{grid_energy(out, tile):13.5f}{dt:7.2f}")
    flat = observed_cube.reshape(ny * nx, n_mz)
    rows, cols = np.nonzero(flat)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=ny * nx))])
    yy, xx = np.divmod(np.arange(ny * nx), nx)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "cube.h5"
        write_converted(src, indptr=indptr, mz=mz_axis[cols].astype(np.float64),
                        intensity=flat[rows, cols], xy=np.c_[xx, yy],
                        attrs={"pixel_size_um": 1.0, "mode": "processed",
                               "mz_range": (float(mz_axis.min()), float(mz_axis.max()))})
        del flat, observed_cube
        for blocks in (1, 4):
            tracemalloc.start()
            t0 = time.perf_counter()
            degrid_converted(src, Path(tmp) / "d.h5", tile=tile, mz_blocks=blocks,
                             block_pixels=8192)
            dt = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
            tracemalloc.stop()
            r = ConvertedReader(Path(tmp) / "d.h5")
            tic = r.to_image(r.tic())
            label = f"spectra, gain, {blocks} m/z block(s)"
            print(f"{label:<34s}{rel_error(tic, truth):15.4f}{corr(tic, truth):9.4f}"
                  f"{grid_energy(tic, tile):13.5f}{dt:7.2f}{peak:11.1f}")
        print(f"(sparse input: {len(rows):,} values; dense would be {ny * nx * n_mz:,})")
    m = mean_tile(truth, tile)[0]
    print(f"original's own mean tile: rms deviation from flat {np.std(m / m.mean()):.3f} "
          f"({(ny // tile) * (nx // tile)} tiles)")
    print("gain (TIC image) on other tile patterns:", end="")
    for name, pattern in other_patterns(tile).items():
        img = truth * tiled(pattern, truth.shape)
        print(f"  {name} {rel_error(img, truth):.3f} -> "
              f"{rel_error(remove_grid(img, tile, 'gain'), truth):.4f}", end="")
    print()


def other_patterns(tile: int) -> dict[str, np.ndarray]:
    """Tile gains of other shapes: a tilted ramp, an off-centre spot, a flat-topped sine."""
    u = (np.arange(tile) + 0.5) / tile
    return {"ramp": np.outer(0.8 + 0.4 * u[::-1] ** 1.5, 0.7 + 0.6 * u),
            "spot": 0.7 + 0.8 * np.exp(-((u[:, None] - 0.35) ** 2 + (u[None, :] - 0.6) ** 2)
                                       / (2 * 0.25 ** 2)),
            "sine": 0.8 + 0.5 * np.outer(np.sin(np.pi * u) ** 0.5, np.sin(np.pi * u) ** 0.5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiles", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--depth", type=float, default=0.6)
    a = ap.parse_args()
    phantoms()
    for tile in a.tiles:
        real_cube(tile, a.depth)


if __name__ == "__main__":
    main()
