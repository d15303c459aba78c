"""The validated graph: node instances whose inputs are typed constants or links to upstream outputs."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx


@dataclass(frozen=True, slots=True)
class Link:
    """An input fed by output number `output` of node `source`."""

    source: str
    output: int

    def to_json(self) -> list:
        return [self.source, self.output]


@dataclass(frozen=True)
class NodeInstance:
    id: str
    type: str
    inputs: Mapping[str, Any]
    title: str | None = None

    def links(self) -> Iterator[tuple[str, Link]]:
        for name, value in self.inputs.items():
            if isinstance(value, Link):
                yield name, value

    def constants(self) -> dict[str, Any]:
        return {name: value for name, value in self.inputs.items() if not isinstance(value, Link)}


@dataclass(frozen=True)
class Graph:
    nodes: Mapping[str, NodeInstance]
    outputs: tuple[str, ...] = ()

    def __getitem__(self, node_id: str) -> NodeInstance:
        return self.nodes[node_id]

    def __iter__(self) -> Iterator[NodeInstance]:
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    def to_api(self) -> dict[str, dict]:
        """The graph in ComfyUI's API format (constants as given, links as [source, output])."""
        api: dict[str, dict] = {}
        for inst in self.nodes.values():
            inputs = {name: value.to_json() if isinstance(value, Link) else _api_constant(value)
                      for name, value in inst.inputs.items()}
            entry: dict[str, Any] = {"class_type": inst.type, "inputs": inputs}
            if inst.title:
                entry["_meta"] = {"title": inst.title}
            api[inst.id] = entry
        return api


def _api_constant(value: Any) -> Any:
    return {"__value__": list(value)} if isinstance(value, list | tuple) else value


def dependency_graph(edges: Iterable[tuple[str, str]], node_ids: Mapping[str, Any] | set[str]) -> nx.DiGraph:
    """A networkx graph of `node_ids` with an edge source -> consumer for each of `edges` between them."""
    graph = nx.DiGraph()
    graph.add_nodes_from(node_ids)
    graph.add_edges_from([(source, consumer) for source, consumer in edges
                          if source in node_ids and consumer in node_ids])
    return graph


def link_edges(graph_nodes: Mapping[str, NodeInstance]) -> list[tuple[str, str]]:
    """(source, consumer) for every link of the nodes."""
    return [(value.source, inst.id) for inst in graph_nodes.values() for value in inst.inputs.values()
            if isinstance(value, Link)]


def needed(graph: nx.DiGraph, targets: Iterable[str]) -> set[str]:
    """The targets in `graph` and every node they depend on: one breadth-first walk (linear, no recursion)."""
    sources = [t for t in targets if t in graph]
    if not sources:
        return set()
    return {node for layer in nx.bfs_layers(graph.reverse(copy=False), sources) for node in layer}


def ancestors(graph_nodes: Mapping[str, NodeInstance], targets: Iterable[str]) -> set[str]:
    """The targets and every node they depend on."""
    return needed(dependency_graph(link_edges(graph_nodes), graph_nodes), targets)


def cycle_through(links: nx.DiGraph, component: set[str], first: str) -> list[str]:
    """A cycle from `first` back to itself: a shortest path to one of its predecessors in its strongly
    connected component (every path between two nodes of a component stays inside it)."""
    last = next(node for node in links.pred[first] if node in component)
    return nx.bidirectional_shortest_path(links, first, last)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Validating or planning a graph makes a few objects per node and frees none: Python's cycle collector would
    scan them again and again (a third of the time of a 100,000-node graph). It runs again afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
