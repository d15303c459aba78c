"""Workflows for the web frontend: sdgraph's own graphs/ in the frontend's UI format (the default workflow and the
first templates), and ComfyUI's template catalogue from `comfyui-workflow-templates` where it is installed.

`api_to_workflow` is the inverse of engine/formats.py's `workflow_to_api`: nodes laid out in columns by depth,
widget values in the order the node's schema lists its widgets (with the "fixed" value the frontend expects after
a seed that has control_after_generate), and links for every [node, slot] input.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
DEFAULT_GRAPH = "txt2img"  # graphs/txt2img.json: the first page's workflow and the first template
TEMPLATE_PREFIX = "sdgraph_"  # our templates' names in /templates/index.json
COLUMN_WIDTH, ROW_GAP, NODE_WIDTH = 400, 50, 340


def is_widget(spec: list[Any]) -> bool:
    kind = spec[0] if spec else None
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _input_specs(info: Mapping[str, Any]) -> list[tuple[str, list[Any]]]:
    """(name, [type, options]) of a node's inputs in the schema's order (required first, then optional)."""
    groups = info.get("input", {})
    order = info.get("input_order", {})
    found = []
    for group in ("required", "optional"):
        specs = groups.get(group, {})
        for name in order.get(group, list(specs)):
            found.append((name, list(specs[name])))
    return found


def _link_of(value: Any) -> tuple[str, int] | None:
    if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and not isinstance(value[1], bool):
        return str(value[0]), value[1]
    return None


def _depths(prompt: Mapping[str, Any]) -> dict[str, int]:
    """Each node's column: the longest chain of links leading to it."""
    depth: dict[str, int] = {}

    def of(node_id: str, seen: frozenset[str]) -> int:
        if node_id in depth:
            return depth[node_id]
        sources = [link[0] for link in map(_link_of, prompt[node_id].get("inputs", {}).values())
                   if link is not None and link[0] in prompt and link[0] not in seen]
        depth[node_id] = max((of(s, seen | {node_id}) + 1 for s in sources), default=0)
        return depth[node_id]

    for node_id in prompt:
        of(node_id, frozenset())
    return depth


def _ui_ids(prompt: Mapping[str, Any]) -> dict[str, int]:
    """The frontend needs integer node ids: numeric API ids are kept, others numbered after the largest."""
    ids = {node_id: int(node_id) for node_id in prompt if node_id.isdigit()}
    following = max(ids.values(), default=0)
    for node_id in prompt:
        if node_id not in ids:
            following += 1
            ids[node_id] = following
    return ids


def api_to_workflow(prompt: Mapping[str, Any], infos: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """A prompt in ComfyUI's API format as a UI workflow the frontend loads. `infos` is /object_info's answer
    (at least the prompt's node types). Raises ValueError naming the node whose type is unknown."""
    ids, depths = _ui_ids(prompt), _depths(prompt)
    links: list[list[Any]] = []
    outputs: dict[str, dict[int, list[int]]] = {node_id: {} for node_id in prompt}
    nodes, rows = [], {}
    for order, node_id in enumerate(sorted(prompt, key=lambda n: (depths[n], ids[n]))):
        entry = prompt[node_id]
        class_type = entry["class_type"]
        info = infos.get(class_type)
        if info is None:
            raise ValueError(f"node {node_id}: there is no node type {class_type!r} to lay out")
        inputs, widgets = [], []
        for name, spec in _input_specs(info):
            options = spec[1] if len(spec) > 1 else {}
            value = entry.get("inputs", {}).get(name, options.get("default"))
            link = _link_of(value)
            linked = link is not None and link[0] in prompt
            if linked or not is_widget(spec):  # every socket is a slot; a widget only when fed by a link
                slot = {"name": name, "type": "COMBO" if isinstance(spec[0], list) else spec[0], "link": None}
                if linked:
                    links.append([len(links) + 1, ids[link[0]], link[1], ids[node_id], len(inputs),
                                  infos[prompt[link[0]]["class_type"]]["output"][link[1]]])
                    outputs[link[0]].setdefault(link[1], []).append(len(links))
                    slot["link"] = len(links)
                    value = options.get("default")
                if is_widget(spec):
                    slot["widget"] = {"name": name}
                inputs.append(slot)
            if is_widget(spec):
                widgets.append(value)
                if options.get("control_after_generate"):
                    widgets.append("fixed")
        column = depths[node_id]
        y = rows.get(column, 80)
        height = 50 + 24 * (max(len(inputs), len(info["output"])) + len(widgets)) + (200 if _multiline(info) else 0)
        rows[column] = y + height + ROW_GAP
        nodes.append({"id": ids[node_id], "type": class_type, "pos": [40 + column * COLUMN_WIDTH, y],
                      "size": [NODE_WIDTH, height], "flags": {}, "order": order, "mode": 0, "inputs": inputs,
                      "outputs": [], "properties": {"Node name for S&R": class_type}, "widgets_values": widgets,
                      "title": entry.get("_meta", {}).get("title", info.get("display_name", class_type))})
    for node, node_id in zip(nodes, sorted(prompt, key=lambda n: (depths[n], ids[n])), strict=True):
        info = infos[prompt[node_id]["class_type"]]
        node["outputs"] = [{"name": info.get("output_name", info["output"])[slot], "type": kind,
                            "links": outputs[node_id].get(slot, []), "slot_index": slot}
                           for slot, kind in enumerate(info["output"])]
    return {"last_node_id": max(ids.values(), default=0), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [150, 120]}},
            "version": 0.4}


def _multiline(info: Mapping[str, Any]) -> bool:
    return any(len(spec) > 1 and spec[0] == "STRING" and spec[1].get("multiline")
               for _name, spec in _input_specs(info))


@dataclass
class Templates:
    """sdgraph's graphs/ (API format, converted on request) and ComfyUI's template catalogue, if installed."""

    graphs_dir: Path

    def graph_names(self) -> list[str]:
        """Our graphs, the default first."""
        names = sorted(p.stem for p in self.graphs_dir.glob("*.json"))
        return sorted(names, key=lambda n: n != DEFAULT_GRAPH)

    def workflow(self, name: str, infos: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
        if name not in self.graph_names():
            return None
        prompt = json.loads((self.graphs_dir / f"{name}.json").read_text(encoding="utf-8"))
        return api_to_workflow(prompt, infos)

    @cached_property
    def catalogue_dir(self) -> Path | None:
        """The folder of ComfyUI's template JSON (index.json and each workflow), or None when not installed."""
        try:
            import comfyui_workflow_templates_json
        except ImportError:
            return None
        folder = Path(next(iter(comfyui_workflow_templates_json.__path__))) / "templates"
        return folder if folder.is_dir() else None

    def index(self, filename: str) -> list[dict[str, Any]]:
        """/templates/index.json (or a translation, index.fr.json): our graphs as the first category."""
        ours = {"moduleName": "default", "category": "sdgraph", "title": "sdgraph", "type": "image",
                "icon": "icon-[lucide--image]",
                "templates": [{"name": TEMPLATE_PREFIX + name, "title": name.replace("_", " "),
                               "description": f"sdgraph's graphs/{name}.json", "mediaType": "image",
                               "mediaSubtype": "png", "tags": ["sdgraph"], "models": ["sdgraph demo"],
                               "openSource": True} for name in self.graph_names()]}
        theirs: list[dict[str, Any]] = []
        if self.catalogue_dir is not None and (self.catalogue_dir / filename).is_file():
            loaded = json.loads((self.catalogue_dir / filename).read_text(encoding="utf-8"))
            theirs = loaded if isinstance(loaded, list) else []
        return [ours, *theirs]

    def thumbnail(self, filename: str) -> bytes | None:
        """`sdgraph_<name>-1.png`, the template browser's picture of one of our graphs: the demo's picture of it
        (docs/images/demo-<name>.png) where there is one, else a plain card with the graph's name."""
        stem = filename[len(TEMPLATE_PREFIX):-len("-1.png")] if filename.endswith("-1.png") else None
        if not filename.startswith(TEMPLATE_PREFIX) or stem not in self.graph_names():
            return None
        picture = self.graphs_dir.parent / "docs" / "images" / f"demo-{stem}.png"
        if picture.is_file():
            return picture.read_bytes()
        import io

        from PIL import Image, ImageDraw
        card = Image.new("RGB", (256, 256), (38, 42, 54))
        ImageDraw.Draw(card).text((16, 118), stem.replace("_", " "), fill=(230, 230, 230))
        buffer = io.BytesIO()
        card.save(buffer, format="PNG")
        return buffer.getvalue()

    def asset(self, filename: str) -> Path | None:
        """A file of ComfyUI's catalogue: a workflow JSON or a thumbnail from one of the media bundles."""
        if "/" in filename or "\\" in filename or filename.startswith("."):
            return None
        if self.catalogue_dir is not None and (self.catalogue_dir / filename).is_file():
            return self.catalogue_dir / filename
        try:
            from comfyui_workflow_templates_core import get_asset_path
        except ImportError:
            return None
        stem = filename.rsplit("-", 1)[0] if "-" in filename else filename.rsplit(".", 1)[0]
        try:
            path = Path(get_asset_path(stem, filename))
        except (KeyError, FileNotFoundError, ValueError):
            return None
        return path if path.is_file() else None
