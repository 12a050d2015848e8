"""Benchmark of msifusion.nmf against tensorly's sparse PARAFAC (the published method) and
scikit-learn's NMF, then at the published ToF-SIMS shape and out of core.

Part 1 (``--part compare``): a 20,000 x 5,000 MSI-like matrix (each pixel mixes 3 of 40 sparse
component spectra, Poisson counts; about 2 M non-zeros), rank 40. Each method runs in its own
process (peak RSS = VmHWM of that process, the matrix included):

- ``msifusion hals`` (ours, torch, CPU threads as given);
- ``sklearn mu`` / ``sklearn cd`` (``NMF(init="nndsvda")``, runs of increasing ``max_iter``);
- ``tensorly sparse`` (``tensorly.contrib.sparse`` ``non_negative_parafac``, random init).

Every error is recomputed the same way from the returned factors (exact relative Frobenius error
in float64; runs of increasing iteration counts give the error-versus-time points). Printed: seconds
per iteration, the lowest error reached within the wall time our run takes for ``--iters``
iterations (equal wall time), peak RSS, and ratios.

Part 2 (``--part tofsims``): ours alone at 2,559,964 x 769, rank 40, in memory.
Part 3 (``--part ooc``): ours out of core with a memory budget (``--budget-gb``) at most half the
in-memory need of the matrix; the matrix is generated block by block straight into the scratch
file, so the process never holds it.

Usage::

    python benchmarks/bench_nmf.py [--part all|compare|tofsims|ooc] [--threads 2] [--iters 30]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RANK = 40

from measure import peak_rss_mb  # noqa: E402  (benchmarks/measure.py)


def components(m: int, k: int, peaks: int, seed: int) -> sp.csr_matrix:
    """k sparse component spectra over m channels, ``peaks`` peaks each (gamma heights)."""
    rng = np.random.default_rng(seed)
    cols = np.concatenate([rng.choice(m, peaks, replace=False) for _ in range(k)])
    return sp.csr_matrix((rng.gamma(1.0, 1.0, k * peaks), (np.repeat(np.arange(k), peaks), cols)),
                         shape=(k, m))


def msi_block(n: int, H: sp.csr_matrix, active: int, counts: float, seed: int) -> sp.csr_matrix:
    """n pixels, each mixing ``active`` random components of H; Poisson counts with mean value
    ``counts`` over the non-zero expectations. CSR float32."""
    rng = np.random.default_rng(seed)
    k = H.shape[0]
    W = sp.csr_matrix((rng.gamma(2.0, 1.0, n * active),
                       (np.repeat(np.arange(n), active), rng.integers(0, k, n * active))),
                      shape=(n, k))
    X = (W @ H).tocsr()
    X.data = rng.poisson(X.data * (counts / 2.0)).astype(np.float32)
    X.eliminate_zeros()
    return X


def exact_error(X: sp.csr_matrix, W: np.ndarray, H: np.ndarray) -> float:
    """||X - WH||_F / ||X||_F in float64 without forming WH."""
    X = X.astype(np.float64)
    W, H = W.astype(np.float64), H.astype(np.float64)
    norm2 = float(X.data @ X.data)
    cross = float(np.sum((X @ H.T) * W))
    quad = float(np.sum((W.T @ W) * (H @ H.T)))
    return float(np.sqrt(max(norm2 - 2 * cross + quad, 0.0) / norm2))


# ------------------------------------------------------------------------------ child processes
def child(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from threadpoolctl import threadpool_limits

    warnings.simplefilter("ignore")
    with threadpool_limits(a.threads):
        return CHILDREN[a.child](a)


def _load(a) -> sp.csr_matrix:
    return sp.load_npz(a.matrix).tocsr().astype(np.float32)


def child_ours(a) -> dict:
    """Runs of increasing max_iter (the same trajectory: deterministic), exact error of each."""
    from msifusion.nmf import factorize

    X = _load(a)
    points, per_iter = [], None
    for it in sorted({1, 2, 5, 10, 20, a.iters}):
        res = factorize(X, RANK, max_iter=it, tol=-1.0, log_every=0, seed=0, device="cpu")
        points.append((float(res.times[-1]), exact_error(X, res.W, res.H)))
        if it == a.iters and len(res.times) > 2:
            per_iter = float(np.median(np.diff(res.times)))
    return {"points": points, "per_iter": per_iter}


def _trajectory(X, fit, counts, budget: float) -> dict:
    """(time, exact error) after runs of ``fit(max_iter) -> (W, H)`` for increasing counts (each
    from the same deterministic start), until one takes longer than ``budget`` seconds; seconds
    per iteration from the last two runs."""
    points, per_iter, last = [], None, None
    for it in counts:
        t0 = time.perf_counter()
        W, H = fit(it)
        dt = time.perf_counter() - t0
        points.append((dt, exact_error(X, W, H)))
        if last is not None:
            per_iter = (dt - last[1]) / (it - last[0])
        last = (it, dt)
        if dt > budget:
            break
    return {"points": points, "per_iter": per_iter}


def child_sklearn(a) -> dict:
    from sklearn.decomposition import NMF

    X = _load(a)

    def fit(it):
        model = NMF(RANK, init="nndsvda", solver=a.solver, max_iter=it, tol=0.0, random_state=0)
        return model.fit_transform(X), model.components_

    return _trajectory(X, fit, (1, 2, 5, 10, 20, 40, 80, 160, 320), a.budget)


def child_tensorly(a) -> dict:
    import sparse
    from tensorly.contrib.sparse.decomposition import non_negative_parafac

    X = _load(a)
    T = sparse.COO.from_scipy_sparse(sp.coo_matrix(X, dtype=np.float64))

    def fit(it):
        weights, factors = non_negative_parafac(T, RANK, n_iter_max=it, init="random", tol=0,
                                                random_state=0)
        W = np.asarray(factors[0].todense()) * np.asarray(weights.todense())
        return W, np.asarray(factors[1].todense()).T

    return _trajectory(X, fit, (1, 2, 4, 8), a.budget)


def child_tofsims(a) -> dict:
    """Ours at the published ToF-SIMS shape, in memory; matrix generated block by block."""
    from msifusion.nmf import RowBlocks, factorize, in_memory_bytes

    n, m = 2_559_964, 769
    H = components(m, RANK, peaks=20, seed=1)
    X = RowBlocks(m)
    t0 = time.perf_counter()
    for b, s in enumerate(range(0, n, 262_144)):
        X.append(msi_block(min(262_144, n - s), H, active=3, counts=2.0, seed=100 + b))
    gen = time.perf_counter() - t0
    res = factorize(X, RANK, max_iter=a.iters, tol=-1.0, log_every=5, seed=0, device="cpu")
    return {"n": n, "m": m, "nnz": X.nnz, "generate_s": gen, "seconds": res.seconds,
            "init_s": float(res.times[0] - np.diff(res.times).mean()) if len(res.times) > 1 else None,
            "per_iter": float(np.median(np.diff(res.times))), "n_iter": res.n_iter,
            "error": float(res.errors[-1]), "need_gb": in_memory_bytes(n, m, X.nnz, RANK) / 2**30}


def child_ooc(a) -> dict:
    """Ours out of core: budget a.budget_gb; the matrix needs at least twice that in memory."""
    from msifusion.nmf import RowBlocks, block_rows_for, factorize, in_memory_bytes

    n, m = 2_559_964, 769
    H = components(m, RANK, peaks=20, seed=1)
    budget = a.budget_gb * 2 ** 30
    est_nnz = int(n * 42)                          # measured density of these blocks
    rows = block_rows_for(budget, n, m, est_nnz, RANK)
    X = RowBlocks(m, scratch=Path(a.workdir) / "ooc.scratch.h5")
    try:
        for b, s in enumerate(range(0, n, rows)):
            X.append(msi_block(min(rows, n - s), H, active=3, counts=2.0, seed=100 + b))
        need = in_memory_bytes(n, m, X.nnz, RANK)
        res = factorize(X, RANK, max_iter=a.iters, tol=-1.0, log_every=5, seed=0, device="cpu")
    finally:
        X.close()
    return {"n": n, "m": m, "nnz": X.nnz, "blocks": len(X.bounds), "rows_per_block": rows,
            "need_gb": need / 2**30, "budget_gb": a.budget_gb, "per_iter":
            float(np.median(np.diff(res.times))), "n_iter": res.n_iter,
            "error": float(res.errors[-1]), "seconds": res.seconds}


CHILDREN = {"ours": child_ours, "sklearn": child_sklearn, "tensorly": child_tensorly,
            "tofsims": child_tofsims, "ooc": child_ooc}


def run_child(name: str, a, **extra) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--threads", str(a.threads),
           "--iters", str(extra.pop("iters", a.iters)), "--workdir", a.workdir,
           "--budget-gb", str(a.budget_gb)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def error_at(points, t: float) -> float | None:
    """Lowest error among the (time, error) points reached within ``t`` seconds."""
    ok = [e for dt, e in points if dt <= t]
    return min(ok) if ok else None


def compare(a) -> None:
    H = components(5000, RANK, peaks=40, seed=1)
    X = msi_block(20_000, H, active=3, counts=20.0, seed=2)
    matrix = Path(a.workdir) / "bench20k.npz"
    sp.save_npz(matrix, X)
    print(f"matrix 20,000 x 5,000, {X.nnz:,} non-zeros ({X.nnz / 1e8:.1%}), rank {RANK}, "
          f"{a.threads} threads", flush=True)
    ours = run_child("ours", a, matrix=matrix)
    t_eq = ours["points"][-1][0]
    rows = [("msifusion hals", ours)]
    for solver in ("mu", "cd"):
        rows.append((f"sklearn {solver}", run_child("sklearn", a, matrix=matrix, solver=solver,
                                                    budget=3 * t_eq)))
    rows.append(("tensorly sparse", run_child("tensorly", a, matrix=matrix,
                                              budget=max(20.0, 3 * t_eq))))
    print(f"\nequal wall time = {t_eq:.2f} s (ours, {a.iters} iterations incl. initialisation)")
    target = min(e for _n, r in rows for _t, e in r["points"]) * (1 + 1e-4)
    print(f"{'method':<18s}{'s/iter':>9s}{'x ours':>8s}{'error @ equal time':>20s}"
          f"{'s to 0.01% of best':>20s}{'peak RSS MB':>13s}")
    base = ours["per_iter"]
    for name, r in rows:
        per = float("nan") if r["per_iter"] is None else r["per_iter"]
        e = error_at(r["points"], t_eq)
        reach = [t for t, err in r["points"] if err <= target]
        print(f"{name:<18s}{per:9.4f}{per / base:8.1f}{'-' if e is None else f'{e:.7f}':>20s}"
              f"{f'{min(reach):.2f}' if reach else 'not reached':>20s}{r['peak_rss_mb']:13.0f}",
              flush=True)
    if a.verbose:
        for name, r in rows:
            print(name, " ".join(f"{t:.2f}s:{e:.6f}" for t, e in r["points"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["all", "compare", "tofsims", "ooc"], default="all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--budget-gb", type=float, default=1.0, help="out-of-core memory budget")
    ap.add_argument("--workdir")
    ap.add_argument("--verbose", action="store_true", help="print every (time, error) point")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--matrix", help=argparse.SUPPRESS)
    ap.add_argument("--solver", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        t0 = time.perf_counter()
        out = child(a)
        out["wall_s"] = time.perf_counter() - t0
        out["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(out))
        return
    with tempfile.TemporaryDirectory(prefix="bench_nmf_", dir=a.workdir) as tmp:
        a.workdir = tmp
        if a.part in ("all", "compare"):
            compare(a)
        if a.part in ("all", "tofsims"):
            r = run_child("tofsims", a, iters=min(a.iters, 20))
            print(f"\nToF-SIMS shape {r['n']:,} x {r['m']} ({r['nnz']:,} non-zeros), rank {RANK}, in "
                  f"memory (estimate {r['need_gb']:.2f} GB): {r['per_iter']:.2f} s/iter, "
                  f"{r['n_iter']} iterations in {r['seconds']:.0f} s, error {r['error']:.4f}, "
                  f"peak RSS {r['peak_rss_mb'] / 1024:.2f} GB (matrix generation included)",
                  flush=True)
        if a.part in ("all", "ooc"):
            r = run_child("ooc", a, iters=min(a.iters, 10))
            print(f"\nout of core: {r['n']:,} x {r['m']} ({r['nnz']:,} non-zeros) needs "
                  f"{r['need_gb']:.2f} GB in memory = {r['need_gb'] / r['budget_gb']:.1f}x the "
                  f"budget of {r['budget_gb']:.2f} GB; {r['blocks']} blocks of "
                  f"{r['rows_per_block']:,} rows: {r['per_iter']:.2f} s/iter, error "
                  f"{r['error']:.4f}, peak RSS {r['peak_rss_mb'] / 1024:.2f} GB", flush=True)


if __name__ == "__main__":
    main()
