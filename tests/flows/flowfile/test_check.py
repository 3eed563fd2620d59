"""Flow file checks: every problem names its key path, what was got and a hint, before anything starts."""

import copy

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from flows.config import parse_config
from flows.flowfile import FlowFileError, check_flow_file, load_flow_file
from flows.flowfile.kinds import KINDS, Kind

BASE = {
    "flow": "t",
    "inputs": {"in": {"channels": ["telemetry"]}},
    "steps": {"db": {"op": "deadband", "from": "in.series"}},
    "outputs": {"telemetry_points": {"from": "db"}},
}


def write(tmp_path, doc: object, name: str = "t.flow.yaml"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def problems(tmp_path, doc: object, config=None) -> list[str]:
    path = write(tmp_path, doc)
    with pytest.raises(FlowFileError) as err:
        check_flow_file(path, config)
    prefix = f"{path}: "
    assert all(p.startswith(prefix) for p in err.value.problems), err.value.problems
    assert str(err.value) == "\n".join(err.value.problems)
    return [p.removeprefix(prefix) for p in err.value.problems]


def edit(**changes) -> dict:
    """BASE with top-level sections replaced (None removes one)."""
    doc = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            doc.pop(key)
        else:
            doc[key] = value
    return doc


def steps(**more) -> dict:
    return {**BASE["steps"], **more}


def outputs(**more) -> dict:
    return {**BASE["outputs"], **more}


CASES = [
    # durations
    (
        edit(
            steps=steps(w={"op": "window", "from": "in.series", "length": "-5s"}),
            outputs=outputs(telemetry_summary={"from": "w"}),
        ),
        'steps.w.length: must be a duration > 0 (got \'-5s\'); hint: a duration like "10s", "5m", "1h", "250ms" or a number of seconds',
    ),
    (
        edit(
            steps=steps(w={"op": "window", "from": "in.series", "length": "ten seconds"}),
            outputs=outputs(telemetry_summary={"from": "w"}),
        ),
        'steps.w.length: must be a duration like "10s", "5m", "1h", "250ms" or a number of seconds (got \'ten seconds\'); hint: e.g. 10s',
    ),
    (
        edit(
            steps=steps(w={"op": "window", "from": "in.series", "allowed_lateness": -1}),
            outputs=outputs(telemetry_summary={"from": "w"}),
        ),
        "steps.w.allowed_lateness: must be a duration >= 0 (got -1)",
    ),
    # the file's shape
    (edit(flow=None), "flow: required key is missing; hint: add flow:"),
    (
        edit(flow="my.flow"),
        "flow: must match pattern '^[A-Za-z0-9_-]+$' (got 'my.flow'); hint: letters, digits, _ and -, e.g. telemetry",
    ),
    (
        {**BASE, "output": {}},
        "output: unknown key; hint: the keys here are description, flow, inputs, outputs, parts, steps",
    ),
    (
        edit(
            steps=steps(w={"op": "window", "from": "in.series"}),
            outputs={"telemetry_points": {"from": "db", "cloud_from": "w"}, "telemetry_summary": {"from": "w"}},
        ),
        "outputs.telemetry_points.cloud_from: w carries summaries, but from carries readings; hint: cloud_from takes the same kind of rows, e.g. a report_by_exception step fed from the same step",
    ),
    (
        edit(outputs={"telemetry_points": {"from": "db", "cloud_from": "db", "cloud": False}}),
        "outputs.telemetry_points.cloud_from: cloud: false sends nothing to the cloud; hint: remove cloud_from or cloud",
    ),
    (
        edit(outputs={"telemetry_points": {"from": "db", "cloud_from": "nope"}}),
        "outputs.telemetry_points.cloud_from: unknown",
    ),
    (
        edit(outputs={"telemetry_points": {"from": "db", "priority": "high"}}),
        "outputs.telemetry_points.priority: must be a valid integer, unable to parse string as an integer (got 'high'); hint: a whole number, e.g. 10",
    ),
    (
        edit(outputs={"telemetry_points": {"from": "db", "priority": -1}}),
        "outputs.telemetry_points.priority: must be greater than or equal to 0 (got -1); hint: a value at or above the bound",
    ),
    (
        edit(outputs={"telemetry_points": {"from": "db", "clouds": True}}),
        "outputs.telemetry_points.clouds: unknown key; hint: the keys here are cloud, cloud_from, from, like, max_file_age, part, priority, publish, reason",
    ),
    (
        edit(inputs={"in": {"channels": ["telemetri"]}}),
        "inputs.in.channels.0: must be 'telemetry', 'vibration', 'attributes' or 'logs' (got 'telemetri'); hint: one of the values listed",
    ),
    (
        [1, 2],
        "(top level): a flow file is a mapping (got list); hint: start with flow:, inputs:, steps: and outputs:",
    ),
    # steps
    (
        edit(steps=steps(**{"Bad-Name": {"op": "deadband", "from": "in.series"}})),
        "steps.Bad-Name: a step name is lower-case letters, digits and _ (got 'Bad-Name'); hint: e.g. hot_readings",
    ),
    (
        edit(steps={"db": {"from": "in.series"}}),
        "steps.db.op: required key is missing; hint: op: one of filter, deadband, window, spectral, threshold, logs, report_by_exception",
    ),
    (
        edit(steps={"db": {"op": "deadbnd", "from": "in.series"}}),
        "steps.db.op: unknown step kind (got 'deadbnd'); hint: one of filter, deadband, window, spectral, threshold, logs, report_by_exception",
    ),
    (
        edit(steps={"db": {"op": "deadband", "from": "in.series", "tolerance": 1}}),
        "steps.db.tolerance: unknown setting of deadband; hint: its settings are absolute, from, max_silence, op, percent",
    ),
    (
        edit(steps={"db": {"op": "deadband", "from": 5}}),
        "steps.db.from: must name a stream or a list of streams (got 5); hint: from: in.series, or from: [window.late, spectral.errors]",
    ),
    (
        edit(steps={"db": {"op": "deadband"}}),
        "steps.db.from: required key is missing; hint: add from:",
    ),
    (
        edit(steps={"db": {"op": "deadband", "from": []}}),
        "steps.db.from: names no stream (got []); hint: from: in.series",
    ),
    (
        edit(steps={"db": {"op": "deadband", "from": "in.serie"}}),
        "steps.db.from: unknown stream 'in.serie'; hint: known streams are db, db.down, in.attributes, in.blocks, in.logs, in.readings, in.series, in.text",
    ),
    (
        edit(
            steps={"a": {"op": "deadband", "from": "b"}, "b": {"op": "deadband", "from": "a"}},
            outputs={"telemetry_points": {"from": "a"}},
        ),
        "steps.a.from: the steps form a cycle: a -> b -> a; hint: a step cannot take its own output, directly or through other steps",
    ),
    (
        edit(steps={"db": {"op": "deadband", "from": "db"}}),
        "steps.db.from: the steps form a cycle: db -> db",
    ),
    (
        edit(
            steps={"sp": {"op": "spectral", "from": "in.blocks"}},
            outputs={"vibration_features": {"from": "sp"}},
        ),
        "steps.sp.from: in.blocks needs channel 'vibration' in inputs.in.channels (got telemetry); hint: add vibration to the channels",
    ),
    (
        edit(
            steps=steps(w={"op": "window", "from": ["in.series", "db"]}),
            outputs=outputs(telemetry_summary={"from": "w"}),
        ),
        "steps.w.from: merges streams of different records (in.series: series, db.down: readings); hint: merge alike streams",
    ),
    (
        edit(steps={"db": {"op": "deadband", "from": "in.text"}}),
        "steps.db.from: deadband does not take text (got in.text); hint: deadband takes readings, series, e.g. in.series, in.readings",
    ),
    (
        edit(
            steps=steps(hot={"op": "threshold", "from": "in.series"}),
            outputs=outputs(alarms={"from": "hot"}),
        ),
        "steps.hot.rules: required when the step takes series; hint: the default rules watch vibration features (velocity_rms_mm_s, kurtosis), e.g. rules: [{name: hot, field: value, raise_above: 80}]",
    ),
    (
        edit(steps=steps(w={"op": "window", "from": "in.series"})),
        "steps.w: its output goes nowhere; hint: add an output with from: w, feed it to another step, or remove the step",
    ),
    (
        edit(
            steps={"in": {"op": "deadband", "from": "in.series"}},
            outputs={"telemetry_points": {"from": "in"}},
        ),
        "steps.in: has the name of the input",
    ),
    # inputs and parts
    (
        edit(inputs={"a": {"channels": ["telemetry"]}, "b": {"channels": ["vibration"]}}),
        "inputs: a flow has one device input (got 2: a, b); hint: list every channel in one input, steps take the streams they need from it",
    ),
    (
        edit(
            inputs={"In": {"channels": ["telemetry"]}},
            steps={"db": {"op": "deadband", "from": "In.series"}},
        ),
        "inputs.In: an input name is lower-case letters, digits and _",
    ),
    (
        edit(parts={"t": {"channels": ["telemetry"]}}),
        "parts.t: a part name is lower-case letters, digits and _, not the flow's name (got 't')",
    ),
    (
        edit(parts={"tel": {"channels": ["vibration"]}}),
        "parts.tel.channels: channel 'vibration' is not one of the input's (telemetry); hint: add it to the input's channels or remove it here",
    ),
    (
        edit(parts={"a": {"channels": ["telemetry"]}, "b": {"channels": ["telemetry"]}}),
        "parts.b.channels: channel 'telemetry' already belongs to part 'a'; hint: each channel is counted by one part",
    ),
    # outputs
    (
        edit(outputs={"Points": {"from": "db"}}),
        "outputs.Points: a stream name is a lower-case identifier; hint: e.g. pressure_points",
    ),
    (
        edit(outputs={"telemetry_points": {"from": "db", "part": "x"}}),
        "outputs.telemetry_points.part: unknown part (got 'x'); hint: one of none yet: declare parts: first",
    ),
    (
        edit(
            inputs={"in": {"channels": ["telemetry", "attributes"]}},
            parts={"a": {"channels": ["telemetry"]}, "b": {"channels": ["attributes"]}},
            outputs=outputs(mixed={"from": ["in.text", "in.attributes"]}),
        ),
        "outputs.mixed.from: merges streams of different records",
    ),
    (
        edit(outputs=outputs(dead_letters={"from": "db", "like": "dead_letters"})),
        "outputs.dead_letters.like: dead_letters takes no like",
    ),
    (
        edit(outputs=outputs(dead_letters={"from": "in.text", "publish": True})),
        "outputs.dead_letters.publish: dead_letters takes no publish",
    ),
    (
        edit(
            steps=steps(w={"op": "window", "from": "in.series"}),
            outputs=outputs(dead_letters={"from": "w"}),
        ),
        "outputs.dead_letters.from: w carries summaries, which cannot be dead letters; hint: dead letters are device readings, blocks and attributes",
    ),
    (
        edit(outputs=outputs(dead_letters={"from": "in.text"})),
        "outputs.dead_letters.reason: required for in.text (text); hint: reason: why they are dead letters, e.g. reason: out of range",
    ),
    (
        edit(outputs={"telemetry_points": {"from": "db", "reason": "x"}}),
        "outputs.telemetry_points.reason: only dead_letters takes a reason; hint: remove reason:",
    ),
    (
        edit(
            inputs={"in": {"channels": ["telemetry", "vibration"]}},
            outputs=outputs(raw={"from": "in.blocks"}),
        ),
        "outputs.raw.from: in.blocks carries blocks, which has no columns of its own; hint: feed it to filter, spectral and output that",
    ),
    (
        edit(outputs={"telemetry_points": {"from": "db", "like": "alarms"}}),
        "outputs.telemetry_points.like: telemetry_points is a standard stream, it takes no like (got 'alarms')",
    ),
    (
        edit(
            steps=steps(w={"op": "window", "from": "in.series"}),
            outputs=outputs(telemetry_summary={"from": "db"}, mine={"from": "w"}),
        ),
        "outputs.telemetry_summary.from: telemetry_summary rows are telemetry_summary, but db carries telemetry_points rows; hint: take a step that gives telemetry_summary rows, or name a new stream (like: telemetry_points)",
    ),
    (
        edit(outputs={"mine": {"from": "db", "like": "telemetry_pts"}}),
        "outputs.mine.like: not a known stream (got 'telemetry_pts'); hint: one of alarms, dead_letters",
    ),
    (
        edit(outputs={"mine": {"from": "db", "like": "telemetry_summary"}}),
        "outputs.mine.like: db carries telemetry_points rows (got like: telemetry_summary); hint: like: telemetry_points, or leave it out",
    ),
    (
        edit(outputs={"mine": {"from": "db", "publish": True}}),
        "outputs.mine.publish: only alarms are published (got db: readings); hint: publish the output of a threshold step",
    ),
    (
        edit(
            inputs={"in": {"channels": ["telemetry", "attributes"]}},
            parts={"a": {"channels": ["telemetry"]}, "b": {"channels": ["attributes"]}},
            steps={
                "db": {"op": "deadband", "from": "in.series"},
                "hot": {
                    "op": "threshold",
                    "from": "in.series",
                    "rules": [{"name": "hot", "field": "value", "raise_above": 1}],
                },
            },
            outputs={
                "telemetry_points": {"from": "db"},
                "alarms": {"from": "hot"},
                "texts": {"from": "in.text"},
                "attrs": {"from": "in.attributes", "like": "device_attributes"},
                "both_text": {"from": ["in.text"], "part": "b"},
            },
        ),
        None,
    ),
    # operator checks, in the file's terms
    (
        edit(steps={"db": {"op": "deadband", "from": "in.series", "absolute": -1}}),
        "steps.db.absolute: must be a finite number >= 0 (got -1.0); hint: give the band in the series' own units, e.g. 0.5",
    ),
    (
        edit(
            steps={"db": {"op": "deadband", "from": "in.series", "absolute": None, "percent": None}}
        ),
        "steps.db: deadband needs absolute or percent (or both); got neither. Hint: absolute: 0.5 keeps a reading",
    ),
    (
        edit(
            steps=steps(w={"op": "window", "from": "in.series", "length": "10s", "slide": "20s"}),
            outputs=outputs(telemetry_summary={"from": "w"}),
        ),
        "steps.w.slide: must be > 0 and <= length (10) (got 20); hint: a slide longer than the window would leave gaps that no window covers; leave slide: null for tumbling windows",
    ),
    (
        edit(
            steps=steps(
                hot={
                    "op": "threshold",
                    "from": "in.series",
                    "rules": [
                        {"name": "hot", "field": "value", "raise_above": 1, "clear_below": 2}
                    ],
                }
            ),
            outputs=outputs(alarms={"from": "hot"}),
        ),
        "steps.hot.rules.0.clear_below: must be <= raise_above (1.0)",
    ),
    (
        edit(
            steps=steps(
                hot={
                    "op": "threshold",
                    "from": "in.series",
                    "rules": [{"name": "hot", "field": "value", "raise_above": 1}] * 2,
                }
            ),
            outputs=outputs(alarms={"from": "hot"}),
        ),
        "steps.hot: threshold 't.hot': rule name 'hot' is used by rules[0] and rules[1]. Hint: names label the alarms",
    ),
    (
        edit(
            steps=steps(
                hot={
                    "op": "threshold",
                    "from": "in.series",
                    "rules": [{"name": "hot", "raise_above": 1}],
                }
            ),
            outputs=outputs(alarms={"from": "hot"}),
        ),
        "steps.hot.rules.0.field: required key is missing; hint: add field:",
    ),
]


@pytest.mark.parametrize(
    ("doc", "expected"), [c for c in CASES if c[0] is not None and c[1] is not None]
)
def test_each_problem_names_its_path_and_gives_a_hint(tmp_path, doc, expected):
    found = problems(tmp_path, doc)
    assert any(p.startswith(expected) for p in found), found


def test_a_good_file_with_parts_inferred_per_output(tmp_path):
    doc = next(c[0] for c in CASES if c[1] is None)
    flow = check_flow_file(write(tmp_path, doc))
    assert {o.stream: o.part for o in flow.outputs} == {
        "telemetry_points": "a",
        "alarms": "a",
        "texts": "a",
        "attrs": "b",
        "both_text": "b",
    }


def test_every_problem_of_a_file_is_reported_at_once(tmp_path):
    doc = edit(
        steps={
            "db": {"op": "deadband", "from": "in.series", "absolute": "x", "percnt": 1},
            "w": {"op": "nope"},
        }
    )
    found = problems(tmp_path, doc)
    assert [p.split(":")[0] for p in found] == [
        "steps.db.absolute",
        "steps.db.percnt",
        "steps.w.op",
    ]


def test_yaml_syntax_errors_give_the_line(tmp_path):
    found = problems(tmp_path, "flow: t\ninputs:\n  in: {channels: [telemetry]\nsteps: {}\n")
    assert found == [
        "not valid YAML at line 4, column 1: expected ',' or '}', but got '<scalar>'; hint: check the "
        "indentation and quote values with ':' or '#' in them"
    ]


def test_a_key_given_twice_is_an_error_with_both_lines(tmp_path):
    text = yaml.safe_dump(BASE, sort_keys=False) + "steps: {}\n"
    found = problems(tmp_path, text)
    assert len(found) == 1 and found[0].startswith(
        "not valid YAML at line 13, column 1: key 'steps' given twice (first at line 6)"
    )


def test_a_missing_or_unreadable_file(tmp_path):
    with pytest.raises(
        FlowFileError, match=r"gone.flow.yaml: the flow file does not exist; hint: check the path"
    ):
        load_flow_file(tmp_path / "gone.flow.yaml")
    (tmp_path / "bin.flow.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(
        FlowFileError,
        match=r"bin.flow.yaml: the flow file cannot be read \(.*\); hint: a UTF-8 YAML file",
    ):
        load_flow_file(tmp_path / "bin.flow.yaml")


def test_a_kind_whose_operator_is_not_installed_fails_only_files_using_it(tmp_path, monkeypatch):
    fake = Kind(
        "sieve",
        "operators.not_here:sieve",
        KINDS["deadband"].settings,
        frozenset({"series"}),
        KINDS["deadband"].gives,
        KINDS["deadband"].call,
    )
    monkeypatch.setitem(KINDS, "sieve", fake)
    check_flow_file(write(tmp_path, BASE))
    found = problems(tmp_path, edit(steps={"db": {"op": "sieve", "from": "in.series"}}))
    assert found[0].startswith(
        "steps.db.op: sieve needs operators.not_here, which this edgesieve does not have; hint: upgrade edgesieve, or use one of "
    )


def test_settings_left_out_take_the_edge_configs_so_check_can_use_it(tmp_path):
    doc = edit(
        steps=steps(w={"op": "window", "from": "in.series", "slide": "20s"}),
        outputs=outputs(telemetry_summary={"from": "w"}),
    )
    check_flow_file(write(tmp_path, doc))  # default length: one minute
    config = parse_config({"telemetry": {"window": {"length": 10}}})
    assert problems(tmp_path, doc, config)[0].startswith(
        "steps.w.slide: must be > 0 and <= length (10)"
    )


def test_an_output_fed_from_two_parts_channels_must_name_its_part(tmp_path, monkeypatch):
    deadband = KINDS["deadband"]
    anything = Kind(
        "relabel",
        deadband.function,
        deadband.settings,
        frozenset({"text", "attributes"}),
        lambda _t: {"down": "readings"},
        deadband.call,
    )
    monkeypatch.setitem(KINDS, "relabel", anything)
    doc = edit(
        inputs={"in": {"channels": ["telemetry", "attributes"]}},
        parts={"a": {"channels": ["telemetry"]}, "b": {"channels": ["attributes"]}},
        steps={
            "x": {"op": "relabel", "from": "in.text"},
            "y": {"op": "relabel", "from": "in.attributes"},
        },
        outputs={"mine": {"from": ["x", "y"]}},
    )
    path = write(tmp_path, doc)
    with pytest.raises(FlowFileError) as err:
        load_flow_file(path)
    assert err.value.problems == [
        f"{path}: outputs.mine.part: its streams come from channels of parts a, b; hint: part: a (the part whose report counts the rows)"
    ]
    doc["outputs"]["mine"]["part"] = "b"
    assert load_flow_file(write(tmp_path, doc)).outputs[0].part == "b"


@given(
    amount=st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False),
    unit=st.sampled_from(["ms", "s", "m", "h", "d"]),
    space=st.sampled_from(["", " "]),
)
def test_durations_read_as_written(amount, unit, space):
    from datetime import timedelta

    from pydantic import TypeAdapter

    from flows.flowfile.model import Duration

    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    parsed = TypeAdapter(Duration).validate_python(f"{amount}{space}{unit}")
    assert parsed == timedelta(seconds=float(amount) * scale)
    assert TypeAdapter(Duration).validate_python(float(amount)) == timedelta(seconds=float(amount))


def test_a_setting_naming_a_stream_must_name_alarms(tmp_path, monkeypatch):
    from flows.flowfile.kinds import ReportSettings

    deadband = KINDS["deadband"]
    fake = Kind(
        "by_exception",
        deadband.function,
        ReportSettings,
        frozenset({"series"}),
        deadband.gives,
        deadband.call,
        streams=("alarms",),
    )
    monkeypatch.setitem(KINDS, "by_exception", fake)
    doc = edit(
        steps=steps(x={"op": "by_exception", "from": "in.series", "alarms": "db"}),
        outputs=outputs(mine={"from": "x"}),
    )
    assert problems(tmp_path, doc) == [
        "steps.x.alarms: must name a stream of alarms (got db: readings); hint: the name of a threshold step"
    ]
    doc["steps"]["x"]["alarms"] = "nowhere"
    assert problems(tmp_path, doc)[0].startswith(
        "steps.x.alarms: unknown stream 'nowhere'; hint: known streams are "
    )


def test_a_step_that_is_not_a_mapping(tmp_path):
    assert problems(tmp_path, edit(steps={"db": "deadband"})) == [
        "steps.db: must be a valid dictionary (got 'deadband'); hint: write a mapping of keys, e.g. {key: value}"
    ]
