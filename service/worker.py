"""The single worker thread: claims the next prompt, runs it with the process's one Executor, records it.

Each prompt gets its own CancelToken, so an interrupt addressed to one prompt can never stop another. Events go
to the websocket client that queued the prompt and nowhere else. Requests to free memory are applied between
prompts, never under a running one.

Whatever a node raises (SystemExit and KeyboardInterrupt included) fails its prompt and the worker goes on. Two
things end the worker for good, and each calls `on_fatal(reason, exit_code)` so the server can exit for its
supervisor to restart it (the queue is durable): the thread dying anyway (a fault outside any prompt), and a
prompt that overran `--prompt-timeout` whose node did not stop within the grace period (it is marked failed
first, so it is not retried).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from engine import CancelToken, Executor, NodeRegistry, RunReport, validate
from engine.deadline import Deadline, stuck_reason, timeout_reason
from engine.events import Event
from engine.sizes import DEFAULT_SIZE_LIMITS, SizeLimits

from .hub import Hub
from .messages import RunMessages, history_entry, preview_frame, ws_text
from .queue import QueueItem, QueueStore

log = logging.getLogger("sdgraph.server")
EXIT_WORKER_DIED = 3  # the worker thread ended: restart the server
EXIT_PROMPT_STUCK = 4  # a prompt overran its time limit and its node would not stop: restart the server


@runtime_checkable
class FreesMemory(Protocol):
    """What the application's resources offer for POST /free: drop loaded models (`unload_models`) and give
    freed memory back (`free_memory`)."""

    def free_memory(self, unload_models: bool, free_memory: bool) -> None: ...


class WorkerLost(Exception):
    """The process running a prompt died under it (scale-out: a Ray worker actor killed, its node lost).
    `retry`: put the prompt back in the queue (for another worker); else it is recorded as failed with the reason."""

    def __init__(self, reason: str, *, retry: bool):
        super().__init__(reason)
        self.retry = retry


@dataclass
class _Current:
    item: QueueItem
    token: CancelToken = field(default_factory=CancelToken)
    node: str | None = None
    for_shutdown: bool = False
    abandoned: bool = False  # recorded as failed by the deadline while its node still runs


class Worker:
    def __init__(self, *, store: QueueStore, executor: Executor, registry: NodeRegistry, hub: Hub,
                 on_queue_change: Callable[[], None] | None = None, prompt_timeout: float | None = None,
                 stuck_grace: float = 60.0, on_fatal: Callable[[str, int], None] | None = None,
                 scrub: Callable[[str], str] | None = None, sizes: SizeLimits = DEFAULT_SIZE_LIMITS,
                 previewer: Callable[[Any], Any] | None = None):
        self.store = store
        self.previewer = previewer  # turns a progress event's preview into an image (--preview-method)
        self.sizes = sizes
        self.executor = executor
        self.registry = registry
        self.hub = hub
        self.on_queue_change = on_queue_change or (lambda: None)
        self.prompt_timeout = prompt_timeout or None
        self.stuck_grace = stuck_grace
        self.on_fatal = on_fatal or (lambda reason, code: None)
        self.scrub = scrub
        self.failure: str | None = None  # why the worker is out of action, once it is
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._current: _Current | None = None
        self._stopping = False
        self._free = {"unload_models": False, "free_memory": False}
        self._thread = threading.Thread(target=self._loop, name="sdgraph-worker", daemon=True)
        self.completed = 0

    # -- control (any thread) ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    @property
    def alive(self) -> bool:
        """Running and able to take prompts (False once it died or gave up on a stuck prompt)."""
        return self._thread.is_alive() and self.failure is None

    def running(self) -> tuple[str, str | None, str | None] | None:
        """(prompt_id, client_id, current node) of the running prompt, if any."""
        with self._lock:
            cur = self._current
            return None if cur is None else (cur.item.prompt_id, cur.item.client_id, cur.node)

    def running_all(self) -> list[tuple[str, str | None, str | None]]:
        """Every running prompt as `running()` gives it (one here; one per worker when scaled out)."""
        running = self.running()
        return [] if running is None else [running]

    def interrupt(self, prompt_id: str | None = None) -> bool:
        """Cancel the running prompt (only if it is `prompt_id`, when given). Returns whether one was cancelled."""
        with self._lock:
            cur = self._current
            if cur is None or (prompt_id is not None and cur.item.prompt_id != prompt_id):
                return False
            cur.token.cancel()
            return True

    def request_free(self, *, unload_models: bool, free_memory: bool) -> None:
        with self._lock:
            self._free["unload_models"] |= unload_models
            self._free["free_memory"] |= free_memory
        self.wake()

    def stop_now(self) -> None:
        """Cancel the running prompt for a shutdown: it goes back in the queue, its attempt not counted."""
        self._stopping = True
        with self._lock:
            if self._current is not None:
                self._current.for_shutdown = True
                self._current.token.cancel()
        self.wake()

    def stop(self, timeout: float, *, grace: float = 10) -> bool:
        """Claim nothing more; give the running prompt `timeout` seconds to finish, then cancel it and put it
        back in the queue (without counting the attempt). Returns True when the thread has ended."""
        self._stopping = True
        self.wake()
        if not self._thread.is_alive():
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.stop_now()
            self._thread.join(grace)
        if self._thread.is_alive():  # a node ignores cancellation: record the prompt as pending anyway
            with self._lock:
                cur = self._current
            if cur is not None and not cur.abandoned:
                self.store.requeue(cur.item.prompt_id, forget_attempt=True)
            return False
        return True

    # -- the thread ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # a fault outside any prompt: say so, and let the server exit
            log.critical("the worker thread died; no more prompts will run in this process", exc_info=True)
            self.failure = f"the worker thread died: {type(exc).__name__}: {exc}"
            self.on_fatal(self.failure, EXIT_WORKER_DIED)

    def _serve(self) -> None:
        while not self._stopping:
            self._wake.clear()  # before looking: a prompt queued from now on wakes the wait below
            self._apply_free()
            try:
                with self._lock:  # claimed and current at once: an interrupt for it is never lost in between
                    item = self.store.claim()
                    current = self._current = _Current(item) if item is not None else None
            except Exception:
                log.exception("could not read the queue; retrying in a second")
                time.sleep(1)
                continue
            if item is None or current is None:
                if not self._stopping:
                    self._wake.wait(1.0)
                continue
            self.on_queue_change()
            try:
                self._run(current)
            except Exception:  # never let one prompt take the worker down
                log.exception("prompt %s: the worker failed while running it", item.prompt_id)
                self._record_failure(item, self._messages(item), "WorkerError",
                                     "the server failed while running this prompt; see its log")
            finally:
                with self._lock:
                    self._current = None
            self.completed += 1
            self.on_queue_change()

    def _messages(self, item: QueueItem) -> RunMessages:
        return RunMessages(item.prompt_id, scrub=self.scrub)

    def _run(self, current: _Current) -> None:
        started = time.perf_counter()
        item = current.item
        messages = self._messages(item)
        result = validate(item.prompt, self.registry, targets=item.outputs or None, resources=self.executor.resources,
                          sizes=self.sizes)
        if not result.ok:  # valid when queued, no longer (a file was removed, a node pack changed)
            first = result.errors[0]
            self._record_failure(item, messages, "ValidationError", "; ".join(str(e) for e in result.errors[:20]),
                                 node_id=first.node_id, node_type=first.node_type)
            return
        extra = {"extra_pnginfo": item.extra_data.get("extra_pnginfo") or {}, "client_id": item.client_id,
                 "prompt_id": item.prompt_id}
        deadline = Deadline(current.token, self.prompt_timeout, self.stuck_grace,
                            lambda: self._abandon(current, messages)).start()
        try:
            report = self.executor.run(result.graph, listeners=[self._listener(current, messages)],
                                       cancel=current.token, run_id=item.prompt_id, prompt=item.prompt, extra=extra)
        except WorkerLost as lost:  # scale-out: the worker process died; once more elsewhere, then failed
            self._lost(current, messages, lost)
            return
        except BaseException as exc:  # SystemExit, KeyboardInterrupt from a node; or the engine itself failed
            log.error("prompt %s: the run raised %s", item.prompt_id, type(exc).__name__, exc_info=True)
            if not self._still_ours(current):
                return
            self._record_failure(item, messages, type(exc).__name__, f"the run raised {type(exc).__name__}: "
                                 f"{exc}", node_id=current.node, node_type=self._type_of(item, current.node))
            return
        finally:
            deadline.stop()
        if not self._still_ours(current):
            return
        if report.status == "interrupted" and deadline.expired:
            log.warning("prompt %s: %s", item.prompt_id, timeout_reason(self.prompt_timeout))
            self._record_failure(item, messages, "PromptTimeout", timeout_reason(self.prompt_timeout),
                                 node_id=current.node, node_type=self._type_of(item, current.node))
            return
        if report.status == "interrupted" and current.for_shutdown:
            self.store.requeue(item.prompt_id, forget_attempt=True)
            log.info("prompt %s: stopped by shutdown, back in the queue", item.prompt_id)
            return
        if report.error is not None:  # the client gets a short, path-free account; the log keeps the traceback
            log.error("prompt %s: node %s (%s) failed:\n%s", item.prompt_id, report.error.node_id,
                      report.error.node_type, report.error.traceback.rstrip())
        out = messages.finish(report)
        self._record(item, report, messages)  # first: a client told "done" must find the history entry
        self._send(item, out)
        log.info("prompt %s: %s in %.2f s (%d ran, %d cached)", item.prompt_id, report.status,
                 time.perf_counter() - started, len(report.executed), len(report.cached))

    def _lost(self, current: _Current, messages: RunMessages, lost: WorkerLost) -> None:
        item = current.item
        if not self._still_ours(current):  # already failed by the deadline, which stopped the worker itself
            return
        if lost.retry:
            log.warning("prompt %s: %s; it runs again on another worker", item.prompt_id, lost)
            self.store.requeue(item.prompt_id, forget_attempt=False)
            return
        log.error("prompt %s: %s; marked failed", item.prompt_id, lost)
        self._record_failure(item, messages, "WorkerLost", str(lost), node_id=current.node,
                             node_type=self._type_of(item, current.node))

    def _still_ours(self, current: _Current) -> bool:
        """False when the deadline has already recorded this prompt as failed (its node ran on regardless)."""
        with self._lock:
            return not current.abandoned

    @staticmethod
    def _type_of(item: QueueItem, node_id: str | None) -> str | None:
        raw = item.prompt.get(node_id) if node_id is not None else None
        return raw.get("class_type") if isinstance(raw, dict) else None

    def _abandon(self, current: _Current, messages: RunMessages) -> None:
        """The deadline's grace has passed and the node still runs: record the prompt as failed (so it is not
        retried) and give up on this worker (from the timer thread)."""
        with self._lock:
            if self._current is not current:
                return
            current.abandoned = True
        reason = stuck_reason(self.prompt_timeout or 0, self.stuck_grace)
        item = current.item
        log.critical("prompt %s: %s; it is marked failed and the server exits to be restarted", item.prompt_id,
                     reason)
        self.failure = f"gave up on prompt {item.prompt_id}: {reason}"
        self._stopping = True
        try:
            self._record_failure(item, messages, "PromptTimeout", reason, node_id=current.node,
                                 node_type=self._type_of(item, current.node))
        finally:
            self.on_fatal(self.failure, EXIT_PROMPT_STUCK)

    def _listener(self, current: _Current, messages: RunMessages) -> Callable[[Event], None]:
        client = current.item.client_id

        def listen(event: Event) -> None:
            try:
                for kind, data in messages.translate(event):
                    if kind == "executing":
                        current.node = data["node"]
                    if client:
                        self.hub.publish(client, ws_text(kind, data))
                preview = getattr(event, "preview", None)
                if client and preview is not None:
                    frame = preview_frame(preview, self.previewer, node_id=getattr(event, "node_id", None),
                                          prompt_id=current.item.prompt_id)
                    if frame is not None:
                        self.hub.publish(client, frame)
            except Exception:  # a listener must never break the run
                log.exception("prompt %s: could not deliver %s", current.item.prompt_id, event.kind)

        return listen

    def _send(self, item: QueueItem, out: list[tuple[str, dict[str, Any]]]) -> None:
        if item.client_id:
            for kind, data in out:
                self.hub.publish(item.client_id, ws_text(kind, data))

    def _record(self, item: QueueItem, report: RunReport, messages: RunMessages) -> None:
        entry = history_entry(number=item.number, prompt_id=item.prompt_id, prompt=item.prompt,
                              extra_data=item.extra_data, outputs=item.outputs, ui=report.ui,
                              status_str="success" if report.ok else "error", completed=report.ok,
                              messages=messages.recorded)
        self.store.finish(item.prompt_id, number=item.number, status=report.status, attempts=item.attempts,
                          entry=entry)

    def _record_failure(self, item: QueueItem, messages: RunMessages, exception_type: str, message: str, *,
                        node_id: str | None = None, node_type: str | None = None) -> None:
        out = [] if messages.recorded else [messages.start()]
        out.append(messages.error(None, [], node_id=node_id, node_type=node_type, exception_type=exception_type,
                                  message=message))
        out.append(("executing", {"node": None, "prompt_id": item.prompt_id}))
        entry = history_entry(number=item.number, prompt_id=item.prompt_id, prompt=item.prompt,
                              extra_data=item.extra_data, outputs=item.outputs, ui={}, status_str="error",
                              completed=False, messages=messages.recorded)
        self.store.finish(item.prompt_id, number=item.number, status="failed", attempts=item.attempts, entry=entry)
        self._send(item, out)

    def _apply_free(self) -> None:
        with self._lock:
            unload, free = self._free["unload_models"], self._free["free_memory"]
            self._free = {"unload_models": False, "free_memory": False}
        if not (unload or free):
            return
        if unload:
            self.executor.cache.clear()  # cached outputs hold the loaded models
        resources = self.executor.resources
        if isinstance(resources, FreesMemory):
            resources.free_memory(unload_models=unload, free_memory=free)
        gc.collect()
        log.info("freed memory (unload_models=%s, free_memory=%s)", unload, free)


def fail_crashed(store: QueueStore, item: QueueItem, max_attempts: int) -> None:
    """At start-up: record a prompt that was running when the server died `max_attempts` times as failed."""
    messages = RunMessages(item.prompt_id)
    messages.error(None, [], exception_type="ServerCrashed", message=(
        f"the server stopped {item.attempts} time(s) while running this prompt; it is marked failed so that it "
        f"cannot crash the server again (limit: --max-attempts {max_attempts}). Check the server's log and the "
        "prompt's inputs (e.g. sizes) before queueing it again."))
    entry = history_entry(number=item.number, prompt_id=item.prompt_id, prompt=item.prompt,
                          extra_data=item.extra_data, outputs=item.outputs, ui={}, status_str="error",
                          completed=False, messages=messages.recorded)
    store.finish(item.prompt_id, number=item.number, status="failed", attempts=item.attempts, entry=entry)


def recover(store: QueueStore, max_attempts: int) -> tuple[list[str], list[str]]:
    """Prompts a previous process was running when it died: retried, or failed after `max_attempts` starts.
    Returns (retried ids, failed ids)."""
    retried, failed = [], []
    for item in store.running():
        if item.attempts >= max_attempts:
            fail_crashed(store, item, max_attempts)
            failed.append(item.prompt_id)
        else:
            store.requeue(item.prompt_id, forget_attempt=False)
            retried.append(item.prompt_id)
    return retried, failed
