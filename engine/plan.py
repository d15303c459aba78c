"""Planning a run, without running anything: which nodes, in which order, under which cache keys, and for each
whether it comes from the cache or must run, and why.

`compile_plan` is pure: it reads the graph, the registry's declarations, which keys the cache holds and the key
parts each node had when it last ran (`KeyHistory`); it calls no node function (fingerprints are called: they
are the nodes' cheap declarations of what they read) and changes nothing. The runner (`runner.py`) executes a
`Plan`; `Plan.explain()` says what a run would do.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from collections.abc import Container, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from .cache import KeyParts, describe_change, make_key
from .graph import Graph, Link, NodeInstance, ancestors
from .registry import NodeRegistry
from .spec import NodeDef, accepted_kwargs

CACHED = "cached"  # its result is in the cache: taken from there without looking at its inputs
RUN = "run"  # not in the cache and needed: it runs
LAZY = "lazy"  # not in the cache and needed only through lazy inputs: it runs if its consumer asks for it
SKIP = "skip"  # nothing that runs needs it (its consumers come from the cache)

OutputRef = tuple[str, int]  # (node id, output index)


class KeyHistory:
    """The key parts each node id had when it last ran: the one owner of "what changed since the last run".

    One per executor. `why_run` says why a node must run now, `record` notes what it ran with."""

    def __init__(self) -> None:
        self._parts: dict[str, KeyParts] = {}

    def last(self, node_id: str) -> KeyParts | None:
        return self._parts.get(node_id)

    def record(self, node_id: str, parts: KeyParts) -> None:
        self._parts[node_id] = parts

    def why_run(self, node_id: str, parts: KeyParts, cacheable: bool) -> str:
        if not cacheable:
            return "not cacheable (it has side effects)"
        previous = self._parts.get(node_id)
        if previous is None:
            return "no earlier result for this node"
        return describe_change(previous, parts)


@dataclass(frozen=True)
class Step:
    """One planned node. `why` says why it would have to run if it is not (or no longer) in the cache: what
    changed since it last ran."""

    node: NodeInstance
    definition: NodeDef
    key: str
    parts: KeyParts
    status: str  # CACHED | RUN | LAZY | SKIP
    in_cache: bool
    why: str
    links: tuple[tuple[str, Link], ...]  # (input name, link), in input order
    lazy: frozenset[str]  # the names of its lazy inputs

    @property
    def node_id(self) -> str:
        return self.node.id

    def describe(self) -> str:
        """The plan's word on this node, for `Plan.explain`."""
        if self.status == CACHED:
            return "cached"
        if self.status == RUN:
            return f"will run: {self.why}"
        if self.status == LAZY:
            return f"will run if a lazy input that needs it is asked for: {self.why}"
        return "skipped: nothing that will run needs it (its consumers are cached)"


@dataclass(frozen=True)
class Plan:
    """What a run of `outputs` does, in topological `order` (only the outputs and what they depend on)."""

    outputs: tuple[str, ...]
    order: tuple[str, ...]
    steps: Mapping[str, Step]
    readers: Mapping[OutputRef, tuple[str, ...]]  # each output's consuming node ids, one per link

    def __getitem__(self, node_id: str) -> Step:
        return self.steps[node_id]

    @property
    def in_cache(self) -> tuple[str, ...]:
        """Planned nodes whose key is in the cache (whether or not the run will need them)."""
        return tuple(nid for nid in self.order if self.steps[nid].in_cache)

    def with_status(self, status: str) -> tuple[str, ...]:
        return tuple(nid for nid in self.order if self.steps[nid].status == status)

    def explain(self) -> dict[str, str]:
        """For each planned node: cached, will run (and why), or skipped."""
        return {nid: self.steps[nid].describe() for nid in self.order}


def compile_plan(graph: Graph, registry: NodeRegistry, cache: Container[str], *, resources: Any = None,
                 history: KeyHistory | None = None) -> Plan:
    """Plan a run of `graph.outputs`. Pure: no node function is called, nothing is changed.

    `cache` only needs to answer `key in cache`; `resources` is what fingerprints receive; `history` (the
    executor's) says what changed since each node last ran."""
    history = history if history is not None else KeyHistory()
    # 1. Which nodes: the outputs and their ancestors, in topological order.
    order = topological_order(graph)
    # 2. Keys, upstream first: content addresses made of type, version, constants, fingerprint, input keys.
    keys: dict[str, str] = {}
    parts: dict[str, KeyParts] = {}
    for nid in order:
        inst = graph[nid]
        definition = registry.get(inst.type)
        constants = {name: repr(value) for name, value in inst.inputs.items() if not isinstance(value, Link)}
        inputs = {name: f"{keys[link.source]}:{link.output}" for name, link in inst.links()}
        part = KeyParts(definition.name, definition.version, constants, inputs,
                        fingerprint(definition, inst, resources))
        parts[nid] = part
        keys[nid] = make_key(part)
    # 3. What is needed: walking from the outputs, a cached node's inputs are not; lazy inputs maybe.
    in_cache = {nid: keys[nid] in cache for nid in order}
    demand = _demand(graph, registry, order, in_cache)
    # 4. Consumers of each output, for releasing values and for the look-ahead.
    readers: dict[OutputRef, list[str]] = {}
    steps: dict[str, Step] = {}
    for nid in order:
        inst = graph[nid]
        definition = registry.get(inst.type)
        links = tuple(inst.links())
        for _, link in links:
            readers.setdefault((link.source, link.output), []).append(nid)
        need = demand.get(nid)
        status = SKIP if need is None else CACHED if in_cache[nid] else need
        steps[nid] = Step(inst, definition, keys[nid], parts[nid], status, in_cache[nid],
                          history.why_run(nid, parts[nid], definition.cacheable), links,
                          frozenset(spec.name for spec in definition.inputs if spec.lazy))
    return Plan(tuple(graph.outputs), tuple(order), MappingProxyType(steps),
                MappingProxyType({ref: tuple(ids) for ref, ids in readers.items()}))


def topological_order(graph: Graph) -> list[str]:
    """The outputs and every node they depend on, each after its inputs (Kahn's algorithm, in the graph's order
    where there is a choice; iterative, so long chains need no recursion)."""
    needed = ancestors(graph.nodes, graph.outputs)
    waiting = {nid: 0 for nid in graph.nodes if nid in needed}
    consumers: dict[str, list[str]] = {}
    for nid in waiting:
        for _, link in graph[nid].links():
            waiting[nid] += 1
            consumers.setdefault(link.source, []).append(nid)
    ready = deque(nid for nid, count in waiting.items() if count == 0)
    order: list[str] = []
    while ready:
        nid = ready.popleft()
        order.append(nid)
        for consumer in consumers.get(nid, ()):
            waiting[consumer] -= 1
            if waiting[consumer] == 0:
                ready.append(consumer)
    if len(order) != len(waiting):
        raise ValueError("the graph has a cycle; validate it first (validation reports cycles with their nodes)")
    return order


def _demand(graph: Graph, registry: NodeRegistry, order: list[str], in_cache: Mapping[str, bool]) -> dict[str, str]:
    """RUN or LAZY for each node a run needs, from the outputs upstream (consumers before their sources)."""
    demand = dict.fromkeys(graph.outputs, RUN)
    for nid in reversed(order):
        need = demand.get(nid)
        if need is None or in_cache[nid]:
            continue
        inst = graph[nid]
        lazy = {spec.name for spec in registry.get(inst.type).inputs if spec.lazy}
        for name, link in inst.links():
            if need == RUN and name not in lazy:
                demand[link.source] = RUN
            else:
                demand.setdefault(link.source, LAZY)
    return demand


def fingerprint(definition: NodeDef, inst: NodeInstance, resources: Any) -> str:
    """The node's declaration of what it reads besides its inputs (a file's date, ...). A fresh value, so the
    node always runs, when it is not cacheable, when the fingerprint is NaN (ComfyUI's "always changed") or when
    computing it fails (the node itself will run and report the problem with its inputs)."""
    if not definition.cacheable:
        return uuid.uuid4().hex
    if definition.fingerprint is None:
        return ""
    try:
        value = definition.fingerprint(resources, **accepted_kwargs(definition.fingerprint, inst.constants()))
    except BaseException:  # noqa: BLE001 - a node's own code never stops planning (SystemExit included)
        return uuid.uuid4().hex
    if isinstance(value, float) and math.isnan(value):
        return uuid.uuid4().hex
    return repr(value)
