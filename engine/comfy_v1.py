"""ComfyUI "V1" node classes, adapted into ordinary `NodeDef`s of the one registry.

A V1 class describes itself with upper-case attributes (INPUT_TYPES, RETURN_TYPES, FUNCTION, ...). Here each
class becomes a NodeDef whose function instantiates the class and calls its FUNCTION; the rest of the engine
never knows the difference.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from .context import RunContext
from .spec import (
    COMBO,
    FLOAT,
    INT,
    MISSING,
    SEED_NAMES,
    Input,
    NodeDef,
    NodeDefinitionError,
    Output,
    Result,
    accepted_kwargs,
)

_INPUT_OPTION_NAMES = {"default", "min", "max", "step", "multiline", "tooltip", "forceInput", "lazy",
                       "control_after_generate", "options", "defaultInput"}


def adapt_class(name: str, cls: type, *, display_name: str = "", source: str = "",
                around: Callable[[RunContext], AbstractContextManager[Any]] | None = None,
                convert: Callable[[str, Any], Any] | None = None) -> NodeDef:
    """Describe a V1 class as a NodeDef; raises NodeDefinitionError naming what is wrong. `around(ctx)` is
    entered while the class's FUNCTION runs (the pack environment: ComfyUI's modules, the current context);
    `convert(type, value)` turns each input into the form ComfyUI's code expects (`comfy_inputs`)."""
    where = f"{source or cls.__module__}: class {cls.__name__} (node {name!r})"
    try:
        declared = cls.INPUT_TYPES()
    except Exception as exc:
        raise NodeDefinitionError(f"{where}: INPUT_TYPES() failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(declared, Mapping):
        raise NodeDefinitionError(f"{where}: INPUT_TYPES() must return a dict with 'required'/'optional'")
    function_name = getattr(cls, "FUNCTION", None)
    if not isinstance(function_name, str) or not callable(getattr(cls, function_name, None)):
        raise NodeDefinitionError(f"{where}: FUNCTION must name a method of the class "
                                  f"(got {function_name!r})")
    inputs = [_input(where, input_name, entry, optional=False, cls=cls, section="required")
              for input_name, entry in (declared.get("required") or {}).items()]
    inputs += [_input(where, input_name, entry, optional=True, cls=cls, section="optional")
               for input_name, entry in (declared.get("optional") or {}).items()]
    hidden = tuple(str(v) for v in (declared.get("hidden") or {}).values())
    hidden_names = dict((declared.get("hidden") or {}).items())
    outputs = _outputs(where, cls)
    is_changed = getattr(cls, "IS_CHANGED", None)
    validate_inputs = getattr(cls, "VALIDATE_INPUTS", None)
    check_lazy = getattr(cls, "check_lazy_status", None)
    input_is_list = bool(getattr(cls, "INPUT_IS_LIST", False))

    instances: dict[tuple[str, str], Any] = {}
    enter = around or (lambda _ctx: nullcontext())

    types = {spec.name: spec.type for spec in inputs}

    def run(ctx: RunContext, **kwargs: Any) -> Result:
        kwargs = comfy_inputs(kwargs, types, convert, listed=input_is_list)
        for arg_name, kind in hidden_names.items():
            value = _hidden_value(ctx, kind)
            kwargs[arg_name] = [value] if input_is_list else value
        with enter(ctx):
            # One instance per node and run (ComfyUI keeps one per node id; state across runs is the cache's job).
            instance = instances.get((ctx.run_id, ctx.node_id))
            if instance is None:
                instances.clear()
                instance = instances[(ctx.run_id, ctx.node_id)] = cls()
            returned = getattr(instance, function_name)(**kwargs)
        return _result(where, returned, len(outputs))

    lazy_check = None
    if check_lazy is not None:
        def lazy_check(**available: Any) -> list[str]:
            return list(cls().check_lazy_status(**available) or ())

    return NodeDef(
        name=name,
        fn=run,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        category=str(getattr(cls, "CATEGORY", "") or ""),
        description=str(getattr(cls, "DESCRIPTION", "") or ""),
        display_name=display_name,
        version=str(getattr(cls, "VERSION", "1")),
        output_node=bool(getattr(cls, "OUTPUT_NODE", False)),
        cacheable=not bool(getattr(cls, "NOT_IDEMPOTENT", False)),
        fingerprint=within(enter, _without_resources(_bound(is_changed))),
        validate=within(enter, _bound(validate_inputs)),
        check_lazy=within(enter, lazy_check),
        input_is_list=input_is_list,
        hidden=hidden,
        source=source or f"{cls.__module__}.{cls.__qualname__}",
        origin="comfy_v1",
    )


def _input(where: str, input_name: str, entry: Any, *, optional: bool, cls: type, section: str) -> Input:
    if not isinstance(entry, tuple | list) or not entry:
        raise NodeDefinitionError(f"{where}: input {input_name!r} must be a tuple (TYPE, options?), got {entry!r}")
    kind, options = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], Mapping) else {})
    combo: Any = None
    if isinstance(kind, list | tuple):
        combo = _live_combo(cls, section, input_name, tuple(kind))
        kind = COMBO
    elif kind == COMBO:
        combo = tuple(options.get("options", ()))
    if not isinstance(kind, str):
        raise NodeDefinitionError(f"{where}: input {input_name!r} has a type that is not a string: {kind!r}")
    default = _tolerated_default(kind, options.get("default", MISSING), options.get("min"), options.get("max"))
    extra = {k: v for k, v in options.items() if k not in _INPUT_OPTION_NAMES}
    # The front end's rule: an explicit flag wins, else INT inputs named seed/noise_seed get the control widget.
    control = options.get("control_after_generate")
    if control is None:
        control = kind == INT and input_name in SEED_NAMES
    return Input(
        name=input_name,
        type=kind,
        default=default,
        min=options.get("min"),
        max=options.get("max"),
        step=options.get("step"),
        options=combo,
        multiline=bool(options.get("multiline", False)),
        optional=optional,
        tooltip=str(options.get("tooltip", "")),
        lazy=bool(options.get("lazy", False)),
        force_input=bool(options.get("forceInput", False)),
        control_after_generate=bool(control),
        extra=extra,
    )


def comfy_inputs(values: dict[str, Any], types: Mapping[str, str], convert: Callable[[str, Any], Any] | None, *,
                 listed: bool) -> dict[str, Any]:
    """Each input through `convert(type, value)` (each element of it for INPUT_IS_LIST nodes)."""
    if convert is None:
        return values
    return {key: ([convert(types.get(key, ""), v) for v in value] if listed and isinstance(value, list)
                  else convert(types.get(key, ""), value)) for key, value in values.items()}


def within(enter: Callable[[Any], AbstractContextManager[Any]], fn: Callable[..., Any] | None
           ) -> Callable[..., Any] | None:
    """`fn` called inside `enter(None)` (the pack environment, no node running): IS_CHANGED, VALIDATE_INPUTS
    and lazy checks may import ComfyUI's modules too. The signature stays `fn`'s (inputs are passed by name)."""
    if fn is None:
        return None

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        with enter(None):
            return fn(*args, **kwargs)

    return call


def _tolerated_default(kind: str, default: Any, low: Any, high: Any) -> Any:
    """ComfyUI tolerates numeric defaults its front end then fixes: None or a list (no default), and a value
    outside min..max (clamped into range, as the widget does)."""
    if kind not in (INT, FLOAT) or default is MISSING:
        return default
    if default is None or isinstance(default, list | tuple | dict | str):
        return MISSING
    if kind == INT and isinstance(default, float) and default.is_integer():
        default = int(default)
    if isinstance(low, int | float) and default < low:
        default = low
    if isinstance(high, int | float) and default > high:
        default = high
    return default


def _live_combo(cls: type, section: str, input_name: str, first: tuple) -> Callable[[], tuple]:
    """Combo options re-read from INPUT_TYPES each time, so lists of files stay current."""

    def options(_resources: Any = None) -> tuple:
        try:
            entry = (cls.INPUT_TYPES().get(section) or {}).get(input_name)
            return tuple(entry[0]) if entry and isinstance(entry[0], list | tuple) else first
        except Exception:
            return first

    return options


def _outputs(where: str, cls: type) -> list[Output]:
    types = getattr(cls, "RETURN_TYPES", ())
    if not isinstance(types, tuple | list):
        raise NodeDefinitionError(f"{where}: RETURN_TYPES must be a tuple, got {types!r}")
    names = getattr(cls, "RETURN_NAMES", None) or ()
    is_list = getattr(cls, "OUTPUT_IS_LIST", None) or ()
    outputs = []
    for i, kind in enumerate(types):
        type_name = COMBO if isinstance(kind, list | tuple) else kind
        if not isinstance(type_name, str):
            raise NodeDefinitionError(f"{where}: RETURN_TYPES[{i}] is not a type name: {kind!r}")
        outputs.append(Output(str(names[i]) if i < len(names) else type_name, type_name,
                              bool(is_list[i]) if i < len(is_list) else False))
    return outputs


def _bound(method: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """IS_CHANGED / VALIDATE_INPUTS are class-level in ComfyUI; accept plain functions too."""
    if method is None:
        return None
    if inspect.ismethod(method) or isinstance(method, staticmethod):
        return method
    params = list(inspect.signature(method).parameters)
    if params and params[0] in ("self", "cls", "s"):
        return functools.partial(method, None)  # keeps the signature: the inputs it names still show
    return method


def _without_resources(method: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """Native fingerprints receive the application's resources first; IS_CHANGED only the inputs it names
    (all of them when it takes **kwargs)."""
    if method is None:
        return None
    return lambda _resources, **kwargs: method(**accepted_kwargs(method, kwargs))


def _hidden_value(ctx: RunContext, kind: str) -> Any:
    if kind == "PROMPT":
        return dict(ctx.prompt)
    if kind == "EXTRA_PNGINFO":
        return ctx.extra.get("extra_pnginfo")
    if kind == "UNIQUE_ID":
        return ctx.node_id
    return None


def _result(where: str, returned: Any, n_outputs: int) -> Any:
    if isinstance(returned, Mapping) and "expand" in returned:
        return returned  # node expansion: the runner runs the graph (engine/expansion.py)
    if isinstance(returned, Mapping):
        result = returned.get("result", ())
        values = tuple(result) if isinstance(result, tuple | list) else (result,)
        values = values[:n_outputs] if len(values) > n_outputs else values  # ComfyUI ignores undeclared extras
        if not values and n_outputs:
            raise NodeDefinitionError(f"{where}: returned a dict without 'result' but declares {n_outputs} outputs")
        return Result(values, returned.get("ui"))
    if returned is None and n_outputs == 0:
        return Result((), None)
    if not isinstance(returned, tuple | list):
        raise NodeDefinitionError(f"{where}: must return a tuple of {n_outputs} values (or a dict with "
                                  f"'result'), returned {type(returned).__name__}")
    return Result(tuple(returned)[:n_outputs] if len(returned) > n_outputs else tuple(returned), None)
