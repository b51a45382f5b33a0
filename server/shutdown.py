"""Graceful shutdown: drain in-flight requests before uvicorn closes the socket.

Plain uvicorn closes its listening socket as soon as SIGTERM arrives, so a
client that connects during the drain gets "connection refused" and a load
balancer cannot tell a restart from a crash. Here the first SIGTERM / SIGINT
only sets `app.state.draining`: the socket stays open, `/ready` and every
`/v1` route answer 503 (`shutting_down`), and requests already running go on.
Once none are left, or after the drain timeout, uvicorn's ordinary shutdown
runs. A second signal skips the wait.
"""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("quantserve")


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal starts a drain instead of a close."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.app = app
        self.drain_timeout_s = drain_timeout_s
        self._drain_started: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_started is not None or self.app.state.engine is None:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)
        self._drain_started = time.monotonic()
        self.app.state.draining = True
        log.info("draining: refusing new requests, waiting up to %.0fs for %d in flight",
                 self.drain_timeout_s, len(self.server_state.tasks))

    async def on_tick(self, counter: int) -> bool:
        if self._drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self._drain_started
            if not self.server_state.tasks or waited >= self.drain_timeout_s:
                log.info("drained in %.1fs (%d request(s) still running)", waited,
                         len(self.server_state.tasks))
                self.should_exit = True
        return await super().on_tick(counter)
