"""Helpers for the real-pack tests: sample inputs for a node's declared inputs, and checks of its outputs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from engine.context import CancelToken, RunContext
from engine.spec import COMBO, MISSING, NodeDef, Result

BATCH = 4  # 2x2 tiles for untiling nodes, several frames for batch nodes
PLAIN_TYPES = frozenset({"IMAGE", "MASK", "LATENT", "STRING", "INT", "FLOAT", "BOOLEAN", COMBO})


def plain(definition: NodeDef) -> bool:
    """Inputs and outputs only of the plain types (combos count: they are widgets of strings)."""
    return (all(spec.type in PLAIN_TYPES for spec in definition.inputs)
            and all(out.type in PLAIN_TYPES - {COMBO} for out in definition.outputs))


def sample_value(spec: Any, resources: Any = None) -> Any:
    generator = torch.Generator().manual_seed(0)
    if spec.type == "IMAGE":
        return torch.rand(BATCH, 64, 96, 3, generator=generator)
    if spec.type == "MASK":
        return torch.rand(BATCH, 64, 96, generator=generator)
    if spec.type == "LATENT":
        return {"samples": torch.rand(BATCH, 4, 8, 12, generator=generator)}
    if spec.type == COMBO:
        options = list(spec.combo_options(resources))
        return spec.default if spec.default is not MISSING else (options[0] if options else "")
    if spec.default is not MISSING:
        return spec.default
    return {"INT": max(1, spec.min or 0), "FLOAT": float(spec.min or 0.5), "STRING": "a cat",
            "BOOLEAN": False}[spec.type]


def sample_inputs(definition: NodeDef, resources: Any = None) -> dict[str, Any]:
    """A value for every required input (optional ones keep their defaults); lists for INPUT_IS_LIST nodes."""
    values = {spec.name: sample_value(spec, resources) for spec in definition.inputs if not spec.optional}
    return {name: [value] for name, value in values.items()} if definition.input_is_list else values


def context(node_type: str, resources: Any = None, events: list | None = None) -> RunContext:
    return RunContext(run_id="packs", node_id="1", node_type=node_type, resources=resources, cancel=CancelToken(),
                      emit=(events.append if events is not None else (lambda event: None)))


def outputs_of(returned: Any, definition: NodeDef) -> tuple[Any, ...]:
    if isinstance(returned, Result):
        return tuple(returned.outputs)
    return (returned,) if len(definition.outputs) == 1 else tuple(returned)


def output_problem(type_name: str, value: Any, is_list: bool) -> str | None:
    """Why `value` is not a value of `type_name` (None: it is)."""
    if is_list:
        if not isinstance(value, list | tuple):
            return f"a list output gave {type(value).__name__}"
        problems = [output_problem(type_name, v, False) for v in value]
        return next((p for p in problems if p), None)
    if type_name == "IMAGE":
        ok = isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[-1] in (1, 3, 4)
        return None if ok else f"IMAGE must be [B,H,W,C], got {_describe(value)}"
    if type_name == "MASK":
        ok = isinstance(value, torch.Tensor) and value.dim() in (2, 3)
        return None if ok else f"MASK must be [B,H,W], got {_describe(value)}"
    if type_name == "LATENT":
        ok = isinstance(value, Mapping) and isinstance(value.get("samples"), torch.Tensor) and \
            value["samples"].dim() in (4, 5)
        return None if ok else f"LATENT must hold samples [B,C,H,W], got {_describe(value)}"
    expected = {"STRING": str, "INT": int, "FLOAT": (int, float), "BOOLEAN": (bool, int)}[type_name]
    if isinstance(value, torch.Tensor) and value.numel() == 1 and type_name != "STRING":
        return None
    if isinstance(value, expected) and not (type_name == "FLOAT" and not math.isfinite(float(value))):
        return None
    return f"{type_name} output is {_describe(value)}"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)}"
    return f"{type(value).__name__} {str(value)[:60]!r}"
