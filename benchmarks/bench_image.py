"""Benchmark of the bounded-memory microscopy reader (msifusion.image) on a synthetic whole slide.

1. Writes a synthetic H&E-like RGB slide (default 40,000 x 30,000) as a BigTIFF with JPEG tiles of
   512 x 512 and pyramid levels /4, /16 and /64 in SubIFDs, tile by tile from generators (bounded
   memory: a few smooth stained blobs with fine texture, computed per tile; the pyramid levels
   are computed from the same model at their own scale, texture averaged out).
2. In a fresh subprocess (so that its peak RSS is its own) reads the header and a working level
   at ``--max-pixels`` (2**22) through ``choose_downsample`` / ``read_image`` with
   ``--memory-mb``; then, in another subprocess, the same budget at the next factor that a
   pyramid level divides (what a pyramid-aware caller could ask for).

Printed: file size, write time, info time, read time (wall and CPU of the process: on a shared
machine the wall time is an upper bound), the level used, the output shape, the peak RSS of the
reading process (VmHWM) minus its baseline after imports, and whether that stayed within
``memory_mb`` + the output size.

Usage::

    python benchmarks/bench_image.py [--size 40000x30000] [--memory-mb 256] [--out DIR]
    python benchmarks/bench_image.py --small          # 4,000 x 3,000, a quick check
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from measure import peak_rss_mb  # noqa: E402

TILE = 512
LEVELS = (4, 16, 64)
#: Glass level (RGB) and the hematoxylin / eosin optical-density vectors (Ruifrok & Johnston).
GLASS = np.array([236.0, 236.0, 232.0])
H_VEC = np.array([0.65, 0.70, 0.29])
E_VEC = np.array([0.07, 0.99, 0.11])
GLASS_TILE = np.ascontiguousarray(np.broadcast_to(GLASS.astype(np.uint8), (TILE, TILE, 3)))


def blobs(width: int, height: int, n: int = 7, seed: int = 0) -> list[tuple]:
    """Stained blobs (cx, cy, rx, ry, angle, hematoxylin, eosin) in level-0 pixels."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        r = rng.uniform(0.08, 0.2) * min(width, height)
        out.append((rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height,
                    r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3),
                    rng.uniform(0, np.pi), rng.uniform(0.05, 0.3), rng.uniform(0.3, 0.8)))
    return out


def _sin_sum(a: float, b: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """``sin(a x + b y)`` on the grid of ``xs`` x ``ys`` as two outer products (separable)."""
    return (np.outer(np.cos(b * ys), np.sin(a * xs)) + np.outer(np.sin(b * ys), np.cos(a * xs)))


def tile_rgb(x0: float, y0: float, scale: int, model: list[tuple]) -> np.ndarray:
    """RGB uint8 tile (TILE, TILE, 3) of the slide at ``scale`` (level-0 pixels per pixel)."""
    ys = ((y0 + np.arange(TILE) + 0.5) * scale - 0.5).astype(np.float32)
    xs = ((x0 + np.arange(TILE) + 0.5) * scale - 0.5).astype(np.float32)
    h = np.zeros((TILE, TILE), np.float32)
    e = np.zeros((TILE, TILE), np.float32)
    span = TILE * scale
    touched = False
    for cx, cy, rx, ry, ang, hh, ee in model:
        reach = 1.3 * max(rx, ry)
        if (cx + reach < xs[0] or cx - reach > xs[0] + span
                or cy + reach < ys[0] or cy - reach > ys[0] + span):
            continue
        touched = True
        c, s = np.float32(math.cos(ang)), np.float32(math.sin(ang))
        dx, dy = (xs - cx)[None, :], (ys - cy)[:, None]
        u = (dx * (c / rx) + dy * (s / rx))
        v = (dy * (c / ry) - dx * (s / ry))
        z = np.sqrt(u * u + v * v)
        z -= 1.0
        z *= 40.0
        np.clip(z, -50, 50, out=z)
        inside = 1.0 / (1.0 + np.exp(z))
        h += np.float32(hh) * inside
        e += np.float32(ee) * inside
    if not touched:
        return GLASS_TILE
    if scale == 1:  # fine texture (nuclei-like speckle, fibres); averages out at coarse levels
        tex = (0.35 * _sin_sum(0.9, 0.31, xs, ys) * _sin_sum(-0.21, 1.13, xs, ys)).astype(
            np.float32)
        h *= 1.0 + tex
        e *= 1.0 - 0.5 * tex
    od = h[..., None] * H_VEC.astype(np.float32) + e[..., None] * E_VEC.astype(np.float32)
    rgb = np.exp(od * np.float32(-math.log(10.0)))
    rgb *= GLASS.astype(np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def tiles(width: int, height: int, scale: int, model: list[tuple]):
    """Tiles of one level in row-major order (tifffile's order)."""
    w, h = -(-width // scale), -(-height // scale)
    for ty in range(-(-h // TILE)):
        for tx in range(-(-w // TILE)):
            yield tile_rgb(tx * TILE, ty * TILE, scale, model)


def write_slide(path: Path, width: int, height: int) -> None:
    import tifffile

    from msifusion.store import atomic_output

    model = blobs(width, height)
    kw = dict(dtype=np.uint8, tile=(TILE, TILE), compression="jpeg",
              compressionargs={"level": 85}, photometric="rgb", maxworkers=2,
              buffersize=32 << 20)
    with atomic_output(path) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
            tif.write(tiles(width, height, 1, model), shape=(height, width, 3),
                      subifds=len(LEVELS), resolution=(1e4 / 0.25, 1e4 / 0.25),
                      resolutionunit="centimeter", **kw)
            for f in LEVELS:
                tif.write(tiles(width, height, f, model),
                          shape=(-(-height // f), -(-width // f), 3), subfiletype=1, **kw)


def read_step(path: str, memory_mb: float, max_pixels: int, factor: int | None) -> dict:
    """One read in this process (run in a subprocess): JSON-able figures."""
    import tifffile  # noqa: F401  (imported before timing: the header read, not the import)

    from msifusion import image as mi

    base = peak_rss_mb()
    t = time.perf_counter()
    info = mi.read_image_info(path)
    t_info = time.perf_counter() - t
    f = factor or mi.choose_downsample(info, max_pixels=max_pixels)
    level, r = mi._pick_level(info, f)
    t, c = time.perf_counter(), time.process_time()
    out = mi.read_image(path, f, memory_mb=memory_mb, info=info)
    t_read, c_read = time.perf_counter() - t, time.process_time() - c
    peak = peak_rss_mb()
    return {"factor": f, "level": level, "level_shape": info.levels[level], "reduction": r,
            "shape": list(out.shape), "info_ms": 1e3 * t_info, "read_s": t_read, "cpu_s": c_read,
            "baseline_mb": base, "peak_mb": peak, "out_mb": out.nbytes / 2**20,
            "levels": info.levels, "pixel_size_um": info.pixel_size_um,
            "note": info.pixel_size_note, "mean_rgb": out.reshape(-1, 3).mean(0).tolist()}


def pyramid_factor(levels, shape, max_pixels: int) -> int:
    """Smallest multiple of a level's reduction that fits ``max_pixels``."""
    ny, nx = shape
    best = None
    for lny, lnx in levels[1:]:
        r = round(nx / lnx)
        f = r * max(1, math.ceil(math.sqrt(ny * nx / max_pixels) / r))
        while (ny / f) * (nx / f) > max_pixels:
            f += r
        best = f if best is None else min(best, f)
    return best or 1


def run_read(path: Path, memory_mb: float, max_pixels: int, factor: int | None) -> dict:
    cmd = [sys.executable, __file__, "--read-only", str(path), "--memory-mb", str(memory_mb),
           "--max-pixels", str(max_pixels)]
    if factor:
        cmd += ["--factor", str(factor)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "image")
    ap.add_argument("--size", default="40000x30000", help="WIDTHxHEIGHT of level 0 (pixels)")
    ap.add_argument("--memory-mb", type=float, default=256.0)
    ap.add_argument("--max-pixels", type=int, default=2**22)
    ap.add_argument("--small", action="store_true", help="4000x3000, a quick check")
    ap.add_argument("--keep", action="store_true", help="reuse an existing slide of that size")
    ap.add_argument("--read-only", help=argparse.SUPPRESS)
    ap.add_argument("--factor", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.read_only:
        print(json.dumps(read_step(args.read_only, args.memory_mb, args.max_pixels, args.factor)))
        return
    width, height = (int(v) for v in ("4000x3000" if args.small else args.size).split("x"))
    path = args.out / f"slide_{width}x{height}.tif"
    t_write = c_write = float("nan")
    if not (args.keep and path.exists()):
        t, c = time.perf_counter(), time.process_time()
        write_slide(path, width, height)
        t_write, c_write = time.perf_counter() - t, time.process_time() - c
    size_mb = path.stat().st_size / 2**20
    print(f"slide {width} x {height} RGB, JPEG tiles {TILE}, levels /{', /'.join(map(str, LEVELS))}"
          f": {size_mb:.1f} MB written in {t_write:.1f} s (CPU {c_write:.1f} s; writer peak RSS "
          f"{peak_rss_mb():.0f} MB)")
    first = run_read(path, args.memory_mb, args.max_pixels, None)
    print(f"info: {first['info_ms']:.1f} ms; levels {first['levels']}; pixel "
          f"{first['pixel_size_um']} um ({first['note']})")
    second = run_read(path, args.memory_mb, args.max_pixels,
                      pyramid_factor(first["levels"], first["levels"][0], args.max_pixels))
    print(f"{'read':>22s}{'factor':>8s}{'level':>7s}{'level shape':>16s}{'output':>18s}"
          f"{'time s':>9s}{'cpu s':>8s}{'peak MB':>9s}{'base MB':>9s}{'delta':>8s}{'bound':>8s}{'ok':>5s}")
    for name, r in (("choose_downsample", first), ("pyramid-aware", second)):
        delta = r["peak_mb"] - r["baseline_mb"]
        bound = args.memory_mb + r["out_mb"]
        shape = " x ".join(map(str, r["shape"]))
        lshape = " x ".join(map(str, r["level_shape"]))
        print(f"{name:>22s}{r['factor']:>8d}{r['level']:>7d}{lshape:>16s}{shape:>18s}"
              f"{r['read_s']:>9.1f}{r['cpu_s']:>8.1f}{r['peak_mb']:>9.0f}{r['baseline_mb']:>9.0f}{delta:>8.0f}"
              f"{bound:>8.0f}{'yes' if delta <= bound else 'NO':>5s}")


if __name__ == "__main__":
    main()
