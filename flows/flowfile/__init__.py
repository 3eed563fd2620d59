"""Declarative flow files: a YAML graph of inputs, steps and outputs, compiled onto the flow API.

A flow file declares what a Python ``build(edge)`` would: one device input
(``edge.devices``), optional parts with their own reports (``edge.part``),
steps (operators, each with exactly its Python keyword settings; settings
left out come from the edge config like the standard flows take them) and
outputs (``edge.output``, ``edge.dead_letters``, ``edge.publish``). It builds
the same Bytewax dataflow, so recovery, accounting and exactly-once apply
unchanged. ``load_flow_file(path)`` checks it (every problem names its key
path and gives a hint), ``.builder()`` is the ``build(edge)`` of
``edgesieve run x.flow.yaml``, ``.mermaid()`` draws it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from flows.flowfile.check import load_flow_file, parse_flow_file
from flows.flowfile.graph import FlowFile
from flows.flowfile.model import FlowFileError

__all__ = [
    "FlowFile",
    "FlowFileError",
    "check_flow_file",
    "is_flow_file",
    "json_schema",
    "load_flow_file",
    "parse_flow_file",
]


def is_flow_file(flow: str) -> bool:
    """Whether ``edgesieve run FLOW`` names a flow file (``.yaml`` / ``.yml``)."""
    return flow.endswith((".yaml", ".yml"))


def check_flow_file(path: str | Path, config: Any = None) -> FlowFile:
    """Load ``path`` and build it on a throwaway edge, so operator checks run too.

    ``config`` (an :class:`~flows.config.EdgeConfig`) gives the defaults of
    omitted settings; without it, the edge config's own defaults.
    """
    from bytewax.testing import TestingSource

    from flows.api import Edge
    from flows.config import parse_config

    flow = load_flow_file(path)
    with tempfile.TemporaryDirectory(prefix="edgesieve-check-") as tmp:
        if config is None:
            config = parse_config({"data_dir": tmp})
        else:
            config = config.model_copy(update={"data_dir": Path(tmp), "cloud": None})
        flow.build(Edge(config, name=flow.name, source=TestingSource([])))
    return flow


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a flow file (``flows/standard/flow.schema.json``), for editors."""
    from pydantic import Field, create_model

    from flows.flowfile.kinds import KINDS, step_model
    from flows.flowfile.model import FlowFileModel

    union = tuple(step_model(kind) for kind in KINDS.values())
    step = Field(discriminator="op")
    from typing import Annotated, Union

    model = create_model(
        "FlowFile",
        __base__=FlowFileModel,
        __doc__="An edgesieve flow file (see docs/flows.md, 'Flow files').",
        steps=(dict[str, Annotated[Union[union], step]], {}),  # type: ignore[valid-type]  # noqa: UP007
    )
    schema = model.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "edgesieve flow file"
    return _without_null_defaults(schema)


def _without_null_defaults(node: Any) -> Any:
    """Settings left out default from the edge config, not to null: drop those defaults."""
    if isinstance(node, dict):
        return {
            k: _without_null_defaults(v)
            for k, v in node.items()
            if not (k == "default" and v is None)
        }
    if isinstance(node, list):
        return [_without_null_defaults(v) for v in node]
    return node


def schema_text() -> str:
    """:func:`json_schema` as the committed file's text."""
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


FLOW_FILE_ENV = "EDGESIEVE_FLOW_FILE"
"""The flow file ``python -m bytewax.run flows.flowfile`` runs."""


def __getattr__(name: str) -> Any:
    """``flow``: the flow file named by ``$EDGESIEVE_FLOW_FILE``, for Bytewax's own runner.

    ``EDGESIEVE_FLOW_FILE=telemetry.flow.yaml EDGESIEVE_CONFIG=edge.yaml python -m
    bytewax.run flows.flowfile -r var/recovery/telemetry -s 5`` runs it as
    :func:`flows.runtime.lazy_flow` runs a Python flow module.
    """
    if name != "flow":
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    import os
    import sys

    from flows.runtime import lazy_flow, load_flow_builder

    path = os.environ.get(FLOW_FILE_ENV)
    try:
        if not path:
            msg = (
                f"{FLOW_FILE_ENV} is not set; hint: {FLOW_FILE_ENV}=telemetry.flow.yaml "
                "python -m bytewax.run flows.flowfile"
            )
            raise FlowFileError([msg])
        build = load_flow_builder(path)
    except ValueError as exc:
        for line in str(exc).splitlines():
            print(f"edgesieve: error: {line}", file=sys.stderr)
        sys.exit(2)
    flow = lazy_flow(f"{__name__}.{build.flow_name}", build)("flow")  # type: ignore[attr-defined]
    globals()["flow"] = flow
    return flow
