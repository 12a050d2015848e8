"""Registration accuracy through the workflow, on phantom studies with known transforms.

A ``preset="small"`` phantom study of ``--sections`` sections is generated (every section and every
modality at its own random rotation over the full circle, the ToF-SIMS-like field of view holding
only part of the section), the workflow runs up to the registration of both pairs of the chain
(conversion, NMF, grid removal, section maps, tissue masks, registration), and every registered
fine -> coarse matrix is compared with the phantom's truth:

* rotation error (degrees) of the registered rotation against the true relative rotation;
* translation error: RMS and maximum over the fine tissue pixels of the distance between the
  points mapped by the registered and by the true matrix (coarse pixels);
* the verdict the workflow gave (``passed``) and the quality figures.

Usage::

    python benchmarks/bench_register_study.py [--sections 20] [--seed 1] [--preset small|demo]
        [--workdir DIR]

Done-when of issue 6: rotation error <= 0.5 deg and translation error <= 0.25 coarse px for every
trial (sections x pairs).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from msifusion.phantom import generate_study  # noqa: E402
from test_workflow import small_config, snakemake  # noqa: E402


def true_fine_to_coarse(truth: h5py.File, coarse: str, fine: str) -> np.ndarray:
    """True fine -> coarse pixel matrix (2, 3) from the truth's matrices to the reference grid."""
    def h(m):
        return np.vstack([np.asarray(m), [0.0, 0.0, 1.0]])
    return (np.linalg.inv(h(truth[coarse]["matrix_to_reference"][()]))
            @ h(truth[fine]["matrix_to_reference"][()]))[:2]


def rotation_deg(m: np.ndarray) -> float:
    a = np.asarray(m)[:, :2]
    return math.degrees(math.atan2(a[1, 0] - a[0, 1], a[0, 0] + a[1, 1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--preset", choices=("small", "demo"), default="small",
                    help="phantom sizes (msifusion.phantom.PRESETS); small: 100/25/10 um pixels, "
                         "sections about 20 x 14 coarse px; demo: 80/20/5 um, 32 x 22")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the study and results here")
    a = ap.parse_args(argv)
    tmp = None
    if a.workdir is None:
        tmp = tempfile.TemporaryDirectory()
        workdir = Path(tmp.name)
    else:
        workdir = a.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    chain = ("fticr", "maldi", "tofsims")
    t0 = time.perf_counter()
    summary = generate_study(workdir / "study", preset=a.preset, seed=a.seed, chain=chain,
                             tile_px=20 if a.preset == "small" else 40, n_sections=a.sections)
    cfg = small_config("study/sections.tsv", chain, tile_px=20 if a.preset == "small" else 40)
    cfg["registration"]["min_margin"] = 0.05          # the default
    if a.preset == "demo":
        cfg["modalities"]["tofsims"]["pixel_size_um"] = 5
    cfg["targets"]["mz"] = [float(m) for m in summary["targets_mz"]]
    (workdir / "config").mkdir(exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    targets = [f"results/{s}/transform_{c}_{f}.json" for s in summary["sections"]
               for c, f in zip(chain[:-1], chain[1:])]
    t1 = time.perf_counter()
    snakemake(workdir, *targets)
    t2 = time.perf_counter()
    print(f"{a.sections} sections, preset {a.preset} (seed {a.seed}): study generated in {t1 - t0:.0f} s, workflow up "
          f"to registration in {t2 - t1:.0f} s (2 cores)")
    print(f"{'section':<8s}{'pair':<18s}{'rotation':>10s}{'rot err deg':>13s}{'rms px':>9s}"
          f"{'max px':>9s}{'dice':>7s}{'margin':>8s}{'passed':>8s}  verdict")
    worst = {}
    n_ok = n = 0
    for s in summary["sections"]:
        with h5py.File(summary["truth"][s]) as t:
            for c, f in zip(chain[:-1], chain[1:]):
                doc = json.loads((workdir / "results" / s / f"transform_{c}_{f}.json").read_text())
                m_true = true_fine_to_coarse(t, c, f)
                ys, xs = np.nonzero(t[f]["mask"][()])
                pts = np.stack([xs, ys, np.ones_like(xs)]).astype(float)
                d = np.linalg.norm(np.asarray(doc["matrix_px"]) @ pts - m_true @ pts, axis=0)
                rot_err = abs((rotation_deg(doc["matrix_px"]) - rotation_deg(m_true) + 180) % 360
                              - 180)
                rms, mx = float(np.sqrt((d ** 2).mean())), float(d.max())
                ok = bool(doc["passed"]) and rot_err <= 0.5 and rms <= 0.25
                n, n_ok = n + 1, n_ok + ok
                w = worst.setdefault(f"{f} -> {c}", [0.0, 0.0, 0.0])
                worst[f"{f} -> {c}"] = [max(w[0], rot_err), max(w[1], rms), max(w[2], mx)]
                print(f"{s:<8s}{f + ' -> ' + c:<18s}{rotation_deg(m_true):10.1f}{rot_err:13.3f}"
                      f"{rms:9.3f}{mx:9.3f}{doc['score']:7.3f}{doc['margin']:8.3f}"
                      f"{str(doc['passed']):>8s}  {'OK' if ok else 'WRONG'}")
    print(f"\n{n_ok}/{n} registrations right and passed")
    for pair, (r, rms, mx) in worst.items():
        print(f"{pair}: worst rotation error {r:.3f} deg, worst RMS {rms:.3f} coarse px "
              f"(worst single pixel {mx:.3f})")
    if tmp is not None:
        tmp.cleanup()
    return 0 if n_ok == n else 1


if __name__ == "__main__":
    sys.exit(main())
