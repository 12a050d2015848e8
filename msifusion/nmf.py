"""Non-negative matrix factorisation of sparse pixel x m/z matrices, and the NMF file.

``X (n_pixels, n_mz) ~ W (n_pixels, k) @ H (k, n_mz)``, W, H >= 0. Backends:

- ``"hals"`` (default): accelerated hierarchical alternating least squares (Gillis & Glineur
  2012: several cheap inner sweeps per product with X) in torch, on the CPU (all cores torch is
  given) or a CUDA GPU; float32 products and factors, error accumulated in float64. The only
  products with X are ``X @ H^T`` and ``W^T @ X``, and the error is computed without forming
  ``W @ H``: ``||X - WH||^2 = ||X||^2 - 2 tr(W^T X H^T) + tr(W^T W H H^T)``.
- ``"mu"``: Lee & Seung multiplicative updates, same products.
- ``"tensorly"``: the published method, ``tensorly.decomposition.non_negative_parafac`` on the
  2-way tensor (sparse through ``tensorly.contrib.sparse`` and the pydata ``sparse`` package;
  dense for matrices up to :data:`TENSORLY_DENSE_LIMIT` values when that package is missing).

X is held as CSR row blocks (:class:`RowBlocks`): in memory, or streamed from a scratch file when
it exceeds the memory budget (out of core). W is updated block by block, which gives the same
result as in memory because W's rows are independent given H. Memory in memory mode:
:func:`in_memory_bytes` (16 bytes per non-zero plus 12 k bytes per pixel); out of core the process
keeps to the budget (:func:`block_rows_for`: interpreter, W, H-side arrays and one block).

All backends return rows of H scaled to unit maximum (W absorbs the scale).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from .errors import InputError
from .schema import default
from .spectra import MzAxis, assemble_matrix, iter_matrix_blocks
from .store import ConvertedReader, write_nmf

log = logging.getLogger("msifusion.nmf")

BACKENDS = ("hals", "mu", "tensorly")
INITS = ("nndsvda", "nndsvd", "random")
#: Largest matrix (values) the dense tensorly fallback accepts (8 bytes each, several copies).
TENSORLY_DENSE_LIMIT = 20_000_000
#: Memory of the Python process itself (numpy, torch, h5py loaded), counted in the budget.
INTERPRETER_BYTES = 300 * 2 ** 20
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
    times : ndarray, shape (n_iter,), float64
        Wall time (s, initialisation included) at the end of each iteration.
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
    times: np.ndarray | None = None

    @property
    def n_iter(self) -> int:
        return len(self.errors)


# ---------------------------------------------------------------------------------------------
# The matrix in row blocks (in memory or in a scratch HDF5 file)
# ---------------------------------------------------------------------------------------------

def _torch_csr(m: sp.csr_matrix, device, dtype):
    """scipy CSR -> torch sparse CSR (int32 indices when they fit) on ``device``."""
    import torch

    itype = np.int32 if max(m.nnz, m.shape[1]) < 2 ** 31 - 1 else np.int64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)           # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(itype, copy=False)),
            torch.from_numpy(m.indices.astype(itype, copy=False)),
            torch.from_numpy(m.data.astype(np.float32 if dtype == "float32" else np.float64,
                                           copy=False)),
            size=m.shape, device=device, check_invariants=False)


class RowBlocks:
    """A non-negative sparse matrix ``X (n, m)`` as consecutive CSR row blocks.

    Blocks are held in memory (as torch tensors on the compute device, with their transposes), or,
    with ``scratch`` set, written to an uncompressed HDF5 file and read back one at a time (the
    out-of-core mode: memory holds one block, however large X is).

    Parameters
    ----------
    n_cols : int
        Number of columns m.
    scratch : path-like, optional
        Scratch HDF5 file for out-of-core mode (removed by :meth:`close`).
    device : str
        torch device of the products (``"cpu"`` or ``"cuda"``).
    dtype : {"float32", "float64"}
        Precision of the products and factors.
    """

    def __init__(self, n_cols: int, *, scratch=None, device: str = "cpu", dtype: str = "float32"):
        self.n_cols = int(n_cols)
        self.device, self.dtype = device, dtype
        self.bounds: list[tuple[int, int]] = []
        self.nnz = 0
        self.sq_norm = 0.0
        self.total = 0.0
        self.scratch = None if scratch is None else Path(scratch)
        self._blocks: list = []
        self._h5 = None
        if self.scratch is not None:
            self.scratch.parent.mkdir(parents=True, exist_ok=True)
            self._h5 = h5py.File(self.scratch, "w")

    @property
    def n_rows(self) -> int:
        return self.bounds[-1][1] if self.bounds else 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_rows, self.n_cols

    @property
    def in_memory(self) -> bool:
        return self.scratch is None

    def append(self, block) -> None:
        """Add the next rows (scipy sparse or dense, non-negative, ``n_cols`` columns)."""
        block = sp.csr_matrix(block, dtype=np.float32 if self.dtype == "float32" else np.float64)
        if block.shape[1] != self.n_cols:
            raise InputError(f"NMF: a block has {block.shape[1]} columns, expected {self.n_cols}")
        block.sum_duplicates()
        d = block.data.astype(np.float64)
        if d.size and (not np.all(np.isfinite(d)) or d.min() < 0):
            raise InputError("NMF input has negative or non-finite values")
        start = self.n_rows
        self.bounds.append((start, start + block.shape[0]))
        self.nnz += block.nnz
        self.sq_norm += float(d @ d)
        self.total += float(d.sum())
        if self._h5 is None:
            self._blocks.append((_torch_csr(block, self.device, self.dtype),
                                 _torch_csr(block.T.tocsr(), self.device, self.dtype)))
        else:
            g = self._h5.create_group(str(len(self.bounds) - 1))
            for name, m in (("x", block), ("xt", block.T.tocsr())):
                for part in ("indptr", "indices", "data"):
                    g.create_dataset(f"{name}_{part}", data=getattr(m, part))

    def __iter__(self):
        """Yield ``(start, stop, Xb, XbT)``: the rows ``start:stop`` and their transpose as torch
        sparse CSR tensors on the compute device."""
        for i, (start, stop) in enumerate(self.bounds):
            if self._h5 is None:
                yield (start, stop) + self._blocks[i]
                continue
            g = self._h5[str(i)]
            pair = []
            for name, shape in (("x", (stop - start, self.n_cols)),
                                ("xt", (self.n_cols, stop - start))):
                m = sp.csr_matrix((g[f"{name}_data"][:], g[f"{name}_indices"][:],
                                   g[f"{name}_indptr"][:]), shape=shape)
                pair.append(_torch_csr(m, self.device, self.dtype))
            yield start, stop, pair[0], pair[1]

    def close(self) -> None:
        """Drop the blocks (and remove the scratch file)."""
        self._blocks = []
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
            self.scratch.unlink(missing_ok=True)

    def __enter__(self) -> "RowBlocks":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def in_memory_bytes(n: int, m: int, nnz: int, rank: int) -> int:
    """Bytes the in-memory mode needs for an ``n x m`` matrix with ``nnz`` values at ``rank``:
    X and its transpose (value + int32 index each), W and two (k, n) work arrays, H-side arrays
    (float32)."""
    return int(16 * nnz + 8 * (n + m) + 4 * rank * (3 * n + 4 * m))


def block_rows_for(budget_bytes: float, n: int, m: int, nnz: int, rank: int) -> int:
    """Rows per out-of-core block so that the whole process keeps within ``budget_bytes``.

    Held at once: the interpreter (:data:`INTERPRETER_BYTES`), W (4 k n bytes), the H-side arrays
    (16 k m bytes) and one block: X_b and its transpose as read (scipy) and as torch tensors, and
    the (rows, k) work arrays (about 40 bytes per non-zero and 24 k bytes per row); blocks take a
    quarter of what is left.
    """
    fixed = 4 * rank * n + 16 * rank * m + 8 * m + INTERPRETER_BYTES
    left = budget_bytes - fixed
    per_row = 40 * nnz / max(1, n) + 8 + 24 * rank
    if left <= 0:
        need = fixed
        raise InputError(
            f"NMF: the memory budget ({budget_bytes / 2**30:.2f} GB) does not even hold W and H "
            f"of a {n} x {m} matrix at rank {rank} ({need / 2**30:.2f} GB with the interpreter); "
            "raise nmf.memory_gb")
    return max(1, int(left / 4 / per_row))


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------

def _torch_dtype(dtype: str):
    import torch

    return torch.float32 if dtype == "float32" else torch.float64


def _randomized_svd(X: RowBlocks, rank: int, seed: int, n_iter: int = 2):
    """Truncated SVD ``U (n, k) float32 (a transposed view of a (k, n) array), S (k,), Vt (k, m)``
    by a randomized subspace iteration
    (Halko et al. 2011) on the right singular space, with block products only.

    ``Z`` (m, l) is iterated as ``qr(X^T X Z)``; the Gram ``(X Z)^T (X Z)`` gives the singular
    values and right vectors in that subspace, and ``U = X V / S`` is formed block by block. Only
    m-sized work arrays and U itself are held (no (n, l) arrays), so this fits the out-of-core
    budget. Deterministic given ``seed``.
    """
    import torch

    n, m = X.shape
    ell = min(rank + 10, n, m)
    rng = np.random.default_rng(seed)
    tdt = _torch_dtype(X.dtype)
    Z = torch.from_numpy(rng.standard_normal((m, ell))).to(device=X.device, dtype=tdt)
    Z = torch.linalg.qr(Z)[0]
    for _ in range(n_iter + 1):
        Y = torch.zeros((m, ell), dtype=tdt, device=X.device)
        for _s, _e, Xb, XbT in X:
            Y += XbT @ (Xb @ Z)
        Z = torch.linalg.qr(Y)[0]
    G = torch.zeros((ell, ell), dtype=torch.float64, device=X.device)
    for _s, _e, Xb, _t in X:
        P = (Xb @ Z).double()
        G += P.T @ P
    evals, evecs = torch.linalg.eigh(G)                         # ascending
    order = torch.argsort(evals, descending=True)[:rank]
    S = evals[order].clamp(min=0).sqrt()
    V = Z.double() @ evecs[:, order]                            # (m, k)
    Vt_ = V.to(tdt)
    inv = torch.where(S > 0, 1.0 / S, torch.zeros_like(S)).to(tdt)
    Ut = np.empty((rank, n), np.float32 if X.dtype == "float32" else np.float64)   # (k, n)
    for s, e, Xb, _t in X:
        Ut[:, s:e] = ((Xb @ Vt_) * inv).T.cpu().numpy()
    return Ut.T, S.cpu().numpy(), V.T.cpu().numpy()


def initialize(X, rank: int, *, init: str = "nndsvda",
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Initial ``W (n, k)``, ``H (k, m)`` (float64) for NMF of ``X``.

    Parameters
    ----------
    X : RowBlocks, sparse matrix or ndarray, shape (n, m), non-negative
    rank : int
    init : {"nndsvda", "nndsvd", "random"}
        NNDSVD (Boutsidis & Gallopoulos 2008) from a randomized truncated SVD; ``"nndsvda"`` fills
        its zeros with the mean of X (needed by multiplicative updates); ``"random"`` draws uniform
        values scaled to the mean of X.
    seed : int
        Seed of the randomized SVD / random draws.
    """
    if not isinstance(X, RowBlocks):
        blocks = RowBlocks(X.shape[1])
        blocks.append(X)
        X = blocks
    n, m = X.shape
    mean = X.total / (n * m)
    if init == "random":
        rng = np.random.default_rng(seed)
        scale = np.sqrt(mean / rank)
        return ((scale * rng.random((n, rank))).astype(np.float32),
                scale * rng.random((rank, m)))
    if init not in ("nndsvd", "nndsvda"):
        raise InputError(f"NMF init must be one of {INITS}, got {init!r}")
    U, S, Vt = _randomized_svd(X, rank, seed)
    W = U              # NNDSVD column by column, in place (no (n, k) copy, no (n, k) masks)
    H = np.zeros((rank, m))
    for j in range(rank):
        x, y = U[:, j].astype(np.float64), Vt[j]
        if j == 0:
            u, v, sigma = np.abs(x), np.abs(y), 1.0
        else:
            xp, yp = np.maximum(x, 0), np.maximum(y, 0)
            xn, yn = np.maximum(-x, 0), np.maximum(-y, 0)
            nxp, nyp = np.linalg.norm(xp), np.linalg.norm(yp)
            nxn, nyn = np.linalg.norm(xn), np.linalg.norm(yn)
            if nxp * nyp >= nxn * nyn:
                u, v, sigma = xp / max(nxp, _EPS), yp / max(nyp, _EPS), nxp * nyp
            else:
                u, v, sigma = xn / max(nxn, _EPS), yn / max(nyn, _EPS), nxn * nyn
        lam = np.sqrt(S[j] * sigma)
        w, h = lam * u, lam * v
        w[w < _EPS] = 0
        h[h < _EPS] = 0
        if init == "nndsvda":
            w[w == 0] = mean
            h[h == 0] = mean
        W[:, j], H[j] = w, h
    return W, H


# ---------------------------------------------------------------------------------------------
# Updates (torch, CPU or GPU)
# ---------------------------------------------------------------------------------------------

def _hals_sweeps(F, A, B, inner: int, eps: float = 0.01, chunk: int = 16384) -> None:
    """In place accelerated HALS (Gillis & Glineur 2012) on the rows of a factor ``F (k, p)``.

    Minimises ``||Y - F^T G||`` given ``A = G Y^T (k, p)`` and ``B = G G^T (k, k)``: up to
    ``inner`` sweeps over the k rows, stopping when a sweep changes F by less than ``eps`` times
    the first sweep (squared norms; ``eps=0``: always ``inner`` sweeps). The p columns are
    independent, so they are processed in cache-sized chunks of ``chunk`` columns (on a GPU: all
    at once). Rows that die (all zero) are
    revived at a tiny value.
    """
    diag = B.diagonal()
    positive = (diag > 0).cpu().numpy()
    step = F.shape[1] if F.is_cuda else max(1, int(chunk))
    for c0 in range(0, F.shape[1], step):
        Fc, Ac = F[:, c0:c0 + step], A[:, c0:c0 + step]
        first = None
        for _ in range(max(1, inner)):
            change = Fc.new_zeros(())
            for j in range(Fc.shape[0]):
                if not positive[j]:
                    continue
                new = (Fc[j] + (Ac[j] - B[j] @ Fc) / diag[j]).clamp_(min=0)
                change += ((new - Fc[j]) ** 2).sum()
                Fc[j] = new
            change = float(change)
            if first is None:
                first = change
            elif eps > 0 and change <= eps * first:
                break
    dead = F.amax(dim=1) <= 0
    if bool(dead.any()):
        F[dead] = _EPS


def _mu_update(F, A, B, inner: int = 1) -> None:
    """In place multiplicative update ``F *= A / (B F)`` (Lee & Seung, Frobenius)."""
    for _ in range(max(1, inner)):
        F.mul_(A / (B @ F).clamp_(min=_EPS))


def _inner_counts(n: int, m: int, nnz: int, k: int, alpha: float = 0.5, cap: int = 10):
    """Inner sweeps per outer iteration for W and H: 1 + alpha * rho with rho the cost of the
    products with X relative to one sweep (Gillis & Glineur 2012), capped."""
    cost = nnz + (n + m) * k
    rho_w = 1 + cost / (n * (k + 1))
    rho_h = 1 + cost / (m * (k + 1))
    return (min(cap, 1 + int(alpha * rho_w)), min(cap, 1 + int(alpha * rho_h)))


def _iterate(X: RowBlocks, start: list, backend: str, max_iter: int, tol: float,
             log_every: int, label: str, clock: float):
    """Alternate W (block by block) and H updates; returns W (n, k), H (k, m), errors.

    Per outer iteration, for each row block b: ``A_b = H X_b^T``, W_b updated given ``H H^T``,
    then ``C += W_b X_b`` and ``D += W_b W_b^T``; finally H is updated given C and D. W updates are
    independent across rows, so this is exactly the in-memory algorithm whatever the blocks. The
    error uses ``||X - WH||^2 = ||X||^2 - 2 <C, H> + <D, H H^T>`` (never forms ``W H``).
    """
    import torch

    tdt = _torch_dtype(X.dtype)
    dev = X.device
    W0, H0 = start.pop(0), start.pop(0)     # the caller's list is emptied: one copy of W lives
    Wt = torch.from_numpy(np.ascontiguousarray(W0.T)).to(device=dev, dtype=tdt)   # (k, n)
    del W0
    H = torch.from_numpy(np.ascontiguousarray(H0)).to(device=dev, dtype=tdt)       # (k, m)
    n, m = X.shape
    k = H.shape[0]
    inner_w, inner_h = _inner_counts(n, m, X.nnz, k) if backend == "hals" else (1, 1)
    # W sweeps run their full count (no early stop): rows of W are then updated exactly alike
    # whatever the blocks, so out of core gives the in-memory result
    update_w = partial(_hals_sweeps, eps=0.0) if backend == "hals" else _mu_update
    update_h = _hals_sweeps if backend == "hals" else _mu_update
    norm2 = X.sq_norm
    errors, times, prev = [], [], None
    t0 = time.perf_counter()
    for it in range(1, max_iter + 1):
        HHt = H @ H.T
        C = torch.zeros((k, m), dtype=tdt, device=dev)
        D = torch.zeros((k, k), dtype=tdt, device=dev)
        Ht = H.T.contiguous()
        for s, e, Xb, XbT in X:
            Wb = Wt[:, s:e].contiguous()
            update_w(Wb, (Xb @ Ht).T.contiguous(), HHt, inner_w)
            Wt[:, s:e] = Wb
            C += (XbT @ Wb.T.contiguous()).T
            D += Wb @ Wb.T
        update_h(H, C, D, inner_h)
        cross = float((C.double() * H.double()).sum())
        quad = float((D.double() * (H.double() @ H.double().T)).sum())
        err = float(np.sqrt(max(norm2 - 2.0 * cross + quad, 0.0) / norm2))
        errors.append(err)
        times.append(time.perf_counter() - clock)
        if log_every and (it % log_every == 0 or it == 1):
            log.info("%s iteration %d: relative error %.6f, %.3f s/iter", label, it, err,
                     (time.perf_counter() - t0) / it)
        if prev is not None and (prev - err) < tol * max(prev, _EPS):
            break
        prev = err
    return Wt.T.cpu().numpy(), H.cpu().double().numpy(), errors, times


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
        # tensorly 0.10's sparse backend fails in its SVD initialisation (argmax(axis=...) is not
        # implemented for pydata sparse), so the sparse path starts from tensorly's random init
        tl_init = "random"
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
    def dense(a):
        a = a.todense() if hasattr(a, "todense") else tl.to_numpy(a)
        return np.asarray(a, dtype=np.float64)

    W = dense(factors[0]) * dense(weights)
    H = dense(factors[1]).T
    return W, H, [float(e) for e in errors]


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _check_rank(rank, n: int, m: int) -> int:
    rank = int(rank)
    if rank < 1 or rank > min(n, m):
        raise InputError(f"NMF rank {rank} must be between 1 and min(n_pixels, n_mz) = {min(n, m)}")
    return rank


def _usable_rank(rank, n: int, m: int, what: str) -> int:
    """The rank a modality's NMF can use: ``rank`` capped at ``min(n, m)`` with a warning.

    More components than m/z bins (or pixels) cannot be told apart, and a factorisation of rank
    ``min(n, m)`` is already exact: a study of few channels (e.g. 20 unit masses of a ToF-SIMS)
    runs with the default rank instead of stopping. A rank below 1 is an error.
    """
    rank = int(rank)
    if rank > min(n, m) >= 1:
        log.warning("%s: NMF rank %d exceeds min(n_pixels, n_mz) = %d (%d pixels x %d m/z bins): "
                    "using rank %d (modalities.<name>.nmf.rank sets it)", what, rank, min(n, m), n, m,
                    min(n, m))
        return min(n, m)
    return _check_rank(rank, n, m)


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a CUDA GPU is available, else ``"cpu"``."""
    if device not in ("auto", "cpu", "cuda"):
        raise InputError(f"NMF device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("NMF device 'cuda' asked for but torch sees no CUDA GPU")
    return device


def scale_components(W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale each row of H to unit maximum and the matching column of W by the inverse factor.

    All-zero rows of H are left as they are. Returns float32 copies ``(W (n, k), H (k, m))``.
    """
    s = H.max(axis=1)
    s = np.where(s > 0, s, 1.0)
    W = np.asarray(W, dtype=np.float32)
    W *= s.astype(np.float32)                       # in place: no float64 (n, k) copy
    return W, (H / s[:, None]).astype(np.float32)


def factorize(X, rank: int, *, backend: str = "hals", max_iter: int = 200, tol: float = 1e-4,
              seed: int = 0, init: str = "nndsvda", log_every: int = 10, device: str = "auto",
              precision: str = "float32") -> NMFResult:
    """Non-negative factorisation ``X ~ W @ H``.

    Parameters
    ----------
    X : RowBlocks, scipy.sparse matrix or ndarray, shape (n, m), non-negative
        Pixels x m/z (never densified by ``"hals"``/``"mu"``). A :class:`RowBlocks` with a
        scratch file runs out of core.
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
        Seed of the initialisation; results are deterministic given the seed, device and threads.
    init : {"nndsvda", "nndsvd", "random"}
        Initialisation (``"tensorly"`` uses its own ``"svd"`` unless ``"random"``).
    log_every : int
        Log progress (iteration, relative error, s/iter) every this many iterations (0: never).
    device : {"auto", "cpu", "cuda"}
        Where ``"hals"``/``"mu"`` run (torch); ``"auto"`` uses a CUDA GPU when there is one.
    precision : {"float32", "float64"}
        Precision of the products and factors (the error is always accumulated in float64).

    Returns
    -------
    NMFResult
        W (n, k) and H (k, m) float32 with rows of H scaled to unit maximum, the error history.
    """
    if backend not in BACKENDS:
        raise InputError(f"NMF backend must be one of {BACKENDS}, got {backend!r}")
    if init not in INITS:
        raise InputError(f"NMF init must be one of {INITS}, got {init!r}")
    if precision not in ("float32", "float64"):
        raise InputError(f"NMF precision must be 'float32' or 'float64', got {precision!r}")
    max_iter = int(max_iter)
    if max_iter < 1:
        raise InputError(f"NMF max_iter must be >= 1, got {max_iter}")
    device = resolve_device(device)
    t0 = time.perf_counter()
    if isinstance(X, RowBlocks):
        if backend == "tensorly":
            raise InputError("NMF backend 'tensorly' needs the matrix in memory, not row blocks")
        blocks, own = X, False
    else:
        if not (sp.issparse(X) or isinstance(X, np.ndarray)):
            X = np.asarray(X)
        if X.ndim != 2:
            raise InputError(f"NMF input must be a 2-D matrix, got shape {X.shape}")
        blocks, own = RowBlocks(X.shape[1], device=device, dtype=precision), True
        blocks.append(X)
    try:
        n, m = blocks.shape
        rank = _check_rank(rank, n, m)
        if blocks.sq_norm == 0:
            raise InputError("NMF input is all zero")
        where = "in memory" if blocks.in_memory else f"out of core ({len(blocks.bounds)} blocks)"
        log.info("NMF %s: %d x %d matrix, %d values, rank %d, %s on %s", backend, n, m,
                 blocks.nnz, rank, where, device)
        label = backend if backend == "tensorly" else f"{backend}-{device}"
        if backend == "tensorly":
            W, H, errors = _tensorly(sp.csr_matrix(X) if sp.issparse(X) else X, rank, max_iter,
                                     tol, seed, init)
            times = None
        else:
            W, H, errors, times = _iterate(blocks, list(initialize(blocks, rank, init=init,
                                                                    seed=seed)),
                                           backend, max_iter, tol, log_every, label, t0)
    finally:
        if own:
            blocks.close()
    W, H = scale_components(W, H)
    seconds = time.perf_counter() - t0
    errors = np.asarray(errors, dtype=np.float64)
    log.info("NMF %s: %d iterations, relative error %.6f, %.1f s", label, len(errors),
             errors[-1] if len(errors) else np.nan, seconds)
    return NMFResult(W, H, errors, seconds, label,
                     None if times is None else np.asarray(times, dtype=np.float64))


def run_nmf(converted: dict[str, str | os.PathLike], axis: MzAxis, out_path, *, rank: int,
            normalize: str = default("modality.nmf.normalize"),
            transform: str = default("modality.nmf.transform"),
            backend: str = default("nmf.backend"), max_iter: int = default("nmf.max_iter"),
            tol: float = default("nmf.tol"), seed: int = default("seed"), modality: str = "",
            init: str = "nndsvda", block_pixels: int | None = None,
            device: str = default("nmf.device"), memory_gb: float = default("nmf.memory_gb"),
            scratch_dir=None) -> NMFResult:
    """Factorise all files of one modality together and write the NMF file.

    The binned matrices of all files are stacked (rows concatenated, in the order of
    ``converted``) so that one set of component spectra serves every file. When the in-memory
    estimate (:func:`in_memory_bytes`, from the converted value counts) exceeds ``memory_gb``,
    the binned matrix is written once to a scratch file in row blocks sized to the budget and
    streamed every iteration (out of core; same result).

    Parameters
    ----------
    converted : dict file_id -> path
        Converted files of the modality (``file_id`` from :func:`msifusion.config.file_id`).
    axis : MzAxis
        Shared m/z axis (columns).
    out_path : path-like
        NMF file to write (``results/nmf/{modality}.h5``).
    rank, backend, max_iter, tol, seed, init, device
        See :func:`factorize`.
    normalize, transform, block_pixels
        See :func:`msifusion.spectra.assemble_matrix`.
    modality : str
        Stored as an attribute.
    memory_gb : float
        Memory budget of the factorisation (GB, 2**30 bytes).
    scratch_dir : path-like, optional
        Folder of the out-of-core scratch file (default: beside ``out_path``).

    Returns
    -------
    NMFResult
        For all rows stacked.
    """
    if not converted:
        raise InputError(f"{out_path}: no converted files for modality {modality!r}")
    out_path = Path(out_path)
    readers = {fid: ConvertedReader(p) for fid, p in converted.items()}
    n = sum(r.n_pixels for r in readers.values())
    m = len(axis)
    rank = _usable_rank(rank, n, m, f"{out_path} ({modality or 'NMF'})")
    nnz = sum(r.nnz for r in readers.values())          # converted values: an upper bound
    need = in_memory_bytes(n, m, nnz, rank)
    budget = float(memory_gb) * 2 ** 30
    out_of_core = backend != "tensorly" and need > budget
    device = resolve_device(device)
    kw = dict(normalize=normalize, transform=transform, block_pixels=block_pixels)
    if backend == "tensorly":
        X = sp.vstack([assemble_matrix(r, axis, **kw) for r in readers.values()], format="csr",
                      dtype=np.float32)
    else:
        scratch = None
        rows = n
        if out_of_core:
            folder = Path(scratch_dir) if scratch_dir else out_path.parent
            scratch = folder / f".{out_path.stem}.scratch.h5"
            rows = block_rows_for(budget, n, m, nnz, rank)
            log.info("%s: the in-memory NMF would need %.2f GB > budget %.2f GB: out of core, "
                     "%d rows per block, scratch %s", out_path, need / 2**30, budget / 2**30,
                     rows, scratch)
        X = RowBlocks(m, scratch=scratch, device=device)
        pending, n_pending = [], 0
        for r in readers.values():
            for _s, _e, block in iter_matrix_blocks(r, axis, **kw):
                pending.append(block)
                n_pending += block.shape[0]
                if n_pending >= rows:
                    X.append(sp.vstack(pending, format="csr"))
                    pending, n_pending = [], 0
        if pending:
            X.append(sp.vstack(pending, format="csr"))
    try:
        res = factorize(X, rank, backend=backend, max_iter=max_iter, tol=tol, seed=seed,
                        init=init, device=device)
    finally:
        if isinstance(X, RowBlocks):
            X.close()
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
             "axis_kind": axis.kind, "axis_ppm": float(axis.ppm),
             "out_of_core": bool(out_of_core), "memory_gb": float(memory_gb)}
    write_nmf(out_path, spectra=res.H, mz=axis.centres, errors=res.errors, maps=maps,
              map_attrs=map_attrs, attrs=attrs)
    log.info("%s: wrote %d components for %d files (%s)", out_path, rank, len(maps), modality)
    return res
