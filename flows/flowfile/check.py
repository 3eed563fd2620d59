"""Checking a flow file: its shape, settings and graph, each problem with its key path."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from connectors.streams import STREAMS
from flows.flowfile.kinds import (
    KINDS,
    LETTERABLE,
    MODELS,
    Kind,
    step_model,
)
from flows.flowfile.model import (
    FlowFileError,
    FlowFileModel,
    OutputSpec,
    Settings,
    describe,
    read_flow_yaml,
)
from flows.ingest import CHANNELS

if TYPE_CHECKING:
    pass
from flows.flowfile.graph import INPUT_STREAMS, NAME, FlowFile, OutputPlan, StepPlan, StreamInfo

__all__ = ["load_flow_file", "parse_flow_file"]


def load_flow_file(path: str | Path) -> FlowFile:
    """Read and check a flow file; every problem found is in the :class:`FlowFileError`."""
    path = Path(path)
    return parse_flow_file(read_flow_yaml(path), path)


def parse_flow_file(data: object, path: Path) -> FlowFile:
    """Check already-parsed flow file data (``path`` names it in errors)."""
    return _Checker(path).check(data)


class _Checker:
    def __init__(self, path: Path) -> None:
        self.src = str(path)
        self.path = path
        self.problems: list[str] = []

    def err(self, where: str, text: str) -> None:
        self.problems.append(f"{self.src}: {where}: {text}")

    def stop(self) -> None:
        if self.problems:
            raise FlowFileError(self.problems)

    def check(self, data: object) -> FlowFile:
        if not isinstance(data, dict):
            self.err(
                "(top level)",
                f"a flow file is a mapping (got {type(data).__name__}); "
                "hint: start with flow:, inputs:, steps: and outputs: (see docs/flows.md)",
            )
            self.stop()
        try:
            model: FlowFileModel | None = FlowFileModel.model_validate(data)
        except ValidationError as exc:
            model = None
            self.problems += [f"{self.src}: {p}" for p in describe(exc, (), FlowFileModel)]
        steps = data.get("steps") if isinstance(data.get("steps"), dict) else {}
        checked = self.steps(steps)
        self.stop()
        assert model is not None
        return self.graph(model, checked)

    # -- steps -------------------------------------------------------------------------------

    def steps(self, steps: dict[Any, Any]) -> dict[str, tuple[Kind, Settings]]:
        out = {}
        kinds = ", ".join(KINDS)
        for name, raw in steps.items():
            where = f"steps.{name}"
            if not isinstance(name, str) or not NAME.match(name):
                self.err(
                    where,
                    f"a step name is lower-case letters, digits and _ (got {name!r}); "
                    "hint: e.g. hot_readings",
                )
                continue
            if not isinstance(raw, dict):
                continue  # described by the model
            kind_name = raw.get("op")
            if kind_name is None:
                self.err(f"{where}.op", f"required key is missing; hint: op: one of {kinds}")
                continue
            kind = KINDS.get(kind_name) if isinstance(kind_name, str) else None
            if kind is None:
                self.err(
                    f"{where}.op", f"unknown step kind (got {kind_name!r}); hint: one of {kinds}"
                )
                continue
            model = step_model(kind)
            try:
                settings = model.model_validate(raw)
            except ValidationError as exc:
                for line in describe(exc, ("steps", name), model):
                    line = line.replace(
                        "unknown key; hint: the keys here are",
                        f"unknown setting of {kind.op}; hint: its settings are",
                    )
                    self.problems.append(f"{self.src}: {line}")
                continue
            if not kind.available():
                module = kind.function.split(":")[0]
                ready = ", ".join(k.op for k in KINDS.values() if k.available())
                self.err(
                    f"{where}.op",
                    f"{kind.op} needs {module}, which this edgesieve does not have; "
                    f"hint: upgrade edgesieve, or use one of {ready}",
                )
                continue
            out[name] = (kind, settings)
        return out

    # -- the graph ---------------------------------------------------------------------------

    def graph(self, model: FlowFileModel, steps: dict[str, tuple[Kind, Settings]]) -> FlowFile:
        if len(model.inputs) != 1:
            self.err(
                "inputs",
                f"a flow has one device input (got {len(model.inputs)}: "
                f"{', '.join(model.inputs)}); hint: list every channel in one input, "
                "steps take the streams they need from it",
            )
            self.stop()
        (input_name, input_spec), *_ = model.inputs.items()
        channels = tuple(dict.fromkeys(input_spec.channels))
        if not NAME.match(input_name):
            self.err(f"inputs.{input_name}", "an input name is lower-case letters, digits and _")
        if input_name in steps:
            self.err(
                f"steps.{input_name}",
                f"has the name of the input; hint: rename the step, {input_name}.* are the "
                "input's streams",
            )
        self.parts(model, channels)
        streams: dict[str, StreamInfo] = {}
        for name, (takes, channel) in INPUT_STREAMS.items():
            if channel in CHANNELS:
                streams[f"{input_name}.{name}"] = StreamInfo(
                    input_name, name, takes, frozenset({channel})
                )
        names: dict[str, str] = {}  # every way to name a stream -> its canonical ref
        names.update({ref: ref for ref in streams})
        for name, (kind, _settings) in steps.items():
            outs = list(kind.gives(""))
            names[name] = f"{name}.{outs[0]}"
            names.update({f"{name}.{o}": f"{name}.{o}" for o in outs})
        sources: dict[str, tuple[str, ...]] = {}
        stream_settings: dict[str, dict[str, str]] = {}
        for name, (kind, settings) in steps.items():
            sources[name] = self.refs(f"steps.{name}.from", settings.from_, names)  # type: ignore[attr-defined]
            stream_settings[name] = {
                key: ref[0]
                for key in kind.streams
                if (value := getattr(settings, key)) is not None
                and (ref := self.refs(f"steps.{name}.{key}", value, names))
            }
        self.stop()
        order = self.order(steps, sources, stream_settings, input_name)
        self.stop()
        used: set[str] = set()
        plans = []
        for name in order:
            kind, settings = steps[name]
            refs = sources[name]
            used.update(refs)
            used.update(stream_settings[name].values())
            takes = self.takes(f"steps.{name}.from", refs, streams, input_name, channels)
            if takes is None:
                continue
            if takes not in kind.takes:
                fitting = [r for r, s in streams.items() if s.takes in kind.takes]
                self.err(
                    f"steps.{name}.from",
                    f"{kind.op} does not take {takes} (got {', '.join(refs)}); hint: "
                    f"{kind.op} takes {', '.join(sorted(kind.takes))}, e.g. "
                    f"{', '.join(fitting[:3]) or 'the stream of another step'}",
                )
                continue
            if (
                kind.op == "threshold"
                and takes != "features"
                and "rules" not in settings.model_fields_set
            ):
                self.err(
                    f"steps.{name}.rules",
                    f"required when the step takes {takes}; hint: the default rules watch "
                    "vibration features (velocity_rms_mm_s, kurtosis), e.g. rules: "
                    "[{name: hot, field: value, raise_above: 80}]",
                )
            for key, ref in stream_settings[name].items():
                if streams[ref].takes != "alarms":
                    got = streams[ref]
                    self.err(
                        f"steps.{name}.{key}",
                        f"must name a stream of alarms (got {got.ref}: {got.takes}); "
                        "hint: the name of a threshold step",
                    )
            chans = frozenset().union(*(streams[r].channels for r in refs))
            for i, (out, out_takes) in enumerate(kind.gives(takes).items()):
                streams[f"{name}.{out}"] = StreamInfo(name, out, out_takes, chans, main=i == 0)
            plans.append(StepPlan(name, kind, settings, refs, stream_settings[name]))
        self.stop()
        outputs = [
            self.output(s, spec, names, streams, model, used) for s, spec in model.outputs.items()
        ]
        for name in steps:
            if not any(ref.startswith(f"{name}.") for ref in used):
                self.err(
                    f"steps.{name}",
                    f"its output goes nowhere; hint: add an output with from: {name}, feed it "
                    "to another step, or remove the step",
                )
        self.stop()
        owners = {c: part for part, spec in model.parts.items() for c in spec.channels}
        rejects = tuple(
            (ref, self.owner(streams[ref].channels, owners))
            for plan in plans
            for ref in (f"{plan.name}.{out}" for out in plan.kind.rejects)
            if ref not in used
        )
        self.stop()
        return FlowFile(
            path=self.path,
            name=model.flow,
            input=input_name,
            channels=channels,
            parts={name: tuple(spec.channels) for name, spec in model.parts.items()},
            steps=tuple(plans),
            outputs=tuple(o for o in outputs if o is not None),
            streams=streams,
            rejects=rejects,
            description=model.description,
        )

    def parts(self, model: FlowFileModel, channels: tuple[str, ...]) -> None:
        owner: dict[str, str] = {}
        for name, spec in model.parts.items():
            where = f"parts.{name}"
            if not NAME.match(name) or name == model.flow:
                self.err(
                    where,
                    f"a part name is lower-case letters, digits and _, not the flow's name "
                    f"(got {name!r}); hint: name it after what it does, e.g. telemetry",
                )
            for channel in spec.channels:
                if channel not in channels:
                    self.err(
                        f"{where}.channels",
                        f"channel {channel!r} is not one of the input's ({', '.join(channels)}); "
                        f"hint: add it to the input's channels or remove it here",
                    )
                elif channel in owner:
                    self.err(
                        f"{where}.channels",
                        f"channel {channel!r} already belongs to part {owner[channel]!r}; "
                        "hint: each channel is counted by one part",
                    )
                owner.setdefault(channel, name)

    def refs(self, where: str, value: str | list[str], names: dict[str, str]) -> tuple[str, ...]:
        refs = [value] if isinstance(value, str) else value
        if not refs:
            self.err(where, "names no stream (got []); hint: from: in.series")
        out = []
        for ref in refs:
            canonical = names.get(ref)
            if canonical is None:
                known = ", ".join(sorted(names))
                self.err(where, f"unknown stream {ref!r}; hint: known streams are {known}")
            else:
                out.append(canonical)
        return tuple(out)

    def order(
        self,
        steps: dict[str, Any],
        sources: dict[str, tuple[str, ...]],
        settings: dict[str, dict[str, str]],
        input_name: str,
    ) -> list[str]:
        """The steps in an order where each comes after those it takes from; cycles are errors."""
        deps = {
            name: {
                ref.split(".")[0]
                for ref in (*sources[name], *settings[name].values())
                if ref.split(".")[0] != input_name
            }
            for name in steps
        }
        order: list[str] = []
        state: dict[str, int] = {}  # 1: being visited, 2: done

        def visit(name: str, path: list[str]) -> None:
            if state.get(name) == 2:
                return
            if state.get(name) == 1:
                cycle = [*path[path.index(name) :], name]
                self.err(
                    f"steps.{name}.from",
                    f"the steps form a cycle: {' -> '.join(reversed(cycle))}; hint: a step "
                    "cannot take its own output, directly or through other steps",
                )
                raise _Cycle
            state[name] = 1
            for dep in sorted(deps[name]):
                visit(dep, [*path, name])
            state[name] = 2
            order.append(name)

        try:
            for name in steps:
                visit(name, [])
        except _Cycle:
            return []
        return order

    def takes(
        self,
        where: str,
        refs: tuple[str, ...],
        streams: dict[str, StreamInfo],
        input_name: str,
        channels: tuple[str, ...],
    ) -> str | None:
        kinds = {}
        for ref in refs:
            info = streams[ref]
            kinds.setdefault(info.takes, ref)
            if info.producer == input_name:
                (channel,) = info.channels
                if channel not in channels:
                    self.err(
                        where,
                        f"{ref} needs channel {channel!r} in inputs.{input_name}.channels "
                        f"(got {', '.join(channels)}); hint: add {channel} to the channels",
                    )
                    return None
        if len(kinds) > 1:
            got = ", ".join(f"{ref}: {t}" for t, ref in kinds.items())
            self.err(
                where, f"merges streams of different records ({got}); hint: merge alike streams"
            )
            return None
        return next(iter(kinds))

    def output(
        self,
        stream: str,
        spec: OutputSpec,
        names: dict[str, str],
        streams: dict[str, StreamInfo],
        model: FlowFileModel,
        used: set[str],
    ) -> OutputPlan | None:
        where = f"outputs.{stream}"
        if not stream.isidentifier() or not stream.islower():
            self.err(where, "a stream name is a lower-case identifier; hint: e.g. pressure_points")
            return None
        refs = self.refs(f"{where}.from", spec.from_, names)
        used.update(refs)
        if not refs or len(refs) != len(
            [spec.from_] if isinstance(spec.from_, str) else spec.from_
        ):
            return None
        if spec.part is not None and spec.part not in model.parts:
            self.err(
                f"{where}.part",
                f"unknown part (got {spec.part!r}); "
                f"hint: one of {', '.join(model.parts) or 'none yet: declare parts: first'}",
            )
        owners = {c: part for part, p in model.parts.items() for c in p.channels}
        if stream == "dead_letters":
            each = tuple(spec.part or self.owner(streams[r].channels, owners) for r in refs)
            for key in ("like", "publish"):
                if key in spec.model_fields_set:
                    self.err(f"{where}.{key}", "dead_letters takes no " + key)
            for ref in refs:
                info = streams[ref]
                if info.takes == "letters":
                    continue
                if spec.reason is None and info.takes in LETTERABLE and info.output in _LETTERED:
                    continue
                if info.takes not in LETTERABLE:
                    self.err(
                        f"{where}.from",
                        f"{info.ref} carries {info.takes}, which cannot be dead letters; "
                        "hint: dead letters are device readings, blocks and attributes",
                    )
                elif spec.reason is None:
                    self.err(
                        f"{where}.reason",
                        f"required for {info.ref} ({info.takes}); hint: reason: why they are "
                        "dead letters, e.g. reason: out of range",
                    )
            return OutputPlan(stream, spec, refs, "dead_letters", spec.part, each)
        chans = frozenset().union(*(streams[r].channels for r in refs))
        part = spec.part or self.owner(chans, owners, f"{where}.part")
        if spec.reason is not None:
            self.err(f"{where}.reason", "only dead_letters takes a reason; hint: remove reason:")
        kinds = {streams[r].takes for r in refs}
        if len(kinds) > 1:
            got = ", ".join(f"{streams[r].ref}: {streams[r].takes}" for r in refs)
            self.err(
                f"{where}.from",
                f"merges streams of different records ({got}); hint: one output per kind",
            )
            return None
        (takes,) = kinds
        has = MODELS[takes]
        first = streams[refs[0]].ref
        if has is None:
            steps = ", ".join(k.op for k in KINDS.values() if takes in k.takes) or "a step"
            self.err(
                f"{where}.from",
                f"{first} carries {takes}, which has no columns of its own; hint: feed it to "
                f"{steps} and output that",
            )
            return None
        like = spec.like
        if stream in STREAMS:
            if like is not None and like != stream:
                self.err(
                    f"{where}.like",
                    f"{stream} is a standard stream, it takes no like (got {like!r})",
                )
            elif has != stream:
                self.err(
                    f"{where}.from",
                    f"{stream} rows are {stream}, but {first} carries {has} rows; hint: take a "
                    f"step that gives {stream} rows, or name a new stream (like: {has})",
                )
            like = stream
        elif like is None:
            like = has
        elif like not in STREAMS:
            self.err(
                f"{where}.like",
                f"not a known stream (got {like!r}); hint: one of {', '.join(sorted(STREAMS))}",
            )
        elif like != has:
            self.err(
                f"{where}.like",
                f"{first} carries {has} rows (got like: {like}); "
                f"hint: like: {has}, or leave it out",
            )
        if spec.publish and takes != "alarms":
            self.err(
                f"{where}.publish",
                f"only alarms are published (got {first}: {takes}); hint: publish the output of "
                "a threshold step",
            )
        clouds: tuple[str, ...] = ()
        if spec.cloud_from is not None:
            clouds = self.refs(f"{where}.cloud_from", spec.cloud_from, names)
            used.update(clouds)
            wrong = [streams[r] for r in clouds if streams[r].takes != takes]
            if wrong:
                self.err(
                    f"{where}.cloud_from",
                    f"{wrong[0].ref} carries {wrong[0].takes}, but from carries {takes}; hint: "
                    "cloud_from takes the same kind of rows, e.g. a report_by_exception step "
                    "fed from the same step",
                )
            if spec.cloud is False:
                self.err(
                    f"{where}.cloud_from",
                    "cloud: false sends nothing to the cloud; hint: remove cloud_from or cloud",
                )
        return OutputPlan(stream, spec, refs, like, part, cloud_sources=clouds)

    def owner(
        self, channels: frozenset[str], owners: dict[str, str], where: str | None = None
    ) -> str | None:
        parts = sorted({owners[c] for c in channels if c in owners})
        if len(parts) > 1 and where is not None:
            self.err(
                where,
                f"its streams come from channels of parts {', '.join(parts)}; "
                f"hint: part: {parts[0]} (the part whose report counts the rows)",
            )
        return parts[0] if parts else None


_LETTERED = frozenset({"late"})
"""Reject outputs that make their own dead letters (a window's late readings, late log lines)."""


class _Cycle(Exception):
    pass
