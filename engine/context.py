"""What a node sees while it runs: its identity, the application's resources, progress and cancellation; and
the typed hook through which the application wraps every node computation."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .events import Event, Progress

if TYPE_CHECKING:
    from .cache import CachedOutput
    from .spec import NodeDef


class Interrupted(Exception):
    """The run was cancelled; raised at the next check (between nodes or when a node reports progress).

    Only a cancelled run ends "interrupted": a node that raises this while nobody cancelled the run has failed."""


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


class AroundNode(Protocol):
    """Wraps every node computation. `call()` computes the node and returns its `CachedOutput`; the hook returns
    that (or raises). Arguments are keyword-only, as in Hamilton's lifecycle hooks: a hook names what it reads,
    and the engine can add arguments without breaking hooks that take `**_`."""

    def __call__(self, *, definition: NodeDef, call: Callable[[], CachedOutput], ctx: RunContext) -> CachedOutput:
        ...


@runtime_checkable
class Resources(Protocol):
    """What the engine itself uses of the application's resources: the node hook (`around_node`, an `AroundNode`).

    The engine passes the resources on untouched: nodes receive the application's concrete object as
    `ctx.resources` (for Stable Diffusion `nodes.runtime.Runtime`: folders, device and dtype, the model manager)
    and fingerprints receive it as their first argument. Resources without an `around_node` (plain data, test
    doubles) are accepted too: nodes are then called directly."""

    def around_node(self, *, definition: NodeDef, call: Callable[[], CachedOutput], ctx: RunContext) -> CachedOutput:
        ...


@dataclass(frozen=True)
class RunContext:
    """Passed as the first argument to every node function.

    `resources` is what the application gave the executor (for Stable Diffusion `nodes.runtime.Runtime`: device,
    dtype policy, folders, the model manager). It is typed with what the engine uses (`Resources`); a node knows
    its application and uses the concrete type. `prompt` is the API-format graph being run and `extra` the
    caller's extra data (ComfyUI's `extra_pnginfo` lives there), so a saver can embed them.
    `upcoming()` is the plan's look-ahead: the values already computed that nodes still to run (other than this
    one) will read, so an owner of scarce resources (the model manager) can keep what is about to be used.
    `node_keys` gives the content key of every node of the plan (node id -> key) and `node_versions` each one's
    declared version, so a saver can record what made its output (the reproducibility manifest).
    """

    run_id: str
    node_id: str
    node_type: str
    resources: Resources | None
    cancel: CancelToken
    emit: Callable[[Event], None]
    prompt: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    upcoming: Callable[[], Sequence[Any]] = field(default=lambda: (), repr=False)
    node_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    node_versions: Mapping[str, str] = field(default_factory=dict, repr=False)

    def progress(self, value: float, total: float, preview: Any = None) -> None:
        """Report progress (value of total) and stop here if the run was cancelled."""
        self.emit(Progress(self.run_id, self.node_id, value, total, preview))
        self.cancel.check()

    def check_cancelled(self) -> None:
        self.cancel.check()


class StepField(Mapping[str, Any]):
    """A read-only view of one field of each planned step (node id -> `read(step)`): the context's `node_keys`
    without copying the plan for every node that runs."""

    def __init__(self, steps: Mapping[str, Any], read: Callable[[Any], Any]):
        self._steps, self._read = steps, read

    def __getitem__(self, node_id: str) -> Any:
        return self._read(self._steps[node_id])

    def __iter__(self) -> Iterator[str]:
        return iter(self._steps)

    def __len__(self) -> int:
        return len(self._steps)


def step_keys(steps: Mapping[str, Any]) -> Mapping[str, str]:
    """node id -> content key, over a plan's steps."""
    return StepField(steps, lambda step: step.key)


def step_versions(steps: Mapping[str, Any]) -> Mapping[str, str]:
    """node id -> the node type's declared version, over a plan's steps."""
    return StepField(steps, lambda step: step.definition.version)
