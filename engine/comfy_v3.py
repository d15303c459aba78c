"""ComfyUI "V3" nodes (`comfy_api.latest.io.ComfyNode`), loaded natively: the schema is already typed, so each
input and output maps onto sdgraph's `Input`/`Output` and the class becomes an ordinary `NodeDef`.

A pack offers V3 nodes in NODE_CLASS_MAPPINGS (next to V1 classes) or through `comfy_entrypoint()`, an async
function returning a `ComfyExtension` whose `get_node_list()` lists the classes.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from . import comfy_io as io
from .comfy_v1 import _hidden_value, _without_resources, comfy_inputs, within
from .context import RunContext
from .spec import COMBO, INT, MISSING, SEED_NAMES, Input, NodeDef, NodeDefinitionError, Output, Result

Around = Callable[[RunContext], AbstractContextManager[Any]]

_HIDDEN_FIELDS = {io.Hidden.unique_id: "unique_id", io.Hidden.prompt: "prompt",
                  io.Hidden.extra_pnginfo: "extra_pnginfo"}


def is_v3_class(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, io.ComfyNode) and value is not io.ComfyNode


def await_if_needed(value: Any) -> Any:
    """V3 methods may be `async`: run a coroutine to its end (node functions run in a worker thread)."""
    return asyncio.run(value) if inspect.iscoroutine(value) else value


def extension_nodes(entrypoint: Callable[[], Any]) -> list[type]:
    """The node classes of a pack's `comfy_entrypoint`."""
    extension = await_if_needed(entrypoint())
    await_if_needed(extension.on_load())
    return list(await_if_needed(extension.get_node_list()) or ())


def adapt_v3(name: str, cls: type, *, display_name: str = "", source: str = "",
             around: Around | None = None, convert: Callable[[str, Any], Any] | None = None) -> NodeDef:
    """Describe a V3 ComfyNode class as a NodeDef; raises NodeDefinitionError naming what is wrong. `around` and
    `convert` as for V1 classes (`comfy_v1.adapt_class`)."""
    where = f"{source or cls.__module__}: class {cls.__name__} (node {name!r})"
    try:
        schema = cls.define_schema()
    except Exception as exc:
        raise NodeDefinitionError(f"{where}: define_schema() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(schema, io.Schema):
        raise NodeDefinitionError(f"{where}: define_schema() must return io.Schema, got {type(schema).__name__}")
    inputs = tuple(_input(where, spec) for spec in schema.inputs)
    outputs = tuple(Output(str(out.display_name or out.id or out.io_type), out.io_type, bool(out.is_output_list))
                    for out in schema.outputs)
    hidden = tuple(h.value if isinstance(h, io.Hidden) else str(h) for h in schema.hidden)
    enter = around or (lambda _ctx: nullcontext())
    is_list = bool(schema.is_input_list)
    types = {spec.name: spec.type for spec in inputs}

    def run(ctx: RunContext, **kwargs: Any) -> Result:
        kwargs = comfy_inputs(kwargs, types, convert, listed=is_list)
        holder = io.HiddenHolder(**{field: _hidden_value(ctx, kind.value) for kind, field in _HIDDEN_FIELDS.items()
                                    if kind.value in hidden})
        bound = type(cls.__name__, (cls,), {"hidden": holder, "__module__": cls.__module__})
        with enter(ctx):
            returned = await_if_needed(bound.execute(**kwargs))
        return _result(where, returned, len(outputs))

    fingerprint = getattr(cls, "fingerprint_inputs", None)
    validate = getattr(cls, "validate_inputs", None)
    check_lazy = getattr(cls, "check_lazy_status", None)
    return NodeDef(
        name=name,
        fn=run,
        inputs=inputs,
        outputs=outputs,
        category=str(schema.category or ""),
        description=str(schema.description or ""),
        display_name=display_name or str(schema.display_name or ""),
        output_node=bool(schema.is_output_node),
        cacheable=not schema.not_idempotent,
        fingerprint=within(enter, _without_resources(fingerprint)),
        validate=within(enter, validate),
        check_lazy=within(enter, (lambda **available: list(check_lazy(**available) or ())) if check_lazy else None),
        input_is_list=is_list,
        hidden=hidden,
        source=source or f"{cls.__module__}.{cls.__qualname__}",
        origin="comfy_v3",
    )


def _input(where: str, spec: Any) -> Input:
    if not isinstance(spec, io.InputSpec):
        raise NodeDefinitionError(f"{where}: inputs must be io.<Type>.Input(...), got {spec!r}")
    if spec.unsupported:
        raise NodeDefinitionError(f"{where}: input {spec.id!r} uses {spec.unsupported}, which sdgraph does not "
                                  "support yet")
    kind = spec.io_type
    options = None
    if kind == COMBO:
        options = tuple(spec.options or ())
    default = MISSING if spec.default is None else spec.default
    if kind == INT and isinstance(default, float) and default.is_integer():
        default = int(default)
    control = spec.control_after_generate
    if control is None:
        control = kind == INT and spec.id in SEED_NAMES
    extra = {"display_name": spec.display_name} if spec.display_name else {}
    return Input(name=spec.id, type=kind, default=default, min=spec.min, max=spec.max, step=spec.step,
                 options=options, multiline=bool(spec.multiline), optional=bool(spec.optional),
                 tooltip=str(spec.tooltip or ""), lazy=spec.lazy, force_input=bool(spec.force_input),
                 control_after_generate=bool(control), extra=extra)


def _result(where: str, returned: Any, n_outputs: int) -> Result:
    if isinstance(returned, io.NodeOutput):
        if returned.expand is not None:
            raise NodeDefinitionError(f"{where}: returned a node expansion, which this loader does not run yet")
        ui = returned.ui.as_dict() if hasattr(returned.ui, "as_dict") else returned.ui
        values = tuple(returned.args)
        if len(values) != n_outputs and not (n_outputs == 0 and not values):
            raise NodeDefinitionError(f"{where}: returned {len(values)} values for {n_outputs} declared outputs")
        return Result(values, ui)
    if isinstance(returned, tuple | list) and len(returned) == n_outputs:
        return Result(tuple(returned), None)
    raise NodeDefinitionError(f"{where}: execute() must return io.NodeOutput(...), returned {type(returned).__name__}")
