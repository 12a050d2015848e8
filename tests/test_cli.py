"""Command line: every stage has --help; errors exit non-zero with one message and no output."""

import re
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


# --------------------------------------------------------------------------------------------------
# bad inputs that used to get through (issue 17)
# --------------------------------------------------------------------------------------------------

def _digest(*paths):
    import hashlib

    return [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths]


def _one_error_line(capsys, *expected):
    log = re.compile(r"\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")   # progress lines of the logger
    err = "\n".join(ln for ln in capsys.readouterr().err.splitlines() if not log.match(ln))
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


def test_outputs_never_overwrite_inputs(tmp_path, capsys):
    """convert IN.imzML IN.imzML / IN.ibd (any letter case, through a link) and export OUT.h5
    SOURCE.imzML used to replace the raw data and exit 0."""
    from imzml_files import random_spectra, write_imzml

    src = write_imzml(tmp_path / "s", random_spectra(4), [(i + 1, 1) for i in range(4)])
    ibd = src.with_suffix(".ibd")
    before = _digest(src, ibd)
    (tmp_path / "link.imzML").symlink_to(src)
    for out in (src, ibd, tmp_path / "s.IBD", tmp_path / "link.imzML"):
        assert main(["convert", str(src), str(out)]) == 1
        _one_error_line(capsys, "the output would overwrite the input")
    assert main(["convert", str(src), str(tmp_path / "s.h5")]) == 0
    capsys.readouterr()
    for out in (src, tmp_path / "S.imzML"):
        assert main(["export", str(tmp_path / "s.h5"), str(out)]) == 1
        _one_error_line(capsys, "the output would overwrite the input", "s.imzML")
    assert main(["export", str(tmp_path / "s.h5"), str(tmp_path / "s.h5")]) == 1
    assert _digest(src, ibd) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.imzML", "s.h5", "s.ibd",
                                                          "s.imzML"]


def test_os_errors_are_one_line_before_the_work(tmp_path, capsys, monkeypatch):
    """An output that is a directory, one below a file or in a read-only folder, a config or
    sheet that is a directory: one line naming the file, exit 1, nothing left behind, and the
    conversion never started."""
    import os

    import msifusion.convert
    from imzml_files import random_spectra, write_imzml

    src = write_imzml(tmp_path / "s", random_spectra(3), [(1, 1), (2, 1), (3, 1)])
    monkeypatch.setattr(msifusion.convert, "read_index", None)     # the work would fail loudly
    (tmp_path / "dir.h5").mkdir()
    readonly = tmp_path / "ro"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != readonly
                        and real_access(p, mode, **kw))
    cases = [(tmp_path / "dir.h5", "dir.h5: cannot be written: the output is a directory"),
             (src / "x.h5", "s.imzML is a file, not a folder"),
             (readonly / "sub" / "x.h5", f"the folder {readonly} is not writable")]
    before = set(tmp_path.rglob("*"))
    for out, text in cases:
        assert main(["convert", str(src), str(out)]) == 1
        _one_error_line(capsys, text)
    assert set(tmp_path.rglob("*")) == before
    assert main(["validate", str(tmp_path / "dir.h5")]) == 1
    _one_error_line(capsys, "dir.h5: the config file is a directory")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"sections: {tmp_path / 'dir.h5'}\nchain: [a, b]\n"
                   "modalities: {a: {}, b: {}}\n")
    assert main(["validate", str(cfg)]) == 1
    _one_error_line(capsys, "dir.h5: the sections sheet is a directory")
    cfg.write_bytes(b"sections: s\xe9.tsv\n")
    assert main(["validate", str(cfg)]) == 1
    _one_error_line(capsys, "c.yaml: the config file is not UTF-8 text")


def test_unwritable_output_stops_nmf_before_the_work(tmp_path, capsys, monkeypatch):
    """An NMF output (or figure) that cannot be written used to fail after the NMF had run."""
    import msifusion.steps.axis

    def never(*_a, **_k):
        raise AssertionError("the work started")

    monkeypatch.setattr(msifusion.steps.axis, "axis_step", never)
    (tmp_path / "file").write_text("")
    (tmp_path / "in.h5").write_text("")
    assert main(["nmf", str(tmp_path / "in.h5"), str(tmp_path / "file" / "nmf.h5")]) == 1
    _one_error_line(capsys, "file/nmf.h5: cannot be written")
    assert main(["nmf", str(tmp_path / "in.h5"), str(tmp_path / "nmf.h5"), "--figure",
                 str(tmp_path / "file" / "f.png")]) == 1
    _one_error_line(capsys, "f.png: cannot be written")
    assert main(["nmf", str(tmp_path / "in.h5"), str(tmp_path / "in.h5")]) == 1
    _one_error_line(capsys, "the output would overwrite the input")


def test_three_d_file_refused_by_convert(tmp_path, capsys):
    from imzml_files import random_spectra, write_imzml

    coords = [(x, y, z) for z in (1, 2) for y in (1, 2, 3) for x in (1, 2, 3)]
    src = write_imzml(tmp_path / "z", random_spectra(18), coords)
    assert main(["convert", str(src), str(tmp_path / "z.h5")]) == 1
    _one_error_line(capsys, "z.imzML: 2 z planes (z = 1, 2); msifusion images one 2-D plane")
    assert not (tmp_path / "z.h5").exists()
