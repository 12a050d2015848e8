"""Exact partial reruns and resuming an interrupted run (issue 8).

One small phantom study is run once (module fixture) with a copy of the workflow inside its folder
(so that editing a script never touches the repository, and the repository being edited meanwhile
never touches the run); every test works on a copy of that folder (``copytree`` keeps the
modification times), changes one thing, and checks from a dry run and from the modification times of
the results and logs exactly which jobs ran again.

What Snakemake 9 reruns (default ``--rerun-triggers mtime params input software-env code``): a job
whose params (the ``tracked`` dict of ``named`` in rules/common.smk), set of input paths or script
changed, or whose input is newer than its output; and then every job downstream of it, whatever the
new content of the files (it does not compare the regenerated outputs before scheduling them).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from test_workflow import ROOT, SNAKEMAKE, job_counts, setup_study, snakemake

pytestmark = pytest.mark.slow

WORKFLOW = ("Snakefile", "rules", "scripts", "msifusion", "envs", "report")
NOTHING = "Nothing to be done"
SECTIONS = ("s01", "s02")


# ----------------------------------------------------------------------------------- helpers
def copy_workflow(dest: Path) -> None:
    """The workflow (Snakefile, rules, scripts, the msifusion library, envs, report) into dest."""
    for name in WORKFLOW:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)


def run(workdir: Path, *args, check=True):
    """snakemake (test_workflow's helper) with the workflow copy inside ``workdir`` (the last
    ``--snakefile`` given wins)."""
    return snakemake(workdir, "--snakefile", str(workdir / "Snakefile"), *args, check=check)


def dry(workdir: Path, *args) -> str:
    proc = run(workdir, "-n", *args)
    return proc.stdout + proc.stderr


def snapshot(workdir: Path) -> dict[str, int]:
    """{path: st_mtime_ns} of every file under results/ and logs/."""
    out = {}
    for top in ("results", "logs"):
        for path in (workdir / top).rglob("*"):
            if path.is_file():
                out[str(path.relative_to(workdir))] = path.stat().st_mtime_ns
    return out


def changed(before: dict[str, int], after: dict[str, int]) -> set[str]:
    return {p for p in set(before) | set(after) if before.get(p) != after.get(p)}


_OWNERS = [  # results file -> the job that writes it ("rule/wildcards", as its log path)
    (r"results/benchmarks/(.+)\.tsv", r"\1"),
    (r"results/converted/(\w+)/degrid/([\w.-]+?)(?:_qc\.png|\.json|\.h5)",
     r"degrid_converted/\1/\2"),
    (r"results/converted/(\w+)/([\w.-]+)\.h5", r"convert/\1/\2"),
    (r"results/nmf/(\w+)\.axis\.h5", r"mz_axis/\1"),
    (r"results/nmf/\w+\.targets\.json", "check_targets"),
    (r"results/nmf/(\w+)(?:\.degrid\.h5|\.degrid\.json|\.degrid_qc\.png|_components\.degrid\.png)",
     r"degrid/\1"),
    (r"results/nmf/(\w+)(?:\.h5|_components\.png)", r"nmf/\1"),
    (r"results/([\w.-]+)/maps_(\w+)\.h5", r"crop/\1/\2"),
    (r"results/([\w.-]+)/(?:transform|qc)_(\w+_\w+)\.(?:json|png)", r"register/\1/\2"),
    (r"results/([\w.-]+)/ions_\w+\.h5", r"ion_images/\1"),
    (r"results/([\w.-]+)/(?:fused_\w+\.h5|fusion\.json)", r"fuse/\1"),
    (r"results/([\w.-]+)/(?:ion|roi)_.+", r"products/\1"),
    (r"results/evaluation\.tsv", "evaluate"),
    (r"results/registration\.tsv", "registration_summary"),
    (r"logs/(.+)\.log", r"\1"),
]


def owner(path: str) -> str:
    for pattern, job in _OWNERS:
        m = re.fullmatch(pattern, path)
        if m:
            return m.expand(job)
    raise AssertionError(f"no job writes {path}")


def check_reran(before: dict[str, int], after: dict[str, int], expected: set[str]) -> None:
    """Exactly the ``expected`` jobs ran again: each of their files (outputs, benchmark, log) has a
    new modification time, and no other file has."""
    diff = changed(before, after)
    assert {owner(p) for p in diff} == expected, sorted(diff)
    stale = sorted(p for p in before if owner(p) in expected and p not in diff)
    assert not stale, f"files of rerun jobs not rewritten: {stale}"


def counts_of(jobs: set[str]) -> dict[str, int]:
    counts = {"all": 1}
    for job in jobs:
        rule = job.split("/")[0]
        counts[rule] = counts.get(rule, 0) + 1
    return counts


def change_and_rerun(work: Path, change, expected: set[str], *args) -> str:
    """Apply ``change``, check the dry run's job stats, run, and check the modification times."""
    before = snapshot(work)
    time.sleep(1.1)   # a new modification time for anything written from now on
    change()
    out = dry(work, *args)
    assert job_counts(out) == counts_of(expected), out[-3000:]
    run(work, *args)
    check_reran(before, snapshot(work), expected)
    assert NOTHING in dry(work, *args)
    return out


def write_config(work: Path, cfg: dict, **dump) -> None:
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, **dump))


DOWNSTREAM_OF_FUSE = {f"{rule}/{s}" for rule in ("fuse", "products") for s in SECTIONS} | {"evaluate"}


# ----------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("reruns") / "base"
    base.mkdir()
    copy_workflow(base)
    summary, cfg = setup_study(base)
    assert summary["sections"] == list(SECTIONS)
    run(base)
    assert NOTHING in dry(base)
    return base, summary, cfg


@pytest.fixture
def case(base_run, tmp_path):
    """A copy of the finished study in a new folder (a moved project: nothing must rerun)."""
    base, summary, cfg = base_run
    work = tmp_path / "study_copy"
    shutil.copytree(base, work, symlinks=True)
    assert NOTHING in dry(work)
    return work, summary, copy.deepcopy(cfg)


# ------------------------------------------------------------------------------- partial reruns
def test_fusion_parameter_reruns_fusion_and_what_follows(case):
    work, _, cfg = case
    cfg["fusion"]["n_components"] = 6
    change_and_rerun(work, lambda: write_config(work, cfg, sort_keys=False), DOWNSTREAM_OF_FUSE)


def test_nmf_rank_reruns_that_modality_only(case):
    """tofsims rank 8 -> 10: its NMF, grid removal, crops, the registrations it is part of, and
    what follows; never a conversion, an m/z axis or another modality's NMF. (A value hidden among
    equal values, which Snakemake's own record misses, is the dilation case of
    test_same_config_spelled_differently_reruns_nothing.)"""
    work, _, cfg = case
    cfg["modalities"]["tofsims"]["nmf"]["rank"] = 10
    expected = {"nmf/tofsims", "degrid/tofsims", "registration_summary"} | DOWNSTREAM_OF_FUSE
    expected |= {f"crop/{s}/tofsims" for s in SECTIONS}
    expected |= {f"register/{s}/maldi_tofsims" for s in SECTIONS}
    change_and_rerun(work, lambda: write_config(work, cfg, sort_keys=False), expected)


def test_section_roi_reruns_that_section_only(case):
    work, _, _ = case
    sheet = work / "study" / "sections.tsv"
    rows = [r.split("\t") for r in sheet.read_text().splitlines()]
    (row,) = [r for r in rows if r[0] == "s01" and r[1] == "fticr"]
    x0, x1, y0, y1 = (int(v) for v in re.split("[:,]", row[3]))
    row[3] = f"{x0 - 1}:{x1},{y0 - 1}:{y1}"

    def change():
        sheet.write_text("\n".join("\t".join(r) for r in rows) + "\n")

    expected = {"crop/s01/fticr", "ion_images/s01", "register/s01/fticr_maldi", "registration_summary",
                "fuse/s01", "products/s01", "evaluate"}
    change_and_rerun(work, change, expected)


def test_edited_script_and_library(case):
    """An edited script (scripts/fuse.py, mtime newer than the outputs): its rule's jobs rerun, then
    everything downstream (Snakemake schedules it before the new outputs exist, whatever they
    hold). An edited library module reruns every rule whose job can run it: the import closure
    of the rule's script (rules/common.smk code, msifusion.codedeps), not a hand-written list.
    affine.py is run by the registration (register.py), the fusion and the products (it used to
    rerun nothing); products.py by the fusion (write_fused), the products and the evaluation."""
    work, _, _ = case
    script = work / "scripts" / "fuse.py"

    def change():
        with open(script, "a") as fh:
            fh.write("# edited\n")

    out = change_and_rerun(work, change, DOWNSTREAM_OF_FUSE)
    assert out.count("reason: Code has changed since last execution") == len(SECTIONS), out
    assert "Input files updated by another job" in out
    time.sleep(1.1)
    with open(work / "msifusion" / "products.py", "a") as fh:
        fh.write("# edited\n")
    out = dry(work)
    assert job_counts(out) == counts_of(DOWNSTREAM_OF_FUSE), out[-3000:]
    assert "Updated input files: msifusion/products.py" in out
    with open(work / "msifusion" / "affine.py", "a") as fh:
        fh.write("# edited\n")
    out = dry(work)
    expected = DOWNSTREAM_OF_FUSE | {"registration_summary"}
    expected |= {f"register/{s}/{pair}" for s in SECTIONS for pair in ("fticr_maldi", "maldi_tofsims")}
    assert job_counts(out) == counts_of(expected), out[-3000:]
    assert "msifusion/affine.py" in out


def test_same_config_spelled_differently_reruns_nothing(case):
    """Reordered keys, another YAML style, integral numbers written as floats, the same values
    through --config (also nested: snakemake reads those as strings), the sheet and truth folder by
    absolute path: nothing to be done. A real change hidden among equal values still reruns."""
    work, _, cfg = case

    def reordered(value):
        if isinstance(value, dict):
            return {k: reordered(value[k]) for k in reversed(list(value))}
        return value

    write_config(work, reordered(cfg), sort_keys=False, default_flow_style=True)
    assert NOTHING in dry(work)
    floats = copy.deepcopy(cfg)
    floats["seed"] = 0.0
    floats["modalities"]["tofsims"]["pixel_size_um"] = 10.0
    floats["modalities"]["maldi"]["nmf"]["rank"] = 8.0
    write_config(work, floats, sort_keys=True)
    assert NOTHING in dry(work)
    for args in (["seed=0"], ["seed=0.0"], ["tissue={dilation_px: 0, min_size_px: 4}"],
                 ["fusion={n_components: 10, scales_px: [0, 1.0, 2, 4]}"],
                 ["registration={mirror: false}"],
                 [f"sections={work / 'study' / 'sections.tsv'}"], ["sections=./study/sections.tsv"],
                 [f"evaluation={{truth: {work / 'study' / 'truth'}/}}"]):
        out = dry(work, "--config", *args)
        assert NOTHING in out, (args, out[-3000:])
    # dilation_px 0 -> 4: 0 stays the seed's value and 4 is min_size_px's; still noticed
    out = dry(work, "--config", "tissue={dilation_px: 4, min_size_px: 4}")
    assert job_counts(out)["crop"] == 3 * len(SECTIONS), out[-3000:]


# --------------------------------------------------------------------------- interrupted run
def incomplete_outputs(workdir: Path) -> set[str]:
    """Outputs that Snakemake marked as being written (.snakemake/incomplete, file backend)."""
    folder = workdir / ".snakemake" / "incomplete"
    out = set()
    for path in folder.rglob("*") if folder.exists() else []:
        if path.is_file() and path.name != "migration_underway":
            parts = path.relative_to(folder).parts
            key = "".join(p.removeprefix("@") for p in parts)
            out.add(base64.urlsafe_b64decode(key).decode())
    return out


def fused_arrays(workdir: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for path in sorted((workdir / "results").glob("*/fused_*.h5")):
        with h5py.File(path) as f:
            f.visititems(lambda name, obj: arrays.__setitem__(
                f"{path.parent.name}/{path.name}:{name}", obj[()]) if isinstance(obj, h5py.Dataset)
                else None)
    return arrays


def test_interrupted_run_resumes_with_rerun_incomplete(base_run, tmp_path):
    """SIGKILL to snakemake's process group while a fuse job writes its products (its temporary
    file exists; or, when no write was caught, while the next fuse job computes). Then: the lock is
    left (--unlock), a half-written output is refused until --rerun-incomplete, and that run gives
    the products of the uninterrupted run and leaves no temporary file."""
    base, _, _ = base_run
    work = tmp_path / "killed"
    shutil.copytree(base, work, symlinks=True)
    before = snapshot(work)
    time.sleep(1.1)
    log = open(tmp_path / "killed_run.log", "w")
    proc = subprocess.Popen([SNAKEMAKE, "-s", str(work / "Snakefile"), "-d", str(work), "--cores",
                             "2", "--forcerun", "fuse"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    killed, parts, seen, finished = None, [], set(), set()
    try:
        deadline = time.monotonic() + 600
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            marked = incomplete_outputs(work)
            for s in SECTIONS:
                job_log = work / "logs" / "fuse" / f"{s}.log"
                running = (f"results/{s}/fusion.json" in marked and job_log.exists()
                           and job_log.stat().st_mtime_ns != before[f"logs/fuse/{s}.log"])
                if running:
                    seen.add(s)
                    parts = list((work / "results" / s).glob(".*.part"))
                    if parts or finished:
                        os.killpg(proc.pid, signal.SIGKILL)
                        killed = s
                        break
                elif s in seen:
                    finished.add(s)
            time.sleep(0.002)
    finally:
        if proc.poll() is None and killed is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert killed, ("the fuse jobs finished before the run could be interrupted:\n"
                    + (tmp_path / "killed_run.log").read_text()[-3000:])
    assert proc.returncode == -signal.SIGKILL
    time.sleep(0.5)   # let the killed processes go
    outputs = {f"results/{killed}/fused_{m}.h5" for m in ("maldi", "tofsims")}
    outputs.add(f"results/{killed}/fusion.json")
    assert outputs <= incomplete_outputs(work)
    # snakemake removed the old outputs before the job; atomic writes: one that exists (written
    # before the kill) is whole
    for rel in outputs:
        if (work / rel).exists() and rel.endswith(".h5"):
            with h5py.File(work / rel) as f:
                assert f["maps"].shape[0] > 0 and f["spectra"].shape[0] == f["maps"].shape[0]
        elif (work / rel).exists():
            json.loads((work / rel).read_text())
    if parts:
        assert list((work / "results").rglob(".*.part")), "the killed write left no temporary file"
    proc = run(work, check=False)
    assert proc.returncode != 0 and "--unlock" in proc.stdout + proc.stderr
    # an output left half-written (by a writer that is not atomic): refused until rerun
    (work / f"results/{killed}/fusion.json").write_text('{"levels": [')
    proc = run(work, "-n", check=False)
    assert proc.returncode != 0
    assert "IncompleteFilesException" in proc.stdout + proc.stderr
    run(work, "--unlock")
    run(work, "--rerun-incomplete")
    assert not list((work / "results").rglob("*.part")), "temporary files left behind"
    assert not incomplete_outputs(work)
    assert NOTHING in dry(work)
    want, got = fused_arrays(base), fused_arrays(work)
    assert got.keys() == want.keys() and len(got) >= 2 * len(SECTIONS)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    for rel in ("results/evaluation.tsv", f"results/{killed}/fusion.json"):
        assert (work / rel).read_text() == (base / rel).read_text(), rel
