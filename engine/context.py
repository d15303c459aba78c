"""What a node sees while it runs: its identity, the application's resources, progress and cancellation."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .events import Event, Progress


class Interrupted(Exception):
    """The run was cancelled; raised at the next check (between nodes or when a node reports progress)."""


class CancelToken:
    """A flag one side sets and the run checks. Thread-safe; one per run (or shared by a queue worker)."""

    def __init__(self) -> None:
        self._flag = threading.Event()

    def cancel(self) -> None:
        self._flag.set()

    @property
    def cancelled(self) -> bool:
        return self._flag.is_set()

    def check(self) -> None:
        if self._flag.is_set():
            raise Interrupted("the run was interrupted")


@dataclass(frozen=True)
class RunContext:
    """Passed as the first argument to every node function.

    `resources` is whatever the application gave the executor (for Stable Diffusion: device, dtype policy,
    folders, the model manager); the engine never looks inside it. `prompt` is the API-format graph being run
    and `extra` the caller's extra data (ComfyUI's `extra_pnginfo` lives there), so a saver can embed them.
    `upcoming()` is the plan's look-ahead: the values already computed that nodes still to run (other than this
    one) will read, so an owner of scarce resources (the model manager) can keep what is about to be used.
    """

    run_id: str
    node_id: str
    node_type: str
    resources: Any
    cancel: CancelToken
    emit: Callable[[Event], None]
    prompt: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    upcoming: Callable[[], Sequence[Any]] = field(default=lambda: (), repr=False)

    def progress(self, value: float, total: float, preview: Any = None) -> None:
        """Report progress (value of total) and stop here if the run was cancelled."""
        self.emit(Progress(self.run_id, self.node_id, value, total, preview))
        self.cancel.check()

    def check_cancelled(self) -> None:
        self.cancel.check()
