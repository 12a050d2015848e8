"""Benchmark of imzML ingestion: msifusion's conversion against a plain pyimzML loop.

Generates a processed imzML with ``--n-spectra`` spectra (default 1,000,000; ``--peaks`` m/z values
each, float64 m/z, float32 intensities) with pyimzML's own writer, then times, each step in a fresh
process so that its peak resident memory (VmHWM) is its own:

- XML indexing: ``msifusion.imzml.read_index`` vs ``pyimzml.ImzMLParser(path)``;
- end to end into the same HDF5 layout: ``msifusion.convert.convert_imzml`` (with its validation
  and the SHA-1 check of the .ibd) vs ``ImzMLParser`` + ``getspectrum`` per pixel written in blocks
  by ``msifusion.store.ConvertedWriter``;

checks that both HDF5 files hold identical values, and prints wall time, peak RSS and the ratios.

Usage::

    python benchmarks/bench_convert.py [--n-spectra 1000000] [--peaks 8] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from measure import peak_rss_mb  # noqa: E402  (benchmarks/measure.py)


def generate(path: Path, n: int, peaks: int, seed: int = 0) -> None:
    """Processed imzML with ``n`` spectra on a square-ish grid, written by pyimzML."""
    import numpy as np
    from pyimzml.ImzMLWriter import ImzMLWriter

    rng = np.random.default_rng(seed)
    nx = int(np.ceil(np.sqrt(n)))
    block = 65536
    with ImzMLWriter(str(path.with_suffix("")), mode="processed", mz_dtype=np.float64,
                     intensity_dtype=np.float32) as w:
        for start in range(0, n, block):
            m = min(block, n - start)
            mz = np.sort(rng.uniform(100, 1000, (m, peaks)), axis=1)
            inten = rng.random((m, peaks), dtype=np.float32) * 1000 + 1
            for j in range(m):
                i = start + j
                w.addSpectrum(mz[j], inten[j], (i % nx + 1, i // nx + 1, 1))


def step_ours_index(path: Path, out: Path) -> dict:
    from msifusion.imzml import read_index

    index = read_index(path)
    return {"n": index.n, "method": index.method}


def step_pyimzml_index(path: Path, out: Path) -> dict:
    from pyimzml.ImzMLParser import ImzMLParser

    p = ImzMLParser(str(path))
    return {"n": len(p.coordinates)}


def step_ours_convert(path: Path, out: Path) -> dict:
    from msifusion.convert import convert_imzml

    s = convert_imzml(path, out)
    return {"n": s["n_pixels"], "nnz": s["nnz"]}


def step_pyimzml_loop(path: Path, out: Path) -> dict:
    import numpy as np
    from pyimzml.ImzMLParser import ImzMLParser

    from msifusion.store import ConvertedWriter

    p = ImzMLParser(str(path))
    n = len(p.coordinates)
    coords = np.asarray(p.coordinates, np.int64)
    xy = (coords[:, :2] - 1).astype(np.int32)
    attrs = {"source": str(path), "mode": "processed", "spectrum_type": "profile",
             "pixel_size_um": float("nan"),
             "image_shape": (int(xy[:, 1].max()) + 1, int(xy[:, 0].max()) + 1)}
    nnz = 0
    with ConvertedWriter(out, n_pixels=n, attrs=attrs, intensity_dtype=np.float32) as w:
        for start in range(0, n, 65536):
            mzs, ints = [], []
            for i in range(start, min(n, start + 65536)):
                mz, inten = p.getspectrum(i)
                mzs.append(mz)
                ints.append(inten)
            lengths = np.fromiter(map(len, mzs), np.int64, len(mzs))
            indptr = np.concatenate([[0], np.cumsum(lengths)])
            w.append(indptr, np.concatenate(mzs).astype(np.float64), np.concatenate(ints))
            nnz += int(indptr[-1])
        w.set_pixels(xy, coords[:, 2] - 1)
    return {"n": n, "nnz": nnz}


STEPS = {"ours_index": step_ours_index, "pyimzml_index": step_pyimzml_index,
         "ours_convert": step_ours_convert, "pyimzml_loop": step_pyimzml_loop}


def run_step(name: str, path: Path, out: Path) -> dict:
    """Run one step in a fresh interpreter; return its result with seconds and peak RSS (MB)."""
    proc = subprocess.run([sys.executable, __file__, "--step", name, "--imzml", str(path),
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"step {name} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_values(a: Path, b: Path) -> bool:
    """Both converted files hold identical CSR arrays and coordinates (compared in blocks)."""
    import numpy as np

    from msifusion.store import ConvertedReader

    ra, rb = ConvertedReader(a), ConvertedReader(b)
    if not (np.array_equal(ra.indptr, rb.indptr) and np.array_equal(ra.xy, rb.xy)):
        return False
    for ba, bb in zip(ra.iter_blocks(1 << 18), rb.iter_blocks(1 << 18)):
        if not (np.array_equal(ba[3], bb[3]) and np.array_equal(ba[4], bb[4])):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-spectra", type=int, default=1_000_000)
    ap.add_argument("--peaks", type=int, default=8)
    ap.add_argument("--workdir", help="folder for the generated files (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the generated files")
    ap.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)
    ap.add_argument("--imzml", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.step:                                       # child process: one timed step
        t0 = time.perf_counter()
        result = STEPS[a.step](Path(a.imzml), Path(a.out))
        result["seconds"] = time.perf_counter() - t0
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return

    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="bench_convert_"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "bench.imzML"
    t0 = time.perf_counter()
    generate(path, a.n_spectra, a.peaks)
    print(f"generated {a.n_spectra:,} processed spectra x {a.peaks} peaks with pyimzML in "
          f"{time.perf_counter() - t0:.1f} s: XML {path.stat().st_size / 2**20:.0f} MB, "
          f".ibd {path.with_suffix('.ibd').stat().st_size / 2**20:.0f} MB", flush=True)
    print(f"machine: {os.cpu_count()} CPUs; msifusion index uses 2 threads", flush=True)

    res = {}
    for name in ("ours_index", "pyimzml_index", "ours_convert", "pyimzml_loop"):
        res[name] = run_step(name, path, work / f"{name}.h5")
        r = res[name]
        print(f"  {name:<14s} {r['seconds']:8.1f} s   peak RSS {r['peak_rss_mb']:7.0f} MB   "
              f"({r['seconds'] / a.n_spectra * 1e6:.1f} us/spectrum)", flush=True)
    for name in res:
        assert res[name]["n"] == a.n_spectra, (name, res[name])
    exact = same_values(work / "ours_convert.h5", work / "pyimzml_loop.h5")
    print()
    print(f"{'':<26s}{'msifusion':>12s}{'pyimzML':>12s}{'speed-up':>10s}")
    for label, ours, ref in (("XML index (s)", "ours_index", "pyimzml_index"),
                             ("end to end -> HDF5 (s)", "ours_convert", "pyimzml_loop")):
        o, p = res[ours]["seconds"], res[ref]["seconds"]
        print(f"{label:<26s}{o:12.1f}{p:12.1f}{p / o:9.1f}x")
    for label, ours, ref in (("peak RSS index (MB)", "ours_index", "pyimzml_index"),
                             ("peak RSS end to end (MB)", "ours_convert", "pyimzml_loop")):
        print(f"{label:<26s}{res[ours]['peak_rss_mb']:12.0f}{res[ref]['peak_rss_mb']:12.0f}")
    print(f"identical values in both HDF5 files: {exact}")
    if not a.keep:
        for f in work.iterdir():
            f.unlink()
        if not a.workdir:
            work.rmdir()
    if not exact:
        sys.exit(1)


if __name__ == "__main__":
    main()
