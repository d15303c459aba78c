"""Runs a validated graph: plan, key, fetch from cache or compute, release, report.

One `Executor` per process (the CLI's or the server's) owns the output cache; `run` is called once per graph.

`around_node(definition, call[, ctx=...])` wraps every computation (`call()` returns the node's CachedOutput);
it is given the node's RunContext when it accepts a `ctx` keyword. Without an explicit one, the resources' own
`around_node` method is used if they have one: that is how the application's model manager retries a node that
ran out of memory and sees the plan's look-ahead, whoever built the executor.
"""

from __future__ import annotations

import math
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from .cache import CachedOutput, KeyParts, OutputCache, describe_change, estimate_nbytes, make_key
from .context import CancelToken, Interrupted, RunContext
from .events import (
    Event,
    Listener,
    NodeFailed,
    NodeFinished,
    NodesCached,
    NodeStarted,
    RunFinished,
    RunInterrupted,
    RunStarted,
)
from .graph import Graph, Link, NodeInstance, ancestors
from .registry import NodeRegistry
from .spec import NodeDef, Result, accepted_kwargs


class NodeError(RuntimeError):
    """A node's function returned something its declaration does not allow."""


@dataclass
class RunReport:
    run_id: str
    status: str  # "success" | "failed" | "interrupted"
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    ui: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    outputs: dict[str, tuple[list, ...]] = field(default_factory=dict)
    explain: dict[str, str] = field(default_factory=dict)
    error: NodeFailed | None = None

    @property
    def ok(self) -> bool:
        return self.status == "success"


class Executor:
    def __init__(self, registry: NodeRegistry, *, cache: OutputCache | None = None, resources: Any = None,
                 around_node: Callable[[NodeDef, Callable[[], CachedOutput]], CachedOutput] | None = None):
        self.registry = registry
        self.cache = cache if cache is not None else OutputCache()
        self.resources = resources
        self.around_node = around_node if around_node is not None else getattr(resources, "around_node", None)
        self._around_takes_ctx = self.around_node is not None and "ctx" in accepted_kwargs(self.around_node,
                                                                                            {"ctx": None})
        self._last_parts: dict[str, KeyParts] = {}

    def run(self, graph: Graph, *, listeners: Iterable[Listener] = (), cancel: CancelToken | None = None,
            run_id: str | None = None, prompt: Mapping[str, Any] | None = None,
            extra: Mapping[str, Any] | None = None) -> RunReport:
        """Compute `graph.outputs`. Never raises for a node's failure: the report (and the events) say what
        happened."""
        run = _Run(self, graph, list(listeners), cancel or CancelToken(), run_id or uuid.uuid4().hex,
                   prompt if prompt is not None else _LazyPrompt(graph), extra or {})
        return run.execute()


class _Run:
    def __init__(self, executor: Executor, graph: Graph, listeners: list[Listener], cancel: CancelToken,
                 run_id: str, prompt: Mapping[str, Any], extra: Mapping[str, Any]):
        self.ex = executor
        self.graph = graph
        self.listeners = listeners
        self.cancel = cancel
        self.report = RunReport(run_id, "success")
        self.prompt = prompt
        self.extra = extra
        self.results: dict[str, CachedOutput] = {}
        self.by_key: dict[str, str] = {}
        self.current: str | None = None
        self.links = {nid: tuple(inst.links()) for nid, inst in graph.nodes.items()}

    def emit(self, event: Event) -> None:
        for listener in self.listeners:
            listener(event)

    def execute(self) -> RunReport:
        # 1. Plan: the outputs and what they depend on, in topological order.
        order = self._plan()
        run_id = self.report.run_id
        # 2. Keys: content-addressed, computed upstream first.
        self.keys, parts = self._keys(order)
        self.emit(RunStarted(run_id, tuple(order)))
        cached = tuple(nid for nid in order if self.keys[nid] in self.ex.cache)
        if cached:
            self.emit(NodesCached(run_id, cached))
        # 3. Consumers per node, so values are released after their last use.
        self.refcount = {nid: 0 for nid in order}
        self.output_refs: Counter[tuple[str, int]] = Counter()  # the same per output, for the look-ahead
        for nid in order:
            for _, link in self.links[nid]:
                self.refcount[link.source] += 1
                self.output_refs[link.source, link.output] += 1
        # 4. Demand-driven evaluation from the outputs.
        try:
            self._evaluate(parts)
        except Interrupted:
            self.report.status = "interrupted"
            self.emit(RunInterrupted(run_id, self.current, self.current and self.graph[self.current].type,
                                     tuple(self.report.executed)))
            return self.report
        except _NodeFailure as failure:
            self.report.status = "failed"
            self.report.error = failure.event
            self.emit(failure.event)
            self.emit(RunFinished(run_id, "failed", tuple(self.report.executed)))
            return self.report
        for nid in self.graph.outputs:
            self.report.outputs[nid] = self.results[nid].outputs
        for nid in order:
            self.report.explain.setdefault(nid, "skipped: nothing that ran needed it (its consumers came from "
                                                "the cache, or it feeds a lazy input that was not asked for)")
        self.emit(RunFinished(run_id, "success", tuple(self.report.executed)))
        return self.report

    def _plan(self) -> list[str]:
        needed = ancestors(self.graph.nodes, self.graph.outputs)
        dag = nx.DiGraph()
        dag.add_nodes_from(nid for nid in self.graph.nodes if nid in needed)
        dag.add_edges_from((link.source, nid) for nid in list(dag) for _, link in self.links[nid])
        return list(nx.topological_sort(dag))

    def _keys(self, order: Sequence[str]) -> tuple[dict[str, str], dict[str, KeyParts]]:
        keys: dict[str, str] = {}
        parts: dict[str, KeyParts] = {}
        for nid in order:
            inst = self.graph[nid]
            definition = self.ex.registry.get(inst.type)
            constants = {name: repr(value) for name, value in inst.inputs.items() if not isinstance(value, Link)}
            inputs = {name: f"{keys[link.source]}:{link.output}" for name, link in self.links[nid]}
            fingerprint = _fingerprint(definition, inst, self.ex.resources)
            part = KeyParts(definition.name, definition.version, constants, inputs, fingerprint)
            parts[nid] = part
            keys[nid] = make_key(part)
        return keys, parts

    def _evaluate(self, parts: dict[str, KeyParts]) -> None:
        results, keys, graph = self.results, self.keys, self.graph
        requested: dict[str, set[str]] = {}
        stack = list(reversed(graph.outputs))
        while stack:
            nid = stack[-1]
            if nid in results:
                stack.pop()
                continue
            key = keys[nid]
            hit = self.ex.cache.get(key)
            twin = self.by_key.get(key)
            if hit is None and twin is not None:
                hit = self.results.get(twin)
            if hit is not None:
                results[nid] = hit
                stack.pop()
                self.report.cached.append(nid)
                self.report.explain[nid] = f"same inputs as node {twin}, computed once" if twin else "cached"
                if hit.ui:
                    self.report.ui[nid] = hit.ui
                self._release_inputs(nid, requested.get(nid, set()))
                continue
            inst = graph[nid]
            definition = self.ex.registry.get(inst.type)
            wanted = requested.setdefault(nid, set())
            lazy = {spec.name for spec in definition.inputs if spec.lazy}
            missing = [link.source for name, link in self.links[nid]
                       if (name not in lazy or name in wanted) and link.source not in results]
            if missing:
                stack.extend(missing)
                continue
            self.current = nid
            if definition.check_lazy is not None and lazy:
                more = self._lazy_requests(definition, inst, wanted, lazy)
                if more:
                    wanted.update(more)
                    continue
            self.cancel.check()
            results[nid] = self._compute(definition, inst, wanted, parts[nid])
            self.by_key.setdefault(key, nid)
            stack.pop()
            self._release_inputs(nid, wanted)
        self.current = None

    def _lazy_requests(self, definition: NodeDef, inst: NodeInstance, wanted: set[str], lazy: set[str]) -> set[str]:
        """Which lazy inputs the node asks for, given what is known so far (unevaluated ones are None)."""
        values = {name: _first(v) for name, v in self._input_lists(inst, wanted).items()}
        try:
            asked = definition.check_lazy(**accepted_kwargs(definition.check_lazy, values)) or ()
        except Exception as exc:
            shown = {name: _describe([v]) for name, v in values.items()}
            raise _NodeFailure(NodeFailed(self.report.run_id, inst.id, definition.name, type(exc).__name__,
                                          f"while choosing its lazy inputs: {exc}", traceback.format_exc(),
                                          shown)) from exc
        linked = {name for name, _ in self.links[inst.id]}
        return {name for name in asked if name in lazy and name in linked and name not in wanted}

    def _input_lists(self, inst: NodeInstance, wanted: set[str]) -> dict[str, list]:
        values: dict[str, list] = {}
        for name, value in inst.inputs.items():
            if isinstance(value, Link):
                source = self.results.get(value.source)
                values[name] = source.outputs[value.output] if source is not None else [None]
            else:
                values[name] = [value]
        return values

    def _upcoming(self, nid: str) -> list[Any]:
        """Values computed so far that a node other than `nid` has still to read (the plan's look-ahead)."""
        mine = Counter((link.source, link.output) for _, link in self.links[nid])
        return [value for (src, output), count in self.output_refs.items() if count - mine[src, output] > 0
                and src in self.results for value in self.results[src].outputs[output]]

    def _release_inputs(self, nid: str, wanted: set[str]) -> None:
        for _, link in self.links[nid]:
            src = link.source
            self.refcount[src] -= 1
            self.output_refs[src, link.output] -= 1
            if self.refcount[src] == 0 and src not in self.graph.outputs:
                self.results.pop(src, None)

    def _compute(self, definition: NodeDef, inst: NodeInstance, wanted: set[str], part: KeyParts) -> CachedOutput:
        run_id, nid = self.report.run_id, inst.id
        self.emit(NodeStarted(run_id, nid, definition.name))
        ctx = RunContext(run_id, nid, definition.name, self.ex.resources, self.cancel, self.emit, self.prompt,
                         self.extra, upcoming=lambda: self._upcoming(nid))
        inputs = self._input_lists(inst, wanted)
        started = time.perf_counter()
        try:
            call = lambda: _call_node(definition, ctx, inputs, self.ex.registry)  # noqa: E731
            around = self.ex.around_node
            if around is None:
                result = call()
            elif self.ex._around_takes_ctx:
                result = around(definition, call, ctx=ctx)
            else:
                result = around(definition, call)
        except Interrupted:
            raise
        except Exception as exc:
            shown = {name: _describe(values) for name, values in inputs.items()}
            raise _NodeFailure(NodeFailed(run_id, nid, definition.name, type(exc).__name__, str(exc),
                                          traceback.format_exc(), shown)) from exc
        seconds = time.perf_counter() - started
        self.report.executed.append(nid)
        if result.ui:
            self.report.ui[nid] = result.ui
        key = self.keys[nid]
        previous = self.ex._last_parts.get(nid)
        if not definition.cacheable:
            reason = "ran: not cacheable (it has side effects)"
        elif previous is None:
            reason = "ran: no earlier result for this node"
        else:
            reason = "ran: " + describe_change(previous, part)
        self.report.explain[nid] = reason
        self.ex._last_parts[nid] = part
        if definition.cacheable:
            self.ex.cache.put(key, result)
        self.emit(NodeFinished(run_id, nid, definition.name, result.ui, seconds))
        return result


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

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._graph.nodes)


class _NodeFailure(Exception):
    def __init__(self, event: NodeFailed):
        super().__init__(event.message)
        self.event = event


def _call_node(definition: NodeDef, ctx: RunContext, inputs: dict[str, list], registry: NodeRegistry) -> CachedOutput:
    """Call the node's function, once per list element unless it takes whole lists (ComfyUI's list rules:
    the longest input sets the count, shorter ones repeat their last element)."""
    if definition.input_is_list:
        calls = [inputs]
    else:
        count = max((len(v) for v in inputs.values()), default=1)
        if any(len(v) == 0 for v in inputs.values()):
            count = 0
        calls = [{name: v[min(i, len(v) - 1)] for name, v in inputs.items()} for i in range(count)]
    n_out = len(definition.outputs)
    outputs: tuple[list, ...] = tuple([] for _ in range(n_out))
    ui: dict[str, Any] | None = None
    for kwargs in calls:
        returned = definition.fn(ctx, **kwargs)
        values, call_ui = _split_return(definition, returned)
        for j, out in enumerate(definition.outputs):
            if out.is_list:
                if not isinstance(values[j], list | tuple):
                    raise NodeError(f"{definition.name} declares output {out.name!r} as a list but returned "
                                    f"{type(values[j]).__name__}")
                outputs[j].extend(values[j])
            else:
                outputs[j].append(values[j])
        if call_ui:
            ui = _merge_ui(ui, call_ui)
    for j, out in enumerate(definition.outputs):
        info = registry.type_info(out.type)
        if info is not None and info.adapt is not None:
            outputs[j][:] = [info.adapt(v) for v in outputs[j]]
    nbytes = sum(estimate_nbytes(v) for values in outputs for v in values) + (estimate_nbytes(ui) if ui else 0)
    return CachedOutput(outputs, ui, nbytes)


def _split_return(definition: NodeDef, returned: Any) -> tuple[tuple, Mapping[str, Any] | None]:
    n_out = len(definition.outputs)
    if isinstance(returned, Result):
        values, ui = tuple(returned.outputs), returned.ui
    elif n_out == 1:
        values, ui = (returned,), None
    elif n_out == 0:
        values, ui = (), None
    else:
        values, ui = returned, None
    if not isinstance(values, tuple) or len(values) != n_out:
        got = len(values) if isinstance(values, tuple) else type(values).__name__
        raise NodeError(f"{definition.name} must return {n_out} output value(s) "
                        f"({', '.join(o.name for o in definition.outputs)}), returned {got}")
    return values, ui


def _merge_ui(ui: dict[str, Any] | None, more: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(ui or {})
    for name, value in more.items():
        if name in merged and isinstance(merged[name], list) and isinstance(value, list):
            merged[name] = merged[name] + value
        else:
            merged[name] = value
    return merged


def _fingerprint(definition: NodeDef, inst: NodeInstance, resources: Any) -> str:
    if not definition.cacheable:
        return uuid.uuid4().hex
    if definition.fingerprint is None:
        return ""
    try:
        value = definition.fingerprint(resources, **accepted_kwargs(definition.fingerprint, inst.constants()))
    except Exception:  # the node itself will run and report the problem with its inputs
        return uuid.uuid4().hex
    if isinstance(value, float) and math.isnan(value):  # ComfyUI's "always changed"
        return uuid.uuid4().hex
    return repr(value)


def _first(values: list) -> Any:
    return values[0] if values else None


def _describe(values: list) -> str:
    value = values[0] if len(values) == 1 else values
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__} shape {tuple(shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
