"""Graph files: ComfyUI's API format, its UI "workflow" format, and PNGs that carry either.

Everything is turned into the API format `{id: {"class_type", "inputs", "_meta"}}`, which validation checks.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .groupnodes import expand_group_nodes, has_group_nodes
from .registry import NodeRegistry
from .schema import node_info
from .subgraphs import SubgraphError, flatten_workflow, has_subgraphs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODE_MUTED, MODE_BYPASSED = 2, 4
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


class GraphFormatError(ValueError):
    """The file is not a graph this project can read; the message says which file and why."""


class _Slot(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = ""
    type: Any = None
    link: int | str | None = None
    links: list[int | str] | None = None
    widget: dict | None = None


class _UINode(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: int | str
    type: str
    mode: int = 0
    title: str | None = None
    inputs: list[_Slot] = Field(default_factory=list)
    outputs: list[_Slot] = Field(default_factory=list)
    widgets_values: list | dict | None = None
    properties: dict = Field(default_factory=dict)


class _Workflow(BaseModel):
    model_config = ConfigDict(extra="allow")
    nodes: list[_UINode]
    links: list[list | dict] = Field(default_factory=list)


def read_graph_file(path: str | Path, registry: NodeRegistry) -> dict[str, Any]:
    """Read a .json graph (API or workflow format) or a .png carrying one; return the API format."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GraphFormatError(f"cannot read graph file {path}: {exc.strerror or exc}") from exc
    if data.startswith(PNG_SIGNATURE):
        chunks = png_text_chunks(data)
        if "prompt" in chunks:
            return _parse_json(chunks["prompt"], f"{path} (its 'prompt' text chunk)")
        if "workflow" in chunks:
            return workflow_to_api(_parse_json(chunks["workflow"], f"{path} ('workflow' chunk)"), registry)
        raise GraphFormatError(f"{path} is a PNG without a 'prompt' or 'workflow' text chunk, so it carries no "
                               "graph; use an image saved by SaveImage (or by ComfyUI)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise GraphFormatError(f"{path} is neither a PNG nor UTF-8 JSON") from exc
    return to_api(_parse_json(text, str(path)), registry, source=str(path))


def to_api(obj: Any, registry: NodeRegistry, *, source: str = "graph") -> dict[str, Any]:
    """Accept a parsed API graph, a workflow, or `{"prompt": api}` (a /prompt request body)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("nodes"), list):
        return workflow_to_api(obj, registry)
    if isinstance(obj, Mapping) and isinstance(obj.get("prompt"), Mapping) and "class_type" not in obj:
        return dict(obj["prompt"])
    if isinstance(obj, Mapping):
        return dict(obj)
    raise GraphFormatError(f"{source}: a graph must be a JSON object (API format or a ComfyUI workflow), "
                           f"got {type(obj).__name__}")


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise GraphFormatError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
            from exc


def png_text_chunks(data: bytes) -> dict[str, str]:
    """The tEXt, zTXt and iTXt chunks of a PNG, read with the standard library only."""
    chunks: dict[str, str] = {}
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IEND":
            break
        try:
            if kind == b"tEXt":
                key, _, value = body.partition(b"\0")
                chunks[key.decode("latin-1")] = value.decode("latin-1")
            elif kind == b"zTXt":
                key, _, rest = body.partition(b"\0")
                chunks[key.decode("latin-1")] = zlib.decompress(rest[1:]).decode("latin-1")
            elif kind == b"iTXt":
                key, _, rest = body.partition(b"\0")
                compressed, rest = rest[0], rest[2:]
                _lang, _, rest = rest.partition(b"\0")
                _translated, _, text = rest.partition(b"\0")
                chunks[key.decode("latin-1")] = (zlib.decompress(text) if compressed else text).decode("utf-8")
        except (zlib.error, UnicodeDecodeError, IndexError):
            continue
    return chunks


def workflow_to_api(workflow: Mapping[str, Any], registry: NodeRegistry) -> dict[str, Any]:
    """Convert ComfyUI's UI workflow (nodes + links, positional widgets_values) to the API format.

    Muted nodes (mode 2) vanish; bypassed ones (mode 4) pass each output through an input of the same type;
    Reroutes and PrimitiveNodes are resolved into direct links and constants; Notes are dropped. Subgraphs and
    group nodes are flattened first (`subgraphs.py`)."""
    if has_subgraphs(workflow) or has_group_nodes(workflow):
        try:
            if has_group_nodes(workflow):
                workflow = expand_group_nodes(workflow, lambda kind: _object_info(registry, kind))
            workflow = flatten_workflow(workflow)
        except SubgraphError as exc:
            raise GraphFormatError(str(exc)) from exc
    try:
        parsed = _Workflow.model_validate(workflow)
    except Exception as exc:
        raise GraphFormatError(f"not a ComfyUI workflow: {exc}") from exc
    nodes = {str(n.id): n for n in parsed.nodes}
    links = {}
    for raw in parsed.links:
        try:
            if isinstance(raw, Mapping):
                link_id, origin, slot = raw["id"], raw["origin_id"], raw["origin_slot"]
            else:
                link_id, origin, slot = raw[0], raw[1], raw[2]
            links[link_id] = (str(origin), int(slot))
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise GraphFormatError(f"not a ComfyUI workflow: link {raw!r} is not [id, origin_id, origin_slot, "
                                   "target_id, target_slot, type]") from exc
    api: dict[str, Any] = {}
    for node_id, ui_node in nodes.items():
        if ui_node.type in FRONTEND_ONLY or ui_node.mode in (MODE_MUTED, MODE_BYPASSED):
            continue
        inputs = _widget_inputs(ui_node, registry)
        for slot in ui_node.inputs:
            if slot.link is None:
                continue
            source = _resolve(nodes, links, slot.link, slot.type)
            if isinstance(source, _Constant):
                inputs[slot.name] = _api_value(source.value)
            elif source is not None:
                inputs[slot.name] = [source[0], source[1]]
            # None: the link leads nowhere (a muted node, an empty Reroute, a bypass with no matching input); a
            # widget keeps its own value, a socket stays unset (frontend 1.58's graphToPrompt).
        entry: dict[str, Any] = {"class_type": ui_node.type, "inputs": inputs}
        entry["_meta"] = _meta(ui_node, registry)
        api[node_id] = entry
    return api


def _object_info(registry: NodeRegistry, kind: str) -> dict[str, Any] | None:
    definition = registry.get(kind)
    return None if definition is None else node_info(definition)


def _meta(ui_node: _UINode, registry: NodeRegistry) -> dict[str, Any]:
    """The front end's `_meta`: the node's title (its display name unless renamed) and the node pack's registry
    id and version when the node's properties carry them."""
    definition = registry.get(ui_node.type)
    known = definition is not None and definition.name == ui_node.type  # an alias is not in /object_info
    default = (definition.display_name or definition.name) if known else ui_node.type
    meta: dict[str, Any] = {"title": ui_node.title or default}
    meta.update({key: ui_node.properties[key] for key in ("cnr_id", "aux_id", "ver")
                 if isinstance(ui_node.properties.get(key), str)})
    return meta


class _Constant:
    def __init__(self, value: Any):
        self.value = value


def _resolve(nodes: Mapping[str, _UINode], links: Mapping[Any, tuple[str, int]], link_id: int, wanted: Any,
             ) -> tuple[str, int] | _Constant | None:
    """Follow a link back through Reroutes and bypassed nodes to a real output (or a PrimitiveNode's value).
    `wanted` is the type of the input being fed (a bypassed node passes on its first input of that type).
    Returns None when the chain ends at a muted node or nowhere."""
    seen = set()
    while link_id in links and link_id not in seen:
        seen.add(link_id)
        origin, slot = links[link_id]
        node = nodes.get(origin)
        if node is None:
            return None
        if node.mode == MODE_MUTED:
            return None
        if node.type == "PrimitiveNode":
            values = node.widgets_values
            return _Constant(values[0]) if isinstance(values, list) and values else None
        if node.type == "Reroute" or node.mode == MODE_BYPASSED:
            next_link = _passthrough_link(node, slot, wanted)
            if next_link is None:
                return None
            link_id = next_link
            continue
        return origin, slot
    return None


def _passthrough_link(node: _UINode, slot: int, wanted: Any) -> int | None:
    """The link a Reroute or a bypassed node passes on from output `slot` (the front end's rules: the input at
    the same position if its type fits, else the first input of exactly the wanted type, else the first whose
    type fits both)."""
    if node.type == "Reroute":
        return node.inputs[0].link if node.inputs else None
    index = _bypass_input_index(node, slot, wanted)
    return node.inputs[index].link if index is not None else None


def _bypass_input_index(node: _UINode, slot: int, wanted: Any) -> int | None:
    inputs = node.inputs
    if not inputs:
        return None
    if wanted in ("*", "", None):
        return slot if slot < len(inputs) else 0
    out_type = node.outputs[slot].type if slot < len(node.outputs) else wanted
    if slot < len(inputs) and _fits(inputs[slot].type, out_type) and _fits(inputs[slot].type, wanted):
        return slot
    for i, candidate in enumerate(inputs):
        if candidate.type == wanted:
            return i
    for i, candidate in enumerate(inputs):
        if _fits(candidate.type, out_type) and _fits(candidate.type, wanted):
            return i
    return None


def _fits(a: Any, b: Any) -> bool:
    """The front end's link compatibility: equal, a wildcard, or comma-separated lists that share a type."""
    if a in ("*", "", None, 0) or b in ("*", "", None, 0) or a == b:
        return True
    if not isinstance(a, str) or not isinstance(b, str):
        return False
    return bool({t.strip().upper() for t in a.split(",")} & {t.strip().upper() for t in b.split(",")})


def _widget_inputs(ui_node: _UINode, registry: NodeRegistry) -> dict[str, Any]:
    """Map positional `widgets_values` onto the node's widget inputs (declaration order). A seed-like widget is
    followed by the front end's control_after_generate value ("fixed", "randomize", ... or a bool in old
    files), which is not an input; trailing values of front-end-only widgets (LoadImage's upload button) are
    ignored."""
    values = ui_node.widgets_values
    definition = registry.get(ui_node.type)
    if definition is None and isinstance(values, Mapping):  # a group node left inside a group: widgets by name
        return {k: _api_value(v) for k, v in values.items()}
    if values is None or definition is None:
        return {}
    if isinstance(values, Mapping):
        return {k: _api_value(v) for k, v in values.items() if definition.input(k) is not None}
    widgets = [spec for spec in definition.inputs if spec.is_widget]
    n_controls = sum(1 for spec in widgets if spec.control_after_generate)
    # When every control value is there, skip them by position. Otherwise (old or hand-written files) skip a
    # control word ("fixed", ...), and a bool (the oldest files) only when there are more values than widgets.
    all_controls = n_controls > 0 and len(values) >= len(widgets) + n_controls
    some_controls = len(values) > len(widgets)
    inputs: dict[str, Any] = {}
    position = 0
    for spec in widgets:
        if position >= len(values):
            break
        inputs[spec.name] = _api_value(values[position])
        position += 1
        if spec.control_after_generate and position < len(values) and (
                all_controls or _is_control(values[position], bools=some_controls)):
            position += 1
    return inputs


def _api_value(value: Any) -> Any:
    """A list-valued widget is written {"__value__": [...]} so it is not read as a link (as the front end does)."""
    return {"__value__": value} if isinstance(value, list) else value


def _is_control(value: Any, *, bools: bool) -> bool:
    if isinstance(value, bool):
        return bools
    return isinstance(value, str) and value in CONTROL_VALUES


def apply_overrides(api: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`ID.INPUT=VALUE` settings (VALUE parsed as JSON when it parses, else taken as text) applied to a copy."""
    result = {node_id: {**node, "inputs": dict(node.get("inputs", {}))} if isinstance(node, Mapping) else node
              for node_id, node in api.items()}
    for item in overrides:
        target, sep, raw = item.partition("=")
        node_id, dot, input_name = target.partition(".")
        if not sep or not dot or not input_name:
            raise GraphFormatError(f"--set {item!r}: write it as NODE_ID.INPUT=VALUE, e.g. --set 3.seed=42")
        if node_id not in result:
            raise GraphFormatError(f"--set {item!r}: there is no node {node_id!r} in the graph")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        result[node_id]["inputs"][input_name] = value
    return result
