"""The code each rule runs and what its environment must provide, derived from the imports.

Conda channels are not reachable here, so ``--sdm conda`` cannot be run in the tests; instead the
imports of every rule's script (its closure within the package, msifusion.codedeps) are checked
against the rule's ``envs/*.yaml`` and against the package's own dependencies (pyproject.toml).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from msifusion.codedeps import module_closure, third_party_imports

ROOT = Path(__file__).resolve().parents[1]

#: import name -> conda-forge package name
CONDA = {"numpy": "numpy", "scipy": "scipy", "h5py": "h5py", "yaml": "pyyaml",
         "jsonschema": "jsonschema", "sklearn": "scikit-learn", "skimage": "scikit-image",
         "torch": "pytorch", "matplotlib": "matplotlib-base", "mpl_toolkits": "matplotlib-base",
         "tifffile": "tifffile", "imagecodecs": "imagecodecs", "PIL": "pillow",
         "tensorly": "tensorly", "sparse": "sparse",
         "threadpoolctl": "threadpoolctl", "pyimzml": "pyimzml"}
#: import name -> PyPI distribution name
PYPI = dict(CONDA, torch="torch", matplotlib="matplotlib", mpl_toolkits="matplotlib")


def rule_blocks() -> dict[str, str]:
    """{rule name: its text} of every rule in rules/*.smk."""
    blocks = {}
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        parts = re.split(r"^rule (\w+):\n", smk.read_text(), flags=re.M)
        blocks.update(dict(zip(parts[1::2], parts[2::2])))
    return blocks


def script_rules() -> list[tuple[str, str, str | None]]:
    """(rule, script name, conda env file or None) of every rule with a ``script:``."""
    out = []
    for rule, text in rule_blocks().items():
        script = re.search(r'script:\s*\n\s*"\.\./scripts/(\w+)\.py"', text)
        if script is None:
            continue
        env = re.search(r'conda:\s*\n\s*"\.\./(envs/[\w.-]+\.yaml)"', text)
        out.append((rule, script.group(1), env.group(1) if env else None))
    return out


def env_packages(env_file: str) -> dict[str, str]:
    """{package: version spec} of a conda environment file."""
    doc = yaml.safe_load((ROOT / env_file).read_text())
    packages = {}
    for dep in doc["dependencies"]:
        assert isinstance(dep, str), f"{env_file}: pip sections are not used ({dep})"
        name, _, version = dep.partition("=")
        packages[name.strip()] = version.strip()
    return packages


RULES = script_rules()


def test_every_rule_with_a_script_has_an_env_and_derived_code_inputs():
    """Every script rule names a conda env and lists its code as ``code("<its script>")``, the
    import closure (rules/common.smk code), never a hand-written module list."""
    assert len(RULES) >= 13
    blocks = rule_blocks()
    for rule, script, env in RULES:
        assert env is not None, f"rule {rule} has no conda env"
        assert f'code=code("{script}")' in blocks[rule], f"rule {rule}: code is not derived"
    text = "".join(p.read_text() for p in (ROOT / "rules").glob("*.smk"))
    assert "lib(" not in text


@pytest.mark.parametrize("rule, script, env", RULES, ids=[r[0] for r in RULES])
def test_env_provides_every_import_of_the_job(rule, script, env):
    """The rule's env holds a conda package for every third-party module its job can import
    (found in the source of its whole closure, function-level imports included), plus a pinned
    Python."""
    packages = env_packages(env)
    assert packages.get("python", "").startswith("3.11"), f"{env}: python not pinned to 3.11"
    needed = third_party_imports(ROOT / "scripts" / f"{script}.py")
    unknown = sorted(needed - set(CONDA))
    assert not unknown, f"rule {rule}: no conda package known for imports {unknown}"
    missing = sorted({CONDA[m] for m in needed} - set(packages))
    assert not missing, f"rule {rule} ({env}) lacks {missing} for {sorted(needed)}"
    unpinned = sorted(p for p in packages if not packages[p])
    assert not unpinned, f"{env}: unpinned packages {unpinned}"


def test_package_dependencies_cover_every_import():
    """pyproject.toml lists every third-party module the package imports anywhere."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0].lower() for d in deps}
    needed = set()
    for path in (ROOT / "msifusion").rglob("*.py"):
        needed |= third_party_imports(path)
    missing = sorted({PYPI.get(m, m) for m in needed} - names)
    assert not missing, f"pyproject.toml lacks {missing}"


@pytest.mark.parametrize("script", sorted({s for _, s, _ in RULES}))
def test_static_closure_holds_what_the_job_imports(script):
    """What importing a job's modules really loads (in a fresh interpreter) is inside the static
    closure: the derived code inputs miss nothing a job runs at import time."""
    text = (ROOT / "scripts" / f"{script}.py").read_text()
    imports = "\n".join(line for line in text.splitlines() if line.startswith("from msifusion"))
    probe = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{imports}\n"
             "print('\\n'.join(m.__file__ for n, m in sys.modules.items() "
             "if n.startswith('msifusion') and getattr(m, '__file__', None)))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    loaded = {Path(p).resolve() for p in out}
    closure = set(module_closure(ROOT / "scripts" / f"{script}.py"))
    assert loaded and loaded <= closure, sorted(map(str, loaded - closure))


def test_closure_follows_lazy_imports_and_stays_narrow():
    """The fuse job's code includes what fuse_step calls through other modules (affine,
    products, evaluate, spectra, register: an edit of affine.py reruns the fusion), and the
    conversion's code none of the later stages (an edit of products.py does not reconvert)."""
    names = lambda script: {p.relative_to(ROOT / "msifusion").as_posix()   # noqa: E731
                            for p in module_closure(ROOT / "scripts" / f"{script}.py")}
    fuse = names("fuse")
    assert {"affine.py", "products.py", "evaluate.py", "spectra.py", "register.py", "fuse.py",
            "steps/fuse.py", "steps/__init__.py", "__init__.py", "job.py"} <= fuse
    convert = names("convert")
    assert {"convert.py", "imzml.py", "store.py"} <= convert
    assert not convert & {"products.py", "fuse.py", "register.py", "nmf.py", "figures.py",
                          "degrid.py", "config.py"}
    assert "nmf.py" not in names("crop") and "products.py" not in names("nmf")
