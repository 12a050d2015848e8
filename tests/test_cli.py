"""Command line: every stage has --help; errors exit non-zero with one message and no output."""

import subprocess
import sys
from pathlib import Path

import pytest

from msifusion.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["convert", "nmf", "degrid", "crop", "register", "fuse", "ion-image", "spectrum",
          "phantom", "evaluate", "validate"]


def test_every_stage_has_help(capsys):
    parser = build_parser()
    for stage in STAGES:
        with pytest.raises(SystemExit) as info:
            parser.parse_args([stage, "--help"])
        assert info.value.code == 0
        assert "usage: msifusion " + stage in capsys.readouterr().out


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "msifusion", "--help"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0
    for stage in STAGES:
        assert stage in proc.stdout


def test_convert_error_exit_status_and_no_output(tmp_path, capsys):
    bad = tmp_path / "broken.imzML"
    bad.write_text("this is not xml")
    out = tmp_path / "out.h5"
    assert main(["convert", str(bad), str(out)]) == 1
    err = capsys.readouterr().err
    assert "broken.imzML" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".out.h5*"))


def test_validate_reports_bad_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sections: s.tsv\nchain: [a]\nmodalities: {a: {}}\n")
    assert main(["validate", str(cfg)]) == 1
    assert "key 'chain'" in capsys.readouterr().err
