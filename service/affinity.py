"""Which worker should run a prompt: the model files it needs, what each worker holds, and the routing policies.

Pure functions over plain data (no Ray, no torch), so the policies are tested without a cluster:

- `models_needed(graph, registry, resources)`: the model files a validated graph's loaders will read, by file
  identity (path, size, mtime), computed from the loaders' fingerprints without loading anything. A fingerprint
  counts as a model file when it is a tuple starting with (path, size, mtime_ns), the shape of
  `nodes.loaders.file_identity` (checkpoints, VAEs, ControlNets, upscale models) and of the LoRA loaders'.
- `choose_affinity(...)` and `RoundRobin`: given one free worker and the pending prompts (in queue order, a
  bounded look-ahead window), which prompt that worker takes and why. Never a worker whose memory is smaller
  than the prompt's models (`fits`), never a worker a prompt was lost on when another one can take it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine import Graph, NodeRegistry
from engine.spec import accepted_kwargs


@dataclass(frozen=True, order=True)
class ModelFile:
    """A model file by identity: a file replaced under the same name is another model."""

    path: str
    size: int
    mtime_ns: int

    def as_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns}


def model_file_of(identity: Any) -> ModelFile | None:
    """The ModelFile a loader's fingerprint names, or None when the fingerprint is not a file identity."""
    if (isinstance(identity, tuple) and len(identity) >= 3 and isinstance(identity[0], str)
            and isinstance(identity[1], int) and isinstance(identity[2], int)):
        return ModelFile(identity[0], identity[1], identity[2])
    return None


def models_needed(graph: Graph, registry: NodeRegistry, resources: Any) -> tuple[ModelFile, ...]:
    """The model files the graph's nodes declare through their fingerprints (sorted, each once). A fingerprint
    that fails (a missing file) names nothing: validation has already said what is wrong."""
    found: set[ModelFile] = set()
    for inst in graph:
        definition = registry.get(inst.type)
        if definition is None or definition.fingerprint is None:
            continue
        try:
            identity = definition.fingerprint(resources, **accepted_kwargs(definition.fingerprint, inst.constants()))
        except Exception:  # noqa: BLE001 - a node's own code never stops routing
            continue
        model = model_file_of(identity)
        if model is not None:
            found.add(model)
    return tuple(sorted(found))


def need_bytes(models: Iterable[ModelFile]) -> int:
    """What a prompt's models take in memory, estimated by their file sizes (the weights as stored)."""
    return sum(m.size for m in models)


@dataclass(frozen=True)
class WorkerView:
    """What the front knows of a worker when it routes: what it holds, its memory, whether it is running."""

    name: str
    holds: frozenset[ModelFile] = frozenset()
    capacity: int | None = None  # bytes of models it can hold at all (its memory budget); None: unknown
    free: int = 0  # bytes it could load now without evicting
    busy: bool = False

    def fits(self, models: Iterable[ModelFile]) -> bool:
        return self.capacity is None or need_bytes(models) <= self.capacity

    def held_bytes(self, models: Iterable[ModelFile]) -> int:
        return sum(m.size for m in models if m in self.holds)


@dataclass(frozen=True)
class Candidate:
    """A pending prompt as routing sees it."""

    prompt_id: str
    models: tuple[ModelFile, ...]
    avoid: frozenset[str] = frozenset()  # workers it was lost on (a retry goes elsewhere when it can)
    skipped: int = 0  # how often a free worker passed it over for a later prompt


@dataclass(frozen=True)
class Route:
    prompt_id: str
    worker: str
    reason: str

    def as_json(self) -> dict[str, str]:
        return {"worker": self.worker, "reason": self.reason}


@dataclass(frozen=True)
class Unroutable:
    """A prompt no worker can ever run: its models need more memory than the largest worker has."""

    prompt_id: str
    reason: str


def eligible(candidate: Candidate, workers: Sequence[WorkerView]) -> list[WorkerView]:
    """Workers that can run the candidate: its models fit, and not one it was lost on unless none other fits."""
    fitting = [w for w in workers if w.fits(candidate.models)]
    fresh = [w for w in fitting if w.name not in candidate.avoid]
    return fresh or fitting


def unroutable(candidate: Candidate, workers: Sequence[WorkerView]) -> Unroutable | None:
    if not workers or eligible(candidate, workers):
        return None
    largest = max((w.capacity or 0) for w in workers)
    return Unroutable(candidate.prompt_id, f"its models need {need_bytes(candidate.models)} bytes of memory and the "
                      f"largest worker has {largest} bytes ({', '.join(m.path for m in candidate.models)}); add a "
                      "worker with more memory (sdgraph worker --memory) or use a smaller model")


def _best_free(candidate: Candidate, workers: Sequence[WorkerView]) -> WorkerView | None:
    """The free worker affinity gives the candidate: the most of its models held, then the most free memory."""
    free = [w for w in eligible(candidate, workers) if not w.busy]
    if not free:
        return None
    return max(free, key=lambda w: (w.held_bytes(candidate.models), w.free))


def choose_affinity(me: str, candidates: Sequence[Candidate], workers: Sequence[WorkerView], *,
                    patience: int = 8) -> Route | None:
    """Which of the pending prompts (queue order) the free worker `me` takes, by affinity:

    0. the first in line, once it was passed over `patience` times (so no prompt waits for ever);
    1. the first prompt whose models `me` holds already;
    2. else the first prompt for which `me` is the best free worker (most of its models held, then most free
       memory) and that no busy worker holds the models of (that one will take it when it is free);
    3. else the first in line, if `me` is the best free worker for it (a worker never idles while the
       prompt at the head waits for a busy one).
    None: `me` takes nothing now (another free worker suits every prompt better)."""
    views = {w.name: w for w in workers}
    mine = views.get(me)
    if mine is None:
        return None
    head = candidates[0] if candidates else None
    if head is not None and head.skipped >= patience and _best_free(head, workers) is mine:
        return Route(head.prompt_id, me, f"first in line, passed over {head.skipped} times")
    for c in candidates:
        if mine in eligible(c, workers) and c.models and all(m in mine.holds for m in c.models):
            return Route(c.prompt_id, me, f"holds its models ({_names(c.models)})")
    fallback: Route | None = None
    for index, c in enumerate(candidates):
        best = _best_free(c, workers)
        if best is None or best.name != me:
            continue
        held_elsewhere = any(w.busy and w.name != me and w.held_bytes(c.models) > mine.held_bytes(c.models)
                             for w in eligible(c, workers))
        why = (f"the most free memory of the free workers ({mine.free} bytes)" if not mine.held_bytes(c.models)
               else f"holds some of its models ({_names(m for m in c.models if m in mine.holds)})")
        if not held_elsewhere:
            return Route(c.prompt_id, me, why)
        if fallback is None and index == 0:
            fallback = Route(c.prompt_id, me, f"{why}; the worker holding its models is busy")
    return fallback


@dataclass
class RoundRobin:
    """The baseline: prompts in queue order, the n-th to the n-th worker in turn (of those its models fit)."""

    turn: int = 0

    def choose(self, me: str, candidates: Sequence[Candidate], workers: Sequence[WorkerView]) -> Route | None:
        if not candidates:
            return None
        head = candidates[0]
        names = [w.name for w in eligible(head, workers)]
        if not names:
            return None
        target = names[self.turn % len(names)]
        if target != me:
            return None
        self.turn += 1
        return Route(head.prompt_id, me, f"round-robin turn {self.turn}")


def choose(policy: str, me: str, candidates: Sequence[Candidate], workers: Sequence[WorkerView], *,
           round_robin: RoundRobin, patience: int) -> Route | None:
    if policy == "round-robin":
        return round_robin.choose(me, candidates, workers)
    return choose_affinity(me, candidates, workers, patience=patience)


def _names(models: Iterable[ModelFile]) -> str:
    return ", ".join(m.path.rsplit("/", 1)[-1] for m in models)


POLICIES = ("affinity", "round-robin")


def describe_workers(workers: Mapping[str, WorkerView]) -> list[dict[str, Any]]:
    return [{"name": w.name, "busy": w.busy, "capacity": w.capacity, "free": w.free,
             "holds": [m.as_json() for m in sorted(w.holds)]} for w in workers.values()]
