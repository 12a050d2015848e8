"""Job harness: what every Snakemake ``script:`` job does around its step function.

Logging to the rule's ``log:`` file, the thread count of the rule, one clear message instead of a
traceback for the errors msifusion raises on purpose, and no second attempt of a job that stopped on
such an error (a retry helps a job killed for memory or time, never one whose input is wrong).

Deliberately light: it imports nothing of the library's stages, so that the code a job depends on
(:mod:`msifusion.codedeps`) is the closure of its step module alone.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from threadpoolctl import threadpool_limits

from .errors import MsifusionError

log = logging.getLogger("msifusion.job")

#: Suffix of the marker a job leaves beside its log when it stopped on an input or quality error.
ERROR_MARKER = ".msifusion_error"
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def setup_logging(log_file: str | None = None, level: int = logging.INFO) -> None:
    """Log ``msifusion.*`` progress to stderr and, when given, to ``log_file``."""
    root = logging.getLogger("msifusion")
    root.setLevel(level)
    root.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)


def script_params(smk) -> dict:
    """A Snakemake job's params for the step function: without ``tracked``, the by-name copy of
    all of them that the rules add so that Snakemake notices any change (``named`` in
    ``rules/common.smk``)."""
    return {name: value for name, value in smk.params.items() if name != "tracked"}


def error_marker(log_file: str | os.PathLike) -> Path:
    """The marker file of a job whose log is ``log_file``."""
    return Path(f"{log_file}{ERROR_MARKER}")


def remove_error_markers(folder: str | os.PathLike = "logs") -> list[Path]:
    """Remove the markers of earlier runs (the workflow's ``onstart``): a new run tries every job
    again, once. Returns the files removed."""
    removed = []
    folder = Path(folder)
    for path in folder.rglob(f"*{ERROR_MARKER}") if folder.is_dir() else []:
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def run_job(smk, step, **kwargs) -> None:
    """Run a pipeline step inside a Snakemake ``script:`` job.

    Logs go to the rule's ``log:`` file and to stderr; numpy's BLAS and torch use the rule's
    ``threads``. An :class:`~msifusion.errors.MsifusionError` (bad input, failed quality check)
    ends the job with one clear message instead of a traceback and leaves a marker beside the log,
    so that Snakemake's retry of the job (``retries:``, meant for jobs killed for memory or time)
    stops at once with that message instead of redoing the work; the workflow removes the
    markers when a new run starts.
    """
    log_file = smk.log[0] if len(smk.log) else None
    setup_logging(log_file)
    threads = max(1, int(getattr(smk, "threads", 1)))
    for var in _THREAD_VARIABLES:           # torch reads these when it is first imported
        os.environ[var] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    marker = error_marker(log_file) if log_file else None
    if marker is not None and marker.is_file():
        log.error("msifusion error (not retried: the first attempt stopped on it, and a retry "
                  "cannot change an input): %s", marker.read_text())
        sys.exit(1)
    try:
        with threadpool_limits(threads):
            step(**kwargs)
    except MsifusionError as err:
        log.error("msifusion error: %s", err)
        if marker is not None:
            marker.write_text(str(err))
        sys.exit(1)
    except Exception:
        log.exception("unexpected error in %s", getattr(step, "__name__", step))
        raise
