"""Tests of msifusion.nmf: factorisation backends and the NMF file."""

import importlib.util

import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from msifusion import nmf
from msifusion.errors import InputError
from msifusion.nmf import factorize, read_nmf, run_nmf
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
    res = factorize(X, 4, backend="hals", max_iter=1000, tol=1e-9, engine="numpy", log_every=0)
    assert rel_err(X, res) < 1e-3
    assert res.errors[-1] < 1e-3
    assert res.W.dtype == np.float32 and res.H.dtype == np.float32
    assert res.W.shape == (150, 4) and res.H.shape == (4, 90)
    assert res.W.min() >= 0 and res.H.min() >= 0
    np.testing.assert_allclose(res.H.max(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("backend", ["hals", "mu"])
def test_error_history_non_increasing_and_exact(backend):
    X = noisy()
    res = factorize(X, 3, backend=backend, max_iter=60, tol=0, engine="numpy", log_every=0)
    assert len(res.errors) >= 30          # tol=0 stops only when the error stops decreasing
    assert np.all(np.diff(res.errors) <= 1e-10)
    # the error computed without densifying equals the dense one
    assert res.errors[-1] == pytest.approx(rel_err(X, res), rel=1e-5)
    assert res.errors[-1] < res.errors[0]


def test_tol_stops_early():
    X = noisy()
    res = factorize(X, 3, max_iter=500, tol=1e-3, engine="numpy", log_every=0)
    assert len(res.errors) < 500
    e = res.errors
    assert (e[-2] - e[-1]) < 1e-3 * e[-2]


def test_deterministic_with_seed():
    X = noisy()
    a = factorize(X, 3, max_iter=20, init="random", seed=5, engine="numpy", log_every=0)
    b = factorize(X, 3, max_iter=20, init="random", seed=5, engine="numpy", log_every=0)
    c = factorize(X, 3, max_iter=20, init="random", seed=6, engine="numpy", log_every=0)
    np.testing.assert_array_equal(a.W, b.W)
    np.testing.assert_array_equal(a.H, b.H)
    assert not np.allclose(a.W, c.W)
    d = factorize(X, 3, max_iter=20, seed=5, engine="numpy", log_every=0)
    e = factorize(X, 3, max_iter=20, seed=5, engine="numpy", log_every=0)
    np.testing.assert_array_equal(d.H, e.H)


def test_dense_and_sparse_input_agree():
    X = noisy()
    a = factorize(X, 3, max_iter=15, engine="numpy", log_every=0)
    b = factorize(X.toarray(), 3, max_iter=15, engine="numpy", log_every=0)
    np.testing.assert_allclose(a.W, b.W, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a.errors, b.errors, rtol=1e-8)


def test_mu_backend_converges():
    X, _, _ = exact_rank(seed=3)
    res = factorize(X, 4, backend="mu", max_iter=300, tol=0, log_every=0)
    assert res.backend == "mu"
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


def test_torch_engine_on_cpu():
    pytest.importorskip("torch")
    X, _, _ = exact_rank(seed=5)
    res = factorize(X, 4, backend="hals", engine="torch", max_iter=300, tol=1e-7, log_every=0)
    assert res.backend == "hals-torch"
    assert rel_err(X, res) < 1e-2


def test_bad_input():
    X, _, _ = exact_rank()
    with pytest.raises(InputError, match="rank"):
        factorize(X, 200)
    with pytest.raises(InputError, match="negative"):
        factorize(-X, 2)
    with pytest.raises(InputError, match="backend"):
        factorize(X, 2, backend="als")


def test_run_nmf_file_layout_with_missing_pixels(tmp_path):
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
                  max_iter=30, tol=1e-6, seed=3, modality="maldi", engine="numpy")
    d = read_nmf(out)
    np.testing.assert_array_equal(d["mz"], centres)
    np.testing.assert_array_equal(d["spectra"], res.H)
    np.testing.assert_array_equal(d["errors"], res.errors)
    assert d["attrs"]["modality"] == "maldi" and d["attrs"]["rank"] == 2
    assert d["attrs"]["normalize"] == "tic" and d["attrs"]["transform"] == "sqrt"
    assert d["attrs"]["seed"] == 3 and d["attrs"]["backend"] == "hals"
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
    with pytest.raises(InputError, match="not found"):
        read_nmf(tmp_path / "none.h5")
