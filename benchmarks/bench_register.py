"""Benchmark of msifusion.register on phantom pairs with a known transform.

Prints per-trial errors (rotation, RMS / max mapped-position error over the fine tissue in coarse
pixels), quality figures and timings for a sweep of random rotations over the full circle, shifts,
scale ratios 2x / 4x / 10x and full or partial (about half) fine fields of view; then negative
controls (unrelated shape, field of view off the tissue, mirrored section with mirror=False) and the
timing of a 700 x 975 (fine) vs 65 x 97 (coarse) pair.

Usage::

    python benchmarks/bench_register.py [--trials 20] [--threads 2] [--seed 0]

The phantom generator is ``make_pair`` from ``tests/test_register.py``: small sections (radius 15
coarse px) and fields of view down to 20 x 40 coarse px, a stress test beyond the pipeline's
geometry; the done-when figures of the registration come from ``bench_register_study.py`` (the
workflow on phantom studies). The sweep runs twice: on the total images alone, and with 4
component-like channels per modality (the same geometry rendered with other region contrasts), as
the workflow passes its NMF maps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_register import _channels, errors, make_pair, run_pair  # noqa: E402


def _row(name, pair, reg, dt, truth=True, ok=None):
    """Print one trial; ``truth``: errors against the known matrix; ``ok`` overrides the verdict."""
    if truth:
        rot_err, rms, mx = errors(pair, reg)
        ok = (reg.passed and rot_err <= 0.5 and rms <= 0.25) if ok is None else ok
        err = f"rot_err {rot_err:6.3f} deg  rms {rms:6.3f}  max {mx:6.3f} px"
    else:
        ok = (not reg.passed) if ok is None else ok
        err = " " * 44
    print(f"{name:<44s} {err}  dice {reg.score:5.3f}  bnd {reg.boundary:5.3f}  ncc {reg.ncc:6.3f}  margin {reg.margin:6.3f}  "
          f"passed {str(reg.passed):5s}  {dt:5.2f} s  {'OK' if ok else 'WRONG'}", flush=True)
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--negatives", type=int, default=6, help="trials per negative control")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    cases = [([2, 4, 10][i % 3], "half" if i % 2 else "full", float(rng.uniform(-180, 180)),
              tuple(rng.uniform(-300, 300, 2))) for i in range(args.trials)]
    for label, with_channels in (("total images alone", False),
                                 ("plus 4 component-like channels (as the workflow)", True)):
        results, times, rms_all, rot_all = [], [], [], []
        print(f"\n== sweep: {args.trials} trials, {label} ==")
        for i, (ratio, fov, rot, shift) in enumerate(cases):
            pair, cch, fch = _channels(ratio, rot, shift, fov=fov, seed=1000 + i)
            kw = dict(coarse_channels=cch, fine_channels=fch) if with_channels else {}
            t = time.perf_counter()
            reg = run_pair(pair, **kw)
            dt = time.perf_counter() - t
            times.append(dt)
            name = f"{i:2d} ratio {ratio:2d} {fov:4s} rot {rot:7.1f} fine {pair['fine_img'].shape}"
            results.append(_row(name, pair, reg, dt))
            e = errors(pair, reg)
            rot_all.append(e[0])
            rms_all.append(e[1])
        print(f"sweep ({label}): {sum(results)}/{len(results)} correct and passed; rotation error "
              f"median {np.median(rot_all):.3f} max {np.max(rot_all):.3f} deg; RMS position error median "
              f"{np.median(rms_all):.3f} max {np.max(rms_all):.3f} coarse px; time median "
              f"{np.median(times):.2f} s")

    print(f"\n== negative controls ({args.negatives} each; expected passed=False) ==")
    neg = []
    for i in range(args.negatives):
        rot = float(rng.uniform(-180, 180))
        for kind, kw in (("unrelated shape", dict(kind_fine=1)),
                         ("FOV off the tissue", dict(fov="none", fine_shape=(60, 60))),
                         ("mirrored, mirror=False", dict(mirror=True)),
                         ("FOV inside the tissue", dict(fine_shape=(80, 80), radius_px=20, coarse_shape=(56, 64),
                                                        shift_um=(0.0, 0.0)))):
            pair = make_pair(4, rot, seed=2000 + i, **kw)
            t = time.perf_counter()
            reg = run_pair(pair)
            dt = time.perf_counter() - t
            if kind == "FOV inside the tissue":  # may be placed right (structure); must not pass if wrong
                rot_err, rms, _ = errors(pair, reg)
                right = rot_err <= 0.5 and rms <= 0.25
                neg.append(_row(f"{kind} rot {rot:7.1f}", pair, reg, dt, ok=right or not reg.passed))
            else:
                neg.append(_row(f"{kind} rot {rot:7.1f}", pair, reg, dt, truth=False))
    print(f"negative controls: {sum(neg)}/{len(neg)} correctly failed (or, inside the tissue, right)")

    print("\n== 700 x 975 fine (5 um) vs 65 x 97 coarse (50 um), ratio 10; total images alone, then "
          "with 12 component-like channels per modality (as the workflow passes its NMF maps) ==")
    for i in range(3):
        rot = float(rng.uniform(-180, 180))
        kw = dict(fov="full", coarse_px=50.0, coarse_shape=(65, 97), radius_px=26.0, fine_shape=(700, 975),
                  seed=3000 + i)
        pair, cch, fch = _channels(10, rot, tuple(rng.uniform(-200, 200, 2)), **kw)
        t = time.perf_counter()
        reg = run_pair(pair)
        _row(f"large {i} rot {rot:7.1f}", pair, reg, time.perf_counter() - t)
        cch, fch = (np.concatenate([c, np.sqrt(c), c ** 2]) for c in (cch, fch))
        t = time.perf_counter()
        reg = run_pair(pair, coarse_channels=cch, fine_channels=fch)
        _row(f"large {i} rot {rot:7.1f}, {len(cch)} channels", pair, reg, time.perf_counter() - t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
