"""Descriptions derived from node declarations: ComfyUI's `/object_info` shape."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

from .registry import NodeRegistry
from .spec import COMBO, INT, SEED_NAMES, Input, NodeDef


def input_info(spec: Input, resources: Any = None) -> list[Any]:
    options: dict[str, Any] = {}
    if spec.has_default:
        options["default"] = spec.default
    for key in ("min", "max", "step"):
        if getattr(spec, key) is not None:
            options[key] = getattr(spec, key)
    if spec.multiline:
        options["multiline"] = True
    if spec.tooltip:
        options["tooltip"] = spec.tooltip
    if spec.lazy:
        options["lazy"] = True
    if spec.force_input:
        options["forceInput"] = True
    if spec.control_after_generate or (spec.type == INT and spec.name in SEED_NAMES):
        # explicit either way: the front end gives INT inputs named seed/noise_seed a control widget unless told
        options["control_after_generate"] = spec.control_after_generate
    options.update(spec.extra)
    if spec.type == COMBO:
        return [list(spec.combo_options(resources)), options]
    return [spec.type, options] if options else [spec.type]


def node_info(definition: NodeDef, resources: Any = None) -> dict[str, Any]:
    required = {s.name: input_info(s, resources) for s in definition.inputs if not s.optional}
    optional = {s.name: input_info(s, resources) for s in definition.inputs if s.optional}
    inputs: dict[str, Any] = {"required": required}
    if optional:
        inputs["optional"] = optional
    if definition.hidden:
        inputs["hidden"] = {kind.lower(): kind for kind in definition.hidden}
    order = {"required": list(required)}
    if optional:
        order["optional"] = list(optional)
    module = python_module(definition)
    return {
        "input": inputs,
        "input_order": order,
        "output": [o.type for o in definition.outputs],
        "output_is_list": [o.is_list for o in definition.outputs],
        "output_name": [o.name for o in definition.outputs],
        "output_tooltips": [o.tooltip for o in definition.outputs],
        "name": definition.name,
        "display_name": definition.display_name or definition.name,
        "description": definition.description,
        "python_module": module,
        "category": definition.category,
        "output_node": definition.output_node,
        "aliases": list(definition.aliases),
    }


def python_module(definition: NodeDef) -> str:
    """Where a node comes from, as ComfyUI names it: a module path, `custom_nodes.<pack>` for packs."""
    source = definition.source
    if source.endswith(".py"):  # a pack's file (V1 classes found by discovery)
        path = PurePath(source)
        return f"custom_nodes.{path.parent.name if path.name == '__init__.py' else path.stem}"
    if definition.origin == "native":
        module = getattr(definition.fn, "__module__", None) or source.rsplit(".", 1)[0]
    else:
        module = source.rsplit(".", 1)[0]
    prefix = "sdgraph_packs."
    return "custom_nodes." + module[len(prefix):] if module.startswith(prefix) else module


def object_info(registry: NodeRegistry, resources: Any = None) -> dict[str, dict[str, Any]]:
    return {definition.name: node_info(definition, resources) for definition in registry}
