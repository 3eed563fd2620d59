"""A checked flow file (:class:`FlowFile`): compiled onto :class:`flows.api.Edge`, and drawn."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bytewax.operators as op

from connectors.codecs.attributes_json import ATTRIBUTES
from flows.flowfile.errors import operator_error
from flows.flowfile.kinds import (
    Built,
    Call,
    Kind,
    SettingError,
)
from flows.flowfile.model import (
    FlowFileError,
    OutputSpec,
    Settings,
)
from operators.records import TELEMETRY, VIBRATION, Evict

if TYPE_CHECKING:
    from bytewax.dataflow import Stream

    from flows.api import Edge

__all__ = ["INPUT_STREAMS", "NAME", "FlowFile", "OutputPlan", "StepPlan", "StreamInfo"]

NAME = re.compile(r"^[a-z][a-z0-9_]*$")
INPUT_STREAMS: dict[str, tuple[str, str]] = {
    "series": ("series", TELEMETRY),
    "readings": ("readings", TELEMETRY),
    "text": ("text", TELEMETRY),
    "blocks": ("blocks", VIBRATION),
    "attributes": ("attributes", ATTRIBUTES),
    "logs": ("logs", "logs"),
}
"""``in.<name>``: the record kind and the device channel of each stream of the device input."""


@dataclass(frozen=True)
class StreamInfo:
    """One stream of the graph: ``in.series``, ``window.down``, ``window.late``..."""

    producer: str
    output: str
    takes: str
    channels: frozenset[str]
    main: bool = False

    @property
    def ref(self) -> str:
        """How the file names it (a step's main output by the step's name)."""
        return self.producer if self.main else f"{self.producer}.{self.output}"


@dataclass(frozen=True)
class StepPlan:
    """A checked step: its kind, settings and the streams it takes."""

    name: str
    kind: Kind
    settings: Settings
    sources: tuple[str, ...]
    stream_settings: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputPlan:
    """A checked output: its stream, the streams it takes and which part counts it."""

    stream: str
    spec: OutputSpec
    sources: tuple[str, ...]
    like: str | None
    part: str | None
    source_parts: tuple[str | None, ...] = ()
    """``dead_letters`` only: the part counting each source (the one owning its channels)."""
    cloud_sources: tuple[str, ...] = ()
    """``cloud_from``: the streams sent to the cloud instead of ``sources`` (kept local)."""


@dataclass(frozen=True)
class FlowFile:
    """A checked flow file, ready to build onto an :class:`~flows.api.Edge`."""

    path: Path
    name: str
    input: str
    channels: tuple[str, ...]
    parts: dict[str, tuple[str, ...]]
    steps: tuple[StepPlan, ...]
    outputs: tuple[OutputPlan, ...]
    streams: dict[str, StreamInfo]
    rejects: tuple[tuple[str, str | None], ...]
    """Reject streams no one takes, with the part that owns them: dead-lettered, or
    counted per reason (a filter's dropped items)."""
    description: str | None = None

    def builder(self) -> Callable[[Edge], None]:
        """``build(edge)`` for ``edgesieve run`` (its ``flow_name`` is the file's ``flow``)."""

        def build(edge: Edge) -> None:
            self.build(edge)

        build.flow_name = self.name  # type: ignore[attr-defined]
        return build

    def build(self, edge: Edge) -> None:
        """Declare the flow on ``edge``: the same calls a Python flow makes."""
        from flows.inputs import unkeyed
        from flows.vibration import ALARM_FILE_AGE

        src = str(self.path)
        dev = edge.devices(self.input, channels=self.channels)
        parts = {name: edge.part(name, channel=chs) for name, chs in self.parts.items()}
        made: dict[str, Stream[Any]] = {}
        letters: dict[str, Callable[[Any], Any]] = {}

        def stream(ref: str) -> Stream[Any]:
            if ref not in made:
                info = self.streams[ref]
                made[ref] = getattr(dev, info.output)
            return made[ref]

        def numbers(ref: str, step_id: str) -> Stream[Any]:
            up = stream(ref)
            if self.streams[ref].takes == "series":  # an output gets readings, not evictions
                up = op.filter(step_id, up, lambda kv: type(kv[1]) is not Evict)
            return up

        for step in self.steps:
            ups = [stream(ref) for ref in step.sources]
            up = ups[0] if len(ups) == 1 else op.merge(f"{step.name}_from", *ups)
            try:
                kwargs = step.kind.kwargs(step.settings, edge.config)
                kwargs.update({k: stream(ref) for k, ref in step.stream_settings.items()})
                takes = self.streams[step.sources[0]].takes
                if step.kind.off(edge.config):  # e.g. vibration.report.enabled: false
                    built = Built({next(iter(step.kind.gives(takes))): up})
                else:
                    built = step.kind.call(Call(step.name, up, kwargs, takes, step.kind.load()))
            except SettingError as exc:
                raise FlowFileError([f"{src}: steps.{step.name}.{exc.path}: {exc.text}"]) from None
            except (TypeError, ValueError) as exc:
                key, text = operator_error(str(exc))
                where = f"steps.{step.name}" + (f".{key}" if key else "")
                raise FlowFileError([f"{src}: {where}: {text}"]) from None
            for out, s in built.streams.items():
                made[f"{step.name}.{out}"] = s
            letters.update({f"{step.name}.{out}": fn for out, fn in built.letters.items()})

        def as_letters(ref: str, reason: str | None, step_id: str) -> Stream[Any]:
            if self.streams[ref].takes == "letters":
                return stream(ref)
            up = numbers(ref, f"{step_id}_readings")
            if reason is not None:
                from flows.ingest import to_dead_letter

                return op.map(step_id, up, lambda item: to_dead_letter(unkeyed(item), reason))
            letter = letters[ref]
            return op.map(step_id, up, lambda item: letter(unkeyed(item)))

        for out in self.outputs:
            target = parts[out.part] if out.part else edge
            spec = out.spec
            if out.stream == "dead_letters":
                for i, (ref, part) in enumerate(zip(out.sources, out.source_parts, strict=True)):
                    target = parts[part] if part else edge
                    target.output(  # = edge.dead_letters(...), with this output's settings
                        "dead_letters",
                        as_letters(ref, spec.reason, f"dead_letters_from_{i}"),
                        cloud=spec.cloud,
                        priority=spec.priority,
                        max_file_age=spec.max_file_age,
                    )
                continue
            ups = [numbers(ref, f"{out.stream}_from_{i}") for i, ref in enumerate(out.sources)]
            age = spec.max_file_age
            if age is None and out.like == "alarms":  # as flows.vibration: alarms show promptly
                age = min(ALARM_FILE_AGE, edge.config.parquet.max_file_age)
            like = out.like if out.like != out.stream else None
            for up in ups:
                target.output(
                    out.stream,
                    up,
                    like=like,
                    cloud=False if out.cloud_sources else spec.cloud,
                    priority=spec.priority,
                    max_file_age=age,
                )
            for i, ref in enumerate(out.cloud_sources):
                target.output(
                    out.stream,
                    numbers(ref, f"{out.stream}_cloud_from_{i}"),
                    like=like,
                    local=False,
                    priority=spec.priority,
                )
            if spec.publish:
                from connectors.sinks.mqtt import alarm_payload

                up = ups[0] if len(ups) == 1 else op.merge(f"{out.stream}_publish_from", *ups)
                target.publish(
                    f"publish_{out.stream}",
                    up,
                    topic=lambda a: f"v1/devices/{unkeyed(a).device}/alarms",
                    payload=lambda a: alarm_payload(unkeyed(a)),
                )
        for ref, part in self.rejects:
            target = parts[part] if part else edge
            step_id = ref.replace(".", "_")
            if self.streams[ref].takes == "dropped":  # counted per reason in the report
                target.count_dropped(f"{step_id}_count", stream(ref))
            else:
                target.dead_letters(as_letters(ref, None, f"{step_id}_letters"))

    def mermaid(self) -> str:
        """The graph as a Mermaid flowchart: the input, steps labelled with their op, outputs."""
        lines = ["flowchart LR"]
        chans = ", ".join(self.channels)
        lines.append(f'    i_{self.input}[/"{self.input}<br/>{chans}"/]')
        owners = {c: part for part, channels in self.parts.items() for c in channels}
        nodes: dict[str | None, list[str]] = {}  # by part: a part's nodes are drawn in a box
        for step in self.steps:
            chans_of = self.streams[f"{step.name}.{next(iter(step.kind.gives('')))}"].channels
            mine = {owners.get(c) for c in chans_of}
            part = mine.pop() if len(mine) == 1 else None
            nodes.setdefault(part, []).append(
                f's_{step.name}("{step.name}<br/><i>{step.kind.op}</i>")'
            )
        sinks = {out.stream: out.part for out in self.outputs}
        letters = [ref for ref, _ in self.rejects if self.streams[ref].takes != "dropped"]
        if letters:
            sinks["dead_letters"] = None
        for stream, part in sorted(sinks.items()):
            nodes.setdefault(part, []).append(f'o_{stream}[("{stream}")]')
        lines += [f"    {node}" for node in nodes.pop(None, [])]
        for part, inside in nodes.items():
            lines.append(f'    subgraph part_{part} ["{part}"]')
            lines += [f"        {node}" for node in inside]
            lines.append("    end")

        def edge(ref: str, to: str, dashed: bool = False, label: str = "") -> str:
            info = self.streams[ref]
            node = f"i_{info.producer}" if info.producer == self.input else f"s_{info.producer}"
            label = label or ("" if info.main else info.output)
            if dashed:
                return f"    {node} -. {label} .-> {to}"
            return f"    {node} -- {label} --> {to}" if label else f"    {node} --> {to}"

        for step in self.steps:
            lines += [edge(ref, f"s_{step.name}") for ref in step.sources]
            lines += [edge(ref, f"s_{step.name}") for ref in step.stream_settings.values()]
        for out in self.outputs:
            lines += [edge(ref, f"o_{out.stream}") for ref in out.sources]
            lines += [edge(ref, f"o_{out.stream}", label="cloud") for ref in out.cloud_sources]
            if out.spec.publish:
                lines.append(f'    p_{out.stream}>"MQTT v1/devices/+/alarms"]')
                lines.append(f"    o_{out.stream} -.-> p_{out.stream}")
        lines += [edge(ref, "o_dead_letters", dashed=True) for ref in letters]
        return "\n".join(lines) + "\n"
