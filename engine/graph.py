"""The validated graph: node instances whose inputs are typed constants or links to upstream outputs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any


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


def ancestors(graph_nodes: Mapping[str, NodeInstance], targets: Iterable[str]) -> set[str]:
    """The targets and every node they depend on (iteratively: a 5,000-long chain is fine)."""
    seen: set[str] = set()
    stack = [t for t in targets if t in graph_nodes]
    while stack:
        node_id = stack.pop()
        if node_id in seen:
            continue
        seen.add(node_id)
        for _, link in graph_nodes[node_id].links():
            if link.source in graph_nodes and link.source not in seen:
                stack.append(link.source)
    return seen
