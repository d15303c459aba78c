"""The worker side of scale-out on Ray: the actor that runs prompts (`PromptRunner`), how one is started and found,
and `sdgraph worker`. The front side (routing, the pool the server uses) is service/ray_pool.py.

Ray is imported only inside functions: importing this module does not load it.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engine import CancelToken, Executor, validate
from engine.sizes import DEFAULT_SIZE_LIMITS, SizeLimits

NAMESPACE = "sdgraph"
ACTOR_PREFIX = "sdgraph-worker-"
CODE_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker actor is built with (the same base folder as the front, or a mount of it)."""

    base_dir: str
    pack_dirs: tuple[str, ...] = ()
    device: str | None = None
    dtype: str | None = None
    allow_pickle: bool = False
    memory: int | None = None  # bytes for models on its device; None: what the device has
    cpus: float = 1.0
    gpus: float = 0.0
    output: str | None = None  # write outputs here instead of BASE/output (sdgraph run --out)


class PromptRunner:
    """The body of a worker actor: runs prompts with its own Executor and model manager; buffers their events
    for the front; cancels a prompt by id. Threaded (several calls at once), so events and cancel are served
    while a prompt runs."""

    def __init__(self, name: str, settings: WorkerSettings):
        from nodes import build_registry
        from nodes.folders import Folders
        from nodes.runtime import Runtime

        if settings.cpus >= 1:
            import torch
            torch.set_num_threads(int(settings.cpus))
        self.name = name
        folders = Folders.at(settings.base_dir, output=settings.output)
        self.registry = build_registry(pack_dirs=[Path(p) for p in settings.pack_dirs])
        on_gpu = bool(settings.device and settings.device.startswith("cuda"))
        self.runtime = Runtime(folders, device=settings.device, dtype=settings.dtype,
                               allow_pickle=settings.allow_pickle, ram_budget=None if on_gpu else settings.memory,
                               vram_budget=settings.memory if on_gpu else None)
        self.executor = Executor(self.registry, resources=self.runtime)
        self.prompts = 0
        self._lock = threading.Lock()
        self._events: dict[str, list[Any]] = {}
        self._tokens: dict[str, CancelToken] = {}

    def info(self) -> dict[str, Any]:
        """Who it is and what it holds, for routing: pid, node, model files loaded, memory, model loads so far."""
        import ray

        models = self.runtime.models
        device = self.runtime.device or "cpu"
        free = max(0, models.room(device))
        capacity = models.budget(device) or free + models.held(device)
        holds = sorted({(origin.split("#", 1)[0], *version[:2]) for origin, version in models.loaded_versions()
                        if len(version) >= 2})
        return {"name": self.name, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "holds": holds, "free": free, "capacity": capacity, "loads": models.stats["loads"],
                "prompts": self.prompts}

    def run(self, prompt: dict, targets: list[str], run_id: str, extra: dict,
            sizes: SizeLimits = DEFAULT_SIZE_LIMITS) -> tuple[Any, dict[str, Any]]:
        token = CancelToken()
        with self._lock:
            self._events[run_id], self._tokens[run_id] = [], token
        try:
            result = validate(prompt, self.registry, targets=targets or None, resources=self.runtime, sizes=sizes)
            if not result.ok:
                raise ValueError(f"worker {self.name} cannot run the prompt: "
                                 + "; ".join(str(e) for e in result.errors[:5]))
            report = self.executor.run(result.graph, listeners=[self._buffer(run_id)], cancel=token, run_id=run_id,
                                       prompt=prompt, extra=extra)
        finally:
            with self._lock:
                self._tokens.pop(run_id, None)
        self.prompts += 1
        return replace(report, outputs={}), self.info()  # the outputs (tensors) stay here, in its cache

    def events(self, run_id: str) -> list[Any]:
        """The run's events since the last call (the last call after the run returned gets the rest)."""
        with self._lock:
            events = self._events.get(run_id, [])
            self._events[run_id] = []
            if run_id not in self._tokens:
                self._events.pop(run_id, None)
            return events

    def cancel(self, run_id: str) -> bool:
        with self._lock:
            token = self._tokens.get(run_id)
        if token is not None:
            token.cancel()
        return token is not None

    def free(self, unload_models: bool, free_memory: bool) -> None:
        if unload_models:
            self.executor.cache.clear()
        self.runtime.free_memory(unload_models=unload_models, free_memory=free_memory)
        gc.collect()

    def _buffer(self, run_id: str) -> Callable[[Any], None]:
        def keep(event: Any) -> None:
            with self._lock:
                self._events.setdefault(run_id, []).append(event)
        return keep


def connect(address: str) -> bool:
    """ray.init for `address` unless Ray is initialised already; True when this call started it. "auto" joins a
    running cluster if there is one, else starts a local one."""
    import ray

    if ray.is_initialized():
        return False
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(CODE_ROOT), os.environ.get("PYTHONPATH")]))}}
    if address == "local":
        ray.init(include_dashboard=False, runtime_env=env, namespace=NAMESPACE)
    elif address == "auto":
        try:
            ray.init(address="auto", runtime_env=env, namespace=NAMESPACE)
        except ConnectionError:
            ray.init(include_dashboard=False, runtime_env=env, namespace=NAMESPACE)
    else:
        ray.init(address=address, runtime_env=env, namespace=NAMESPACE)
    return True


def start_actor(name: str, settings: WorkerSettings, *, detached: bool = False, here: bool = False) -> Any:
    """A worker actor named `sdgraph-worker-NAME` (`here`: pinned to this machine's Ray node)."""
    import ray

    options: dict[str, Any] = {"name": ACTOR_PREFIX + name, "namespace": NAMESPACE, "max_concurrency": 8,
                               "num_cpus": settings.cpus, "num_gpus": settings.gpus, "max_restarts": 0}
    if detached:
        options["lifetime"] = "detached"
    if here:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                        soft=False)
    return ray.remote(PromptRunner).options(**options).remote(name, settings)


def running_workers() -> list[tuple[str, Any]]:
    """Worker actors `sdgraph worker` started in the cluster: (name, handle)."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == NAMESPACE and a["name"].startswith(ACTOR_PREFIX)]
    return [(n.removeprefix(ACTOR_PREFIX), ray.get_actor(n, namespace=NAMESPACE)) for n in sorted(names)]


def worker_main(argv: list[str]) -> int:
    """`sdgraph worker`: start a worker actor on this machine's Ray node (one per device) and keep it until
    SIGTERM/SIGINT. `sdgraph serve --ray ADDRESS` finds it by name and routes prompts to it."""
    import argparse
    import signal
    import socket

    from .scale_options import _size

    p = argparse.ArgumentParser(prog="sdgraph worker", description="Serve prompts of `sdgraph serve --ray` from "
                                "this machine: one worker actor (one per device) in the Ray cluster.")
    p.add_argument("--ray", default="auto", metavar="ADDRESS", help="the cluster (default auto: the one `ray start` "
                   "runs on this machine)")
    p.add_argument("--name", default=None, help="its name in routing (default HOST-DEVICE)")
    p.add_argument("--base-dir", default=None, help="models/, output/, custom_nodes/: the same folder the server "
                   "uses, or a shared mount of it (default: the working directory)")
    p.add_argument("--nodes-dir", action="append", default=[], metavar="DIR", help="also load node packs from DIR")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: best available)")
    p.add_argument("--dtype", default=None, choices=["auto", "fp32", "fp16", "bf16"])
    p.add_argument("--memory", type=_size, default=None, metavar="SIZE", help="memory for models (default: what "
                   "the device has); a model needing more is never routed here")
    p.add_argument("--cpus", type=float, default=1.0, help="Ray CPUs it takes (and its torch threads)")
    p.add_argument("--gpus", type=float, default=None, help="Ray GPUs it takes (default 1 with a cuda device)")
    p.add_argument("--unsafe-load-pickle", action="store_true")
    args = p.parse_args(argv)
    base = Path(args.base_dir or os.getcwd()).absolute()
    gpus = args.gpus if args.gpus is not None else (1.0 if (args.device or "").startswith("cuda") else 0.0)
    name = args.name or f"{socket.gethostname()}-{(args.device or 'auto').replace(':', '')}"
    settings = WorkerSettings(str(base), tuple(str(d) for d in [base / "custom_nodes", *args.nodes_dir]),
                              device=args.device, dtype=args.dtype, allow_pickle=args.unsafe_load_pickle,
                              memory=args.memory, cpus=args.cpus, gpus=gpus)
    import ray

    connect(args.ray)
    actor = start_actor(name, settings, detached=True, here=True)
    info = ray.get(actor.info.remote())
    print(f"sdgraph worker {name} ready (pid {info['pid']}, {info['capacity']} bytes for models)", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(5):
        try:
            ray.get(actor.info.remote(), timeout=30)
        except Exception as exc:  # noqa: BLE001 - the actor is gone: say so and exit for a supervisor
            print(f"sdgraph worker {name}: the actor is gone ({type(exc).__name__}); exiting", flush=True)
            return 3
    ray.kill(actor)
    return 0
