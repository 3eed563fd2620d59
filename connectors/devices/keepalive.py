"""A connection's keepalive: cancel its task once one wait for the peer lasted too long."""

from __future__ import annotations

import asyncio


class Keepalive:
    """The keepalive of one connection: cancels its task once one packet took ``seconds``.

    One timer per connection, rescheduled only when it fires: cheaper than
    ``asyncio.wait_for`` around every packet, which makes a task and a timer
    for each message a device publishes.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.fired = False
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._since: float | None = None
        self._timer = self._loop.call_later(seconds, self._check)

    def reading(self) -> None:
        """A packet is awaited from now on."""
        self._since = self._loop.time()

    def idle(self) -> None:
        """No packet is awaited (the connection is busy with the last one)."""
        self._since = None

    def _check(self) -> None:
        since, now = self._since, self._loop.time()
        if since is not None and now - since >= self.seconds:
            self.fired = True
            if self._task is not None:
                self._task.cancel()
            return
        wait = self.seconds if since is None else since + self.seconds - now
        self._timer = self._loop.call_later(wait, self._check)

    def stop(self) -> None:
        """Cancel the timer (the connection ends)."""
        self._timer.cancel()
