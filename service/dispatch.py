"""One durable queue, several workers: which worker claims which pending prompt (no Ray here).

Each worker's thread (a `service.worker.Worker`) claims through its own `RoutedStore`, a view of the shared
`QueueStore` whose `claim()` asks the `Router`. The router looks at the first `lookahead` pending prompts, the
model files each needs (`affinity.models_needed`, computed once per prompt) and what every worker holds, and
lets the asking worker claim the prompt the policy gives it (`affinity.choose`), or nothing (then it wakes the
worker that suits the first prompt better). A prompt no worker has the memory for is handed to `on_unroutable`
(which records it as failed). Decisions are kept for GET /queue and `--explain`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .affinity import (
    Candidate,
    ModelFile,
    RoundRobin,
    Route,
    WorkerView,
    choose,
    describe_workers,
    unroutable,
)
from .queue import QueueItem, QueueStore

KEPT_DECISIONS = 256  # routing decisions remembered for GET /queue (the newest)


class Router:
    """Thread-safe; one per pool. `needs(item)` gives the model files of a queued prompt."""

    def __init__(self, store: QueueStore, *, needs: Callable[[QueueItem], tuple[ModelFile, ...]],
                 policy: str = "affinity", lookahead: int = 16, patience: int = 8,
                 on_unroutable: Callable[[QueueItem, str], None] = lambda item, reason: None):
        self.store = store
        self.policy = policy
        self.lookahead = max(1, lookahead)
        self.patience = patience
        self.on_unroutable = on_unroutable
        self._needs = needs
        self._lock = threading.RLock()
        self._views: dict[str, WorkerView] = {}
        self._wakers: dict[str, Callable[[], None]] = {}
        self._models: dict[str, tuple[ModelFile, ...]] = {}
        self._skipped: dict[str, int] = {}
        self._avoid: dict[str, frozenset[str]] = {}
        self._decisions: OrderedDict[str, Route] = OrderedDict()
        self._round_robin = RoundRobin()

    # -- workers ------------------------------------------------------------------------------------------------
    def register(self, view: WorkerView, wake: Callable[[], None]) -> None:
        with self._lock:
            self._views[view.name] = view
            self._wakers[view.name] = wake

    def retire(self, name: str) -> None:
        """A worker that is gone for good: nothing is routed to it any more."""
        with self._lock:
            self._views.pop(name, None)
            self._wakers.pop(name, None)
        self.wake_all()

    def update(self, name: str, **changes: Any) -> None:
        """What a worker reported: holds, capacity, free (and busy, which the router sets itself)."""
        with self._lock:
            if name in self._views:
                self._views[name] = replace(self._views[name], **changes)

    def views(self) -> list[WorkerView]:
        with self._lock:
            return list(self._views.values())

    def lost(self, prompt_id: str, worker: str) -> None:
        """The prompt's worker died under it: its retry goes to another worker when one can take it."""
        with self._lock:
            self._avoid[prompt_id] = self._avoid.get(prompt_id, frozenset()) | {worker}
        self.wake_all()

    def wake_all(self) -> None:
        with self._lock:
            wakers = list(self._wakers.values())
        for wake in wakers:
            wake()

    # -- claiming -----------------------------------------------------------------------------------------------
    def claim(self, name: str) -> QueueItem | None:
        """Called by worker `name` when it is free: the prompt it should run now (claimed), or None. Free workers
        that may suit the rest of the queue better are woken."""
        while True:
            with self._lock:
                again, item, wake = self._try_claim(name)
            for waker in wake:
                waker()
            if not again:
                return item

    def _try_claim(self, name: str) -> tuple[bool, QueueItem | None, list[Callable[[], None]]]:
        """(look again, the claimed prompt, wakers of the other free workers)."""
        if name not in self._views:
            return False, None, []
        self.update(name, busy=False)
        pending = self.store.pending(self.lookahead)
        if not pending:
            return False, None, []
        candidates = [self._candidate(item) for item in pending]
        views = list(self._views.values())
        for c in candidates:
            stuck = unroutable(c, views)
            if stuck is not None:  # no worker has the memory for it: failed with the reason, never run
                item = self.store.claim(c.prompt_id)
                if item is not None:
                    self.on_unroutable(item, stuck.reason)
                    self._forget(item.prompt_id)
                return True, None, []
        route = choose(self.policy, name, candidates, views, round_robin=self._round_robin, patience=self.patience)
        others = [w for n, w in self._wakers.items() if n != name and not self._views[n].busy]
        if route is None:
            return False, None, others
        item = self.store.claim(route.prompt_id)
        if item is None:  # removed meanwhile (POST /queue delete): look again
            return True, None, []
        if route.prompt_id != candidates[0].prompt_id:
            self._pass_over(candidates[0], views)
        self._note(route)
        self.update(name, busy=True)
        return False, item, others

    def decision(self, prompt_id: str) -> Route | None:
        with self._lock:
            return self._decisions.get(prompt_id)

    def forget(self, prompt_id: str) -> None:
        """A prompt is finished: drop what routing remembered of it, except its decision (kept for /queue)."""
        with self._lock:
            self._forget(prompt_id)

    def state(self) -> dict[str, Any]:
        """For GET /queue: the policy, the workers as routing sees them, and the newest decisions."""
        with self._lock:
            return {"policy": self.policy, "workers": describe_workers(self._views),
                    "decisions": {pid: route.as_json() for pid, route in self._decisions.items()}}

    # -- helpers --------------------------------------------------------------------------------------------------
    def _candidate(self, item: QueueItem) -> Candidate:
        models = self._models.get(item.prompt_id)
        if models is None:
            models = self._models[item.prompt_id] = self._needs(item)
        return Candidate(item.prompt_id, models, self._avoid.get(item.prompt_id, frozenset()),
                         self._skipped.get(item.prompt_id, 0))

    def _pass_over(self, head: Candidate, views: list[WorkerView]) -> None:
        """The first in line was passed over for a later prompt. That counts towards its patience only when no
        worker holds its models (a busy one that does takes it as soon as it is free)."""
        if not any(v.holds and all(m in v.holds for m in head.models) for v in views if head.models):
            self._skipped[head.prompt_id] = head.skipped + 1

    def _note(self, route: Route) -> None:
        self._decisions[route.prompt_id] = route
        self._decisions.move_to_end(route.prompt_id)
        while len(self._decisions) > KEPT_DECISIONS:
            self._decisions.popitem(last=False)
        self._skipped.pop(route.prompt_id, None)

    def _forget(self, prompt_id: str) -> None:
        self._models.pop(prompt_id, None)
        self._skipped.pop(prompt_id, None)
        self._avoid.pop(prompt_id, None)


class RoutedStore:
    """What one worker's thread sees as its queue store: the shared store, with `claim()` going through routing."""

    def __init__(self, store: QueueStore, router: Router, name: str):
        self._store = store
        self._router = router
        self.name = name

    def claim(self) -> QueueItem | None:
        return self._router.claim(self.name)

    def finish(self, prompt_id: str, **kwargs: Any) -> None:
        # Free from now on, before anyone can see the prompt finished: a prompt queued in the moment before this
        # worker claims again must see it free, or another free worker would take it as "the holder is busy".
        self._router.update(self.name, busy=False)
        self._store.finish(prompt_id, **kwargs)
        self._router.forget(prompt_id)

    def __getattr__(self, attr: str) -> Any:  # requeue, remaining, ...: the shared store's
        return getattr(self._store, attr)
