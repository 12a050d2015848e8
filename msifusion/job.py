"""Job harness: what every Snakemake ``script:`` job does around its step function.

Logging to the rule's ``log:`` file, the thread count of the rule, the outputs checked before the
work (:func:`check_outputs`, also called by every command of :mod:`msifusion.cli` and by the
stages that write next to raw data), one clear message instead of a traceback for the errors
msifusion raises on purpose and for errors of the operating system, and no second attempt of a
job that stopped on an input error (a retry helps a job killed for memory or time, never one
whose input is wrong).

Deliberately light: it imports nothing of the library's stages, so that the code a job depends on
(:mod:`msifusion.codedeps`) is the closure of its step module alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from threadpoolctl import threadpool_limits

from .errors import InputError, MsifusionError

log = logging.getLogger("msifusion.job")

#: Suffix of the marker a job leaves beside its log when it stopped on an input or quality error.
ERROR_MARKER = ".msifusion_error"
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _with_ibd(paths) -> list[Path]:
    """``paths`` and, beside each ``.imzML`` among them, its ``.ibd`` (the name written, and any
    existing file of that name in another letter case)."""
    out = []
    for path in map(Path, paths):
        out.append(path)
        if path.suffix.lower() == ".imzml":
            ibd = path.with_suffix(".ibd")
            out.append(ibd)
            with contextlib.suppress(OSError):
                out += [path.parent / name for name in os.listdir(path.parent)
                        if name.casefold() == ibd.name.casefold() and name != ibd.name]
    return out


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are (or would be, on a case-insensitive file system) one file:
    the same path once links are resolved, letter case ignored, or the same existing file."""
    if os.path.realpath(a).casefold() == os.path.realpath(b).casefold():
        return True
    with contextlib.suppress(OSError):
        return os.path.samefile(a, b)
    return False


def output_error(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be written as an output (None when it can): it is a directory, or
    the nearest existing folder above it is a file or not writable."""
    path = Path(path)
    if path.is_dir():
        return "the output is a directory"
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable"
    return None


def check_outputs(outputs, inputs=()) -> None:
    """Refuse, before any work, outputs that would destroy an input or cannot be written.

    Every command and workflow job calls this first: an output may not be (or resolve to, through
    links or a case-insensitive match) one of its inputs or an input's ``.ibd``; an output
    ``.imzML`` brings its ``.ibd`` along. Each output must be writable (not a directory, in a
    writable folder or one that can be created).

    Parameters
    ----------
    outputs, inputs : iterable of path-like
        None entries are skipped.

    Raises
    ------
    InputError
        Naming the output and the problem.
    """
    outputs = _with_ibd(p for p in outputs if p is not None)
    inputs = _with_ibd(p for p in inputs if p is not None)
    for out in outputs:
        clash = next((inp for inp in inputs if _same_file(out, inp)), None)
        if clash is not None:
            raise InputError(f"{out}: the output would overwrite the input {clash}; choose "
                             "another output path")
        why = output_error(out)
        if why:
            raise InputError(f"{out}: cannot be written: {why}")


def os_error_message(err: OSError) -> str:
    """One line for an operating-system error: the file(s) and the reason."""
    names = [str(n) for n in (err.filename, err.filename2) if n is not None]
    reason = err.strerror or str(err)
    return f"{' -> '.join(names)}: {reason}" if names else reason


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
    ``threads``. Outputs that would overwrite an input or cannot be written stop the job before
    the work (:func:`check_outputs`). An :class:`~msifusion.errors.MsifusionError` (bad input,
    failed quality check)
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
        check_outputs(list(smk.output), list(smk.input))
        with threadpool_limits(threads):
            step(**kwargs)
    except OSError as err:          # not marked: a full disk or a lost mount may be gone next time
        log.error("msifusion error: %s", os_error_message(err))
        sys.exit(1)
    except (MsifusionError, UnicodeError) as err:
        log.error("msifusion error: %s", err)
        if marker is not None:
            marker.write_text(str(err))
        sys.exit(1)
    except Exception:
        log.exception("unexpected error in %s", getattr(step, "__name__", step))
        raise
