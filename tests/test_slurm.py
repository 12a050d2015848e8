"""profiles/slurm on a real SLURM cluster: the demo workflow through sbatch equals a local run.

Needs a running cluster that answers sinfo/squeue/sbatch (start a single-node one as root with
`bash .ci/slurm_setup.sh`). Skipped without one, except under CI=true, where it fails instead:
CI starts the cluster (.ci/run) and must never skip this test silently.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from test_workflow import ROOT, setup_study, snakemake

pytestmark = pytest.mark.slow

PROFILE = ROOT / "profiles" / "slurm"
IN_CI = os.environ.get("CI", "").strip().lower() == "true"
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+)")


def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"CI=true and no usable SLURM cluster: {reason}. CI must run this test "
                    "(.ci/run starts the cluster with .ci/slurm_setup.sh)", pytrace=False)
    pytest.skip(f"no usable SLURM cluster: {reason} (start one: sudo bash .ci/slurm_setup.sh)")


def _require_cluster() -> str:
    """The partition the profile submits to, once the cluster answers and it has a usable node."""
    missing = [t for t in ("sbatch", "squeue", "sinfo") if shutil.which(t) is None]
    if missing:
        _unavailable(f"{', '.join(missing)} not on PATH")
    partition = re.search(r'slurm_partition:\s*"?([\w.-]+)', (PROFILE / "config.yaml").read_text())
    partition = partition.group(1) if partition else "main"
    try:
        proc = subprocess.run(["sinfo", "-h", "-p", partition, "-o", "%T"], capture_output=True,
                              text=True, timeout=30)
    except subprocess.TimeoutExpired:
        _unavailable("sinfo did not answer within 30 s")
    states = proc.stdout.split()
    if proc.returncode != 0:
        _unavailable(f"sinfo failed: {proc.stderr.strip()[-300:]}")
    if not any(s.rstrip("*~#$@^-+").lower() in ("idle", "mixed", "allocated", "completing")
               for s in states):
        _unavailable(f"partition {partition!r} has no usable node (sinfo states: {states})")
    return partition


@pytest.fixture(scope="module")
def local_and_slurm_runs(tmp_path_factory):
    """The same small phantom study (FT-ICR, MALDI and tiled ToF-SIMS: every rule of the demo)
    run locally and through profiles/slurm."""
    _require_cluster()
    local = tmp_path_factory.mktemp("local")
    summary, cfg = setup_study(local)
    cluster = tmp_path_factory.mktemp("slurm")
    shutil.copytree(local / "study", cluster / "study")
    shutil.copytree(local / "config", cluster / "config")
    snakemake(local)   # --cores 2
    # the profile as users give it; only the first status query comes sooner than the profile's
    # 20 s (the workflow has ~8 dependent steps of seconds each), and the SLURM logs of successful
    # jobs are kept (the plugin deletes them by default) to be checked below
    proc = snakemake(cluster, "--profile", str(PROFILE),
                     "--slurm-init-seconds-before-status-checks", "5",
                     "--slurm-keep-successful-logs")
    return local, cluster, summary, cfg, proc.stdout + proc.stderr


def test_jobs_went_through_sbatch(local_and_slurm_runs):
    _, cluster, _, _, log = local_and_slurm_runs
    submitted = dict(SUBMITTED.findall(log))   # snakemake job id -> SLURM job id
    assert len(submitted) > 1, log[-3000:]
    slurm_ids = set(submitted.values())
    assert len(slurm_ids) == len(submitted)
    # every job wrote its SLURM log, named by its SLURM job id
    logs = {p.stem: p for p in (cluster / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert slurm_ids <= set(logs), (sorted(slurm_ids - set(logs)), sorted(logs))
    assert all(logs[i].stat().st_size > 0 for i in slurm_ids)
    # and SLURM itself knows them as finished jobs (squeue keeps them for MinJobAge)
    proc = subprocess.run(["squeue", "--states=all", "-h", "-o", "%i|%T", "-j",
                           ",".join(sorted(slurm_ids))], capture_output=True, text=True,
                          timeout=60)
    states = dict(line.split("|", 1) for line in proc.stdout.split())
    if states:   # a cluster with a short MinJobAge may have forgotten them already
        assert set(states.values()) == {"COMPLETED"}, states
    assert not re.search(r"SLURM-job '\d+' failed", log), log[-3000:]


def test_products_equal_local_run(local_and_slurm_runs):
    local, cluster, summary, cfg, _ = local_and_slurm_runs
    n = 0
    for section in summary["sections"]:
        for modality in cfg["chain"][1:]:
            name = Path("results") / section / f"fused_{modality}.h5"
            with h5py.File(local / name) as a, h5py.File(cluster / name) as b:
                datasets = []
                a.visititems(lambda k, v: datasets.append(k) if isinstance(v, h5py.Dataset)
                             else None)
                assert datasets and "maps" in datasets
                other = []
                b.visititems(lambda k, v: other.append(k) if isinstance(v, h5py.Dataset)
                             else None)
                assert sorted(datasets) == sorted(other)
                for key in datasets:
                    x, y = a[key][()], b[key][()]
                    assert x.shape == y.shape and x.dtype == y.dtype, key
                    if np.issubdtype(x.dtype, np.floating):
                        np.testing.assert_allclose(y, x, rtol=1e-6, atol=0, equal_nan=True,
                                                   err_msg=f"{name}:{key}")
                    else:
                        np.testing.assert_array_equal(y, x, err_msg=f"{name}:{key}")
                    n += 1
    assert n >= 2 * len(summary["sections"])
    table = (local / "results" / "evaluation.tsv").read_text()
    assert table.strip() and (cluster / "results" / "evaluation.tsv").read_text() == table
