"""Prompts executed on Ray actors: `sdgraph serve --ray ADDRESS` (and `sdgraph run --sweep ... --ray`).

The front keeps everything clients see: the HTTP/WebSocket API, the durable SQLite queue, history, /view. Each
worker is a Ray actor (`PromptRunner`: one per device, with its own registry, Runtime, model manager and output
cache); the front gives each one a thread, a `service.worker.Worker` whose executor is a `RemoteExecutor`, so
validation, events, history, time limits and failures are recorded exactly as with one local worker. Which
worker claims which prompt is decided by `service.dispatch.Router` (affinity by model file, or round-robin).

- Events (progress, previews, node results) are buffered in the actor and fetched by the front while the prompt
  runs (every `POLL_SECONDS`), then translated into ComfyUI's websocket messages as for a local run.
- Outputs: the actors write into the shared base folder's output/ with atomic renames (SaveImage's
  `engine.files.atomic_write`), so /view and history work as on one machine; on a multi-machine cluster output/
  (and models/) is a shared mount (docs/scale-out.md).
- Faults: an actor that dies mid-prompt (killed, crashed, node lost) makes the run raise `WorkerLost`: the prompt
  is re-queued once, for another worker when there is one, and failed with the reason the second time. A worker
  the front started is replaced; one started by `sdgraph worker` is dropped from routing.
- Interrupt and per-prompt cancel reach the actor running that prompt (its Worker's cancel token is forwarded).

The actor itself, how actors are started and found, and `sdgraph worker` are in service/ray_worker.py. Ray is
imported only in these two modules, and only when a pool starts: without --ray the server never loads it.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from engine import CancelToken, NodeRegistry, validate
from engine.deadline import stuck_reason
from engine.sizes import DEFAULT_SIZE_LIMITS, SizeLimits

from .affinity import ModelFile, WorkerView, models_needed
from .dispatch import RoutedStore, Router
from .messages import RunMessages, history_entry, ws_text
from .queue import QueueItem, QueueStore
from .ray_worker import WorkerSettings, connect, running_workers, start_actor
from .scale_options import ScaleOut
from .worker import Worker, WorkerLost

log = logging.getLogger("sdgraph.scaleout")
POLL_SECONDS = 0.1


def view_of(info: dict[str, Any], *, busy: bool = False) -> WorkerView:
    return WorkerView(info["name"], frozenset(ModelFile(*h) for h in info["holds"]), info["capacity"], info["free"],
                      busy)


def actor_lost_errors() -> tuple[type[BaseException], ...]:
    import ray.exceptions as rex

    return tuple(getattr(rex, n) for n in ("RayActorError", "ActorUnavailableError", "NodeDiedError",
                                           "ObjectLostError", "OwnerDiedError") if hasattr(rex, n))


class _RemoteCache:
    def __init__(self, slot: Slot):
        self.slot = slot

    def clear(self) -> None:
        self.slot.actor.free.remote(True, False)


class RemoteExecutor:
    """What a Slot's Worker runs prompts with: the same `run(...)` as engine.Executor, executed by the slot's
    actor. `resources` are the front's (validation before a run reads the same folders)."""

    def __init__(self, slot: Slot, resources: Any, sizes: SizeLimits):
        self.slot = slot
        self.resources = resources
        self.sizes = sizes
        self.cache = _RemoteCache(slot)

    def run(self, graph: Any, *, listeners: Iterable[Callable[[Any], None]], cancel: CancelToken, run_id: str,
            prompt: dict, extra: dict) -> Any:
        import ray

        slot, listeners = self.slot, list(listeners)
        actor = slot.actor
        try:
            ref = actor.run.remote(prompt, list(graph.outputs), run_id, extra, self.sizes)
            forwarded = False
            while True:
                ready, _ = ray.wait([ref], timeout=POLL_SECONDS)
                if cancel.cancelled and not forwarded:
                    actor.cancel.remote(run_id)
                    forwarded = True
                for event in ray.get(actor.events.remote(run_id)):
                    for listen in listeners:
                        listen(event)
                if ready:
                    break
            report, info = ray.get(ref)
        except actor_lost_errors() as exc:
            raise slot.pool.lost(slot, run_id, exc) from exc
        slot.reported(info)
        return report


class Slot(Worker):
    """The front's thread for one worker actor: a Worker claiming through routing and running on the actor."""

    def __init__(self, pool: RayPool, name: str, actor: Any, info: dict[str, Any], *, owned: bool,
                 **worker_kwargs: Any):
        self.pool, self.name, self.actor, self.owned = pool, name, actor, owned
        self.info = info
        super().__init__(store=RoutedStore(pool.store, pool.router, name),
                         executor=RemoteExecutor(self, pool.resources, pool.sizes), **worker_kwargs)
        self._thread.name = f"sdgraph-slot-{name}"

    def reported(self, info: dict[str, Any]) -> None:
        self.info = info
        self.pool.router.update(self.name, holds=view_of(info).holds, free=info["free"], capacity=info["capacity"])

    def _abandon(self, current: Any, messages: RunMessages) -> None:
        """The deadline's grace has passed and the node on the actor still runs (stuck in C code): unlike a local
        worker, the server need not exit. The prompt is failed (PromptTimeout, not retried) and the actor is killed,
        which ends the run and replaces the worker (from the deadline's timer thread)."""
        import ray

        with self._lock:
            if self._current is not current:
                return
            current.abandoned = True
        item = current.item
        reason = f"{stuck_reason(self.prompt_timeout or 0, self.stuck_grace)}; its worker {self.name} was restarted"
        log.error("prompt %s: %s", item.prompt_id, reason)
        self._record_failure(item, messages, "PromptTimeout", reason, node_id=current.node,
                             node_type=self._type_of(item, current.node))
        ray.kill(self.actor)

    def _apply_free(self) -> None:  # POST /free reaches the actor, between its prompts
        with self._lock:
            unload, free = self._free["unload_models"], self._free["free_memory"]
            self._free = {"unload_models": False, "free_memory": False}
        if unload or free:
            self.actor.free.remote(unload, free)


class RayPool:
    """The server's worker when it scales out: the surface of `service.worker.Worker` (start, wake, alive,
    failure, running, interrupt, request_free, stop_now, stop, completed) over one Slot per worker actor."""

    def __init__(self, *, store: QueueStore, registry: NodeRegistry, resources: Any, hub: Any, scale: ScaleOut,
                 settings: WorkerSettings, sizes: SizeLimits = DEFAULT_SIZE_LIMITS,
                 on_queue_change: Callable[[], None] | None = None, prompt_timeout: float | None = None,
                 stuck_grace: float = 60.0, on_fatal: Callable[[str, int], None] | None = None,
                 scrub: Callable[[str], str] | None = None, previewer: Callable[[Any], Any] | None = None):
        self.store, self.registry, self.resources, self.hub = store, registry, resources, hub
        self.scale, self.settings, self.sizes, self.scrub = scale, settings, sizes, scrub
        self.router = Router(store, needs=self._needs, policy=scale.policy, lookahead=scale.lookahead,
                             on_unroutable=self._fail_unroutable)
        self.slots: list[Slot] = []
        self._worker_kwargs = {"registry": registry, "hub": hub, "on_queue_change": on_queue_change,
                               "prompt_timeout": prompt_timeout, "stuck_grace": stuck_grace, "on_fatal": on_fatal,
                               "scrub": scrub, "sizes": sizes, "previewer": previewer}
        self._losses: dict[str, int] = {}
        self._lock = threading.Lock()
        self._names = itertools.count(1)
        self._started_ray = False
        self.failure: str | None = None

    # -- life ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        import ray

        self._started_ray = connect(self.scale.address)
        found = [(name, actor, False) for name, actor in running_workers()]
        wanted = self.scale.workers or (0 if found else 1)
        taken = {name for name, _, _ in found}
        for _ in range(wanted):
            name = self._fresh_name(taken)
            taken.add(name)
            found.append((name, start_actor(name, self.settings), True))
        infos = ray.get([actor.info.remote() for _, actor, _ in found])
        for (name, actor, owned), info in zip(found, infos, strict=True):
            slot = Slot(self, name, actor, info, owned=owned, **self._worker_kwargs)
            self.router.register(view_of(info), slot.wake)
            self.slots.append(slot)
        for slot in self.slots:
            slot.start()
        log.info("scale-out: %d worker(s) on Ray (%s routing): %s", len(self.slots), self.scale.policy,
                 ", ".join(f"{s.name} (pid {s.info['pid']})" for s in self.slots))

    def stop(self, timeout: float, *, grace: float = 10) -> bool:
        """Every slot stops as `Worker.stop` does, all at once (so the wait is `timeout`, not one per worker); then
        the actors this pool started are killed."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, len(self.slots))) as threads:
            ends = list(threads.map(lambda slot: slot.stop(timeout, grace=grace), self.slots))
        self._shutdown_actors()
        return all(ends)

    def stop_now(self) -> None:
        for slot in self.slots:
            slot.stop_now()

    def _shutdown_actors(self) -> None:
        import ray

        for slot in self.slots:
            if slot.owned:
                ray.kill(slot.actor)
        if self._started_ray:
            ray.shutdown()

    # -- the Worker surface ---------------------------------------------------------------------------------------
    def wake(self) -> None:
        self.router.wake_all()

    @property
    def alive(self) -> bool:
        return self.failure is None and any(slot.alive for slot in self.slots)

    @property
    def completed(self) -> int:
        return sum(slot.completed for slot in self.slots)

    def running(self) -> tuple[str, str | None, str | None] | None:
        return next(iter(self.running_all()), None)

    def running_all(self) -> list[tuple[str, str | None, str | None]]:
        return [r for slot in self.slots if (r := slot.running()) is not None]

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Cancel `prompt_id` on the worker running it (without an id: every running prompt)."""
        return any([slot.interrupt(prompt_id) for slot in self.slots])

    def request_free(self, *, unload_models: bool, free_memory: bool) -> None:
        for slot in self.slots:
            slot.request_free(unload_models=unload_models, free_memory=free_memory)

    def routing(self) -> dict[str, Any]:
        """GET /queue's "routing": the policy, each worker (pid, models held, memory, loads, prompt running) and
        the newest decisions (prompt_id -> worker and why)."""
        state = self.router.state()
        running = {slot.name: slot.running() for slot in self.slots}
        by_name = {slot.name: slot for slot in self.slots}
        for worker in state["workers"]:
            slot = by_name.get(worker["name"])
            if slot is not None:
                worker.update(pid=slot.info.get("pid"), loads=slot.info.get("loads"), owned=slot.owned,
                              running=running[slot.name][0] if running.get(slot.name) else None)
        return state

    # -- faults -------------------------------------------------------------------------------------------------
    def lost(self, slot: Slot, run_id: str, exc: BaseException) -> WorkerLost:
        """The slot's actor died under `run_id`: replace it (or drop it from routing), and say whether the prompt
        runs again (the first time) or fails (the second)."""
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        reason = f"worker {slot.name} (pid {slot.info.get('pid')}) died while running the prompt: " \
                 f"{type(exc).__name__}: {first_line}"
        with self._lock:
            self._losses[run_id] = losses = self._losses.get(run_id, 0) + 1
        self.router.lost(run_id, slot.name)
        self._replace(slot)
        if losses > 1:
            reason += f" (the prompt was lost on {losses} workers; it is not retried again)"
        return WorkerLost(reason, retry=losses <= 1)

    def _replace(self, slot: Slot) -> None:
        import ray

        if not slot.owned:
            log.error("worker %s is gone; no more prompts go there", slot.name)
            self.router.retire(slot.name)
            return
        try:
            ray.kill(slot.actor)
        except Exception:  # noqa: BLE001 - it is dead already
            pass
        slot.actor = start_actor(slot.name, self.settings)
        slot.reported(ray.get(slot.actor.info.remote()))
        log.warning("worker %s replaced (pid %s)", slot.name, slot.info.get("pid"))

    def _fail_unroutable(self, item: QueueItem, reason: str) -> None:
        log.error("prompt %s: no worker can run it: %s", item.prompt_id, reason)
        messages = RunMessages(item.prompt_id, scrub=self.scrub)
        out = [messages.start(), messages.error(None, [], exception_type="NoWorkerFits", message=reason),
               ("executing", {"node": None, "prompt_id": item.prompt_id})]
        entry = history_entry(number=item.number, prompt_id=item.prompt_id, prompt=item.prompt,
                              extra_data=item.extra_data, outputs=item.outputs, ui={}, status_str="error",
                              completed=False, messages=messages.recorded)
        self.store.finish(item.prompt_id, number=item.number, status="failed", attempts=item.attempts, entry=entry)
        if item.client_id and self.hub is not None:
            for kind, data in out:
                self.hub.publish(item.client_id, ws_text(kind, data))

    def _needs(self, item: QueueItem) -> tuple[ModelFile, ...]:
        result = validate(item.prompt, self.registry, targets=item.outputs or None, resources=self.resources,
                          sizes=self.sizes)
        return models_needed(result.graph, self.registry, self.resources) if result.ok else ()

    def _fresh_name(self, taken: set[str]) -> str:
        while True:
            name = f"{os.getpid()}-{next(self._names)}"
            if name not in taken:
                return name


def pool_for(config: Any, *, store: QueueStore, resources: Any, **worker_kwargs: Any) -> RayPool:
    """The server's pool from its ServerConfig (`config.scale_out` set by --ray)."""
    scale: ScaleOut = config.scale_out
    settings = WorkerSettings(base_dir=str(config.base_dir), pack_dirs=tuple(str(p) for p in config.pack_dirs),
                              device=config.device, dtype=config.dtype, allow_pickle=config.allow_pickle,
                              memory=scale.memory, cpus=scale.cpus, gpus=scale.gpus)
    return RayPool(store=store, resources=resources, scale=scale, settings=settings, **worker_kwargs)
