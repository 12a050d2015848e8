"""Config schema, sections sheet and ROI checks: every bad input names the key or file and row."""

from pathlib import Path

import pytest
import yaml

from msifusion.config import (file_id, load_config, load_study, parse_roi, read_sections,
                              validate_config)
from msifusion.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def base_config(sheet="sections.tsv"):
    return {"sections": str(sheet), "chain": ["fticr", "maldi"],
            "modalities": {"fticr": {}, "maldi": {"pixel_size_um": 10}}}


def touch_imzml(folder: Path, name: str) -> Path:
    p = folder / name
    p.write_text("<mzML/>")
    p.with_suffix(".ibd").write_bytes(b"\0" * 16)
    return p


def write_sheet(path: Path, rows):
    path.write_text("section\tmodality\timzml\troi\n" + "".join("\t".join(r) + "\n" for r in rows))
    return path


def test_defaults_filled_and_shipped_config_valid():
    cfg = validate_config(base_config())
    assert cfg["modalities"]["fticr"]["nmf"]["rank"] == 40
    assert cfg["modalities"]["maldi"]["binning"] == {"mode": "ppm", "ppm": 10, "min_pixels": 1}
    assert cfg["fusion"]["method"] == "ridge" and cfg["seed"] == 0
    shipped = load_config(ROOT / "config" / "config.yaml")
    assert shipped["chain"][0] == "fticr" and shipped["sections"] == "config/sections.tsv"


@pytest.mark.parametrize("mutate, key", [
    (lambda c: c.update(chain=["fticr"]), "'chain'"),
    (lambda c: c.update(chain=["fticr", "fticr"]), "'chain'"),
    (lambda c: c["modalities"]["maldi"].update(nmf={"rank": 0}), "'modalities.maldi.nmf.rank'"),
    (lambda c: c["modalities"]["maldi"].update(nmf={"rnk": 3}), "'modalities.maldi.nmf'"),
    (lambda c: c["modalities"]["maldi"].update(pixel_size_um=-1), "'modalities.maldi.pixel_size_um'"),
    (lambda c: c.update(fusion={"method": "magic"}), "'fusion.method'"),
    (lambda c: c.update(chain=["fticr", "tof sims"]), "'chain[1]'"),
    (lambda c: c.pop("sections"), "sections"),
    (lambda c: c["modalities"].pop("maldi"), "'modalities'"),
    (lambda c: c["modalities"]["fticr"].update(binning={"mode": "reference"}),
     "'modalities.fticr.binning.mode'"),
])
def test_invalid_config_names_key(mutate, key):
    cfg = base_config()
    mutate(cfg)
    with pytest.raises(InputError, match=key.replace("[", r"\[").replace("]", r"\]")):
        validate_config(cfg)


def test_parse_roi():
    assert parse_roi("0:10,5:7", "x") == (0, 10, 5, 7)
    assert parse_roi(" * ", "x") is None
    with pytest.raises(InputError, match="row 3"):
        parse_roi("10:0,0:5", "row 3")
    with pytest.raises(InputError, match="x0:x1,y0:y1"):
        parse_roi("1-2,3-4", "row 3")


def test_sheet_read_relative_paths_and_file_ids(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    touch_imzml(tmp_path, "ft.imzML")
    touch_imzml(tmp_path / "a", "run.imzML")
    touch_imzml(tmp_path / "b", "run.imzML")
    sheet = write_sheet(tmp_path / "s.tsv", [
        ("s1", "fticr", "ft.imzML", "0:5,0:5"), ("s1", "maldi", "a/run.imzML", "*"),
        ("s2", "fticr", "ft.imzML", "5:10,0:5"), ("s2", "maldi", "b/run.imzML", "*")])
    acq = read_sections(sheet, ["fticr", "maldi"])
    assert [a.section for a in acq] == ["s1", "s1", "s2", "s2"]
    assert acq[0].imzml == str(tmp_path / "ft.imzML") and acq[0].roi == (0, 5, 0, 5)
    assert acq[0].file_id == acq[2].file_id == "ft"
    ids = {a.file_id for a in acq if a.modality == "maldi"}
    assert ids == {"a_run", "b_run"}
    assert file_id("x/My Run.IMZML") == "My_Run"


def test_roi_auto_rows_ranked_per_file(tmp_path):
    """roi auto: each file's auto rows are numbered in sheet order (the sections, left to right)."""
    touch_imzml(tmp_path, "ft.imzML")
    touch_imzml(tmp_path, "m1.imzML")
    touch_imzml(tmp_path, "m2.imzML")
    sheet = write_sheet(tmp_path / "s.tsv", [
        ("s1", "fticr", "ft.imzML", "auto"), ("s1", "maldi", "m1.imzML", "AUTO"),
        ("s2", "fticr", "ft.imzML", "auto"), ("s2", "maldi", "m2.imzML", "*"),
        ("s3", "fticr", "ft.imzML", "0:5,0:5"), ("s3", "maldi", "m2.imzML", "0:5,0:5")])
    acq = {(a.section, a.modality): a for a in read_sections(sheet, ["fticr", "maldi"])}
    assert parse_roi("auto", "x") == "auto"
    assert acq["s1", "fticr"].roi == "auto" and acq["s2", "fticr"].roi == "auto"
    assert (acq["s1", "fticr"].auto_index, acq["s1", "fticr"].auto_count) == (0, 2)
    assert (acq["s2", "fticr"].auto_index, acq["s2", "fticr"].auto_count) == (1, 2)
    assert (acq["s1", "maldi"].auto_index, acq["s1", "maldi"].auto_count) == (0, 1)
    assert acq["s3", "fticr"].auto_count == 0


def test_auto_roi_orders_sections_left_to_right_and_checks_count():
    import numpy as np

    from msifusion.pipeline import auto_roi

    mask = np.zeros((30, 60), bool)
    mask[5:25, 35:55] = True      # the larger section, on the right
    mask[10:20, 5:15] = True      # the smaller one, on the left
    mask[2, 2] = True             # debris
    assert auto_roi(mask, 0, 2, margin_px=2) == (3, 17, 8, 22)
    assert auto_roi(mask, 1, 2, margin_px=2) == (33, 57, 3, 27)
    with pytest.raises(InputError, match=r"found 2 tissue section\(s\) \(3:17,8:22, 33:57,3:27\)"
                                         r" but the sections sheet gives this file 3"):
        auto_roi(mask, 0, 3, margin_px=2, where="file x")


@pytest.mark.parametrize("rows, message", [
    ([("s1", "fticr", "missing.imzML", "*"), ("s1", "maldi", "ft.imzML", "*")],
     "row 2: imzML file not found"),
    ([("s1", "fticr", "ft.imzML", "*"), ("s1", "orbi", "ft.imzML", "*")],
     "row 3: modality 'orbi' is not in the chain"),
    ([("s1", "fticr", "ft.imzML", "*")], "section 's1' has no row for modality 'maldi'"),
    ([("s1", "fticr", "ft.imzML", "3:1,0:2"), ("s1", "maldi", "ft.imzML", "*")], "row 2: roi"),
    ([("s/1", "fticr", "ft.imzML", "*"), ("s/1", "maldi", "ft.imzML", "*")], "section id"),
])
def test_bad_sheet_names_file_and_row(tmp_path, rows, message):
    touch_imzml(tmp_path, "ft.imzML")
    sheet = write_sheet(tmp_path / "s.tsv", rows)
    with pytest.raises(InputError, match=message) as info:
        read_sections(sheet, ["fticr", "maldi"])
    assert str(sheet) in str(info.value)


def test_roi_outside_image_is_caught_from_header(tmp_path):
    """ROIs are checked against the imzML header's image size before anything runs."""
    import numpy as np
    from pyimzml.ImzMLWriter import ImzMLWriter

    path = tmp_path / "ft.imzML"
    with ImzMLWriter(str(path), mode="processed") as w:
        for x in range(1, 5):
            for y in range(1, 4):
                w.addSpectrum(np.array([100.0, 200.0]), np.array([1.0, 2.0]), (x, y, 1))
    sheet = write_sheet(tmp_path / "s.tsv", [("s1", "fticr", "ft.imzML", "0:9,0:2"),
                                             ("s1", "maldi", "ft.imzML", "*")])
    cfg = base_config(sheet)
    with pytest.raises(InputError, match=r"row 2: roi 0:9,0:2 .* outside the image .*\(4 x 3 pixels"):
        load_study(cfg)
    write_sheet(sheet, [("s1", "fticr", "ft.imzML", "0:4,0:3"), ("s1", "maldi", "ft.imzML", "*")])
    study = load_study(cfg)
    assert study.sections == ["s1"] and study.pairs() == [("fticr", "maldi")]


def test_load_config_errors(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("chain: [a, b\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump(base_config()))
    assert load_config(ok, {"seed": 7})["seed"] == 7


def test_shipped_sheet_is_the_demo_phantom(tmp_path):
    """config/sections.tsv (the default) lists exactly what `make demo` generates into demo/."""
    from msifusion.phantom import generate_study

    generate_study(tmp_path / "demo", preset="demo", seed=0)
    generated = (tmp_path / "demo" / "sections.tsv").read_text().replace("\timzml/", "\t../demo/imzml/")
    assert (ROOT / "config" / "sections.tsv").read_text() == generated
