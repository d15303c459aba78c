"""Node expansion: a node that returns a graph to run in its place (ComfyUI's `{"expand": graph, "result": ...}`).

A node function may return `Expansion(graph, result)` (or ComfyUI's dict `{"expand": graph, "result": (...)}`):
`graph` is an API-format graph of other nodes and `result` gives the node's outputs, each a value or a link
`[inner_id, output]` into that graph. The runner then (ComfyUI's rules, comfy_execution/graph.py and execution.py):

1. gives every inner node an id derived from the parent, "PARENT.INNER" ("PARENT.N.INNER" for the N-th call when
   the node is called once per list element), so ids are unique and the same in every run;
2. validates the inner graph like any prompt (an error names the parent and the inner node);
3. plans and runs it with the run's cache, key history, hook, listeners and cancel token: inner nodes are cached
   by content like any other, so an unchanged inner node is taken from the cache on the next expansion;
4. replaces the node's outputs by the linked inner outputs: the parent's result (the resolved values) is cached
   under the parent's own key, so a later run with the same inputs takes it without expanding again.

Inner nodes may link only to each other (not to nodes of the outer graph); pass outer values as constants.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .events import Event, NodeFailed, RunFinished, RunInterrupted, RunStarted

RUN_EVENTS = (RunStarted, RunFinished, RunInterrupted, NodeFailed)  # the outer run reports these itself


class ExpansionError(RuntimeError):
    """An expansion that cannot run; the message names the parent node and what is wrong."""


@dataclass(frozen=True)
class Expansion:
    """What a node returns to be replaced by a graph: `graph` in API format, `result` one entry per declared
    output, each a value or `[inner_id, output_index]`."""

    graph: Mapping[str, Any]
    result: Sequence[Any]


def as_expansion(returned: Any) -> Expansion | None:
    """The expansion a node returned (ours or ComfyUI's dict form), or None for ordinary outputs."""
    if isinstance(returned, Expansion):
        return returned
    if isinstance(returned, Mapping) and "expand" in returned:
        graph, result = returned.get("expand"), returned.get("result", ())
        if not isinstance(graph, Mapping):
            raise ExpansionError(f"'expand' must be a graph in the API format (a dict), got {type(graph).__name__}")
        return Expansion(graph, tuple(result) if isinstance(result, list | tuple) else (result,))
    return None


def inner_prefix(parent_id: str, call_index: int, calls: int) -> str:
    return f"{parent_id}." if calls == 1 else f"{parent_id}.{call_index}."


def prefixed_graph(expansion: Expansion, prefix: str, parent: str) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """The inner graph with prefixed ids (links renamed), and each result link as (prefixed id, output)."""
    inner = {str(nid) for nid in expansion.graph}
    graph: dict[str, Any] = {}
    for nid, node in expansion.graph.items():
        if not isinstance(node, Mapping) or not isinstance(node.get("inputs", {}), Mapping):
            raise ExpansionError(f"node {parent} expanded into a graph whose node {nid!r} is not "
                                 "{'class_type': ..., 'inputs': {...}}")
        inputs = {name: _renamed(value, inner, prefix, parent, f"{nid}.{name}")
                  for name, value in node.get("inputs", {}).items()}
        graph[prefix + str(nid)] = {**node, "inputs": inputs}
    links = [(prefix + str(value[0]), int(value[1])) for value in expansion.result if _is_link(value, inner)]
    return graph, links


def _is_link(value: Any, inner: set[str]) -> bool:
    return (isinstance(value, list | tuple) and len(value) == 2 and str(value[0]) in inner
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _renamed(value: Any, inner: set[str], prefix: str, parent: str, where: str) -> Any:
    if _is_link(value, inner):
        return [prefix + str(value[0]), value[1]]
    if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int):
        raise ExpansionError(f"node {parent} expanded into a graph whose input {where} links to {value[0]!r}, "
                             "which is not a node of the expansion; inner nodes may link only to each other "
                             "(pass outer values as constants)")
    return value


def resolved_outputs(expansion: Expansion, prefix: str, outputs: Mapping[str, tuple[list, ...]],
                     n_outputs: int, parent: str) -> list[list]:
    """The parent's outputs: each result entry's value, or the values of the inner output it links to."""
    if len(expansion.result) != n_outputs:
        raise ExpansionError(f"node {parent} expanded with {len(expansion.result)} result value(s) for its "
                             f"{n_outputs} declared output(s)")
    inner = {str(nid) for nid in expansion.graph}
    return [list(outputs[prefix + str(value[0])][value[1]]) if _is_link(value, inner) else [value]
            for value in expansion.result]


def node_events_only(emit: Callable[[Event], None]) -> Callable[[Event], None]:
    """The inner run's events for the outer run's `emit`, without its own start and finish (and failure, which
    the outer run reports as the parent's)."""
    def forward(event: Event) -> None:
        if not isinstance(event, RUN_EVENTS):
            emit(event)
    return forward
