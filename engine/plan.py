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
from collections import OrderedDict
from collections.abc import Container, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import networkx as nx

from .cache import DEFAULT_MAX_ENTRIES, KeyParts, describe_change, make_key
from .graph import Graph, Link, NodeInstance, collector_paused, dependency_graph, needed
from .registry import NodeRegistry
from .spec import NodeDef, accepted_kwargs

CACHED = "cached"  # its result is in the cache: taken from there without looking at its inputs
RUN = "run"  # not in the cache and needed: it runs
LAZY = "lazy"  # not in the cache and needed only through lazy inputs: it runs if its consumer asks for it
SKIP = "skip"  # nothing that runs needs it (its consumers come from the cache)

OutputRef = tuple[str, int]  # (node id, output index)

UNCHANGED = ("same inputs as its last run, but its result is no longer cached (evicted, or never stored on disk: "
             "outputs without a codec, such as models, or too quick to be worth storing)")
UNCHANGED_OUTPUT_NODE = ("same inputs as its last run, but an output node's result is kept in memory only: a new "
                         "process writes its files again")


class KeyHistory:
    """The key parts each node id had when it last ran: the one owner of "what changed since the last run".

    One per executor. `last` is what a node id last ran with, `record` notes it; the node ids
    recorded longest ago are forgotten beyond `max_entries` (a long-running server sees many graphs)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._parts: OrderedDict[str, KeyParts] = OrderedDict()

    def last(self, node_id: str) -> KeyParts | None:
        return self._parts.get(node_id)

    def record(self, node_id: str, parts: KeyParts) -> None:
        self._parts[node_id] = parts
        self._parts.move_to_end(node_id)
        if len(self._parts) > self.max_entries:
            self._parts.popitem(last=False)

    def save(self) -> None:
        """Persist what was recorded (nothing to do in memory; `engine.tiers.StoredKeyHistory` writes a file)."""


class Step(NamedTuple):
    """One planned node. (A named tuple: immutable, and cheap enough for 100,000-node plans.)"""

    node: NodeInstance
    definition: NodeDef
    key: str
    parts: KeyParts
    status: str  # CACHED | RUN | LAZY | SKIP
    in_cache: bool
    links: tuple[tuple[str, Link], ...]  # (input name, link), in input order
    lazy: frozenset[str]  # the names of its lazy inputs
    previous: KeyParts | None  # what this node id last ran with (the executor's KeyHistory), if it ran

    @property
    def node_id(self) -> str:
        return self.node.id

    @property
    def why(self) -> str:
        """Why it would have to run if it is not (or no longer) in the cache: what changed since it last ran."""
        if not self.definition.cacheable:
            return "not cacheable (it has side effects)"
        if self.previous is None:
            return "no earlier result for this node"
        if self.previous == self.parts:
            return UNCHANGED_OUTPUT_NODE if self.definition.output_node else UNCHANGED
        return describe_change(self.previous, self.parts)

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
    executor's) says what changed since each node last ran. Two passes, so 100,000-node graphs plan quickly."""
    with collector_paused():
        return _compile_plan(graph, registry, cache, resources, history)


def _compile_plan(graph: Graph, registry: NodeRegistry, cache: Container[str], resources: Any,
                  history: KeyHistory | None) -> Plan:
    history = history if history is not None else KeyHistory()
    # 1. Which nodes (the outputs and their ancestors), each after its inputs, with its linked inputs.
    order, links = needed_in_order(graph)
    # 2. Keys, upstream first: content addresses made of type, version, constants, fingerprint, input keys.
    definitions: dict[str, NodeDef] = {}
    keys: dict[str, str] = {}
    parts: dict[str, KeyParts] = {}
    for nid in order:
        inst = graph.nodes[nid]
        definition = definitions.get(inst.type) or definitions.setdefault(inst.type, registry.get(inst.type))
        constants: dict[str, str] = {}
        inputs: dict[str, str] = {}
        for name, value in inst.inputs.items():
            if value.__class__ is Link:
                inputs[name] = f"{keys[value.source]}:{value.output}"
            else:
                constants[name] = repr(value)
        stamp = "" if definition.fingerprint is None and definition.cacheable else fingerprint(definition, inst,
                                                                                              resources)
        part = parts[nid] = KeyParts(definition.name, definition.version, constants, inputs, stamp)
        keys[nid] = make_key(part)
    # 3. Consumers before their sources: what a run needs (walking from the outputs, not a cached node's inputs;
    #    lazy inputs maybe), the steps, and each output's consumers (for releasing values and the look-ahead).
    lazy = {name: frozenset(spec.name for spec in d.inputs if spec.lazy) for name, d in definitions.items()}
    demand = dict.fromkeys(graph.outputs, RUN)
    readers: dict[OutputRef, list[str]] = {}
    steps: dict[str, Step] = {}
    cached = cache.__contains__
    for nid in reversed(order):
        inst = graph.nodes[nid]
        definition, node_lazy, in_cache = definitions[inst.type], lazy[inst.type], cached(keys[nid])
        need = demand.get(nid)
        for name, link in links[nid]:
            readers.setdefault((link.source, link.output), []).append(nid)
            if need is None or in_cache:
                continue
            if need == RUN and name not in node_lazy:
                demand[link.source] = RUN
            else:
                demand.setdefault(link.source, LAZY)
        status = SKIP if need is None else CACHED if in_cache else need
        steps[nid] = Step(inst, definition, keys[nid], parts[nid], status, in_cache, links[nid], node_lazy,
                          history.last(nid))
    return Plan(tuple(graph.outputs), tuple(order), MappingProxyType({nid: steps[nid] for nid in order}),
                MappingProxyType({ref: tuple(ids) for ref, ids in readers.items()}))


Links = dict[str, tuple[tuple[str, Link], ...]]


def needed_in_order(graph: Graph) -> tuple[list[str], Links]:
    """The outputs and every node they depend on, each after its inputs (networkx: one walk back from the
    outputs, then a topological sort; no recursion), and each one's linked inputs."""
    nodes = graph.nodes
    links: Links = {nid: tuple([(name, value) for name, value in inst.inputs.items() if value.__class__ is Link])
                    for nid, inst in nodes.items()}
    edges = [(link.source, nid) for nid, mine in links.items() for _, link in mine]
    full = dependency_graph(edges, nodes)
    wanted = needed(full, graph.outputs)
    dag = full if len(wanted) == len(nodes) else full.subgraph(wanted)
    try:
        order = list(nx.topological_sort(dag))
    except nx.NetworkXUnfeasible:
        raise ValueError("the graph has a cycle; validate it first (validation reports cycles with their "
                         "nodes)") from None
    return order, {nid: links[nid] for nid in order}


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
