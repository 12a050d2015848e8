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
    demo = load_config(ROOT / "config" / "demo" / "config.yaml")
    assert demo["sections"] == "config/demo/sections.tsv"


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
    assert acq[0].path == str(tmp_path / "ft.imzML") and acq[0].roi == (0, 5, 0, 5)
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

    from msifusion.steps.section import auto_roi

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
    cfg["modalities"]["fticr"]["pixel_size_um"] = 100     # the file states none
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


def test_demo_sheet_is_the_demo_phantom(tmp_path):
    """config/demo/sections.tsv lists exactly what `make demo` generates into demo/."""
    from msifusion.phantom import generate_study

    generate_study(tmp_path / "demo", preset="demo", seed=0)
    generated = (tmp_path / "demo" / "sections.tsv").read_text().replace("\timzml/",
                                                                         "\t../../demo/imzml/")
    assert (ROOT / "config" / "demo" / "sections.tsv").read_text() == generated


# ----------------------------------------------------------------- issue 14: the user's own study
def small_imzml(path: Path, nx: int = 4, ny: int = 3, pixel_size_um=None,
                mz=(100.0, 200.0)) -> Path:
    """A tiny processed imzML (+ .ibd) of nx x ny pixels, stating ``pixel_size_um`` or none."""
    import numpy as np

    from msifusion.phantom import write_imzml

    xy = np.array([(x, y) for y in range(ny) for x in range(nx)])
    k = len(mz)
    return write_imzml(path, xy, np.arange(len(xy) + 1) * k, np.tile(np.asarray(mz), len(xy)),
                       np.ones(len(xy) * k, np.float32), mode="processed",
                       pixel_size_um=pixel_size_um)


def study_files(tmp_path: Path, *, ft_px=8.0, maldi_px=2.0, rows=None) -> dict:
    small_imzml(tmp_path / "ft.imzML", 6, 5, ft_px)
    small_imzml(tmp_path / "m.imzML", 8, 8, maldi_px)
    sheet = write_sheet(tmp_path / "s.tsv", rows or [("s1", "fticr", "ft.imzML", "0:4,0:3"),
                                                     ("s1", "maldi", "m.imzML", "*")])
    return {"sections": str(sheet), "chain": ["fticr", "maldi"],
            "modalities": {"fticr": {}, "maldi": {}}}


def test_template_config_holds_nothing_of_the_demo():
    """config/config.yaml is the template of a user's study: no truth, no targets, no pixel
    size, its sheet only a header; the demo has its own config that sets every key the template
    sets (Snakemake reads the template first, --configfile config/demo/config.yaml over it)."""
    from snakemake.common.configfile import load_configfile
    from snakemake.utils import update_config

    template = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    demo = yaml.safe_load((ROOT / "config" / "demo" / "config.yaml").read_text())
    assert template["sections"] == "config/sections.tsv"
    assert "evaluation" not in template and template["targets"]["mz"] == []
    assert all("pixel_size_um" not in m and "tile_px" not in m.get("grid", {})
               for m in template["modalities"].values())
    sheet = (ROOT / "config" / "sections.tsv").read_text().splitlines()
    assert sheet[0].split("\t") == ["section", "modality", "imzml", "roi"]
    assert all(line.startswith("#") for line in sheet[1:])
    with pytest.raises(InputError, match="lists no sections"):
        load_study(template)
    merged = dict(load_configfile(str(ROOT / "config" / "config.yaml")))
    update_config(merged, demo)
    assert validate_config(merged) == validate_config(demo)
    assert demo["evaluation"]["truth"] == "demo/truth" and demo["sections"] != template["sections"]


def test_nested_null_from_the_command_line_is_null():
    """--config 'evaluation={truth: null}' gives the string "null" (snakemake reads nested
    values as strings); for a nullable key it is YAML's null, not a folder named null."""
    cfg = validate_config(base_config() | {"evaluation": {"truth": "null"},
                                           "export": {"top_n": "~"}})
    assert cfg["evaluation"]["truth"] is None and cfg["export"]["top_n"] is None
    assert validate_config(base_config() | {"sections": "null"})["sections"] == "null"


def test_defaults_come_from_the_schema_only():
    """The command line, the workflow steps and the library functions take their defaults from
    the schema: `python -m msifusion fuse` is the workflow's fuse."""
    import inspect

    from msifusion.cli import build_parser
    from msifusion.fuse import fuse_pair
    from msifusion.nmf import run_nmf
    from msifusion.register import register_pair
    from msifusion.schema import default
    from msifusion.steps.fuse import fuse_step
    from msifusion.steps.register import register_step
    from msifusion.steps.section import crop_step
    from msifusion.tissue import tissue_mask_from_maps

    def sig(fn, name):
        return inspect.signature(fn).parameters[name].default

    checks = {  # (function, parameter) -> schema key
        (fuse_step, "ppm"): "targets.ppm", (fuse_step, "consistency"): "fusion.consistency",
        (fuse_step, "n_components"): "fusion.n_components", (fuse_step, "method"): "fusion.method",
        (fuse_step, "scales_px"): "fusion.scales_px", (fuse_step, "alpha_se"): "fusion.alpha_se",
        (fuse_step, "min_target_r"): "fusion.min_target_r",
        (fuse_pair, "consistency"): "fusion.consistency", (fuse_pair, "alpha_se"): "fusion.alpha_se",
        (register_pair, "min_score"): "registration.min_score",
        (register_pair, "min_margin"): "registration.min_margin",
        (register_pair, "n_starts"): "registration.n_starts",
        (register_step, "min_score"): "registration.min_score",
        (register_step, "iterations"): "registration.iterations",
        (crop_step, "min_size_px"): "tissue.min_size_px",
        (tissue_mask_from_maps, "min_size_px"): "tissue.min_size_px",
        (run_nmf, "tol"): "nmf.tol", (run_nmf, "max_iter"): "nmf.max_iter",
    }
    for (fn, name), key in checks.items():
        assert sig(fn, name) == default(key), (fn.__name__, name, key)
    parser = build_parser()
    sub = {a.dest: a for a in parser._subparsers._group_actions[0].choices["fuse"]._actions}
    assert sub["ppm"].default == default("targets.ppm") == 10
    assert sub["min_target_r"].default == default("fusion.min_target_r")
    assert sub["consistency"].default == "auto" and sub["n_components"].default == 10
    reg = {a.dest: a for a in parser._subparsers._group_actions[0].choices["register"]._actions}
    assert reg["min_score"].default == default("registration.min_score") == 0.6


def test_pixel_size_the_file_wins_the_config_fills_in():
    from msifusion.metadata import resolve_pixel_size

    assert resolve_pixel_size(1.0, 5.0).um == 1.0
    assert "ignored" in resolve_pixel_size(1.0, 5.0).note
    assert resolve_pixel_size(1.0, 1.0).note == ""
    assert resolve_pixel_size(None, 5.0) == resolve_pixel_size(float("nan"), 5.0)
    assert resolve_pixel_size(None, 5.0).source == "config"
    forced = resolve_pixel_size(1.0, 5.0, force=True)
    assert (forced.um, forced.source) == (5.0, "config (forced)") and "forced" in forced.note
    with pytest.raises(InputError, match="pixel size unknown.*'modalities.x.pixel_size_um'"):
        resolve_pixel_size(None, None, where="f.imzML", key="modalities.x.pixel_size_um")
    with pytest.raises(InputError, match="force_pixel_size"):
        resolve_pixel_size(1.0, None, force=True)
    assert resolve_pixel_size(None, None, required=False).source == "none"


def test_study_pixel_sizes_decided_once_before_running(tmp_path):
    """The files' own pixel sizes win over a contradicting config (the demo's ToF-SIMS 5 um
    overrode a user's 1 um file); a file with none takes the config's; neither stops the study
    before any job, naming the file and the key."""
    cfg = study_files(tmp_path, ft_px=8.0, maldi_px=None)
    cfg["modalities"]["fticr"]["pixel_size_um"] = 5       # contradicts the file's 8 um
    with pytest.raises(InputError, match=r"m\.imzML: pixel size unknown.*modalities\.maldi"):
        load_study(cfg)
    cfg["modalities"]["maldi"]["pixel_size_um"] = 2
    study = load_study(cfg)
    ft, m = (study.pixel_sizes[str(tmp_path / n)] for n in ("ft.imzML", "m.imzML"))
    assert (ft.um, ft.source, m.um, m.source) == (8.0, "imzML", 2.0, "config")
    assert "ignored" in ft.note
    lines = "\n".join(study.summary())
    assert "fticr ft: pixel size 8 um (imzML)" in lines and "maldi m: pixel size 2 um (config)" in lines
    cfg["modalities"]["fticr"]["force_pixel_size"] = True
    assert load_study(cfg).pixel_sizes[str(tmp_path / "ft.imzML")].um == 5.0


@pytest.mark.parametrize("change, message", [
    (lambda c, p: c.update(rois=[{"name": "r", "box": [5, 2, 0, 3]}]),
     r"key 'rois' entry 'r': box \[5, 2, 0, 3\] is empty"),
    (lambda c, p: c.update(rois=[{"name": "r", "box": [0, 2, 0, 3], "level": "orbi"}]),
     r"level 'orbi' is not in the chain"),
    (lambda c, p: c.update(rois=[{"name": "r", "box": [0, 9, 0, 3]}]),
     r"box \[0, 9, 0, 3\] lies outside section 's1' on fticr \(4 x 3 pixels"),
    (lambda c, p: c.update(rois=[{"name": "r", "mask": str(p / "{section}_m.npy")}]),
     r"mask file .*s1_m\.npy not found \(section 's1'\)"),
    (lambda c, p: (__import__("numpy").save(p / "s1_m.npy", __import__("numpy").ones((5, 5), bool)),
                   c.update(rois=[{"name": "r", "level": "maldi", "mask": str(p / "{section}_m.npy")}])),
     r"s1_m\.npy is 5 x 5 pixels but section 's1' on maldi is 8 x 8"),
    (lambda c, p: c.update(evaluation={"truth": str(p / "truth")}),
     r"key 'evaluation.truth': folder .*truth not found"),
    (lambda c, p: c["modalities"]["maldi"].update(grid={"enabled": True, "tile_px": 3}),
     r"row 3: .*m\.imzML: the configured tile 3 x 3 px does not divide the 8 x 8 px image"),
    (lambda c, p: (p / "m.ibd").unlink(), r"row 3: .*binary data file m\.ibd not found"),
])
def test_everything_knowable_is_checked_before_running(tmp_path, change, message):
    """Problems that used to stop a run late (after the NMF), or not at all, stop it at start-up
    (`validate` and the workflow both call load_study), each naming its key, file or row."""
    cfg = study_files(tmp_path)
    load_study(cfg)
    change(cfg, tmp_path)
    with pytest.raises(InputError, match=message):
        load_study(cfg)


def test_all_problems_are_listed_at_once(tmp_path):
    cfg = study_files(tmp_path, maldi_px=None)
    cfg["rois"] = [{"name": "a", "box": [3, 1, 0, 2]}, {"name": "b", "box": [0, 1, 0, 2],
                                                         "level": "nope"}]
    with pytest.raises(InputError, match=r"3 problems found before running anything") as info:
        load_study(cfg)
    assert "pixel size unknown" in str(info.value) and "level 'nope'" in str(info.value)


def test_sheet_rows_that_are_not_files(tmp_path):
    (tmp_path / "dir.imzML").mkdir()
    small_imzml(tmp_path / "ft.imzML")
    sheet = write_sheet(tmp_path / "s.tsv", [("s1", "fticr", "ft.imzML", "*"),
                                             ("s1", "maldi", "dir.imzML", "*")])
    with pytest.raises(InputError, match=r"row 3: .*dir\.imzML is a directory"):
        read_sections(sheet, ["fticr", "maldi"])
    with pytest.raises(InputError, match="sections sheet is a directory"):
        read_sections(tmp_path, ["fticr", "maldi"])
    sheet.write_bytes(b"section\tmodality\timzml\troi\ns\xe91\tfticr\tft.imzML\t*\n")
    with pytest.raises(InputError, match="not UTF-8 text"):
        read_sections(sheet, ["fticr", "maldi"])
    small_imzml(tmp_path / "m.imzML")
    sheet.write_bytes("\ufeffsection\tmodality\timzml\troi\ns1\tfticr\tft.imzML\t*\n"
                      "s1\tmaldi\tm.imzML\t*\n".encode())   # Excel's byte-order mark
    assert [a.section for a in read_sections(sheet, ["fticr", "maldi"])] == ["s1", "s1"]


def test_ibd_found_whatever_the_case_and_brackets(tmp_path):
    """s[1].imzML + s[1].IBD: the name is not a glob pattern."""
    from msifusion.imzml import find_ibd

    p = small_imzml(tmp_path / "s[1].imzML")
    p.with_suffix(".ibd").rename(tmp_path / "s[1].IBD")
    assert find_ibd(p) == tmp_path / "s[1].IBD"


def test_config_readme_explains_every_key():
    """config/README.md holds the key reference generated from the schema, and every key of the
    schema has a description."""
    from msifusion.schema import reference_table

    table = reference_table()
    readme = (ROOT / "config" / "README.md").read_text()
    assert table in readme, "config/README.md is stale: python -m msifusion config-keys"
    undocumented = [row.split("|")[1] for row in table.splitlines()[2:]
                    if row.rstrip().endswith("|  |")]
    assert not undocumented


# ------------------------------------------------------------------ image levels (issue 15)
def image_study(tmp_path: Path, *, ome_um=None, roi="*", he_cfg=None, header="imzml"):
    """A MALDI imzML and an H&E-like RGB TIFF (600 x 400 px) of one section."""
    import numpy as np
    import tifffile

    small_imzml(tmp_path / "m.imzML", 8, 8, 20.0)
    rgb = np.full((400, 600, 3), 235, np.uint8)
    rgb[100:300, 150:450] = (180, 90, 160)
    kw = {"metadata": {"PhysicalSizeX": ome_um, "PhysicalSizeY": ome_um}} if ome_um else {}
    tifffile.imwrite(tmp_path / "he.ome.tif" if ome_um else tmp_path / "he.tif", rgb,
                     photometric="rgb", **kw)
    name = "he.ome.tif" if ome_um else "he.tif"
    sheet = tmp_path / "s.tsv"
    sheet.write_text(f"section\tmodality\t{header}\troi\ns1\tmaldi\tm.imzML\t*\n"
                     f"s1\the\t{name}\t{roi}\n")
    return {"sections": str(sheet), "chain": ["maldi", "he"],
            "modalities": {"maldi": {}, "he": he_cfg or {}}}


def test_image_level_in_the_sheet_and_the_start_up_decisions(tmp_path):
    """An image is a level of the chain: its kind from the file ending (column 'imzml' or
    'file'), its pixel size from the OME metadata or the config or left to the registration,
    its read factor decided once, all in the start-up summary."""
    study = load_study(image_study(tmp_path, ome_um=2.5, header="file",
                                   he_cfg={"image": {"max_pixels": 60000}}))
    he = study.acquisition("s1", "he")
    assert (he.kind, he.ibd, he.file_id, study.kind("maldi")) == ("image", "", "he", "imzml")
    lines = "\n".join(study.summary())
    assert "1 imzML file(s), 1 image(s)" in lines
    assert "he he: pixel size 2.5 um (image); read block-averaged by 2 (5 um pixels)" in lines
    (tmp_path / "b").mkdir()
    study = load_study(image_study(tmp_path / "b", he_cfg={"pixel_size_um": 3}))
    assert "he he: pixel size 3 um (config)" in "\n".join(study.summary())
    (tmp_path / "c").mkdir()
    study = load_study(image_study(tmp_path / "c"))
    assert study.pixel_sizes[study.acquisition("s1", "he").path].source == "none"
    assert "pixel size unknown: the registration finds the scale" in "\n".join(study.summary())


@pytest.mark.parametrize("change, message", [
    (lambda c: c["modalities"]["he"].update(kind="imzml"),
     r"row 3: 'he.tif' is an image but 'modalities.he.kind' is 'imzml'"),
    (lambda c: c["modalities"]["maldi"].update(kind="image"),
     r"row 2: 'm.imzML' is an imzML file but 'modalities.maldi.kind' is 'image'"),
    (lambda c: c["modalities"]["he"].update(grid={"enabled": True}),
     r"key 'modalities.he.grid.enabled': 'he' is an image level"),
    (lambda c: c.update(chain=["he", "maldi"]),
     r"key 'modalities.he.kind': the reference .* must be an imzML modality, not an image"),
])
def test_image_level_misconfigurations_named(tmp_path, change, message):
    cfg = image_study(tmp_path)
    change(cfg)
    with pytest.raises(InputError, match=message):
        load_study(cfg)


def test_image_level_rows_checked_before_running(tmp_path):
    cfg = image_study(tmp_path, roi="0:700,0:100")
    with pytest.raises(InputError, match=r"roi 0:700,0:100 of section 's1' lies outside the "
                                         r"image of .*he\.tif \(600 x 400 pixels"):
        load_study(cfg)
    sheet = Path(cfg["sections"])
    sheet.write_text(sheet.read_text().replace("he.tif", "he.bmp"))
    (tmp_path / "he.bmp").write_bytes(b"BM")
    with pytest.raises(InputError, match=r"'he.bmp' is neither an .imzML file nor an image"):
        load_study(cfg)
    sheet.write_text(sheet.read_text().replace("he.bmp", "gone.tif"))
    with pytest.raises(InputError, match=r"row 3: image not found: .*gone\.tif"):
        load_study(cfg)
    (tmp_path / "bad.tif").write_bytes(b"II*\0garbage")
    sheet.write_text(sheet.read_text().replace("gone.tif", "bad.tif"))
    with pytest.raises(InputError, match=r"row 3: .*bad\.tif"):
        load_study(cfg)
    sheet.write_text(sheet.read_text() + "s2\tmaldi\tm.imzML\t*\ns2\the\tm.imzML\t*\n")
    with pytest.raises(InputError, match=r"modality 'he' mixes imzML files and images"):
        read_sections(sheet, ["maldi", "he"])


def test_working_roi_and_file_ids_of_images():
    from msifusion.metadata import working_roi

    assert working_roi((0, 600, 0, 400), 2) == (0, 300, 0, 200)
    assert working_roi((3, 7, 5, 9), 4) == (0, 2, 1, 3)
    assert [file_id(p) for p in ("a/he 1.ome.tif", "b.TIFF", "c.jpeg", "d.btf")] == \
        ["he_1", "b", "c", "d"]
