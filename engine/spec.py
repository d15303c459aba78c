"""How a node is declared: typed inputs, typed outputs and a function.

A node is declared once, with the `node` decorator:

    @node("Add", category="math", inputs=[Input("a", "INT", default=0), Input("b", "INT", default=0)],
          outputs=[Output("sum", "INT")])
    def add(ctx, a, b):
        return a + b

The function receives the run context first and its inputs as keyword arguments. A node with one output
returns that value; a node with several returns a tuple; a node that also shows something in a front end
returns `Result(outputs, ui)`. The declaration is data (`NodeDef`): the registry checks it when it registers,
validation checks graphs against it, and `/object_info` is derived from it.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

INT, FLOAT, STRING, BOOLEAN, COMBO = "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"
PRIMITIVE_TYPES = frozenset({INT, FLOAT, STRING, BOOLEAN, COMBO})
ANY = "*"
SEED_NAMES = frozenset({"seed", "noise_seed"})  # INT widgets the front end follows with a control_after_generate


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class NodeDefinitionError(ValueError):
    """A node declaration is inconsistent (raised when it is declared or registered)."""


@dataclass(frozen=True)
class Input:
    """One input of a node. Primitive inputs (INT, FLOAT, STRING, BOOLEAN, COMBO) are widgets in a front end and
    may be given as constants; every input may also be linked to an upstream output of the same type."""

    name: str
    type: str
    default: Any = MISSING
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: Sequence[str] | Callable[[Any], Sequence[str]] | None = None
    multiline: bool = False
    optional: bool = False
    tooltip: str = ""
    lazy: bool = False
    force_input: bool = False
    control_after_generate: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def has_default(self) -> bool:
        return self.default is not MISSING

    @property
    def is_widget(self) -> bool:
        """True when a front end shows this input as a widget (a value kept in `widgets_values`)."""
        return self.type in PRIMITIVE_TYPES and not self.force_input

    def combo_options(self, resources: Any = None) -> Sequence[str]:
        """The allowed values; a callable receives the application's resources (e.g. to list model files)."""
        if self.options is None:
            return ()
        return self.options(resources) if callable(self.options) else self.options


@dataclass(frozen=True)
class Output:
    name: str
    type: str
    is_list: bool = False
    tooltip: str = ""


@dataclass(frozen=True)
class Result:
    """What a node returns when it has a UI payload (images to show) besides its outputs."""

    outputs: tuple = ()
    ui: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class NodeDef:
    """A node type. `fn(ctx, **inputs)` computes it; everything else describes it."""

    name: str
    fn: Callable[..., Any]
    inputs: tuple[Input, ...] = ()
    outputs: tuple[Output, ...] = ()
    category: str = ""
    description: str = ""
    display_name: str = ""
    version: str = "1"
    output_node: bool = False
    cacheable: bool = True
    fingerprint: Callable[..., Hashable] | None = None  # fingerprint(resources, **constant_inputs)
    validate: Callable[..., bool | str] | None = None
    check_lazy: Callable[..., Sequence[str]] | None = None
    input_is_list: bool = False
    hidden: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    source: str = ""
    size_rule: Callable[..., Any] | None = None  # sizes of the images it makes, from its inputs (engine/sizes.py)
    origin: str = "native"  # "comfy_v1" for adapted ComfyUI classes (positional outputs, VALIDATE_INPUTS rules)

    def input(self, name: str) -> Input | None:
        return self.inputs_by_name.get(name)

    @functools.cached_property
    def inputs_by_name(self) -> Mapping[str, Input]:
        return {spec.name: spec for spec in self.inputs}

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)


def accepted_kwargs(fn: Callable[..., Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of `values` that `fn` accepts by name (all of them when it takes **kwargs)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(values)
    return {k: v for k, v in values.items() if k in params}


def node(
    name: str,
    *,
    inputs: Sequence[Input] = (),
    outputs: Sequence[Output] = (),
    category: str = "",
    description: str = "",
    display_name: str = "",
    version: str | int = 1,
    output_node: bool = False,
    cacheable: bool = True,
    fingerprint: Callable[..., Hashable] | None = None,
    validate: Callable[..., bool | str] | None = None,
    check_lazy: Callable[..., Sequence[str]] | None = None,
    input_is_list: bool = False,
    aliases: Sequence[str] = (),
    size_rule: Callable[..., Any] | None = None,
) -> Callable[[Callable[..., Any]], NodeDef]:
    """Declare a node: the decorated function becomes a `NodeDef` (checked again by the registry)."""

    def declare(fn: Callable[..., Any]) -> NodeDef:
        definition = NodeDef(
            name=name,
            fn=fn,
            inputs=tuple(inputs),
            outputs=tuple(outputs),
            category=category,
            description=description or (fn.__doc__ or "").strip(),
            display_name=display_name,
            version=str(version),
            output_node=output_node,
            cacheable=cacheable,
            fingerprint=fingerprint,
            validate=validate,
            check_lazy=check_lazy,
            input_is_list=input_is_list,
            aliases=tuple(aliases),
            source=f"{fn.__module__}.{fn.__qualname__}",
            size_rule=size_rule,
        )
        check_definition(definition)
        return definition

    return declare


def check_definition(definition: NodeDef, known_types: frozenset[str] | None = None) -> None:
    """Raise NodeDefinitionError when the declaration contradicts itself (or uses unknown types)."""
    if not isinstance(definition, NodeDef):
        raise NodeDefinitionError(f"{definition!r} is not a node definition; declare nodes with @node(...)")
    where = f"node {definition.name!r} ({definition.source or 'unknown source'})"
    if not definition.name or not isinstance(definition.name, str):
        raise NodeDefinitionError(f"{where}: a node needs a non-empty string name")
    if not callable(definition.fn):
        raise NodeDefinitionError(f"{where}: its function is not callable")
    seen: set[str] = set()
    for spec in definition.inputs:
        if not isinstance(spec, Input) or not isinstance(spec.name, str) or not spec.name \
                or not isinstance(spec.type, str):
            raise NodeDefinitionError(f"{where}: inputs must be Input(name, type, ...) with string name and type, "
                                      f"got {spec!r}")
        if spec.name in seen:
            raise NodeDefinitionError(f"{where}: input {spec.name!r} is declared twice; rename one of them")
        seen.add(spec.name)
        _check_input(where, spec, known_types)
    out_names: set[str] = set()
    for out in definition.outputs:
        if not isinstance(out, Output) or not isinstance(out.type, str):
            raise NodeDefinitionError(f"{where}: outputs must be Output(name, type), got {out!r}")
        # ComfyUI outputs are positional and often unnamed ("INT", "INT"); native outputs are referred to by name.
        if out.name in out_names and definition.origin == "native":
            raise NodeDefinitionError(f"{where}: output {out.name!r} is declared twice; rename one of them")
        out_names.add(out.name)
        if known_types is not None and not _type_known(out.type, known_types):
            raise NodeDefinitionError(f"{where}: output {out.name!r} has unknown type {out.type!r}; "
                                      "register the type first or fix its spelling")
    if definition.origin == "native":  # adapted ComfyUI classes take **kwargs and hand them to their method
        _check_signature(where, definition)
    _check_size_rule(where, definition)


def _parameters(fn: Callable[..., Any]) -> list[inspect.Parameter] | None:
    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: nothing to compare
        return None


def _check_signature(where: str, definition: NodeDef) -> None:
    """The inputs are declared twice, in the Input list and by the function's parameters: they must agree."""
    params = _parameters(definition.fn)
    if params is None:
        return
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                  inspect.Parameter.VAR_POSITIONAL)
    if not params or params[0].kind not in positional:
        raise NodeDefinitionError(f"{where}: its function must take the run context first, as fn(ctx, <inputs>)")
    rest = params[1:]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in rest)
    by_name = {p.name: p for p in rest if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for param in rest:
        if param.kind is param.POSITIONAL_ONLY and param.default is param.empty:
            raise NodeDefinitionError(f"{where}: its function takes {param.name!r} by position only, but inputs are "
                                      "passed by name; remove the '/' from its parameters")
    for spec in definition.inputs:
        param = by_name.get(spec.name)
        if param is None and not takes_any:
            raise NodeDefinitionError(f"{where}: input {spec.name!r} is declared but its function has no parameter "
                                      f"{spec.name!r}; add the parameter (or **kwargs), or remove the input")
        if param is not None and spec.optional and not spec.has_default and param.default is param.empty:
            raise NodeDefinitionError(f"{where}: optional input {spec.name!r} may be left unconnected, but its "
                                      f"parameter has no default; write {spec.name}=None")
    declared = set(definition.input_names)
    for name, param in by_name.items():
        if param.default is param.empty and name not in declared:
            raise NodeDefinitionError(f"{where}: its function's parameter {name!r} is not a declared input and has "
                                      f"no default; declare Input({name!r}, TYPE) or give the parameter a default")


def _check_size_rule(where: str, definition: NodeDef) -> None:
    """A size rule names inputs (and perhaps `resources`); a misspelt name would leave sizes unknown for ever."""
    if definition.size_rule is None:
        return
    if not callable(definition.size_rule):
        raise NodeDefinitionError(f"{where}: its size_rule is not callable")
    params = _parameters(definition.size_rule) or []
    allowed = {*definition.input_names, "resources"}
    for param in params:
        if param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY) and param.name not in allowed:
            raise NodeDefinitionError(f"{where}: its size rule takes {param.name!r}, which is not one of its inputs "
                                      f"({', '.join(definition.input_names) or 'none'}) nor 'resources'; fix the name")


def _type_known(type_name: str, known_types: frozenset[str]) -> bool:
    return all(part.strip() in known_types or part.strip() == ANY for part in type_name.split(","))


def _check_input(where: str, spec: Input, known_types: frozenset[str] | None) -> None:
    if known_types is not None and not _type_known(spec.type, known_types):
        raise NodeDefinitionError(f"{where}: input {spec.name!r} has unknown type {spec.type!r}; "
                                  "register the type first or fix its spelling")
    for bound in ("min", "max", "step"):
        value = getattr(spec, bound)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise NodeDefinitionError(f"{where}: input {spec.name!r} has a {bound} that is not a number: {value!r}")
    if spec.min is not None and spec.max is not None and spec.min > spec.max:
        raise NodeDefinitionError(f"{where}: input {spec.name!r} has min {spec.min} > max {spec.max}")
    if spec.type == COMBO and spec.options is None:
        raise NodeDefinitionError(f"{where}: combo input {spec.name!r} needs options")
    if not spec.has_default:
        return
    value = spec.default
    if spec.type in (INT, FLOAT):
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise NodeDefinitionError(f"{where}: default of {spec.name!r} must be a finite number, got {value!r}")
        if spec.type == INT and value != int(value):
            raise NodeDefinitionError(f"{where}: default of INT input {spec.name!r} must be whole, got {value!r}")
        if spec.min is not None and value < spec.min:
            raise NodeDefinitionError(f"{where}: default {value} of {spec.name!r} is below its min {spec.min}")
        if spec.max is not None and value > spec.max:
            raise NodeDefinitionError(f"{where}: default {value} of {spec.name!r} is above its max {spec.max}")
    elif spec.type == BOOLEAN and not isinstance(value, bool):
        raise NodeDefinitionError(f"{where}: default of BOOLEAN input {spec.name!r} must be True or False")
    elif spec.type == STRING and not isinstance(value, str):
        raise NodeDefinitionError(f"{where}: default of STRING input {spec.name!r} must be a string")
    elif spec.type == COMBO and not callable(spec.options) and value not in spec.combo_options():
        raise NodeDefinitionError(f"{where}: default {value!r} of combo {spec.name!r} is not one of its options")
