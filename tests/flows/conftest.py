"""Helpers for flow tests: run a flow on recorded messages through the same Edge as production."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest
from bytewax.testing import TestingSource, run_main

from flows.api import Edge
from flows.config import EdgeConfig
from flows.runtime import FlowBuilder
from operators.records import RawMessage

RUNNERS = ("run_main", "cluster_main-1", "cluster_main-2")
"""The ways a flow runs in production: Bytewax's single-worker runner, and 1 or 2 worker threads."""


@pytest.fixture(params=RUNNERS)
def runner(request: pytest.FixtureRequest) -> str:
    """Run the test once per way a flow runs (see :data:`RUNNERS`)."""
    return str(request.param)


def run_recorded(
    build: FlowBuilder,
    config: EdgeConfig,
    messages: Sequence[RawMessage],
    *,
    name: str = "flow",
    batch_size: int = 1,
    runner: str = "cluster_main-1",
) -> Edge:
    """Build ``build`` on an Edge fed ``messages`` and run it to the end (reports written)."""
    edge = Edge(config, name=name, source=TestingSource(list(messages), batch_size))
    build(edge)
    if runner == "run_main":
        run_main(edge.dataflow())
        edge.close()
        edge.reports(write=True)
    else:
        edge.run(workers=int(runner.rsplit("-", 1)[1]))
    return edge


@contextmanager
def running(edge: Edge, *, timeout: float = 60.0) -> Iterator[None]:
    """Run ``edge`` as deployed (its ingest process fills the journal) until the block ends.

    The block starts once the ingest process is subscribed and listening; at its
    end the edge is stopped cleanly, so every accepted message went through the flow.
    """
    errors: list[BaseException] = []

    def run() -> None:
        try:
            edge.run()
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    thread = threading.Thread(target=run, name=f"edge-{edge.name}", daemon=True)
    thread.start()
    try:
        assert edge.wait_ready(timeout), errors or "the ingest process did not get ready"
        yield
    finally:
        edge.stop.set()
        thread.join(timeout)
    assert not thread.is_alive(), f"the edge did not stop within {timeout:g}s"
    if errors:
        raise errors[0]
