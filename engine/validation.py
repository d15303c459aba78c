"""Validation of an API-format graph: a pure function that reports every problem at once.

Steps (each adds errors, none stops the others):
  1. structure: every entry is a node object with a known `class_type` and an `inputs` object;
  2. inputs: constants coerced and range-checked, links point at existing outputs of a matching type,
     required inputs present, unknown inputs reported;
  3. custom checks the node declares (`validate`, ComfyUI's VALIDATE_INPUTS) on its constants;
  4. cycles (one error per cycle);
  5. sizes: each node's size rule, in topological order, against the `SizeLimits` (engine/sizes.py);
  6. at least one output to compute.
Every step is linear in the size of the graph, and at most MAX_ERRORS errors are returned (then one that counts
the rest), so no input makes a slow check or a huge reply. The input mapping is never modified; the result holds
a fresh `Graph` with coerced values.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from .coerce import CoercionError, coerce_constant, reply_value, short_repr
from .graph import Graph, Link, NodeInstance, collector_paused, cycle_through, dependency_graph, needed
from .registry import NodeRegistry
from .sizes import DEFAULT_SIZE_LIMITS, SizeLimits, propagate
from .spec import ANY, COMBO, FLOAT, INT, PRIMITIVE_TYPES, Input, NodeDef, accepted_kwargs


@dataclass(frozen=True)
class ValidationError:
    code: str
    message: str
    node_id: str | None = None
    node_type: str | None = None
    input_name: str | None = None
    details: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        where = ""
        if self.node_id is not None:
            where = f"node {self.node_id}" + (f" ({self.node_type})" if self.node_type else "")
            if self.input_name and not self.message.startswith(f"input {self.input_name!r}"):
                where += f", input {self.input_name!r}"
            where += ": "
        return f"{where}{self.message} [{self.code}]"

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "node_id": self.node_id, "node_type": self.node_type,
                "input_name": self.input_name, "details": self.details, "extra": dict(self.extra)}


@dataclass(frozen=True)
class ValidationResult:
    graph: Graph | None
    errors: tuple[ValidationError, ...]

    @property
    def ok(self) -> bool:
        return not self.errors


def types_compatible(output_type: str, input_type: str) -> bool:
    if output_type == input_type or ANY in (output_type, input_type):
        return True
    outs = {t.strip() for t in output_type.split(",")}
    ins = {t.strip() for t in input_type.split(",")}
    return bool(outs & ins)


MAX_ERRORS = 100  # errors returned at most; one more says how many were left out
CYCLE_NAMES = 30  # node ids one cycle error names at most


def validate(prompt: Mapping[str, Any], registry: NodeRegistry, *, targets: Sequence[str] | None = None,
             resources: Any = None, sizes: SizeLimits = DEFAULT_SIZE_LIMITS) -> ValidationResult:
    """Check an API-format graph. `targets` restricts the run (and the checks) to those nodes and what they
    need; by default every node is checked and every output node is a target. `resources` is passed to
    combo option callables (e.g. to list model files) and to size rules that ask for it; `sizes` bounds every
    image, latent and mask the graph can make."""
    with collector_paused():
        return _validate(prompt, registry, targets, resources, sizes)


def _validate(prompt: Mapping[str, Any], registry: NodeRegistry, targets: Sequence[str] | None, resources: Any,
              sizes: SizeLimits) -> ValidationResult:
    errors: list[ValidationError] = []
    if not isinstance(prompt, Mapping):
        return ValidationResult(None, (ValidationError(
            "invalid_prompt", "a graph must be a JSON object mapping node ids to nodes "
            '({"1": {"class_type": ..., "inputs": {...}}})'),))
    raw_nodes = _step_structure(prompt, registry, errors)
    # One graph of the links as written, for --only, cycles and the order of size rules.
    links = dependency_graph(((source, nid) for nid, raw in raw_nodes.items() for source in _raw_link_sources(raw)),
                             raw_nodes)
    ids: Mapping[str, Any] | set[str] = raw_nodes
    if targets is not None:
        missing = [t for t in targets if str(t) not in raw_nodes]
        for target in missing:
            errors.append(ValidationError("bad_target", f"there is no node {target!r} in the graph to run; "
                                          "check the id given to --only / partial_execution_targets",
                                          node_id=str(target)))
        ids = needed(links, [str(t) for t in targets])
        links.remove_nodes_from([node_id for node_id in raw_nodes if node_id not in ids])
    nodes: dict[str, NodeInstance] = {}
    for node_id in raw_nodes:
        if node_id not in ids:
            continue
        class_type, definition, raw_inputs, title = raw_nodes[node_id]
        if definition is None:
            continue
        before = len(errors)
        linked_types: dict[str, str] = {}
        inputs = _step_inputs(node_id, definition, raw_inputs, prompt, raw_nodes, resources, errors, linked_types)
        if len(errors) == before:  # a custom check given incomplete inputs would only add noise
            _step_custom(node_id, definition, inputs, linked_types, errors, resources)
        nodes[node_id] = NodeInstance(node_id, definition.name, inputs, title)
    try:
        order = list(nx.topological_sort(links))  # linear; most graphs have no cycle
    except nx.NetworkXUnfeasible:
        _step_cycles(links, raw_nodes, errors)
    else:
        _step_sizes([node_id for node_id in order if node_id in nodes], nodes, registry, sizes, resources, errors)
    outputs = _step_outputs(nodes, registry, targets, errors)
    if errors:  # in node order (then in the order of the steps above); graph-wide problems last
        errors.sort(key=lambda e: (2, 0, "") if e.node_id is None else _id_order(e.node_id))
        return ValidationResult(None, _capped(errors))
    return ValidationResult(Graph(nodes, outputs), ())


def _capped(errors: list[ValidationError]) -> tuple[ValidationError, ...]:
    if len(errors) <= MAX_ERRORS:
        return tuple(errors)
    rest = len(errors) - MAX_ERRORS
    return (*errors[:MAX_ERRORS], ValidationError(
        "too_many_errors", f"and {rest} more problem(s) not listed; fix these first and validate again",
        extra={"not_listed": rest, "total": len(errors)}))


def _step_structure(prompt: Mapping[str, Any], registry: NodeRegistry, errors: list[ValidationError]) -> dict:
    raw_nodes: dict[str, tuple] = {}
    for raw_id, raw in prompt.items():
        node_id = str(raw_id)
        if not _is_mapping(raw):
            errors.append(ValidationError("invalid_node", "a node must be an object with class_type and inputs",
                                          node_id=node_id))
            continue
        class_type = raw.get("class_type")
        if not isinstance(class_type, str):
            errors.append(ValidationError("missing_node_type", "the node has no class_type; "
                                          "name the node type (see `sdgraph nodes`)", node_id=node_id))
            continue
        definition = registry.get(class_type)
        if definition is None:
            errors.append(ValidationError(
                "unknown_node_type", f"there is no node type {class_type!r}; install the pack that defines it "
                "or fix the name (`sdgraph nodes` lists the known ones; `sdgraph nodes --errors` shows packs "
                "that failed to load)", node_id=node_id, node_type=class_type))
        raw_inputs = raw.get("inputs", {})
        if not _is_mapping(raw_inputs):
            errors.append(ValidationError("invalid_node", "inputs must be an object of name: value",
                                          node_id=node_id, node_type=class_type))
            raw_inputs = {}
        meta = raw.get("_meta")
        title = meta.get("title") if _is_mapping(meta) and isinstance(meta.get("title"), str) else None
        raw_nodes[node_id] = (class_type, definition, raw_inputs, title)
    return raw_nodes


def _raw_link_sources(raw: tuple) -> list[str]:
    return [str(v[0]) for v in raw[2].values() if _is_link(v)]


_JSON_SCALARS = frozenset({str, int, float, bool, list, type(None)})


def _is_mapping(value: Any) -> bool:
    """isinstance(value, Mapping), with JSON's own types answered first (an ABC check is slow)."""
    kind = type(value)
    return kind is dict or (kind not in _JSON_SCALARS and isinstance(value, Mapping))


_SEQUENCE = (list, tuple)  # isinstance with a tuple of types: twice as fast as with `list | tuple`
_ID_TYPES = (str, int)
_CONTAINER = (list, dict)


def _is_link(value: Any) -> bool:
    kind = type(value)
    if kind is list or kind is tuple:  # JSON's own types first (most inputs are constants, checked 3 times)
        if len(value) != 2:
            return False
        if type(value[1]) is int and type(value[0]) in _ID_TYPES:
            return True
    elif not isinstance(value, _SEQUENCE):
        return False
    return (len(value) == 2 and isinstance(value[0], _ID_TYPES) and not isinstance(value[0], bool)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


def _step_inputs(node_id: str, definition: NodeDef, raw_inputs: Mapping[str, Any], prompt: Mapping[str, Any],
                 raw_nodes: Mapping[str, tuple], resources: Any, errors: list[ValidationError],
                 linked_types: dict[str, str]) -> dict[str, Any]:
    def error(code: str, message: str, input_name: str | None, **extra: Any) -> None:
        if "received_value" in extra:
            extra["received_value"] = reply_value(extra["received_value"])
        errors.append(ValidationError(code, message, node_id, definition.name, input_name, extra=extra))

    # ComfyUI's VALIDATE_INPUTS takes over the range/option checks of the inputs it names, and the link type
    # checks when it asks for `input_types`.
    custom_names = _custom_check_names(definition)
    inputs: dict[str, Any] = {}
    declared = definition.inputs_by_name
    for name in raw_inputs:
        if name not in declared and not _frontend_extra(definition, name):
            known = ", ".join(definition.input_names) or "none"
            error("unknown_input", f"{definition.name} has no input {name!r} (its inputs: {known}); "
                  "remove it or fix its name", name, received_value=raw_inputs[name])
    for spec in definition.inputs:
        value = raw_inputs.get(spec.name)
        if value is None:
            if spec.has_default:
                inputs[spec.name] = _default(spec)
            elif not spec.optional:
                how = "link it to an output" if not spec.is_widget else "give it a value or link it"
                error("required_input_missing", f"required input {spec.name!r} ({spec.type}) is missing; {how}",
                      spec.name)
            continue
        if _is_link(value):
            link = _check_link(spec, value, prompt, raw_nodes, error, linked_types,
                               check_type="input_types" not in custom_names)
            if link is not None:
                inputs[spec.name] = link
            continue
        if _is_mapping(value) and "__value__" in value:
            value = copy.deepcopy(value["__value__"])
            if spec.type not in PRIMITIVE_TYPES:  # an explicit constant for a custom (widget) type
                inputs[spec.name] = value
                continue
        elif isinstance(value, _SEQUENCE) and spec.type != ANY:
            if spec.type in PRIMITIVE_TYPES:
                error("invalid_input_type", f"input {spec.name!r} got a list {_short(value)}: a link is "
                      '[node_id, output_index]; a list constant is written {"__value__": [...]}', spec.name,
                      received_value=value)
            else:
                error("bad_linked_input", f"input {spec.name!r} is {_short(value)}, which is not a link; link it "
                      'as ["node_id", output_index] with an existing node id and a whole output index', spec.name,
                      received_value=value)
            continue
        if spec.type not in PRIMITIVE_TYPES and spec.type != ANY:
            error("invalid_input_type", f"input {spec.name!r} takes a {spec.type} from another node's output; "
                  f"link it as [node_id, output_index] instead of giving {_short(value)}", spec.name,
                  received_value=value)
            continue
        try:
            inputs[spec.name] = coerce_constant(spec, copy.deepcopy(value) if isinstance(value, _CONTAINER)
                                                else value, resources, check_limits=spec.name not in custom_names)
        except CoercionError as problem:
            extra = {"received_value": value}
            if spec.type == COMBO:
                extra["input_config"] = list(spec.combo_options(resources))[:100]
            error(problem.code, problem.message, spec.name, **extra)
    return inputs


def _default(spec: Input) -> Any:
    if spec.type == INT and isinstance(spec.default, float):
        return int(spec.default)
    if spec.type == FLOAT and isinstance(spec.default, int) and not isinstance(spec.default, bool):
        return float(spec.default)
    return spec.default


def _custom_check_names(definition: NodeDef) -> frozenset[str]:
    if definition.validate is None or definition.origin != "comfy_v1":
        return frozenset()
    try:
        return frozenset(inspect.signature(definition.validate).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _frontend_extra(definition: NodeDef, name: str) -> bool:
    """Inputs ComfyUI's front end sends beside the declared ones (LoadImage's `upload` button value)."""
    return name == "upload" and any(key.endswith("_upload") and flag for spec in definition.inputs
                                    for key, flag in spec.extra.items())


def _short(value: Any) -> str:
    return short_repr(value, 40)


def _check_link(spec: Input, value: Sequence, prompt: Mapping[str, Any], raw_nodes: Mapping[str, tuple],
                error, linked_types: dict[str, str], *, check_type: bool = True) -> Link | None:
    source, index = str(value[0]), value[1]
    parsed = raw_nodes.get(source)
    if parsed is None and not _is_mapping(prompt.get(source, prompt.get(value[0]))):
        error("bad_linked_input", f"input {spec.name!r} is linked to node {source!r}, which is not in the graph; "
              "link it to an existing node", spec.name, linked_node=[source, index])
        return None
    source_def = parsed[1] if parsed is not None else None
    if source_def is None:
        return Link(source, index)  # the source's own unknown_node_type error says what to fix
    if not 0 <= index < len(source_def.outputs):
        error("bad_linked_input", f"input {spec.name!r} is linked to output {index} of node {source!r} "
              f"({source_def.name}), which has {len(source_def.outputs)} output(s); use an index from 0 to "
              f"{len(source_def.outputs) - 1}", spec.name, linked_node=[source, index])
        return None
    out_type = source_def.outputs[index].type
    linked_types[spec.name] = out_type
    if check_type and not types_compatible(out_type, spec.type):
        error("return_type_mismatch", f"input {spec.name!r} expects {spec.type} but is linked to output "
              f"{index} of node {source!r} ({source_def.name}), which gives {out_type}; link an output of type "
              f"{spec.type}", spec.name, received_type=out_type, linked_node=[source, index])
        return None
    return Link(source, index)


def _step_custom(node_id: str, definition: NodeDef, inputs: dict[str, Any], linked_types: Mapping[str, str],
                 errors: list[ValidationError], resources: Any = None) -> None:
    """The node's own check on its constants. A native `validate` runs only when every input it names is a
    constant (a linked value is not known before the run); one with a `resources` parameter that is not an
    input receives the application's resources. ComfyUI's VALIDATE_INPUTS always runs: linked
    inputs arrive as None and `input_types`, when asked for, maps them to the linked output types."""
    if definition.validate is None:
        return
    try:
        params = inspect.signature(definition.validate).parameters
        if definition.origin == "comfy_v1":
            values = {k: (None if isinstance(v, Link) else v) for k, v in inputs.items()}
            if "input_types" in params:
                values["input_types"] = dict(linked_types)
        else:
            if any(isinstance(inputs.get(name), Link) for name in params):
                return
            values = {k: v for k, v in inputs.items() if not isinstance(v, Link)}
            if "resources" in params and definition.input("resources") is None:
                values["resources"] = resources
        verdict = definition.validate(**accepted_kwargs(definition.validate, values))
    except Exception as exc:  # a custom check that crashes is itself a validation failure
        verdict = f"the node's own input check raised {type(exc).__name__}: {exc}"
    if verdict is not True:
        message = "the node's own input check rejected these inputs; check its documentation for valid values" \
            if verdict is False or verdict is None else str(verdict)
        errors.append(ValidationError("custom_validation_failed", message, node_id, definition.name,
                                      details=str(verdict)))


def _step_cycles(links: nx.DiGraph, raw_nodes: Mapping[str, tuple], errors: list[ValidationError]) -> None:
    """One error per cycle, on its lowest node id, naming at most CYCLE_NAMES of its nodes."""
    for component in nx.strongly_connected_components(links):
        if len(component) == 1:
            (only,) = component
            if not links.has_edge(only, only):
                continue
        first = min(component, key=_id_order)
        path = cycle_through(links, component, first)
        shown = " -> ".join(path[:CYCLE_NAMES]) + (f" -> ... ({len(path) - CYCLE_NAMES} more)"
                                                    if len(path) > CYCLE_NAMES else f" -> {path[0]}")
        others = f" ({len(component)} nodes depend on each other)" if len(component) > len(path) else ""
        errors.append(ValidationError(
            "dependency_cycle", f"node {first} is part of a cycle of {len(path)} node(s): {shown}{others}; "
            "break the cycle by removing one of these links", first, raw_nodes[first][0],
            extra={"cycle": path[:CYCLE_NAMES], "cycle_length": len(path), "component_size": len(component)}))


def _step_sizes(order: list[str], nodes: Mapping[str, NodeInstance], registry: NodeRegistry, limits: SizeLimits,
                resources: Any, errors: list[ValidationError]) -> None:
    definitions = {inst.type: registry.get(inst.type) for inst in nodes.values()}
    if all(definition.size_rule is None for definition in definitions.values()):
        return  # nothing in the graph declares a size
    for problem in propagate(order, nodes, definitions, limits, resources):
        errors.append(ValidationError(problem.code, problem.message, problem.node_id, problem.node_type,
                                      extra=problem.extra))


def _step_outputs(nodes: Mapping[str, NodeInstance], registry: NodeRegistry, targets: Sequence[str] | None,
                  errors: list[ValidationError]) -> tuple[str, ...]:
    if targets is not None:
        return tuple(str(t) for t in targets if str(t) in nodes)
    outputs = tuple(inst.id for inst in nodes.values() if registry.get(inst.type).output_node)
    unknown_types = any(e.code == "unknown_node_type" for e in errors)  # one of them may be the output node
    if not outputs and not unknown_types:
        errors.append(ValidationError("prompt_no_outputs", "the graph has no output node, so there is nothing "
                                      "to compute; add one (e.g. SaveImage or PreviewImage)"))
    return outputs


def _id_order(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isascii() and node_id.isdecimal() else (1, 0, node_id)
