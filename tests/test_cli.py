"""Command line: every stage has --help; errors exit non-zero with one message and no output."""

import subprocess
import sys
from pathlib import Path

import pytest

from msifusion.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["convert", "export", "nmf", "degrid", "crop", "register", "fuse", "ions", "ion-image", "spectrum",
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


def test_convert_and_export_round_trip(tmp_path, capsys):
    from imzml_files import random_spectra, write_imzml

    src = write_imzml(tmp_path / "s", random_spectra(6), [(i + 1, 1) for i in range(6)])
    assert main(["convert", str(src), str(tmp_path / "s.h5"), "--threads", "1"]) == 0
    assert '"n_pixels": 6' in capsys.readouterr().out
    assert main(["export", str(tmp_path / "s.h5"), str(tmp_path / "e.imzML"), "--top-n", "2"]) == 0
    assert '"mode": "processed"' in capsys.readouterr().out
    assert (tmp_path / "e.imzML").is_file() and (tmp_path / "e.ibd").is_file()


def test_export_error_exit_status_and_no_output(tmp_path, capsys):
    from imzml_files import random_spectra, write_imzml

    src = write_imzml(tmp_path / "s", random_spectra(3), [(1, 1), (2, 1), (3, 1)])
    assert main(["convert", str(src), str(tmp_path / "s.h5")]) == 0
    before = set(tmp_path.iterdir())
    assert main(["export", str(tmp_path / "s.h5"), str(tmp_path / "e.imzML"),
                 "--mode", "continuous"]) == 1
    err = capsys.readouterr().err
    assert "s.h5: processed data has no shared m/z axis" in err
    assert set(tmp_path.iterdir()) == before
