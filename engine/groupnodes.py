"""Group nodes (`extra.groupNodes`, the format before subgraphs), expanded as frontend 1.58 does when it loads them.

A group is a saved selection of nodes: `nodes` (each with its `index`), `links` as [origin index, origin slot,
target index, target slot, origin id, type] between them, `external` [index, slot, type] (outputs also used
outside) and an optional `config` (the group's own names, hidden inputs and outputs). A node of type
"workflow>NAME" (oldest files: "workflow/NAME") is an instance; its widgets and sockets are derived from the inner
nodes' /object_info entries (`build_group`). When the front end loads such a file it pastes each instance's inner
nodes under fresh ids (the next free numbers, in the group's node order), sets their widgets from the instance's,
re-makes the links in and out, removes the instance and turns the pasted nodes into a subgraph under the next
id: the prompt names them "subgraph:inner". Its quirks are kept, because the prompt must match the browser's
(docs/engine.md lists them; tests/fixtures/group-nodes holds the browser's prompts).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .subgraphs import SubgraphError, last_node_id_after_load

PREFIX, LEGACY_PREFIX = "workflow>", "workflow/"
PRIMITIVE = "PrimitiveNode"
FRONTEND_TYPES = {PRIMITIVE, "Reroute", "Note", "MarkdownNote"}  # types the front end has without the server
SEED_NAMES = ("seed", "noise_seed")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
NodeInfo = Callable[[str], Mapping[str, Any] | None]  # a node type's /object_info entry, None when unknown


def has_group_nodes(workflow: Mapping[str, Any]) -> bool:
    extra = workflow.get("extra")
    return isinstance(extra, Mapping) and isinstance(extra.get("groupNodes"), Mapping) and \
        bool(extra["groupNodes"])


@dataclass
class GroupDef:
    """What the front end derives from a group: its widgets and sockets, and where each leads inside."""

    name: str
    nodes: list[Mapping[str, Any]]
    links: list[list[Any]]
    widgets: list[tuple[str, Any, bool]] = field(default_factory=list)  # (name, default, has a control widget)
    sockets: list[str] = field(default_factory=list)  # the instance's inputs, in the order it holds them
    input_map: dict[int, dict[str, int]] = field(default_factory=dict)  # inner index -> input -> socket number
    widget_map: dict[int, dict[str, str]] = field(default_factory=dict)  # inner index -> widget -> group widget
    outputs: list[tuple[int, int]] = field(default_factory=list)  # group output -> (inner index, slot)
    missing: list[str] = field(default_factory=list)  # inner node types neither the server nor the front end has


def expand_group_nodes(workflow: Mapping[str, Any], node_info: NodeInfo) -> dict[str, Any]:
    """The workflow with every group node instance replaced by its inner nodes ("subgraph:inner" ids, string
    ids throughout) and `extra.groupNodes` gone; nodes and links are lists as in a saved workflow."""
    raw_groups = workflow["extra"]["groupNodes"]
    groups: dict[str, GroupDef] = {}
    for name, data in raw_groups.items():
        groups[name] = build_group(str(name), data, node_info, known_groups=list(groups))
    raw_nodes = workflow.get("nodes")
    if not isinstance(raw_nodes, list) or not all(isinstance(n, Mapping) and "id" in n for n in raw_nodes):
        raise SubgraphError("the workflow: 'nodes' must be a list of nodes with an 'id'")
    nodes = [dict(n, type=_modern_type(n.get("type"))) for n in raw_nodes]
    links = [_link_list(link) for link in workflow.get("links") or []]
    last = last_node_id_after_load(workflow)
    for instance in list(nodes):
        group = groups.get(str(instance["type"])[len(PREFIX):]) if _is_group_type(instance["type"]) else None
        if _is_group_type(instance["type"]) and group is None:
            raise SubgraphError(f"node {instance['id']}: group node type {instance['type']!r} has no definition "
                                "in extra.groupNodes; re-save the workflow from the front end")
        if group is None:
            continue
        if group.missing:
            raise SubgraphError(f"node {instance['id']}: group node {group.name!r} holds node types this server "
                                f"does not have ({', '.join(group.missing)}); install them or remove the group node")
        last = _expand_instance(instance, group, groups, nodes, links, last, node_info)
    extra = {k: v for k, v in workflow["extra"].items() if k != "groupNodes"}
    return {**workflow, "nodes": nodes, "links": links, "extra": extra}


def _is_group_type(kind: Any) -> bool:
    return isinstance(kind, str) and kind.startswith(PREFIX)


def _modern_type(kind: Any) -> Any:
    return PREFIX + kind[len(LEGACY_PREFIX):] if isinstance(kind, str) and kind.startswith(LEGACY_PREFIX) else kind


def _link_list(link: Any) -> list[Any]:
    if isinstance(link, Mapping):
        return [link.get("id"), link.get("origin_id"), link.get("origin_slot"), link.get("target_id"),
                link.get("target_slot"), link.get("type")]
    if not isinstance(link, list | tuple) or len(link) < 5:
        raise SubgraphError(f"the workflow: link {link!r} is not [id, origin_id, origin_slot, target_id, "
                            "target_slot, type]")
    return list(link)




def build_group(name: str, data: Any, node_info: NodeInfo, known_groups: Iterable[str] = ()) -> GroupDef:
    """The group's widgets, sockets and maps, derived as the front end's group node config does. `known_groups`:
    the groups defined before this one (a group node inside must be one of them)."""
    if not isinstance(data, Mapping) or not isinstance(data.get("nodes"), list):
        raise SubgraphError(f"group node {name!r}: extra.groupNodes[{name!r}] must hold a 'nodes' list")
    if not all(isinstance(n, Mapping) for n in data["nodes"]):
        raise SubgraphError(f"group node {name!r}: each of its 'nodes' must be a node (an object)")
    group = GroupDef(name, list(data["nodes"]), _group_links(name, data.get("links"), len(data["nodes"])))
    kinds = {str(n.get("type")) if isinstance(n, Mapping) else "" for n in group.nodes}
    known = {PREFIX + g for g in known_groups} | FRONTEND_TYPES
    group.missing = sorted(k for k in kinds if k not in known and node_info(k) is None)
    builder = _Builder(group, data, node_info)
    for index, node in enumerate(group.nodes):
        builder.add_node(index, node)
    builder.add_converted_widgets()
    group.widgets = [(n, _default(spec), _has_control(spec)) for n, spec in builder.required.items()
                     if _is_widget(spec)]
    group.sockets = [n for n, spec in builder.required.items() if not _is_widget(spec)] + \
        [w[0] for w in group.widgets]
    return group


def _group_links(name: str, raw: Any, count: int) -> list[list[Any]]:
    """The group's links, each [origin index, origin slot, target index, target slot, ...] between its nodes (a
    link without an origin, which the front end skips, is left out)."""
    links = []
    for link in raw or []:
        if isinstance(link, list | tuple) and len(link) >= 4 and link[0] is None:
            continue
        if not (isinstance(link, list | tuple) and len(link) >= 4 and all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in link[:4])
                and link[0] < count and link[2] < count):
            raise SubgraphError(f"group node {name!r}: link {link!r} is not [origin index, origin slot, target "
                                f"index, target slot, ...] between its {count} nodes; re-save the workflow")
        links.append(list(link))
    return links


@dataclass
class _Builder:
    """The front end's walk over a group's nodes: plain widgets and free sockets in node order (sockets
    numbered as they come), widgets converted to inputs after all nodes (numbered after the sockets)."""

    group: GroupDef
    data: Mapping[str, Any]
    node_info: NodeInfo
    required: dict[str, list[Any]] = field(default_factory=dict)  # the group's inputs, in order
    used: dict[str, int] = field(default_factory=dict)  # how often each name was given
    converted: list[tuple[int, Mapping[str, Any], list[tuple[int, str]], Mapping[str, Any]]] = \
        field(default_factory=list)
    counter: int = 0

    @cached_property
    def links_to(self) -> set[tuple[Any, Any]]:
        return {(link[2], link[3]) for link in self.group.links}

    def add_node(self, index: int, node: Mapping[str, Any]) -> None:
        info = _primitive_info(index, self.group, self.node_info) if node.get("type") == PRIMITIVE else \
            self.node_info(str(node.get("type")))
        if info is None:
            return  # the front end skips a node it has no definition for (a group node inside included)
        specs = _input_specs(info)
        saved = [s for s in node.get("inputs") or [] if isinstance(s, Mapping)]
        converted: list[tuple[int, str]] = []
        slots: list[str] = []
        self.group.widget_map[index] = {}
        self.group.input_map[index] = {}
        for input_name, spec in specs.items():
            position = next((i for i, s in enumerate(saved) if s.get("name") == input_name
                             and (s.get("widget") or {}).get("name") == input_name), -1)
            if not _is_widget(spec):
                slots.append(input_name)
            elif position > -1:
                converted.append((position, input_name))
            else:
                new_name = self.name_for(index, node, input_name)
                self.required[new_name] = _with_control(spec, input_name)
                self.group.widget_map[index][input_name] = new_name
        for position, input_name in enumerate(slots):
            found = next((i for i, s in enumerate(saved) if s.get("name") == input_name), -1)
            if (index, found if found >= 0 else position) in self.links_to:
                continue
            new_name = self.name_for(index, node, input_name)
            if self.config(index, "input", input_name).get("visible") is not False:
                self.required[new_name] = specs[input_name]
                self.group.input_map[index][input_name] = self.counter
                self.counter += 1
        self.converted.append((index, node, sorted(converted), specs))
        self.add_outputs(index, info)

    def add_outputs(self, index: int, info: Mapping[str, Any]) -> None:
        linked_from = {(link[0], link[1]) for link in self.group.links}
        external = {(e[0], e[1]) for e in self.data.get("external") or []
                    if isinstance(e, list | tuple) and len(e) > 2 and e[2] is not None}
        for slot, _ in enumerate(info.get("output") or []):
            hidden_by_default = (index, slot) in linked_from and (index, slot) not in external
            if self.config(index, "output", slot).get("visible", not hidden_by_default):
                self.group.outputs.append((index, slot))

    def add_converted_widgets(self) -> None:
        for index, node, converted, specs in self.converted:
            for position, input_name in converted:
                if (index, position) in self.links_to:
                    continue
                new_name = self.name_for(index, node, input_name)
                self.required[new_name] = _with_control(specs[input_name], input_name)
                self.group.widget_map[index][input_name] = new_name
                self.group.input_map[index][input_name] = self.counter
                self.counter += 1

    def config(self, index: int, kind: str, key: Any) -> Mapping[str, Any]:
        """The group's own settings for an inner input or output (`config[index][kind][key]`)."""
        config = self.data.get("config")
        entry = config.get(str(index)) if isinstance(config, Mapping) else None
        section = entry.get(kind) if isinstance(entry, Mapping) else None
        found = section.get(str(key)) if isinstance(section, Mapping) else None
        return found if isinstance(found, Mapping) else {}

    def name_for(self, index: int, node: Mapping[str, Any], input_name: str) -> str:
        """The group's name for an inner input: the group's own name for it, its label or its name; "Title name"
        when that is taken, "Title N name" when that is taken too (the front end's counting)."""
        label = next((s.get("label") for s in node.get("inputs") or []
                      if isinstance(s, Mapping) and s.get("name") == input_name and s.get("label")), None)
        name = key = self.config(index, "input", input_name).get("name") or label or input_name
        if name in self.used or (node.get("type") == PRIMITIVE and node.get("title")):
            title = f"{node.get('title') or node.get('type')} "
            name = key = f"{title}{input_name}"
            if name in self.used:
                name = f"{title}{self.used[name]} {input_name}"
        self.used[key] = self.used.get(key, 1) + 1
        return name


def _primitive_info(index: int, group: GroupDef, node_info: NodeInfo) -> dict[str, Any] | None:
    """What the front end makes of a PrimitiveNode inside a group: one widget `value` of the type (and options)
    of the input it feeds, with a control widget; None when it feeds nothing inside."""
    link = next((link for link in group.links if link and link[0] == index), None)
    if link is None or not 0 <= link[2] < len(group.nodes):
        return None
    target = group.nodes[link[2]]
    saved = target.get("inputs") or []
    name = saved[link[3]].get("name") if link[3] < len(saved) and isinstance(saved[link[3]], Mapping) else None
    info = node_info(str(target.get("type")))
    spec = _input_specs(info).get(name) if info is not None and name else None
    kind = spec[0] if isinstance(spec, list | tuple) and spec else (link[5] if len(link) > 5 else "*")
    options = spec[1] if isinstance(spec, list | tuple) and len(spec) > 1 and isinstance(spec[1], Mapping) else {}
    return {"input": {"required": {"value": [kind, {**options, "control_after_generate": True}]}},
            "output": [kind]}


def _is_widget(spec: Any) -> bool:
    if not isinstance(spec, list | tuple) or not spec:
        return False
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
    if options.get("forceInput") is True:
        return False
    return isinstance(spec[0], list | tuple) or spec[0] in WIDGET_TYPES


def _with_control(spec: list[Any], input_name: str) -> list[Any]:
    """Inside a group an INT named seed or noise_seed always gets a control_after_generate widget."""
    if input_name in SEED_NAMES:
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
        return [spec[0], {**options, "control_after_generate": True}]
    return spec


def _has_control(spec: list[Any]) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
    return bool(options.get("control_after_generate"))


def _default(spec: list[Any]) -> Any:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
    if "default" in options:
        return options["default"]
    if isinstance(spec[0], list | tuple):
        return spec[0][0] if spec[0] else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec[0])


def _expand_instance(instance: Mapping[str, Any], group: GroupDef, groups: Mapping[str, GroupDef],
                     nodes: list[dict[str, Any]], links: list[list[Any]], last: int, node_info: NodeInfo) -> int:
    """Replace `instance` in `nodes`/`links` by the group's inner nodes, as the front end's conversion does;
    return the graph's new last node id."""
    count = len(group.nodes)
    prefix = f"{last + count + 1}:"
    inner_ids = [f"{prefix}{last + 1 + i}" for i in range(count)]
    values = _group_widget_values(instance, group)
    pasted = [_pasted_node(node, inner_ids[i], group.widget_map.get(i, {}), values, groups, node_info)
              for i, node in enumerate(group.nodes)]
    inner_links = []
    for n, link in enumerate(group.links):
        if group.nodes[link[0]].get("type") == PRIMITIVE:
            continue  # its value does not reach the input it feeds: that widget keeps its own value
        link_id = f"{prefix}link{n}"
        inner_links.append([link_id, inner_ids[link[0]], link[1], inner_ids[link[2]], link[3],
                            link[5] if len(link) > 5 else None])
        _plug(pasted[link[2]], link[3], link_id)
    into = {_target_name(instance, link): link for link in links
            if str(link[3]) == str(instance["id"]) and _target_name(instance, link) is not None}
    for index in sorted(group.input_map):
        for input_name, number in group.input_map[index].items():
            outer = into.get(group.sockets[number]) if number < len(group.sockets) else None
            if outer is not None:
                link_id = f"{prefix}in{index}.{input_name}"
                inner_links.append([link_id, outer[1], outer[2], inner_ids[index], input_name, outer[5]])
                _plug_named(pasted[index], input_name, link_id, outer[5])
    kept = []
    for link in links:
        if str(link[3]) == str(instance["id"]):
            continue  # links in are re-made above (or dropped, as the front end drops them)
        if str(link[1]) == str(instance["id"]):
            slot = link[2] if isinstance(link[2], int) else -1
            if not 0 <= slot < len(group.outputs):
                continue
            index, inner_slot = group.outputs[slot]
            link = [link[0], inner_ids[index], inner_slot, *link[3:]]
        kept.append(link)
    kept.extend(_named_to_slots(inner_links, pasted))
    links[:] = kept
    position = nodes.index(instance)
    nodes[position:position + 1] = pasted
    return last + count + 1


def _group_widget_values(instance: Mapping[str, Any], group: GroupDef) -> dict[str, Any]:
    """The instance's widget values by group widget name (its `widgets_values` by position, a control widget
    taking a place after its widget; a missing value is the widget's default)."""
    saved = instance.get("widgets_values")
    saved = saved if isinstance(saved, list) else []
    values: dict[str, Any] = {}
    position = 0
    for name, default, control in group.widgets:
        values.setdefault(name, saved[position] if position < len(saved) else default)
        position += 2 if control else 1
    return values


def _pasted_node(node: Mapping[str, Any], new_id: str, widget_map: Mapping[str, str], values: Mapping[str, Any],
                 groups: Mapping[str, GroupDef], node_info: NodeInfo) -> dict[str, Any]:
    """A copy of an inner node under its new id, its input links cleared (re-made by the caller) and the group's
    widget values set on its widgets by name."""
    pasted = {k: v for k, v in node.items() if k != "index"}
    pasted["id"] = new_id
    pasted["type"] = _modern_type(node.get("type"))
    pasted["inputs"] = [dict(s, link=None) for s in node.get("inputs") or [] if isinstance(s, Mapping)]
    if _is_group_type(pasted["type"]):  # a group node inside a group: kept as it is, its widgets by name
        inner = groups.get(pasted["type"][len(PREFIX):])
        if inner is not None:
            pasted["widgets_values"] = _group_widget_values(node, inner)
            pasted.setdefault("title", inner.name)
        return pasted
    info = node_info(str(pasted["type"]))
    if info is None:
        return pasted
    saved = node.get("widgets_values")
    widget_values = list(saved) if isinstance(saved, list) else []
    position = 0
    for input_name, spec in _input_specs(info).items():
        if not _is_widget(spec):
            continue
        if len(widget_values) == position:  # a value the file left out: the widget's default
            widget_values.append(_default(spec))
        if _has_control(spec) and len(widget_values) == position + 1:
            widget_values.append("fixed")
        if widget_map.get(input_name) in values:
            widget_values[position] = values[widget_map[input_name]]
        position += 2 if _has_control(spec) else 1
    pasted["widgets_values"] = widget_values
    return pasted


def _input_specs(info: Mapping[str, Any]) -> dict[str, Any]:
    inputs = info.get("input") or {}
    return {**(inputs.get("required") or {}), **(inputs.get("optional") or {})}


def _target_name(instance: Mapping[str, Any], link: list[Any]) -> str | None:
    """The name of the instance's input a link goes into (its saved input holding that link)."""
    for slot in instance.get("inputs") or []:
        if isinstance(slot, Mapping) and slot.get("link") == link[0]:
            return slot.get("name")
    return None


def _plug(node: dict[str, Any], slot: int, link_id: str) -> None:
    if 0 <= slot < len(node["inputs"]):
        node["inputs"][slot]["link"] = link_id


def _plug_named(node: dict[str, Any], input_name: str, link_id: str, kind: Any) -> None:
    for slot in node["inputs"]:
        if slot.get("name") == input_name:
            slot["link"] = link_id
            return
    node["inputs"].append({"name": input_name, "type": kind or "*", "link": link_id})


def _named_to_slots(inner_links: list[list[Any]], pasted: list[dict[str, Any]]) -> list[list[Any]]:
    """Links re-made into a named input get that input's slot number."""
    by_id = {str(n["id"]): n for n in pasted}
    result = []
    for link in inner_links:
        if isinstance(link[4], str):
            slots = by_id[link[3]]["inputs"]
            link = [*link[:4], next(i for i, s in enumerate(slots) if s.get("name") == link[4]), link[5]]
        result.append(link)
    return result
