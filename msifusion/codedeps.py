"""The code a workflow job runs, derived from its imports (not listed by hand).

Each rule's ``script:`` imports a step module of :mod:`msifusion.steps` (and :mod:`msifusion.job`);
the library modules a job may execute are the transitive closure of those imports inside the
package, found by reading the source (every ``import`` statement anywhere in a module, function
level included, so the closure errs on the side of more). The workflow lists the closure as the
rule's ``code`` input, so editing any module a job runs reruns that job (and nothing else); the
third-party packages of the closure are what the rule's conda environment must provide
(``tests/test_envs.py``).
"""

from __future__ import annotations

import ast
import functools
import os
import sys
from pathlib import Path

PACKAGE = "msifusion"
PACKAGE_DIR = Path(__file__).resolve().parent


def _module_path(dotted: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """The source file of a package module ``msifusion.a.b`` (a module or a package), or None."""
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return None
    base = package_dir.joinpath(*parts[1:])
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def _dotted_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    """``msifusion.a.b`` of a source file of the package."""
    rel = path.resolve().relative_to(package_dir).with_suffix("")
    parts = [PACKAGE, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package_dir: Path = PACKAGE_DIR) -> tuple[set[str], set[str]]:
    """(package modules, other top-level module names) imported anywhere in one source file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    inside = path.resolve().is_relative_to(package_dir)
    here = _dotted_name(path, package_dir) if inside else ""
    is_pkg = path.name == "__init__.py"
    own, other = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base if is_pkg else base[:-1]
                base = base[:len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # "from pkg import name": name may be a submodule
            names = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top == PACKAGE:
                if _module_path(name, package_dir) is not None:
                    own.add(name)
            elif top and top != "__future__":
                other.add(top)
    return own, other


def _with_parents(dotted: str) -> list[str]:
    """A module and the packages above it (importing it runs their ``__init__``)."""
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@functools.lru_cache(maxsize=None)
def _closure(script: Path, package_dir: Path) -> tuple[tuple[Path, ...], frozenset[str]]:
    seen: dict[str, Path] = {}
    third_party: set[str] = set()
    own, other = _imports(script, package_dir)
    third_party |= other
    todo = [m for name in own for m in _with_parents(name)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_path(name, package_dir)
        if path is None:
            continue
        seen[name] = path
        own, other = _imports(path, package_dir)
        third_party |= other
        todo += [m for n in own for m in _with_parents(n) if m not in seen]
    stdlib = set(sys.stdlib_module_names) | {"snakemake"}
    return (tuple(sorted(seen.values())),
            frozenset(t for t in third_party if t not in stdlib))


def module_closure(script: str | os.PathLike, package_dir: str | os.PathLike = PACKAGE_DIR
                   ) -> list[Path]:
    """The package source files a script (or module) may run: its imports within the package,
    transitively, with the ``__init__`` of every package on the way, sorted.

    Parameters
    ----------
    script : path-like
        A workflow script (``scripts/fuse.py``) or any Python source file.
    package_dir : path-like
        The ``msifusion`` package folder the imports resolve to.

    Returns
    -------
    list of pathlib.Path
    """
    return list(_closure(Path(script).resolve(), Path(package_dir).resolve())[0])


def third_party_imports(script: str | os.PathLike, package_dir: str | os.PathLike = PACKAGE_DIR
                        ) -> set[str]:
    """Top-level names of the modules outside the package and the standard library that a script
    or any module of its closure imports (``numpy``, ``sklearn``, ``torch``, ...)."""
    return set(_closure(Path(script).resolve(), Path(package_dir).resolve())[1])
