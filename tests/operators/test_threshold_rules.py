"""Threshold rules on their own: levels, defaults and every settings error."""

from __future__ import annotations

import math
from datetime import timedelta

import numpy as np
import pytest

from operators.threshold import Rule


def test_rule_levels_are_floats_and_clear_levels_default_to_raise_levels():
    high = Rule("h", "f", raise_above=np.int64(7))
    assert (high.raise_above, high.clear_below, high.raise_below, high.clear_above) == (
        7.0,
        7.0,
        None,
        None,
    )
    assert type(high.raise_above) is float
    low = Rule("l", "f", raise_below=1, clear_above=2)
    assert (low.raise_below, low.clear_above, low.clear_below) == (1.0, 2.0, None)
    assert Rule("h", "f", raise_above=7) == Rule("h", "f", raise_above=7.0, clear_below=7.0)
    assert (high.min_count, high.min_duration, high.severity) == (1, timedelta(0), "warning")
    with pytest.raises(AttributeError):
        high.name = "other"  # type: ignore[misc]


RULE_ERRORS = [
    (
        {"name": "", "field": "f", "raise_above": 1},
        ValueError,
        r"threshold rule `name` must be a non-empty string; got '' \(str\)\. "
        r'Hint: name the rule after what it watches, e\.g\. name="velocity_zone_c"',
    ),
    (
        {"name": 5, "field": "f", "raise_above": 1},
        TypeError,
        r"threshold rule `name` must be a non-empty string; got 5 \(int\)\. Hint:",
    ),
    (
        {"name": "r", "field": "velocity rms", "raise_above": 1},
        ValueError,
        r"threshold rule 'r': `field` must be the name of an attribute of the incoming items; "
        r"got 'velocity rms' \(str\)\. Hint: e\.g\. field=\"velocity_rms_mm_s\"",
    ),
    (
        {"name": "r", "field": None, "raise_above": 1},
        TypeError,
        r"threshold rule 'r': `field` must be the name of an attribute.*got None \(NoneType\)",
    ),
    (
        {"name": "r", "field": "f", "raise_above": "7.1"},
        TypeError,
        r"threshold rule 'r': `raise_above` must be a number; got '7\.1' \(str\)\. "
        r"Hint: give the level in the watched field's own units, e\.g\. raise_above=7\.1\.",
    ),
    (
        {"name": "r", "field": "f", "raise_below": True},
        TypeError,
        r"threshold rule 'r': `raise_below` must be a number; got True \(bool\)",
    ),
    (
        {"name": "r", "field": "f", "raise_above": 1, "clear_below": math.nan},
        ValueError,
        r"threshold rule 'r': `clear_below` must be a finite number; got nan\. "
        r"Hint: leave `clear_below` as None when there is no such level\.",
    ),
    (
        {"name": "r", "field": "f", "raise_below": 1, "clear_above": math.inf},
        ValueError,
        r"threshold rule 'r': `clear_above` must be a finite number; got inf\.",
    ),
    (
        {"name": "r", "field": "f", "raise_above": 10**400},
        ValueError,
        r"threshold rule 'r': `raise_above` must be a finite number; got 1000+\.\.\.\. Hint:",
    ),
    (
        {"name": "r", "field": "f"},
        ValueError,
        r"threshold rule 'r' needs `raise_above` \(high alarm\) or `raise_below` \(low alarm\); "
        r"got neither\. Hint: raise_above=7\.1, clear_below=6\.5",
    ),
    (
        {"name": "r", "field": "f", "clear_below": 3.0},
        ValueError,
        r"threshold rule 'r' needs `raise_above` \(high alarm\) or `raise_below`",
    ),
    (
        {"name": "r", "field": "f", "raise_above": 7.1, "raise_below": 1.0},
        ValueError,
        r"threshold rule 'r' has both `raise_above` \(7\.1\) and `raise_below` \(1\.0\); "
        r"a rule watches one side\. Hint: make two rules, e\.g\. 'r_high' and 'r_low'\.",
    ),
    (
        {"name": "r", "field": "f", "raise_above": 7.1, "clear_above": 5},
        ValueError,
        r"threshold rule 'r': `clear_above` goes with `raise_below` \(low alarms\), but this "
        r"rule has `raise_above`; got clear_above=5\.0\. Hint: a high alarm clears with "
        r"`clear_below`\.",
    ),
    (
        {"name": "r", "field": "f", "raise_below": 1.0, "clear_below": 5},
        ValueError,
        r"threshold rule 'r': `clear_below` goes with `raise_above` \(high alarms\), but this "
        r"rule has `raise_below`; got clear_below=5\.0\. Hint: a low alarm clears with "
        r"`clear_above`\.",
    ),
    (
        {"name": "r", "field": "f", "raise_above": 7.1, "clear_below": 8},
        ValueError,
        r"threshold rule 'r': `clear_below` must be <= `raise_above` \(7\.1\); got "
        r"clear_below=8\.0\. Hint: the clear level sits on the safe side",
    ),
    (
        {"name": "r", "field": "f", "raise_below": 1.0, "clear_above": 0.5},
        ValueError,
        r"threshold rule 'r': `clear_above` must be >= `raise_below` \(1\.0\); got "
        r"clear_above=0\.5\. Hint: .*raise_below=1\.0, clear_above=1\.5\.",
    ),
    (
        {"name": "r", "field": "f", "raise_above": 1, "min_count": 2.5},
        TypeError,
        r"threshold rule 'r': `min_count` must be an int; got 2\.5 \(float\)\. "
        r"Hint: min_count=3 raises on the third consecutive item",
    ),
    (
        {"name": "r", "field": "f", "raise_above": 1, "min_count": True},
        TypeError,
        r"threshold rule 'r': `min_count` must be an int; got True \(bool\)",
    ),
    (
        {"name": "r", "field": "f", "raise_above": 1, "min_count": 0},
        ValueError,
        r"threshold rule 'r': `min_count` must be >= 1; got 0\. Hint: min_count=1 \(the default\)",
    ),
    (
        {"name": "r", "field": "f", "raise_above": 1, "min_duration": 30},
        TypeError,
        r"threshold rule 'r': `min_duration` must be a datetime\.timedelta; got 30 \(int\)\. "
        r"Hint: min_duration=timedelta\(seconds=30\)\.",
    ),
    (
        {"name": "r", "field": "f", "raise_above": 1, "min_duration": timedelta(seconds=-1)},
        ValueError,
        r"threshold rule 'r': `min_duration` must be >= 0; got datetime\.timedelta\(days=-1, "
        r"seconds=86399\)\. Hint: timedelta\(0\) \(the default\)",
    ),
    (
        {"name": "r", "field": "f", "raise_above": 1, "severity": "error"},
        ValueError,
        r"threshold rule 'r': `severity` must be one of 'info', 'warning', 'critical'; got "
        r"'error' \(str\)\. Hint: severity=\"critical\"",
    ),
    (
        {"name": "r", "field": "f", "raise_above": 1, "severity": None},
        ValueError,
        r"threshold rule 'r': `severity` must be one of .*; got None \(NoneType\)",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "pattern"), RULE_ERRORS)
def test_rule_errors(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        Rule(**kwargs)
