"""Steps of the registration rules: one adjacent pair of a section, and the table of all pairs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import InputError
from ..maps import principal_maps
from ..register import plot_overlay, register_pair
from ..register_image import N_COMPONENTS, register_image
from ..schema import default
from ..store import atomic_output
from .section import read_section_maps, tissue_image, total_image

log = logging.getLogger("msifusion.steps.register")


def register_step(coarse: str, fine: str, out_json: str, out_png: str, *,
                  model: str = default("registration.model"),
                  n_starts: int = default("registration.n_starts"),
                  mirror: bool = default("registration.mirror"),
                  iterations: int = default("registration.iterations"),
                  min_score: float = default("registration.min_score"),
                  min_margin: float = default("registration.min_margin"),
                  min_boundary: float = default("registration.min_boundary"),
                  min_ncc: float = default("registration.min_ncc"),
                  min_image_similarity: float = default("registration.min_image_similarity"),
                  scale_range: float = default("registration.scale_range"),
                  seed: int = default("seed")) -> None:
    """Register a fine modality's section to the coarse one; write the transform JSON and QC PNG.

    An MSI pair is registered on its total images and component maps
    (:func:`msifusion.register.register_pair`), and when that does not pass, by the regression
    of the coarse component maps on the fine ones (:func:`_by_regression`); an image level
    (microscopy) by how much of the coarse component maps its features explain, its scale searched
    (:func:`msifusion.register_image.register_image`). A registration that does not pass is
    written too (``passed: false``, with every failing criterion, :func:`failed_criteria`); the
    fusion refuses it."""
    c, f = read_section_maps(coarse), read_section_maps(fine)
    if f.get("kind") == "image":
        reg = register_image(c["maps"], c["acquired"], c["mask"], c["pixel_size_um"], f["maps"],
                             f["acquired"], f["mask"], float(f["pixel_size_um"]),
                             fine_px_source=str(f.get("pixel_size_source", "none")), model=model,
                             n_starts=n_starts, mirror=mirror, min_score=min_score,
                             min_margin=min_margin, min_boundary=min_boundary,
                             min_similarity=min_image_similarity, scale_range=scale_range)
        _write(reg, c, f, out_json, out_png)
        return
    # The component maps of both sections score every placement beyond the total images
    # (register_pair's multichannel similarity).
    # Two views of each section: the tissue alone (background 0), then, when that gives no
    # confident answer, the whole total image (off-tissue signal such as substrate or matrix
    # can carry the outline). The first view that passes wins; else the better-margin failure.
    reg = None
    for view in (tissue_image, total_image):
        trial = register_pair(view(c), c["mask"], c["pixel_size_um"], view(f), f["mask"],
                              f["pixel_size_um"], model=model, n_starts=n_starts, mirror=mirror,
                              iterations=iterations, min_score=min_score, min_margin=min_margin,
                              min_boundary=min_boundary, min_ncc=min_ncc, seed=seed,
                              coarse_channels=c["maps"], fine_channels=f["maps"])
        trial.details["view"] = view.__name__
        if reg is None or trial.passed or (not reg.passed and trial.margin > reg.margin):
            reg = trial
        if reg.passed:
            break
    if not reg.passed:
        reg = _by_regression(reg, c, f, model=model, n_starts=n_starts, mirror=mirror,
                             min_score=min_score, min_margin=min_margin, min_boundary=min_boundary,
                             min_similarity=min_image_similarity)
    _write(reg, c, f, out_json, out_png)


def _by_regression(failed, c: dict, f: dict, **kw):
    """An MSI pair that the total images could not place, placed by regression similarity.

    When the two modalities see the tissue's chemistry through different responses (ion
    suppression, saturating or steep ion yields: `msifusion.phantom` ``response="nonlinear"``),
    their total images can disagree inside the tissue while a regression of the coarse
    component maps on the fine ones still explains the coarse section only at the right
    placement. The fine maps' leading principal maps (as many as the coarse components the
    similarity explains, :data:`msifusion.register_image.N_COMPONENTS`: a small field cannot
    support a regression on 20 maps, their squares and the tissue share) are taken as an image
    level's features (:func:`msifusion.register_image.register_image`) at the scale their pixel
    sizes give (``scale_range`` 0 before the refinement). Its own criteria decide
    (``registration.min_image_similarity`` among them); when it does not pass either, the
    total-image failure ``failed`` is kept, with this attempt's figures in its details.
    """
    trial = register_image(c["maps"], c["acquired"], c["mask"], c["pixel_size_um"],
                           principal_maps(f["maps"], N_COMPONENTS), f["acquired"], f["mask"],
                           float(f["pixel_size_um"]),
                           fine_px_source="config", scale_range=0.0, **kw)
    log.info("section %r: %s -> %s did not pass on the total images; by regression of the "
             "component maps: rotation %.2f deg, margin %.3f, similarity %.3f -> %s", c["section"],
             f["modality"], c["modality"], trial.rotation_deg, trial.margin, trial.ncc,
             "passed" if trial.passed else "failed")
    if trial.passed:
        trial.details["view"] = "regression"
        return trial
    failed.details["regression"] = {"rotation_deg": float(trial.rotation_deg),
                                    "margin": float(trial.margin), "similarity": float(trial.ncc),
                                    "passed": False}
    return failed


def _write(reg, c: dict, f: dict, out_json: str, out_png: str) -> None:
    """The registration of section maps ``f`` onto ``c`` as JSON and QC overlay, and its line in
    the log."""
    doc = reg.to_json() | {"section": c["section"], "coarse": c["modality"], "fine": f["modality"]}
    plot_overlay(total_image(c), total_image(f), reg, out_png)
    with atomic_output(out_json) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=2))
    level = logging.INFO if reg.passed else logging.WARNING
    log.log(level, "section %r: %s -> %s %s", c["section"], f["modality"], c["modality"],
            registration_summary(doc))


#: Columns of :func:`registration_table_step`.
REGISTRATION_COLUMNS = ("section", "coarse", "fine", "passed", "score", "margin", "ncc",
                        "rotation_deg", "scale", "mirror", "translation_x_um", "translation_y_um")


def registration_table_step(transforms: list[str], pairs: list[list[str]], out: str) -> None:
    """The registration scores of every section and chain pair as one TSV table (atomically).

    Parameters
    ----------
    transforms : list of str
        Transform JSON files written by :func:`register_step`.
    pairs : list of [section, coarse, fine]
        One entry per transform file, in the same order.
    out : str
        Table path: one row per pair, columns :data:`REGISTRATION_COLUMNS` (``NA`` when absent);
        a pair that did not pass is also logged as a warning.
    """
    if len(transforms) != len(pairs):
        raise InputError(f"registration table: {len(transforms)} transform files for "
                         f"{len(pairs)} pairs")
    rows = []
    for path, (section, coarse, fine) in zip(transforms, pairs):
        doc = json.loads(Path(path).read_text())
        tx, ty = (doc.get("translation_um") or [None, None])[:2]
        values = dict(doc, section=section, coarse=coarse, fine=fine, translation_x_um=tx,
                      translation_y_um=ty)
        rows.append("\t".join(_cell(values.get(c)) for c in REGISTRATION_COLUMNS))
        if not doc.get("passed"):
            log.warning("section %s: %s -> %s did not pass (%s)", section, fine, coarse,
                        registration_summary(doc))
    with atomic_output(out) as tmp:
        Path(tmp).write_text("\t".join(REGISTRATION_COLUMNS) + "\n" + "".join(r + "\n" for r in rows))


def _cell(value) -> str:
    """A table cell: ``NA`` for None, ``true``/``false``, floats to 4 decimals."""
    if value is None:
        return "NA"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


#: Acceptance criteria of a registration: (name, JSON field of the value, details field of the
#: threshold, config key). A registration passes when it meets the first two and one of the
#: last two (evidence that the placement is right: outlines or image similarity).
CRITERIA = (("mask Dice", "score", "min_score", "registration.min_score"),
            ("margin over the best other placement", "margin", "min_margin",
             "registration.min_margin"),
            ("outline agreement", "boundary", "min_boundary", "registration.min_boundary"),
            ("image similarity", "ncc", "min_ncc", "registration.min_ncc"))


def failed_criteria(doc: dict) -> list[str]:
    """The criteria a registration JSON fails, each as 'name value < threshold (key)'; the two
    evidence criteria (outline or similarity) are one entry, failing when both do. Empty when it
    passed or when the JSON has no criteria (a registration that could not be attempted: see its
    ``details.reason``)."""
    d = doc.get("details", {})

    def value(field):
        v = doc.get(field)
        return float("nan") if v is None else float(v)

    def item(name, field, tkey, key):
        return f"{name} {value(field):.3f} < {float(d[tkey]):g} ({key})"

    out = []
    criteria = CRITERIA if d.get("similarity") != "regression" else CRITERIA[:3] + (
        ("image similarity", "ncc", "min_ncc", "registration.min_image_similarity"),)
    for name, field, tkey, key in criteria[:2]:
        if tkey in d and not value(field) >= float(d[tkey]):
            out.append(item(name, field, tkey, key))
    evidence = [c for c in criteria[2:] if c[2] in d]
    if evidence and not any(value(c[1]) >= float(d[c[2]]) for c in evidence):
        out.append(" and ".join(item(*c) for c in evidence))
    return out


def registration_summary(doc: dict) -> str:
    """One line on a registration JSON: pose, quality figures and the verdict."""
    def num(source, key):  # JSON stores NaN as null
        value = source.get(key)
        return float("nan") if value is None else float(value)

    d = doc.get("details", {})
    line = (f"rotation {num(doc, 'rotation_deg'):.2f} deg, scale {num(doc, 'scale'):.4f}, "
            f"mask Dice {num(doc, 'score'):.3f} (min {num(d, 'min_score'):g}), margin "
            f"{num(doc, 'margin'):.3f} (min {num(d, 'min_margin'):g}), outline agreement "
            f"{num(doc, 'boundary'):.3f} (min {num(d, 'min_boundary'):g}) or image similarity "
            f"{num(doc, 'ncc'):.3f} (min {num(d, 'min_ncc'):g}): ")
    if doc.get("passed"):
        return line + "passed"
    failed = failed_criteria(doc)
    why = "; ".join(failed) if failed else d.get("reason", "no confident placement")
    return line + f"FAILED: {why}"
