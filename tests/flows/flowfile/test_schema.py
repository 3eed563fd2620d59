"""The committed JSON Schema is current, every shipped flow file follows it, kinds match operators."""

import inspect
import json

import pytest
import yaml

from flows.flowfile import load_flow_file, schema_text
from flows.flowfile.kinds import KINDS, step_model
from flows.standard import STANDARD_DIR

SHIPPED = sorted(STANDARD_DIR.glob("*.flow.yaml"))


def test_the_committed_schema_is_generated_from_the_models():
    committed = (STANDARD_DIR / "flow.schema.json").read_text(encoding="utf-8")
    assert committed == schema_text(), (
        "flows/standard/flow.schema.json is out of date; regenerate it with "
        "python -m flows.flowfile.schema"
    )


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_each_shipped_flow_file_follows_the_schema_and_checks(path):
    jsonschema = pytest.importorskip("jsonschema")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# yaml-language-server: $schema=flow.schema.json\n")
    schema = json.loads((STANDARD_DIR / "flow.schema.json").read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(yaml.safe_load(text))
    load_flow_file(path)


def test_the_schema_refuses_what_the_checks_refuse():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(schema_text())
    validator = jsonschema.Draft202012Validator(schema)
    good = yaml.safe_load((STANDARD_DIR / "telemetry.flow.yaml").read_text(encoding="utf-8"))
    bad_setting = {**good, "steps": {"w": {"op": "window", "from": "in.series", "lenght": 3}}}
    bad_op = {**good, "steps": {"w": {"op": "windw", "from": "in.series"}}}
    bad_duration = {
        **good,
        "steps": {"w": {"op": "window", "from": "in.series", "length": "5 min"}},
    }
    for doc in (bad_setting, bad_op, bad_duration):
        assert not validator.is_valid(doc)
    assert validator.is_valid(
        {**good, "steps": {"w": {"op": "window", "from": "in.series", "length": "5m"}}}
    )


def test_the_standard_files_are_in_the_wheel_package_data():
    text = (STANDARD_DIR.parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    assert '"flows.standard" = ["*.flow.yaml", "flow.schema.json"]' in text


@pytest.mark.parametrize("op", sorted(KINDS))
def test_each_kind_takes_exactly_its_operators_keyword_settings(op):
    kind = KINDS[op]
    if not kind.available():
        pytest.skip(f"{kind.function} is not installed")
    params = inspect.signature(kind.load()).parameters
    keywords = {n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert set(kind.settings.model_fields) == keywords
    assert set(step_model(kind).model_fields) == keywords | {"op", "from_"}


def test_the_readme_example_is_a_good_flow_file_drawn_as_shown():
    from flows.flowfile import check_flow_file

    root = STANDARD_DIR.parents[1]
    flow = check_flow_file(root / "examples" / "pressure.flow.yaml")
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert f"```mermaid\n{flow.mermaid()}```" in readme
    example = (root / "examples" / "pressure.flow.yaml").read_text(encoding="utf-8")
    assert example.split("\n", 3)[3] in readme  # the file as shown, after its comment lines
