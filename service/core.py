"""The service behind the routes: one registry, one Executor (and its cache), one queue store, one worker.

`Service.open(config)` builds them and recovers what a previous process left running; `start(loop)` starts the
worker; `stop()` stops taking work, lets the running prompt finish (or puts it back in the queue) and closes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from diffusion.previews import Previewer
from engine import Executor, NodeRegistry, validate
from nodes import build_registry
from nodes.folders import Folders
from nodes.runtime import Runtime

from .bodies import PromptRequest
from .config import ServerConfig
from .hub import Hub
from .messages import error_body, status_text, validation_failure
from .queue import QueueStore, StoreError, number_json
from .routing import pack_message_sender
from .scrub import PathScrubber
from .worker import Worker, recover

log = logging.getLogger("sdgraph.server")
T = TypeVar("T")


class Service:
    def __init__(self, config: ServerConfig, *, registry: NodeRegistry, runtime: Any, store: QueueStore):
        self.config = config
        self.limits = config.limits
        self.registry = registry
        self.runtime = runtime
        self.folders: Folders = runtime.folders
        self.executor = Executor(registry, resources=runtime, disk=config.disk_cache)
        self.store = store
        self.accepting = True
        self.pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sdgraph-io")
        self.hub: Hub | None = None
        self.worker: Worker | None = None
        self.scrub = PathScrubber.for_folders(self.folders)
        self.exit_code = 0  # non-zero once the worker is out of action: the process exits for a restart

    @classmethod
    def open(cls, config: ServerConfig) -> Service:
        folders = Folders.at(config.base_dir)
        registry = build_registry(pack_dirs=config.pack_dirs, folders=folders)
        for problem in registry.load_errors:
            log.warning("node pack %s failed to load (%s): %s", problem.pack, problem.file, problem.reason)
        runtime = Runtime(folders, device=config.device, dtype=config.dtype, allow_pickle=config.allow_pickle)
        store = QueueStore(config.database, max_history=config.limits.max_history)
        retried, failed = recover(store, config.limits.max_attempts)
        for prompt_id in retried:
            log.warning("prompt %s was running when the server stopped; it runs again", prompt_id)
        for prompt_id in failed:
            log.error("prompt %s crashed the server %d times; marked failed", prompt_id, config.limits.max_attempts)
        return cls(config, registry=registry, runtime=runtime, store=store)

    def start(self, loop: asyncio.AbstractEventLoop, on_fatal: Callable[[], None] = lambda: None) -> None:
        """Start the worker; `on_fatal` is called (on the loop) when it is out of action for good."""
        self.hub = Hub(loop, outbox_size=self.limits.ws_outbox, max_clients=self.limits.max_ws_clients)
        if self.registry.pack_environment is not None:  # custom nodes' PromptServer.instance.send_sync
            self.registry.pack_environment.message_listeners.append(pack_message_sender(self.hub))

        def fatal(reason: str, code: int) -> None:  # from the worker's thread or its deadline's
            self.accepting = False
            self.exit_code = code
            try:
                loop.call_soon_threadsafe(on_fatal)
            except RuntimeError:  # the loop has closed: the server is stopping already
                pass

        common = {"registry": self.registry, "hub": self.hub, "on_queue_change": self.status_changed,
                  "prompt_timeout": self.config.prompt_timeout, "stuck_grace": self.config.stuck_grace,
                  "on_fatal": fatal, "scrub": self.scrub, "sizes": self.limits.sizes,
                  "previewer": Previewer(self.config.preview_method, self.folders.models("vae_approx"))}
        if self.config.scale_out is not None:  # prompts run on Ray actors (docs/scale-out.md); Ray loads only here
            from .ray_pool import pool_for
            self.worker = pool_for(self.config, store=self.store, resources=self.runtime, **common)
        else:
            self.worker = Worker(store=self.store, executor=self.executor, **common)
        self.worker.start()

    async def stop(self, *, close_store: bool = True) -> None:
        self.accepting = False
        if self.worker is not None:
            timeout, grace = (0, 0) if self.exit_code else (self.config.shutdown_timeout, 10)
            finished = await asyncio.to_thread(self.worker.stop, timeout, grace=grace)
            if not finished and not self.exit_code:
                log.error("a node ignored cancellation; its prompt is back in the queue")
        if self.hub is not None:
            await self.hub.close_all()
        if close_store:
            self.close()

    def close(self) -> None:
        """Close the store; work still stuck in a thread (a node's option list that never returns) is abandoned."""
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking work (a commit waits for fsync; node option lists read folders; images decode) in the
        service's own threads, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    def status_changed(self) -> None:
        """Tell every websocket client the queue length (from any thread)."""
        if self.hub is not None:
            self.hub.publish_all(status_text(self.store.remaining()))

    # -- POST /prompt ---------------------------------------------------------------------------------------
    async def submit(self, body: PromptRequest) -> tuple[int, dict[str, Any]]:
        """Validate, then queue: (status, ComfyUI's answer). Nothing is queued unless every check passes."""
        if not self.accepting:
            why = f" ({self.worker.failure})" if self.worker is not None and self.worker.failure else ""
            return 503, error_body("shutting_down", f"the server is shutting down{why} and takes no new prompts; "
                                   "queue it again once it is back", node_errors={})
        prompt = body.prompt
        if len(prompt) > self.limits.max_nodes:
            return 400, error_body("prompt_too_large", f"the prompt has {len(prompt)} nodes; this server takes at "
                                   f"most {self.limits.max_nodes} (--max-nodes)", node_errors={})
        targets = body.partial_execution_targets
        try:
            result = await self.call(validate, prompt, self.registry, targets=targets, resources=self.runtime,
                                     sizes=self.limits.sizes)
        except (Exception, RecursionError) as exc:  # a bug in a check must not become a 500 or reach the worker
            log.exception("validating a prompt raised")
            return 400, error_body("exception_during_validation", f"checking the prompt failed with "
                                   f"{type(exc).__name__}: {self.scrub(str(exc))}", node_errors={})
        errors = list(result.errors)
        if errors:
            return 400, validation_failure(errors, prompt, targets or self._output_nodes(prompt), self.scrub)
        extra_data = dict(body.extra_data)
        if body.client_id:
            extra_data["client_id"] = body.client_id
        prompt_id = body.prompt_id or str(uuid.uuid4())
        try:
            number = await self.call(self.store.put, prompt_id=prompt_id, prompt=prompt, extra_data=extra_data,
                                   outputs=list(result.graph.outputs), client_id=body.client_id or None,
                                   number=body.number, front=body.front, max_pending=self.limits.max_queue)
        except StoreError as error:
            status = 429 if error.kind == "queue_full" else 409
            return status, error_body(error.kind, error.message, node_errors={})
        self.worker.wake()
        await self.call(self.status_changed)
        return 200, {"prompt_id": prompt_id, "number": number_json(number), "node_errors": {}}

    def _output_nodes(self, prompt: dict[str, Any]) -> list[str]:
        outputs = []
        for node_id, raw in prompt.items():
            class_type = raw.get("class_type") if isinstance(raw, dict) else None
            definition = self.registry.get(class_type) if isinstance(class_type, str) else None
            if definition is not None and definition.output_node:
                outputs.append(node_id)
        return outputs

    # -- queue and history --------------------------------------------------------------------------------
    async def change_queue(self, *, clear: bool, delete: list[str]) -> int:
        removed = await self.call(self.store.clear_pending) if clear else 0
        if delete:
            removed += await self.call(self.store.delete_pending, delete)
        await self.call(self.status_changed)
        return removed

    async def change_history(self, *, clear: bool, delete: list[str]) -> int:
        removed = await self.call(self.store.clear_history) if clear else 0
        if delete:
            removed += await self.call(self.store.delete_history, delete)
        return removed

    def worker_state(self) -> dict[str, Any]:
        """Whether prompts still run here: `worker_alive` false (with `worker_error` saying why) means the
        process is about to exit for its supervisor to restart it; the queue is kept."""
        worker = self.worker
        state = {"worker_alive": worker.alive if worker else False,
                 "worker_error": worker.failure if worker else "the worker has not started"}
        if callable(getattr(worker, "routing", None)):  # scale-out: workers, what they hold, routing decisions
            state["routing"] = worker.routing()
        return state

    def counters(self) -> dict[str, Any]:
        """What /system_stats adds under "sdgraph": cache size, queue, clients, prompts run since start."""
        cache = self.executor.cache
        disk = self.executor.disk
        return {"cache_entries": len(cache), "cache_bytes": cache.nbytes, "cache_budget_bytes": cache.max_bytes,
                "disk_cache_dir": str(disk.root) if disk else None,
                "disk_cache_budget_bytes": disk.max_bytes if disk else None,
                "queue_remaining": self.store.remaining(), "prompts_run": self.worker.completed if self.worker else 0,
                **self.worker_state(),
                "websocket_clients": self.hub.count if self.hub else 0,
                "slow_clients_dropped": self.hub.dropped_slow if self.hub else 0}

    async def describe(self, prompt_id: str) -> dict[str, Any] | None:
        described = await self.call(self.store.describe, prompt_id)
        for running in self.worker.running_all() if self.worker else ():
            if described is not None and running[0] == prompt_id:
                described["node"] = running[2]
        return described
