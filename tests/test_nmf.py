"""Tests of msifusion.nmf: factorisation backends and the NMF file."""

import importlib.util
import logging

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from msifusion import nmf
from msifusion.errors import InputError
from msifusion.nmf import factorize, run_nmf
from msifusion.store import read_nmf
from msifusion.spectra import reference_axis
from msifusion.store import write_converted


def exact_rank(n=150, m=90, k=4, density=0.4, seed=0):
    """Sparse non-negative W0 (n, k), H0 (k, m) and X = W0 @ H0 as CSR."""
    rng = np.random.default_rng(seed)
    W0 = rng.random((n, k)) * (rng.random((n, k)) < density)
    H0 = rng.random((k, m)) * (rng.random((k, m)) < density)
    return sp.csr_matrix(W0 @ H0), W0, H0


def noisy(seed=1):
    X, _, _ = exact_rank(seed=seed)
    rng = np.random.default_rng(seed)
    N = sp.random(X.shape[0], X.shape[1], density=0.1, random_state=seed, format="csr")
    return (X + 0.3 * N).tocsr()


def rel_err(X, res):
    D = X.toarray() if sp.issparse(X) else X
    return np.linalg.norm(D - res.W.astype(float) @ res.H.astype(float)) / np.linalg.norm(D)


def test_hals_recovers_exact_rank():
    X, _, _ = exact_rank()
    res = factorize(X, 4, backend="hals", max_iter=1000, tol=1e-9, log_every=0)
    assert rel_err(X, res) < 1e-3
    assert res.errors[-1] < 1e-3
    assert res.W.dtype == np.float32 and res.H.dtype == np.float32
    assert res.W.shape == (150, 4) and res.H.shape == (4, 90)
    assert res.W.min() >= 0 and res.H.min() >= 0
    np.testing.assert_allclose(res.H.max(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("backend", ["hals", "mu"])
def test_error_history_non_increasing_and_exact(backend):
    X = noisy()
    res = factorize(X, 3, backend=backend, max_iter=60, tol=0, log_every=0, precision="float64")
    assert len(res.errors) >= 10          # tol=0 stops only when the error stops decreasing
    assert np.all(np.diff(res.errors) <= 1e-10)
    # the error computed without densifying equals the dense one
    assert res.errors[-1] == pytest.approx(rel_err(X, res), rel=1e-5)
    assert res.errors[-1] < res.errors[0]


def test_tol_stops_early():
    X = noisy()
    res = factorize(X, 3, max_iter=500, tol=1e-3, log_every=0)
    assert len(res.errors) < 500
    e = res.errors
    assert (e[-2] - e[-1]) < 1e-3 * e[-2]


def test_deterministic_with_seed():
    X = noisy()
    a = factorize(X, 3, max_iter=20, init="random", seed=5, log_every=0)
    b = factorize(X, 3, max_iter=20, init="random", seed=5, log_every=0)
    c = factorize(X, 3, max_iter=20, init="random", seed=6, log_every=0)
    np.testing.assert_array_equal(a.W, b.W)
    np.testing.assert_array_equal(a.H, b.H)
    assert not np.allclose(a.W, c.W)
    d = factorize(X, 3, max_iter=20, seed=5, log_every=0)
    e = factorize(X, 3, max_iter=20, seed=5, log_every=0)
    np.testing.assert_array_equal(d.H, e.H)


def test_dense_and_sparse_input_agree():
    X = noisy()
    a = factorize(X, 3, max_iter=15, log_every=0)
    b = factorize(X.toarray(), 3, max_iter=15, log_every=0)
    np.testing.assert_allclose(a.W, b.W, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a.errors, b.errors, rtol=1e-8)


def test_mu_backend_converges():
    X, _, _ = exact_rank(seed=3)
    res = factorize(X, 4, backend="mu", max_iter=300, tol=0, log_every=0)
    assert res.backend == "mu-cpu"
    assert rel_err(X, res) < 0.05


def test_tensorly_backend_small_and_limit(monkeypatch):
    X, _, _ = exact_rank(n=40, m=30, k=3, seed=4)
    res = factorize(X, 3, backend="tensorly", max_iter=300, tol=1e-9)
    assert res.backend == "tensorly"
    assert res.errors[-1] == pytest.approx(rel_err(X, res), rel=1e-3, abs=1e-6)
    assert rel_err(X, res) < 0.05
    np.testing.assert_allclose(res.H.max(axis=1), 1.0, rtol=1e-6)
    if importlib.util.find_spec("sparse") is None:
        monkeypatch.setattr(nmf, "TENSORLY_DENSE_LIMIT", 100)
        with pytest.raises(InputError, match="sparse"):
            factorize(X, 3, backend="tensorly", max_iter=5)


@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_precisions_agree(precision):
    X, _, _ = exact_rank(seed=5)
    res = factorize(X, 4, backend="hals", max_iter=300, tol=1e-7, log_every=0,
                    precision=precision)
    assert res.backend == "hals-cpu"
    assert rel_err(X, res) < 1e-2
    # the float32 error estimate is good to about 1e-3 absolute (cancellation at tiny errors)
    assert res.errors[-1] == pytest.approx(rel_err(X, res), abs=1e-5 if precision == "float64"
                                           else 1e-3)


def test_bad_input():
    X, _, _ = exact_rank()
    with pytest.raises(InputError, match="rank"):
        factorize(X, 200)
    with pytest.raises(InputError, match="negative"):
        factorize(-X, 2)
    with pytest.raises(InputError, match="backend"):
        factorize(X, 2, backend="als")


def test_run_nmf_file_layout_with_missing_pixels(tmp_path, monkeypatch, caplog):
    rng = np.random.default_rng(7)
    centres = np.array([100.0, 200.0, 300.0, 400.0, 500.0])
    axis = reference_axis(centres, ppm=5)
    paths, xys = {}, {}
    for fid, (ny, nx) in {"a": (4, 5), "b": (3, 3)}.items():
        yy, xx = np.mgrid[:ny, :nx]
        xy = np.c_[xx.ravel(), yy.ravel()][1:-1]        # first and last pixel not acquired
        spectra_mz = np.tile(centres, len(xy))
        inten = rng.uniform(0.1, 1.0, len(spectra_mz)).astype(np.float32)
        indptr = np.arange(0, len(spectra_mz) + 1, len(centres))
        p = tmp_path / f"{fid}.h5"
        write_converted(p, indptr=indptr, mz=spectra_mz, intensity=inten, xy=xy,
                        attrs={"pixel_size_um": 20.0, "mode": "processed",
                               "spectrum_type": "centroid"})
        paths[fid], xys[fid] = p, xy
    out = tmp_path / "nmf" / "maldi.h5"
    res = run_nmf(paths, axis, out, rank=2, normalize="tic", transform="sqrt", backend="hals",
                  max_iter=30, tol=1e-6, seed=3, modality="maldi")
    d = read_nmf(out)
    np.testing.assert_array_equal(d["mz"], centres)
    np.testing.assert_array_equal(d["spectra"], res.H)
    np.testing.assert_array_equal(d["errors"], res.errors)
    assert d["attrs"]["modality"] == "maldi" and d["attrs"]["rank"] == 2
    assert d["attrs"]["normalize"] == "tic" and d["attrs"]["transform"] == "sqrt"
    assert d["attrs"]["seed"] == 3 and d["attrs"]["backend"] == "hals-cpu"
    row = 0
    for fid, shape in (("a", (4, 5)), ("b", (3, 3))):
        maps = d["maps"][fid]
        assert maps.shape == (2,) + shape and maps.dtype == np.float32
        assert np.isnan(maps[:, 0, 0]).all() and np.isnan(maps[:, -1, -1]).all()
        assert np.isfinite(maps).sum() == 2 * len(xys[fid])
        xy = xys[fid]
        np.testing.assert_array_equal(maps[:, xy[:, 1], xy[:, 0]].T,
                                      res.W[row:row + len(xy)])
        row += len(xy)
        assert d["map_attrs"][fid]["pixel_size_um"] == 20.0
        assert d["map_attrs"][fid]["source"].endswith(f"{fid}.h5")
    with h5py.File(out, "r") as f:
        assert set(f) == {"spectra", "mz", "errors", "maps"}
    assert d["attrs"]["out_of_core"] == 0
    # a budget of ~2 kB: out of core in row blocks of a few pixels, the same factors
    kw = dict(rank=2, normalize="tic", transform="sqrt", backend="hals", max_iter=30, tol=-1.0,
              seed=3, modality="maldi")
    run_nmf(paths, axis, out, **kw)                            # fixed iteration count
    d = read_nmf(out)
    ooc = tmp_path / "nmf" / "maldi_ooc.h5"
    monkeypatch.setattr(nmf, "INTERPRETER_BYTES", 0)           # a budget for the arrays alone
    run_nmf(paths, axis, ooc, memory_gb=2e-6, **kw)
    e = read_nmf(ooc)
    assert e["attrs"]["out_of_core"] == 1
    np.testing.assert_allclose(e["spectra"], d["spectra"], rtol=1e-4, atol=1e-5)
    for fid in ("a", "b"):
        np.testing.assert_allclose(e["maps"][fid], d["maps"][fid], rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in ooc.parent.iterdir()) == ["maldi.h5", "maldi_ooc.h5"]
    # more components than m/z bins: the rank is capped (a warning names the key), < 1 stops
    capped = tmp_path / "nmf" / "capped.h5"
    with caplog.at_level(logging.WARNING, logger="msifusion.nmf"):
        res = run_nmf(paths, axis, capped, **(kw | {"rank": 40}))
    records = caplog.records
    assert res.W.shape[1] == 5 and read_nmf(capped)["attrs"]["rank"] == 5
    assert any("rank 40 exceeds min(n_pixels, n_mz) = 5" in r.getMessage()
               and "nmf.rank" in r.getMessage() for r in records)
    with pytest.raises(InputError, match="rank 0"):
        run_nmf(paths, axis, capped, **(kw | {"rank": 0}))
    with pytest.raises(InputError, match="not found"):
        read_nmf(tmp_path / "none.h5")


def _matched_cosines(H_true, H_est):
    """Best cosine of each true component spectrum among the estimated ones."""
    a = H_true / np.linalg.norm(H_true, axis=1, keepdims=True)
    b = H_est / np.maximum(np.linalg.norm(H_est, axis=1, keepdims=True), 1e-12)
    return (a @ b.T).max(axis=1)


@pytest.mark.parametrize("backend", ["hals", "tensorly"])
def test_planted_factors_recovered(backend):
    """Separable planted factors (each component owns some pixels and some channels) are found
    again up to order and scale, by our backend and by the published one."""
    rng = np.random.default_rng(11)
    n, m, k = 60, 40, 3
    W0 = rng.random((n, k)) * (rng.random((n, k)) < 0.5)
    H0 = rng.random((k, m)) * (rng.random((k, m)) < 0.5)
    W0[:k * 5] = np.kron(np.eye(k), np.ones((5, 1)))          # pure pixels
    H0[:, :k * 3] = np.kron(np.eye(k), np.ones((1, 3)))       # own channels
    X = sp.csr_matrix(W0 @ H0)
    res = factorize(X, k, backend=backend, max_iter=2000, tol=1e-10, log_every=0,
                    precision="float64", init="nndsvd" if backend == "hals" else "random")
    assert rel_err(X, res) < 1e-3
    assert _matched_cosines(H0, res.H.astype(float)).min() > 0.999
    assert _matched_cosines(W0.T, res.W.T.astype(float)).min() > 0.999


def test_out_of_core_equals_in_memory(tmp_path):
    X = noisy(seed=7)
    ref = factorize(X, 3, max_iter=25, tol=-1, log_every=0, precision="float64")
    scratch = tmp_path / "scratch.h5"
    blocks = nmf.RowBlocks(X.shape[1], scratch=scratch, dtype="float64")
    for s in range(0, X.shape[0], 40):                        # 4 blocks
        blocks.append(X[s:s + 40])
    assert scratch.exists() and not blocks.in_memory and len(blocks.bounds) == 4
    res = factorize(blocks, 3, max_iter=25, tol=-1, log_every=0, precision="float64")
    blocks.close()
    assert not scratch.exists()
    np.testing.assert_allclose(res.W, ref.W, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.H, ref.H, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(res.errors, ref.errors, rtol=1e-6)


def test_memory_budget_rules():
    need = nmf.in_memory_bytes(2_559_964, 769, 100_000_000, 40)
    assert 2.5 * 2**30 < need < 3.5 * 2**30                   # ~16 B per non-zero + 12 k B/pixel
    rows = nmf.block_rows_for(1.25 * 2**30, 2_559_964, 769, 100_000_000, 40)
    assert 10_000 < rows < 2_559_964
    with pytest.raises(InputError, match="raise nmf.memory_gb"):
        nmf.block_rows_for(0.5 * 2**30, 2_559_964, 769, 100_000_000, 40)   # W + interpreter
