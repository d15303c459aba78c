"""The time limit of one run (`--prompt-timeout`), for the server's worker and for `sdgraph run`.

When the limit passes, the run's CancelToken is set: a node sees it at its next progress check and the run ends
as interrupted, which the caller records as failed with `timeout_reason`. A node that never checks (stuck in C
code, or a loop without checks) cannot be stopped from another thread in Python; if the run is still going
`grace` seconds after the limit, `on_stuck` is called (from a timer thread) so the caller can give up on the run:
the server marks the prompt failed and exits for its supervisor to restart it, the CLI exits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .context import CancelToken


def timeout_reason(limit: float) -> str:
    return f"the prompt exceeded its time limit of {limit:g} s (--prompt-timeout)"


def stuck_reason(limit: float, grace: float) -> str:
    return (f"{timeout_reason(limit)}, and its node did not stop within {grace:g} s more (it never checks for "
            "interruption, e.g. stuck in C code)")


class Deadline:
    """Arms two timers for one run; `stop()` when the run has ended (whatever the outcome). `limit` None or 0
    means no limit."""

    def __init__(self, token: CancelToken, limit: float | None, grace: float, on_stuck: Callable[[], None]):
        self.token = token
        self.limit = limit or None
        self.grace = grace
        self.on_stuck = on_stuck
        self.expired = False
        self._lock = threading.Lock()
        self._stopped = False
        self._timer: threading.Timer | None = None

    def start(self) -> Deadline:
        if self.limit is not None:
            self._arm(self.limit, self._expire)
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._timer is not None:
                self._timer.cancel()

    def _arm(self, seconds: float, action: Callable[[], None]) -> None:
        timer = threading.Timer(seconds, action)
        timer.daemon = True
        timer.name = "sdgraph-deadline"
        self._timer = timer
        timer.start()

    def _expire(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self.expired = True
            self.token.cancel()
            self._arm(self.grace, self._stuck)

    def _stuck(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self.on_stuck()
