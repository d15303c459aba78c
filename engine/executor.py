"""The executor: one per process (the CLI's or the server's). It owns the output cache and the key history,
and runs a graph in two steps: `compile_plan` (pure, `plan.py`) then `run_plan` (`runner.py`).

The node hook (`around_node`, keyword-only `definition`, `call`, `ctx`) wraps every computation. Without an
explicit one, the resources' own `around_node` is used when they have one (`engine.context.Resources`): that is
how the application's model manager retries a node that ran out of memory and sees the plan's look-ahead,
whoever built the executor.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .cache import OutputCache
from .context import AroundNode, CancelToken, Resources
from .diskcache import DiskCache
from .events import Listener
from .graph import Graph
from .plan import KeyHistory, Plan, compile_plan
from .registry import NodeRegistry
from .runner import NodeError, RunReport, run_plan
from .tiers import StoredKeyHistory, TieredCache

__all__ = ["Executor", "NodeError", "RunReport"]


class Executor:
    def __init__(self, registry: NodeRegistry, *, cache: OutputCache | None = None,
                 resources: Resources | None = None, around_node: AroundNode | None = None,
                 disk: DiskCache | None = None):
        self.registry = registry
        self.cache = cache if cache is not None else OutputCache()  # the memory tier
        self.disk = disk  # the persistent tier, shared with other processes (None: memory only)
        self.tiers = TieredCache(self.cache, disk, registry)
        self.resources = resources
        if around_node is None and isinstance(resources, Resources):
            around_node = resources.around_node
        self.around_node = around_node
        # What each node id last ran with, to say why it runs again (saved beside the disk entries).
        self.history = KeyHistory() if disk is None else StoredKeyHistory(disk.history_path)

    def plan(self, graph: Graph) -> Plan:
        """What running `graph` would do now: order, keys, cached or must run and why. Runs nothing."""
        return compile_plan(graph, self.registry, self.tiers, resources=self.resources, history=self.history)

    def run(self, graph: Graph, *, listeners: Iterable[Listener] = (), cancel: CancelToken | None = None,
            run_id: str | None = None, prompt: Mapping[str, Any] | None = None,
            extra: Mapping[str, Any] | None = None) -> RunReport:
        """Compute `graph.outputs`. Never raises for a node's failure: the report (and the events) say what
        happened."""
        # 1. Plan: which nodes, in which order, under which keys; what the cache holds and why the rest runs.
        plan = self.plan(graph)
        # 2. Run it: cached or computed on demand from the outputs, values released after their last consumer.
        report = run_plan(plan, registry=self.registry, cache=self.tiers, history=self.history,
                          run_id=run_id or uuid.uuid4().hex, resources=self.resources, around_node=self.around_node,
                          listeners=listeners, cancel=cancel,
                          prompt=prompt if prompt is not None else _LazyPrompt(graph), extra=extra)
        # 3. Keep what each node ran with for the next process's explanations (a failed write costs only that).
        try:
            self.history.save()
        except OSError:
            pass
        return report


class _LazyPrompt(Mapping):
    """The graph in API form for `ctx.prompt`, built only if a node reads it (most never do)."""

    def __init__(self, graph: Graph):
        self._graph = graph
        self._api: dict[str, Any] | None = None

    def _get(self) -> dict[str, Any]:
        if self._api is None:
            self._api = self._graph.to_api()
        return self._api

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._graph.nodes)
