"""Subgraphs of UI workflows, flattened into one plain workflow as the front end does when it queues.

A workflow saved by a 1.2x+ front end may hold `definitions.subgraphs`: each has its own nodes, links, `inputs`
and `outputs`; a node whose `type` is a subgraph's id is an instance of it. `flatten_workflow` replaces every
instance by its inner nodes, with the front end's rules (its `ExecutableNodeDTO.resolveInput/resolveOutput` and
`graphToPrompt`, learnt from frontend 1.58):

- inner node ids become "instance:inner" ("outer:middle:inner" when nested);
- a link from the subgraph's input node (id -10) takes what feeds the instance's input at that position: the link
  into it, else the value of the instance's promoted widget (the subgraph's inputs that feed an inner widget, in
  order, are the instance's widgets, their values its `widgets_values` by position; `widgets_values_named` is
  ignored as the front end ignores it), else nothing (an inner widget then keeps its own value);
- a link from an instance's output takes what feeds the subgraph's output node (id -20) at that position;
- a muted (2) or bypassed (4) instance at the top level is kept as one node (muted: what it feeds loses that
  input; bypassed: it passes its inputs through, as any bypassed node), and its inner nodes are not queued; an
  instance nested inside another is expanded whatever its mode (the front end queues its inner nodes), and its
  own mode still decides what its outputs give.

Inner node ids that repeat an id in use are renumbered as the front end does when it loads the file. Group nodes
(`extra.groupNodes`, the older format) are expanded before, by `groupnodes.py`. The result is a
plain workflow (string node and link ids) for `formats.workflow_to_api`, which resolves bypasses, muted nodes,
Reroutes and PrimitiveNodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

INPUT_NODE, OUTPUT_NODE = -10, -20
MODE_MUTED, MODE_BYPASSED = 2, 4


class SubgraphError(ValueError):
    """A subgraph or group node that cannot be flattened; the message names the node and says why."""


@dataclass(frozen=True)
class _Link:
    origin: Any
    slot: int
    target: Any
    target_slot: int
    type: Any


@dataclass
class _Level:
    """One graph being flattened: the root, or one instance's copy of a subgraph."""

    prefix: str  # "" for the root, "18:" inside instance 18, "18:17:" inside its instance 17
    nodes: dict[str, Mapping[str, Any]]
    links: dict[str, _Link]
    instance: Mapping[str, Any] | None = None  # the instance node (in the parent level) this level expands
    parent: _Level | None = None
    path: tuple[str, ...] = ()  # the subgraph ids expanded so far (a subgraph inside itself is refused)
    children: dict[str, _Level] = field(default_factory=dict)  # expanded instances, by local node id
    input_names: tuple[str, ...] = ()  # the subgraph's inputs, in order

    @cached_property
    def feeds(self) -> dict[tuple[str, int], _Link]:
        """Each link by its (target node id, target slot); the first when a stale second one is left in the file
        (the front end takes an output's first link)."""
        feeds: dict[tuple[str, int], _Link] = {}
        for link in self.links.values():
            feeds.setdefault((str(link.target), link.target_slot), link)
        return feeds

    @cached_property
    def promoted_inputs(self) -> list[int]:
        """The subgraph's inputs that feed an inner widget, in order: the instance's promoted widgets, whose values
        its `widgets_values` hold by position."""
        promoted = set()
        for link in self.links.values():
            if link.origin != INPUT_NODE:
                continue
            node = self.nodes.get(str(link.target), {})
            slots = node.get("inputs") or []
            if link.target_slot < len(slots) and isinstance(slots[link.target_slot], Mapping) and \
                    slots[link.target_slot].get("widget"):
                promoted.add(link.slot)
        return sorted(promoted)


def has_subgraphs(workflow: Mapping[str, Any]) -> bool:
    definitions = workflow.get("definitions")
    return bool(isinstance(definitions, Mapping) and definitions.get("subgraphs"))


def flatten_workflow(workflow: Mapping[str, Any]) -> dict[str, Any]:
    """The workflow with every subgraph instance replaced by its inner nodes: `{"nodes",
    "links"}` with string ids, links as [id, origin_id, origin_slot, target_id, target_slot, type]."""
    subgraphs = _subgraph_definitions(workflow)
    root = _Level("", _nodes_by_id(workflow.get("nodes", []), "the workflow"),
                  _links_by_id(workflow.get("links", []), "the workflow"))
    nodes: list[dict[str, Any]] = []
    links: list[list[Any]] = []
    _flatten_level(root, subgraphs, nodes, links)
    return {"nodes": nodes, "links": links}


def _subgraph_definitions(workflow: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    subgraphs: dict[str, Mapping[str, Any]] = {}
    for sub in _renumbered(workflow, _all_definitions(workflow))[0]:
        subgraphs.setdefault(sub["id"], sub)  # the front end keeps the first of two with one id
    return subgraphs


def _all_definitions(graph: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """`definitions.subgraphs`, with those a subgraph holds in its own `definitions` after it (in that order)."""
    definitions = graph.get("definitions")
    raw = definitions.get("subgraphs") if isinstance(definitions, Mapping) else None
    found: list[Mapping[str, Any]] = []
    for sub in raw or []:
        if not isinstance(sub, Mapping) or not isinstance(sub.get("id"), str):
            raise SubgraphError("a subgraph in definitions.subgraphs has no string 'id'; re-save the workflow "
                                "from the front end")
        found.append(sub)
        found.extend(_all_definitions(sub))
    return found


def last_node_id_after_load(workflow: Mapping[str, Any]) -> int:
    """The root graph's last node id once the front end has loaded the file: past every renumbered inner id and
    every subgraph's own saved counter (new nodes, like the ones group nodes turn into, get the next ids)."""
    definitions = _all_definitions(workflow)
    states = [sub.get("state") for sub in definitions]
    counters = [_number(state.get("lastNodeId")) for state in states if isinstance(state, Mapping)]
    ids = [_number(n.get("id")) for graph in (workflow, *definitions) for n in graph.get("nodes") or []
           if isinstance(n, Mapping)]
    return max([_renumbered(workflow, definitions)[1], *counters, *ids])


def _renumbered(workflow: Mapping[str, Any], subgraphs: list[Mapping[str, Any]],
                ) -> tuple[list[Mapping[str, Any]], int]:
    """Inner node ids that repeat an id already used (at the top level or in an earlier subgraph) get fresh ids, as
    the front end gives them when it loads the file: the next free number after the graph's last node id, in the
    order of the definitions and their nodes. The API prompt's "instance:inner" ids use the fresh ids. Also gives
    the last id given."""
    top = workflow.get("nodes") or []
    taken = {str(n.get("id")) for n in top if isinstance(n, Mapping)}
    numbers = {int(i) for i in taken if i.isdigit()}
    state = workflow.get("state") if isinstance(workflow.get("state"), Mapping) else {}
    last = max(_number(workflow.get("last_node_id")), _number(state.get("lastNodeId")))
    result = []
    for sub in subgraphs:
        fresh: dict[str, int] = {}
        for node in sub.get("nodes") or []:
            node_id = str(node.get("id")) if isinstance(node, Mapping) else ""
            if node_id in taken:
                last += 1
                while last in numbers:
                    last += 1
                fresh[node_id] = last
                numbers.add(last)
                taken.add(str(last))
            else:
                taken.add(node_id)
                if node_id.isdigit():
                    numbers.add(int(node_id))
                    last = max(last, int(node_id))
        result.append(_with_fresh_ids(sub, fresh) if fresh else sub)
    return result, last


def _number(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _with_fresh_ids(sub: Mapping[str, Any], fresh: Mapping[str, int]) -> dict[str, Any]:
    def renamed(node_id: Any) -> Any:
        return fresh.get(str(node_id), node_id)

    nodes = [{**n, "id": renamed(n["id"])} if isinstance(n, Mapping) and "id" in n else n for n in sub["nodes"]]
    links = []
    for link in sub.get("links") or []:
        if isinstance(link, Mapping):
            links.append({**link, "origin_id": renamed(link.get("origin_id")),
                          "target_id": renamed(link.get("target_id"))})
        elif isinstance(link, list | tuple) and len(link) >= 5:
            links.append([link[0], renamed(link[1]), link[2], renamed(link[3]), *link[4:]])
        else:
            links.append(link)
    return {**sub, "nodes": nodes, "links": links}


def _nodes_by_id(raw: Any, where: str) -> dict[str, Mapping[str, Any]]:
    if not isinstance(raw, list) or not all(isinstance(n, Mapping) and "id" in n for n in raw):
        raise SubgraphError(f"{where}: 'nodes' must be a list of nodes with an 'id'")
    return {str(n["id"]): n for n in raw}


def _links_by_id(raw: Any, where: str) -> dict[str, _Link]:
    links: dict[str, _Link] = {}
    for item in raw or []:
        try:
            if isinstance(item, Mapping):
                link_id = item["id"]
                link = _Link(item["origin_id"], int(item["origin_slot"]), item["target_id"],
                             int(item["target_slot"]), item.get("type"))
            else:
                link_id = item[0]
                link = _Link(item[1], int(item[2]), item[3], int(item[4]), item[5] if len(item) > 5 else None)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise SubgraphError(f"{where}: link {item!r} is not [id, origin_id, origin_slot, target_id, "
                                "target_slot, type]") from exc
        links[str(link_id)] = link
    return links


def _is_expanded(level: _Level, node: Mapping[str, Any], subgraphs: Mapping[str, Any]) -> bool:
    """The front end queues the inner nodes of a top-level instance only when it is neither muted nor bypassed;
    nested instances are always expanded."""
    if node.get("type") not in subgraphs:
        return False
    return level.parent is not None or node.get("mode", 0) not in (MODE_MUTED, MODE_BYPASSED)


def _flatten_level(level: _Level, subgraphs: Mapping[str, Mapping[str, Any]], nodes: list, links: list) -> None:
    for local_id, node in level.nodes.items():
        if _is_expanded(level, node, subgraphs):
            level.children[local_id] = _child_level(level, local_id, node, subgraphs[node["type"]])
    for local_id, node in level.nodes.items():
        child = level.children.get(local_id)
        if child is not None:
            _flatten_level(child, subgraphs, nodes, links)
            if node.get("mode", 0) not in (MODE_MUTED, MODE_BYPASSED):
                continue  # a nested muted or bypassed instance also stays, to answer for its outputs
        nodes.append(_flat_node(level, node))
    for link_id, link in level.links.items():
        if link.target == OUTPUT_NODE or str(link.target) in level.children and \
                level.nodes[str(link.target)].get("mode", 0) not in (MODE_MUTED, MODE_BYPASSED):
            continue  # links into an expanded instance are followed from the inside
        source = _origin(level, link.origin, link.slot, subgraphs)
        flat_id = level.prefix + link_id
        if isinstance(source, _Value):
            constant_id = f"{flat_id}#value"
            nodes.append({"id": constant_id, "type": "PrimitiveNode", "mode": 0, "widgets_values": [source.value]})
            links.append([flat_id, constant_id, 0, level.prefix + str(link.target), link.target_slot, link.type])
        elif source is not None:
            links.append([flat_id, source[0], source[1], level.prefix + str(link.target), link.target_slot,
                          link.type])


def _child_level(level: _Level, local_id: str, node: Mapping[str, Any], sub: Mapping[str, Any]) -> _Level:
    sub_id = node["type"]
    if sub_id in level.path:
        raise SubgraphError(f"node {level.prefix}{local_id}: subgraph {sub.get('name') or sub_id!r} contains "
                            "itself; a subgraph cannot be nested in itself")
    where = f"subgraph {sub.get('name') or sub_id!r} (node {level.prefix}{local_id})"
    names = tuple(str(i.get("name", "")) if isinstance(i, Mapping) else "" for i in sub.get("inputs") or [])
    return _Level(f"{level.prefix}{local_id}:", _nodes_by_id(sub.get("nodes", []), where),
                  _links_by_id(sub.get("links", []), where), node, level, (*level.path, sub_id), {}, names)


def _flat_node(level: _Level, node: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of the node with its flat id and its input links renamed like the flat links."""
    inputs = [dict(slot, link=None if slot.get("link") is None else level.prefix + str(slot["link"]))
              for slot in node.get("inputs") or [] if isinstance(slot, Mapping)]
    return {**node, "id": level.prefix + str(node["id"]), "inputs": inputs}


@dataclass(frozen=True)
class _Value:
    """A promoted widget's value: what an inner input linked to the subgraph's input gets."""

    value: Any


def _origin(level: _Level, origin: Any, slot: int, subgraphs: Mapping[str, Any],
            ) -> tuple[str, int] | _Value | None:
    """The flat (node id, output) a link from `origin`'s output `slot` in `level` really comes from; a promoted
    widget's value; or None when nothing feeds it."""
    for _ in range(10_000):  # each step leaves a level; a deeper chain is a broken file
        if origin == INPUT_NODE:
            if level.parent is None or level.instance is None:
                raise SubgraphError("the workflow links from a subgraph input node (-10) outside a subgraph")
            feed = _instance_input(level, slot)
            if not isinstance(feed, _Link):
                return feed
            level, origin, slot = level.parent, feed.origin, feed.slot
            continue
        child = level.children.get(str(origin))
        if child is None or level.nodes[str(origin)].get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            return level.prefix + str(origin), slot
        inner = child.feeds.get((str(OUTPUT_NODE), slot))
        if inner is None:
            return None
        level, origin, slot = child, inner.origin, inner.slot
    raise SubgraphError("subgraph links go round in a loop; re-save the workflow from the front end")


def _instance_input(level: _Level, slot: int) -> _Link | _Value | None:
    """What feeds the instance's input at position `slot`: the link into it (in the parent level), else the value
    of its promoted widget, else nothing (an inner widget keeps its own value)."""
    instance, parent = level.instance, level.parent
    position = _instance_slot(instance, level.input_names, slot)
    link = None if position is None else parent.feeds.get((str(instance["id"]), position))
    if link is not None:
        return link
    promoted = level.promoted_inputs
    if slot not in promoted:
        return None
    values = instance.get("widgets_values")
    if isinstance(values, list) and not (instance.get("properties") or {}).get("proxyWidgets"):
        position = promoted.index(slot)
        if position < len(values):
            return _Value(values[position])
    return None  # `widgets_values_named` is not read by the front end either


def _instance_slot(instance: Mapping[str, Any], input_names: tuple[str, ...], slot: int) -> int | None:
    """The position among the instance's saved inputs of the subgraph's input `slot`: a saved instance leaves out
    its unlinked widget inputs, so the two are matched by name (by position when the subgraph names none)."""
    if slot >= len(input_names):
        return slot
    names = [entry.get("name") if isinstance(entry, Mapping) else None for entry in instance.get("inputs") or []]
    return names.index(input_names[slot]) if input_names[slot] in names else None
