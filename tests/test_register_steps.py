"""The registration steps' verdicts: every failing acceptance criterion is named with its value,
its threshold and the config key that sets it (issue 15)."""

from __future__ import annotations

import json

import pytest

from msifusion.errors import QualityError
from msifusion.schema import default
from msifusion.steps.register import CRITERIA, failed_criteria, registration_summary

THRESHOLDS = {"min_score": 0.6, "min_margin": 0.05, "min_boundary": 0.75, "min_ncc": 0.55}


def doc(passed=False, **values):
    base = dict(score=0.9, margin=0.2, boundary=0.9, ncc=0.7, rotation_deg=1.0, scale=0.25)
    return dict(base, **values, passed=passed, details=dict(THRESHOLDS))


def test_every_threshold_is_a_config_key_with_the_register_pair_default():
    import inspect

    from msifusion.register import register_pair

    params = inspect.signature(register_pair).parameters
    for _, _, threshold, key in CRITERIA:
        assert params[threshold].default == default(key), key


@pytest.mark.parametrize("values, expect", [
    (dict(score=0.077), ["mask Dice 0.077 < 0.6 (registration.min_score)"]),
    (dict(margin=0.01), ["margin over the best other placement 0.010 < 0.05 "
                         "(registration.min_margin)"]),
    (dict(boundary=0.16, ncc=0.101),
     ["outline agreement 0.160 < 0.75 (registration.min_boundary) and image similarity "
      "0.101 < 0.55 (registration.min_ncc)"]),
    (dict(score=0.5, boundary=None, ncc=0.3),
     ["mask Dice 0.500 < 0.6 (registration.min_score)",
      "outline agreement nan < 0.75 (registration.min_boundary) and image similarity "
      "0.300 < 0.55 (registration.min_ncc)"]),
    (dict(boundary=0.16), []),          # the similarity is evidence enough
    (dict(ncc=0.1), []),                # the outline is evidence enough
])
def test_failed_criteria_names_value_threshold_and_key(values, expect):
    assert failed_criteria(doc(**values)) == expect


def test_summary_of_a_refusal_lists_what_failed():
    line = registration_summary(doc(score=0.835, margin=0.051, boundary=0.16, ncc=0.101))
    assert line.endswith("FAILED: outline agreement 0.160 < 0.75 (registration.min_boundary) "
                         "and image similarity 0.101 < 0.55 (registration.min_ncc)")
    assert "passed" in registration_summary(doc(passed=True))
    failed = {"passed": False, "details": {"reason": "coarse tissue mask is empty"}}
    assert registration_summary(failed).endswith("FAILED: coarse tissue mask is empty")


def test_fusion_refuses_a_failed_registration_naming_the_keys(tmp_path):
    from msifusion.steps.fuse import fuse_step

    path = tmp_path / "transform_a_b.json"
    path.write_text(json.dumps(doc(score=0.3, section="s1", coarse="a", fine="b")))
    with pytest.raises(QualityError, match=r"registration b -> a .*FAILED: mask Dice 0\.300 < "
                                           r"0\.6 \(registration\.min_score\); not fusing it"):
        fuse_step([str(tmp_path / "a.h5"), str(tmp_path / "b.h5")], [str(path)],
                  [str(tmp_path / "out.h5")], str(tmp_path / "fusion.json"))
