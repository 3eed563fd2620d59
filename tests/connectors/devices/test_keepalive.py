"""The connection keepalive timer (real asyncio loop and timers)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from connectors.devices.keepalive import Keepalive


def test_keepalive_counts_only_the_time_spent_waiting_for_a_packet() -> None:
    # Busy with the last packet (its commit, the journal pushing back) is not the device's
    # silence: only a wait for the next packet of ``seconds`` cancels the connection's task.
    async def scenario() -> tuple[bool, float]:
        async def connection() -> None:
            watchdog = Keepalive(0.2)
            try:
                watchdog.reading()
                await asyncio.sleep(0.05)  # a packet arrives
                watchdog.idle()
                await asyncio.sleep(0.5)  # keeping it: 2.5 x the keepalive
                assert not watchdog.fired
                watchdog.reading()
                await asyncio.sleep(5)  # a device that says nothing
            finally:
                watchdog.stop()
                outcome.append(watchdog.fired)

        outcome: list[bool] = []
        start = time.monotonic()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.create_task(connection())
        return outcome[0], time.monotonic() - start

    fired, waited = asyncio.run(scenario())
    assert fired
    assert 0.7 <= waited < 2.0  # 0.05 s waiting, 0.5 s busy, then 0.2 s of silence
