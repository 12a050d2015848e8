"""The job harness: one clear message for msifusion's errors, and no retry of an input error."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from msifusion.errors import InputError
from msifusion.job import error_marker, remove_error_markers, run_job


def fake_job(tmp_path, threads=1):
    """What run_job reads of Snakemake's ``snakemake`` object."""
    return SimpleNamespace(log=[str(tmp_path / "logs" / "rule" / "job.log")], threads=threads,
                           input=[], output=[])


def test_input_error_is_not_retried(tmp_path):
    """Attempt 1 stops on an InputError (exit 1, one message, a marker beside the log); the
    retry Snakemake makes (``retries:`` is for memory and time limits) stops at once with the
    same message, without running the step again; a new run (onstart) removes the marker."""
    calls = []

    def step():
        calls.append(1)
        raise InputError("ion image: no m/z within 5 ppm of 760.5851")

    job = fake_job(tmp_path)
    with pytest.raises(SystemExit) as first:
        run_job(job, step)
    assert first.value.code == 1 and calls == [1]
    marker = error_marker(job.log[0])
    assert "760.5851" in marker.read_text()
    with pytest.raises(SystemExit) as second:
        run_job(job, step)
    assert second.value.code == 1 and calls == [1]
    log = open(job.log[0]).read()
    assert "not retried" in log and "760.5851" in log
    assert remove_error_markers(tmp_path / "logs") == [marker] and not marker.exists()
    with pytest.raises(SystemExit):
        run_job(job, step)
    assert calls == [1, 1]


def test_unexpected_errors_are_retried_and_raise(tmp_path):
    """A crash that is not msifusion's own (a MemoryError, ...) keeps its traceback and leaves no
    marker: a retry may help."""
    job = fake_job(tmp_path)

    def step():
        raise MemoryError("Unable to allocate")

    with pytest.raises(MemoryError):
        run_job(job, step)
    assert not error_marker(job.log[0]).exists()


def test_threads_reach_blas_and_torch(tmp_path, monkeypatch):
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    seen = {}

    def step():
        from threadpoolctl import threadpool_info

        seen["env"] = os.environ["OMP_NUM_THREADS"]
        seen["blas"] = {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    run_job(fake_job(tmp_path, threads=1), step)
    assert seen["env"] == "1" and seen["blas"] <= {1}


def test_outputs_checked_before_the_step(tmp_path):
    """A job whose output is (a link to) one of its inputs or an input's .ibd, or cannot be
    written, stops before its step runs, with one message (issue 17)."""
    calls = []
    raw = tmp_path / "a.imzML"
    raw.write_text("raw")
    raw.with_suffix(".ibd").write_text("raw")
    (tmp_path / "file").write_text("")
    for output in (raw, tmp_path / "a.ibd", tmp_path / "file" / "out.h5"):
        job = fake_job(tmp_path)
        job.input, job.output = [str(raw)], [str(output)]
        with pytest.raises(SystemExit) as info:
            run_job(job, lambda: calls.append(1))
        assert info.value.code == 1 and calls == []
        log = open(job.log[0]).read()
        assert "msifusion error" in log and str(output) in log and "Traceback" not in log
        remove_error_markers(tmp_path / "logs")
    assert raw.read_text() == "raw" and raw.with_suffix(".ibd").read_text() == "raw"


def test_os_error_is_one_line_and_not_marked(tmp_path):
    job = fake_job(tmp_path)

    def step():
        open(tmp_path / "no" / "such" / "file.txt")

    with pytest.raises(SystemExit) as info:
        run_job(job, step)
    log = open(job.log[0]).read()
    assert info.value.code == 1 and "Traceback" not in log
    assert f"msifusion error: {tmp_path / 'no' / 'such' / 'file.txt'}: No such file" in log
    assert not error_marker(job.log[0]).exists()
