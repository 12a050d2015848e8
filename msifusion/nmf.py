"""Non-negative matrix factorisation of sparse pixel x m/z matrices, and the NMF file.

``X (n_pixels, n_mz) ~ W (n_pixels, k) @ H (k, n_mz)``, W, H >= 0. Backends:

- ``"hals"`` (default): hierarchical alternating least squares on ``scipy.sparse`` (or on a CUDA
  GPU through torch when one is available); the only products with X are ``X @ H.T`` and
  ``W.T @ X`` (in X's dtype, float32 for binned matrices), and the error is computed without
  forming ``W @ H``: ``||X - WH||^2 = ||X||^2 - 2 tr(W^T X H^T) + tr(W^T W H H^T)``.
- ``"mu"``: Lee & Seung multiplicative updates, same sparse products.
- ``"tensorly"``: the published method, ``tensorly.decomposition.non_negative_parafac`` on the
  2-way tensor (sparse through ``tensorly.contrib.sparse`` when the pydata ``sparse`` package is
  installed; otherwise dense, for matrices up to :data:`TENSORLY_DENSE_LIMIT` values).

All backends return rows of H scaled to unit maximum (W absorbs the scale).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from .errors import InputError
from .spectra import MzAxis, assemble_matrix
from .store import ConvertedReader, atomic_output, plain_attr

log = logging.getLogger("msifusion.nmf")

BACKENDS = ("hals", "mu", "tensorly")
INITS = ("nndsvda", "nndsvd", "random")
#: Largest matrix (values) the dense tensorly fallback accepts (8 bytes each, several copies).
TENSORLY_DENSE_LIMIT = 20_000_000
NMF_FORMAT = "msifusion-nmf"
_EPS = 1e-12


@dataclass
class NMFResult:
    """Result of :func:`factorize`.

    Attributes
    ----------
    W : ndarray, shape (n, k), float32
        Component abundances per row (pixel).
    H : ndarray, shape (k, m), float32
        Component spectra, each row scaled to unit maximum.
    errors : ndarray, shape (n_iter,), float64
        Relative Frobenius error ``||X - WH|| / ||X||`` after each iteration.
    seconds : float
        Wall time of the factorisation (initialisation included).
    backend : str
        Backend that ran (``"hals"``, ``"hals-torch"``, ``"mu"`` or ``"tensorly"``).
    """

    W: np.ndarray
    H: np.ndarray
    errors: np.ndarray
    seconds: float
    backend: str = "hals"

    @property
    def n_iter(self) -> int:
        return len(self.errors)


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------

def _svd(X, rank: int, seed: int):
    """Truncated SVD ``U (n, k), S (k,), Vt (k, m)`` (randomized, deterministic given ``seed``)."""
    from sklearn.utils.extmath import randomized_svd

    return randomized_svd(X, rank, n_oversamples=max(10, rank), n_iter=4, random_state=seed)


def initialize(X, rank: int, *, init: str = "nndsvda",
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Initial ``W (n, k)``, ``H (k, m)`` (float64) for NMF of ``X``.

    Parameters
    ----------
    X : sparse matrix or ndarray, shape (n, m), non-negative
    rank : int
    init : {"nndsvda", "nndsvd", "random"}
        NNDSVD (Boutsidis & Gallopoulos 2008) from a randomized truncated SVD; ``"nndsvda"`` fills
        its zeros with the mean of X (needed by multiplicative updates); ``"random"`` draws uniform
        values scaled to the mean of X.
    seed : int
        Seed of the randomized SVD / random draws.
    """
    n, m = X.shape
    mean = float(X.sum()) / (n * m)
    if init == "random":
        rng = np.random.default_rng(seed)
        scale = np.sqrt(mean / rank)
        return scale * rng.random((n, rank)), scale * rng.random((rank, m))
    if init not in ("nndsvd", "nndsvda"):
        raise InputError(f"NMF init must be one of {INITS}, got {init!r}")
    U, S, Vt = _svd(X, rank, seed)
    W = np.zeros((n, rank))
    H = np.zeros((rank, m))
    W[:, 0] = np.sqrt(S[0]) * np.abs(U[:, 0])
    H[0] = np.sqrt(S[0]) * np.abs(Vt[0])
    for j in range(1, rank):
        x, y = U[:, j], Vt[j]
        xp, yp = np.maximum(x, 0), np.maximum(y, 0)
        xn, yn = np.maximum(-x, 0), np.maximum(-y, 0)
        nxp, nyp = np.linalg.norm(xp), np.linalg.norm(yp)
        nxn, nyn = np.linalg.norm(xn), np.linalg.norm(yn)
        if nxp * nyp >= nxn * nyn:
            u, v, sigma = xp / max(nxp, _EPS), yp / max(nyp, _EPS), nxp * nyp
        else:
            u, v, sigma = xn / max(nxn, _EPS), yn / max(nyn, _EPS), nxn * nyn
        lam = np.sqrt(S[j] * sigma)
        W[:, j], H[j] = lam * u, lam * v
    W[W < _EPS] = 0
    H[H < _EPS] = 0
    if init == "nndsvda":
        W[W == 0] = mean
        H[H == 0] = mean
    return W, H


# ---------------------------------------------------------------------------------------------
# Updates (numpy / scipy.sparse)
# ---------------------------------------------------------------------------------------------

def _hals_rows(F: np.ndarray, A: np.ndarray, B: np.ndarray) -> None:
    """In place HALS sweep over the rows of a factor ``F (k, p)`` (row layout, contiguous).

    Minimises ``||Y - F^T G||`` row by row given ``A = G Y^T (k, p)`` and ``B = G G^T (k, k)``.
    """
    for j in range(F.shape[0]):
        if B[j, j] <= 0:
            continue
        F[j] += (A[j] - B[j] @ F) / B[j, j]
        np.maximum(F[j], 0, out=F[j])
        # keep a component from dying completely (it would never come back)
        if not F[j].any():
            F[j] = _EPS


def _mu_rows(F: np.ndarray, A: np.ndarray, B: np.ndarray) -> None:
    """In place multiplicative update ``F *= A / (B F)`` (Lee & Seung, Frobenius), row layout."""
    F *= A / np.maximum(B @ F, _EPS)


def _iterate_numpy(X, W, H, update, max_iter, tol, log_every, label):
    """Alternate W and H updates; returns W (n, k), H (k, m), errors.

    Factors are kept in row layout (``W^T (k, n)``, ``H (k, m)``) in float64; the two sparse
    products per iteration, ``X @ H^T`` and ``W^T @ X``, run in the dtype of X (float32 for
    float32 input: about twice as fast, with an error estimate good to about 1e-3 relative).
    """
    dt = np.float32 if X.dtype == np.float32 else np.float64
    norm2 = _sq_norm(X)
    Wt = np.ascontiguousarray(W.T, dtype=np.float64)
    H = np.ascontiguousarray(H, dtype=np.float64)
    errors = []
    t0 = time.perf_counter()
    prev = None
    for it in range(1, max_iter + 1):
        At = np.asarray(X @ np.ascontiguousarray(H.T, dtype=dt), np.float64).T.copy()  # (k, n)
        update(Wt, At, H @ H.T)
        Ct = np.asarray(Wt.astype(dt) @ X, dtype=np.float64)                 # W^T X (k, m)
        D = Wt @ Wt.T
        update(H, Ct, D)
        sq = norm2 - 2.0 * float(np.sum(Ct * H)) + float(np.sum(D * (H @ H.T)))
        err = float(np.sqrt(max(sq, 0.0) / norm2))
        errors.append(err)
        if log_every and (it % log_every == 0 or it == 1):
            log.info("%s iteration %d: relative error %.6f, %.3f s/iter", label, it, err,
                     (time.perf_counter() - t0) / it)
        if prev is not None and (prev - err) < tol * max(prev, _EPS):
            break
        prev = err
    return Wt.T, H, errors


def _sq_norm(X) -> float:
    if sp.issparse(X):
        d = X.data.astype(np.float64)
        return float(d @ d)
    d = np.asarray(X, dtype=np.float64).ravel()
    return float(d @ d)


# ---------------------------------------------------------------------------------------------
# Torch (GPU) HALS
# ---------------------------------------------------------------------------------------------

def _hals_torch(X, W0, H0, max_iter, tol, log_every, device):
    """HALS with torch sparse CSR products on ``device`` (float32), as the CPU path."""
    import torch

    Xc = sp.csr_matrix(X, dtype=np.float32)
    Xtc = Xc.T.tocsr()

    def to_t(m):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)       # "sparse CSR support is in beta"
            return torch.sparse_csr_tensor(torch.from_numpy(m.indptr.astype(np.int64)),
                                           torch.from_numpy(m.indices.astype(np.int64)),
                                           torch.from_numpy(m.data), size=m.shape,
                                           device=device, check_invariants=False)

    Xg, Xtg = to_t(Xc), to_t(Xtc)
    W = torch.from_numpy(W0.astype(np.float32)).to(device)
    Ht = torch.from_numpy(np.ascontiguousarray(H0.T, dtype=np.float32)).to(device)
    norm2 = _sq_norm(Xc)

    def sweep(F, A, B):
        for j in range(F.shape[1]):
            if B[j, j] <= 0:
                continue
            F[:, j] += (A[:, j] - F @ B[:, j]) / B[j, j]
            F[:, j].clamp_(min=0)
            if not bool(F[:, j].any()):
                F[:, j] = _EPS

    errors, prev = [], None
    t0 = time.perf_counter()
    for it in range(1, max_iter + 1):
        sweep(W, Xg @ Ht, Ht.T @ Ht)
        C = Xtg @ W
        D = W.T @ W
        sweep(Ht, C, D)
        cross = float((C.double() * Ht.double()).sum())
        quad = float((D.double() * (Ht.T.double() @ Ht.double())).sum())
        err = float(np.sqrt(max(norm2 - 2 * cross + quad, 0.0) / norm2))
        errors.append(err)
        if log_every and (it % log_every == 0 or it == 1):
            log.info("hals-torch(%s) iteration %d: relative error %.6f, %.3f s/iter", device, it,
                     err, (time.perf_counter() - t0) / it)
        if prev is not None and (prev - err) < tol * max(prev, _EPS):
            break
        prev = err
    return W.cpu().numpy().astype(np.float64), Ht.T.cpu().numpy().astype(np.float64), errors


# ---------------------------------------------------------------------------------------------
# tensorly (published method)
# ---------------------------------------------------------------------------------------------

def _tensorly(X, rank, max_iter, tol, seed, init):
    import tensorly as tl

    n, m = X.shape
    try:
        import sparse  # noqa: F401  (pydata sparse, needed by tensorly.contrib.sparse)
        have_sparse = True
    except ImportError:
        have_sparse = False
    tl_init = "random" if init == "random" else "svd"
    if have_sparse and sp.issparse(X):
        import sparse as pydata_sparse
        from tensorly.contrib.sparse.decomposition import non_negative_parafac

        tensor = pydata_sparse.COO.from_scipy_sparse(sp.coo_matrix(X, dtype=np.float64))
    else:
        if n * m > TENSORLY_DENSE_LIMIT:
            raise InputError(
                f"NMF backend 'tensorly': the {n} x {m} matrix is too large for the dense "
                f"fallback (limit {TENSORLY_DENSE_LIMIT} values) and the pydata 'sparse' package "
                "that tensorly's sparse backend needs is not installed; use backend 'hals' or "
                "install 'sparse'")
        from tensorly.decomposition import non_negative_parafac

        tensor = tl.tensor(X.toarray() if sp.issparse(X) else np.asarray(X), dtype=tl.float64)
    (weights, factors), errors = non_negative_parafac(
        tensor, rank, n_iter_max=max_iter, init=tl_init, tol=tol, random_state=seed,
        return_errors=True)
    W = np.asarray(tl.to_numpy(factors[0]), dtype=np.float64) * np.asarray(tl.to_numpy(weights))
    H = np.asarray(tl.to_numpy(factors[1]), dtype=np.float64).T
    return W, H, [float(e) for e in errors]


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _check_matrix(X, rank):
    if not (sp.issparse(X) or isinstance(X, np.ndarray)):
        X = np.asarray(X)
    if X.ndim != 2:
        raise InputError(f"NMF input must be a 2-D matrix, got shape {X.shape}")
    n, m = X.shape
    rank = int(rank)
    if rank < 1 or rank > min(n, m):
        raise InputError(f"NMF rank {rank} must be between 1 and min(n_pixels, n_mz) = {min(n, m)}")
    data = X.data if sp.issparse(X) else X
    if data.size and (not np.all(np.isfinite(data)) or data.min() < 0):
        raise InputError("NMF input has negative or non-finite values")
    dtype = np.float32 if X.dtype == np.float32 else np.float64
    X = sp.csr_matrix(X, dtype=dtype) if sp.issparse(X) else np.asarray(X, dtype=dtype)
    if _sq_norm(X) == 0:
        raise InputError("NMF input is all zero")
    return X, rank


def scale_components(W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale each row of H to unit maximum and the matching column of W by the inverse factor.

    All-zero rows of H are left as they are. Returns float32 copies ``(W (n, k), H (k, m))``.
    """
    s = H.max(axis=1)
    s = np.where(s > 0, s, 1.0)
    return (W * s).astype(np.float32), (H / s[:, None]).astype(np.float32)


def factorize(X, rank: int, *, backend: str = "hals", max_iter: int = 200, tol: float = 1e-4,
              seed: int = 0, init: str = "nndsvda", log_every: int = 10,
              engine: str = "auto") -> NMFResult:
    """Non-negative factorisation ``X ~ W @ H``.

    Parameters
    ----------
    X : scipy.sparse matrix or ndarray, shape (n, m), non-negative
        Pixels x m/z (never densified by ``"hals"``/``"mu"``).
    rank : int
        Number of components k.
    backend : {"hals", "mu", "tensorly"}
        Algorithm, see the module docstring.
    max_iter : int
        Maximum number of iterations (one iteration updates W, then H).
    tol : float
        Stop when the relative error improves by less than ``tol`` times its previous value
        (for ``"tensorly"``: tensorly's absolute criterion on the relative error).
    seed : int
        Seed of the initialisation; results are deterministic given the seed (and device).
    init : {"nndsvda", "nndsvd", "random"}
        Initialisation (``"tensorly"`` uses its own ``"svd"`` unless ``"random"``).
    log_every : int
        Log progress (iteration, relative error, s/iter) every this many iterations (0: never).
    engine : {"auto", "numpy", "torch"}
        For ``"hals"``: ``"numpy"`` runs scipy.sparse on the CPU (the tested path); ``"torch"``
        runs float32 torch on CUDA when available, else on the CPU; ``"auto"`` picks ``"torch"``
        only when CUDA is available.

    Returns
    -------
    NMFResult
        W (n, k) and H (k, m) float32 with rows of H scaled to unit maximum, the error history.
    """
    if backend not in BACKENDS:
        raise InputError(f"NMF backend must be one of {BACKENDS}, got {backend!r}")
    if init not in INITS:
        raise InputError(f"NMF init must be one of {INITS}, got {init!r}")
    if engine not in ("auto", "numpy", "torch"):
        raise InputError(f"NMF engine must be 'auto', 'numpy' or 'torch', got {engine!r}")
    max_iter = int(max_iter)
    if max_iter < 1:
        raise InputError(f"NMF max_iter must be >= 1, got {max_iter}")
    X, rank = _check_matrix(X, rank)
    t0 = time.perf_counter()
    log.info("NMF %s: %d x %d matrix, %s values, rank %d", backend, X.shape[0], X.shape[1],
             X.nnz if sp.issparse(X) else X.size, rank)
    label = backend
    if backend == "tensorly":
        W, H, errors = _tensorly(X, rank, max_iter, tol, seed, init)
    else:
        W, H = initialize(X, rank, init=init, seed=seed)
        use_torch = False
        if backend == "hals" and engine != "numpy":
            try:
                import torch
                cuda = torch.cuda.is_available()
            except ImportError:
                cuda = False
            use_torch = engine == "torch" or cuda
        if use_torch:
            device = "cuda" if cuda else "cpu"
            label = "hals-torch"
            W, H, errors = _hals_torch(X, W, H, max_iter, tol, log_every, device)
        else:
            update = _hals_rows if backend == "hals" else _mu_rows
            W, H, errors = _iterate_numpy(X, W, H, update, max_iter, tol, log_every, backend)
    W, H = scale_components(W, H)
    seconds = time.perf_counter() - t0
    errors = np.asarray(errors, dtype=np.float64)
    log.info("NMF %s: %d iterations, relative error %.6f, %.1f s", label, len(errors),
             errors[-1] if len(errors) else np.nan, seconds)
    return NMFResult(W, H, errors, seconds, label)


# ---------------------------------------------------------------------------------------------
# NMF file
# ---------------------------------------------------------------------------------------------

def write_nmf(path, *, spectra: np.ndarray, mz: np.ndarray, errors: np.ndarray,
              maps: dict[str, np.ndarray], map_attrs: dict[str, dict] | None = None,
              attrs: dict | None = None) -> None:
    """Write an NMF file (layout in ``docs/design.md``) atomically.

    Parameters
    ----------
    path : path-like
    spectra : ndarray, shape (k, n_mz)
    mz : ndarray, shape (n_mz,)
    errors : ndarray, shape (n_iter,)
    maps : dict file_id -> ndarray (k, ny, nx)
        Component maps on each file's acquisition grid, NaN where not acquired.
    map_attrs : dict file_id -> dict, optional
        Attributes of each ``/maps/{file_id}`` dataset (``source``, ``pixel_size_um``).
    attrs : dict, optional
        Root attributes (``modality``, ``rank``, ``backend``, ``seed``, ``normalize``, ...).
    """
    map_attrs = map_attrs or {}
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("spectra", data=np.asarray(spectra, dtype=np.float32))
        f.create_dataset("mz", data=np.asarray(mz, dtype=np.float64))
        f.create_dataset("errors", data=np.asarray(errors, dtype=np.float64))
        g = f.create_group("maps")
        for fid, stack in maps.items():
            stack = np.asarray(stack, dtype=np.float32)
            chunks = (1,) + tuple(min(s, 256) for s in stack.shape[1:]) if stack.size else None
            d = g.create_dataset(fid, data=stack, chunks=chunks, compression="gzip",
                                 compression_opts=1)
            for key, value in map_attrs.get(fid, {}).items():
                d.attrs[key] = "" if value is None else value
        f.attrs["format"] = NMF_FORMAT
        for key, value in (attrs or {}).items():
            f.attrs[key] = "" if value is None else value


def read_nmf(path) -> dict:
    """Read an NMF file.

    Returns
    -------
    dict
        ``spectra`` (k, n_mz) float32, ``mz`` (n_mz,), ``errors`` (n_iter,), ``maps``
        {file_id: (k, ny, nx) float32}, ``map_attrs`` {file_id: dict}, ``attrs`` dict.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: NMF file not found")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("spectra", "mz", "errors", "maps") if k not in f]
            if missing:
                raise InputError(f"{path}: not an NMF file (missing {', '.join(missing)})")
            out = {"spectra": f["spectra"][:], "mz": f["mz"][:], "errors": f["errors"][:],
                   "maps": {}, "map_attrs": {},
                   "attrs": {k: plain_attr(v) for k, v in f.attrs.items()}}
            for fid, d in f["maps"].items():
                out["maps"][fid] = d[:]
                out["map_attrs"][fid] = {k: plain_attr(v) for k, v in d.attrs.items()}
    except OSError as err:
        raise InputError(f"{path}: cannot be read as HDF5 ({err})") from err
    k = out["spectra"].shape[0]
    for fid, stack in out["maps"].items():
        if stack.ndim != 3 or stack.shape[0] != k:
            raise InputError(f"{path}: /maps/{fid} has shape {stack.shape}, expected ({k}, ny, nx)")
    return out


def run_nmf(converted: dict[str, str | os.PathLike], axis: MzAxis, out_path, *, rank: int,
            normalize: str = "none", transform: str = "none", backend: str = "hals",
            max_iter: int = 200, tol: float = 1e-4, seed: int = 0, modality: str = "",
            init: str = "nndsvda", block_pixels: int | None = None,
            engine: str = "auto") -> NMFResult:
    """Factorise all files of one modality together and write the NMF file.

    The binned matrices of all files are stacked (rows concatenated, in the order of
    ``converted``) so that one set of component spectra serves every file.

    Parameters
    ----------
    converted : dict file_id -> path
        Converted files of the modality (``file_id`` from :func:`msifusion.config.file_id`).
    axis : MzAxis
        Shared m/z axis (columns).
    out_path : path-like
        NMF file to write (``results/nmf/{modality}.h5``).
    rank, backend, max_iter, tol, seed, init, engine
        See :func:`factorize`.
    normalize, transform, block_pixels
        See :func:`msifusion.spectra.assemble_matrix`.
    modality : str
        Stored as an attribute.

    Returns
    -------
    NMFResult
        For all rows stacked.
    """
    if not converted:
        raise InputError(f"{out_path}: no converted files for modality {modality!r}")
    readers = {fid: ConvertedReader(p) for fid, p in converted.items()}
    mats = []
    for fid, r in readers.items():
        mats.append(assemble_matrix(r, axis, normalize=normalize, transform=transform,
                                    block_pixels=block_pixels))
    X = sp.vstack(mats, format="csr", dtype=np.float32)
    del mats
    res = factorize(X, rank, backend=backend, max_iter=max_iter, tol=tol, seed=seed, init=init,
                    engine=engine)
    maps, map_attrs = {}, {}
    row = 0
    for fid, r in readers.items():
        w = res.W[row:row + r.n_pixels]
        row += r.n_pixels
        maps[fid] = np.moveaxis(r.to_image(w), -1, 0).astype(np.float32)      # (k, ny, nx)
        map_attrs[fid] = {"source": str(r.path), "pixel_size_um": float(r.pixel_size_um)}
    attrs = {"modality": modality, "rank": int(rank), "backend": res.backend, "seed": int(seed),
             "normalize": normalize, "transform": transform, "init": init, "tol": float(tol),
             "max_iter": int(max_iter), "n_iter": res.n_iter, "seconds": float(res.seconds),
             "axis_kind": axis.kind, "axis_ppm": float(axis.ppm)}
    write_nmf(out_path, spectra=res.H, mz=axis.centres, errors=res.errors, maps=maps,
              map_attrs=map_attrs, attrs=attrs)
    log.info("%s: wrote %d components for %d files (%s)", out_path, rank, len(maps), modality)
    return res
