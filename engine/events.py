"""The events of one run. Listeners (the CLI's progress bar, the server's websocket) receive them in order.

A listener is any callable taking one event. Events are small frozen dataclasses; `kind` names them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunStarted:
    run_id: str
    node_ids: tuple[str, ...]
    kind: str = "run_started"


@dataclass(frozen=True)
class NodesCached:
    run_id: str
    node_ids: tuple[str, ...]
    kind: str = "nodes_cached"


@dataclass(frozen=True)
class NodeStarted:
    run_id: str
    node_id: str
    node_type: str
    kind: str = "node_started"


@dataclass(frozen=True)
class Progress:
    run_id: str
    node_id: str
    value: float
    max: float
    preview: Any = None
    kind: str = "progress"


@dataclass(frozen=True)
class NodeFinished:
    run_id: str
    node_id: str
    node_type: str
    ui: Mapping[str, Any] | None = None
    seconds: float = 0.0
    kind: str = "node_finished"


@dataclass(frozen=True)
class NodeFailed:
    run_id: str
    node_id: str
    node_type: str
    exception_type: str
    message: str
    traceback: str
    inputs: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "node_failed"


@dataclass(frozen=True)
class RunFinished:
    run_id: str
    status: str  # "success" | "failed"
    executed: tuple[str, ...] = ()
    kind: str = "run_finished"


@dataclass(frozen=True)
class RunInterrupted:
    run_id: str
    node_id: str | None
    node_type: str | None
    executed: tuple[str, ...] = ()
    kind: str = "run_interrupted"


Event = RunStarted | NodesCached | NodeStarted | Progress | NodeFinished | NodeFailed | RunFinished | RunInterrupted
Listener = Callable[[Event], None]
