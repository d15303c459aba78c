"""Image sizes known before a run: each node's declared size rule, propagated through the graph.

A node that makes images (IMAGE, LATENT, MASK, or any type of a pack's own) may declare a size rule: a small
pure function from its inputs to the size of what it makes, e.g.

    def scale_by(image, scale_by):
        return Size(image.batch, round(image.height * scale_by), round(image.width * scale_by))

    @node("ImageScaleBy", size_rule=scale_by, ...)

The rule receives, by keyword, the node's constants and, for each linked input whose source has a known size,
that `Size`; a rule with a parameter named `resources` also gets the application's resources (to read a file's
header, say). When a parameter without a default cannot be given (the linked input's size is unknown, or a
number comes from a link), the node's sizes are unknown. It returns one `Size` (the size of every output that is
not a primitive INT/FLOAT/STRING/BOOLEAN/COMBO), a tuple with one `Size` or None per output, or None (unknown).

A node without a rule whose `width` and `height` inputs are whole-number constants (and `batch_size`, if it has
one) is taken to make that size (`dimension_size`), so ComfyUI packs' generators are bounded too.

Validation runs the rules in topological order and refuses a graph in which any output would be larger than the
`SizeLimits`. Unknown sizes (a node without a rule, a file that cannot be read) stay unknown downstream and are
not checked. Sizes are in pixels as (batch, height, width); a LATENT's size is that of the image it decodes to.
"""

from __future__ import annotations

import argparse
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .coerce import short_repr
from .graph import Link, NodeInstance
from .spec import ANY, PRIMITIVE_TYPES, NodeDef

MEGAPIXEL = 1 << 20  # 4096 x 4096 is exactly 16 megapixels


@dataclass(frozen=True, slots=True)
class Size:
    """The size of one image-like value: `batch` items of `height` x `width` pixels."""

    batch: int
    height: int
    width: int

    @property
    def pixels(self) -> int:
        """Pixels of one item."""
        return self.height * self.width

    @property
    def total(self) -> int:
        """Pixels of the whole batch."""
        return self.batch * self.height * self.width

    def __str__(self) -> str:
        return f"{self.batch} x {self.width}x{self.height}"


@dataclass(frozen=True)
class SizeLimits:
    """The largest image (one batch item) and the largest batch any node may make, in pixels."""

    image_pixels: int = 16 * MEGAPIXEL
    batch_pixels: int = 64 * MEGAPIXEL

    @classmethod
    def megapixels(cls, image: float, batch: float) -> SizeLimits:
        return cls(int(image * MEGAPIXEL), int(batch * MEGAPIXEL))


DEFAULT_SIZE_LIMITS = SizeLimits()  # frozen: one shared default


@dataclass(frozen=True)
class SizeProblem:
    """A node whose output is too large, or whose size rule failed."""

    code: str
    node_id: str
    node_type: str
    message: str
    extra: Mapping[str, Any]


@dataclass(frozen=True)
class _RuleCall:
    """What a rule's signature asks for, read once per node type."""

    required: frozenset[str]
    names: frozenset[str] | None  # None: it takes **kwargs
    wants_resources: bool


def _rule_call(rule: Callable[..., Any]) -> _RuleCall:
    params = inspect.signature(rule).parameters.values()
    keyword = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params)
    return _RuleCall(frozenset(p.name for p in keyword if p.default is p.empty),
                     None if var_kw else frozenset(p.name for p in keyword),
                     any(p.name == "resources" for p in keyword))


def propagate(order: Iterable[str], nodes: Mapping[str, NodeInstance], definitions: Mapping[str, NodeDef],
              limits: SizeLimits, resources: Any = None) -> list[SizeProblem]:
    """Run every size rule in `order` (topological) and return the outputs over the limits, one problem per
    node. An output over the limits counts as unknown downstream, so one oversized node gives one error."""
    known: dict[tuple[str, int], Size] = {}
    calls: dict[str, _RuleCall] = {}
    problems: list[SizeProblem] = []
    for node_id in order:
        inst = nodes[node_id]
        definition = definitions[inst.type]
        rule = definition.size_rule or _dimension_rule(inst)
        if rule is None:
            continue
        try:
            call = calls.get(definition.name) or calls.setdefault(definition.name, _rule_call(rule))
            sizes = _output_sizes(definition, inst, rule, call, known, resources)
        except Exception as exc:  # a rule that crashes is the node's fault: say so rather than run blind
            reason = str(exc) if len(str(exc)) <= 300 else str(exc)[:297] + "..."
            problems.append(SizeProblem("size_rule_failed", node_id, inst.type,
                                        f"the node's size rule failed ({type(exc).__name__}: {reason}); fix the rule "
                                        "or report it to the node's author", {}))
            continue
        problem = _over_limits(definition, inst, sizes, limits)
        if problem is not None:
            problems.append(problem)
            continue
        for index, size in enumerate(sizes):
            if size is not None:
                known[(node_id, index)] = size
    return problems


def dimension_size(width: int, height: int, batch_size: int = 1) -> Size:
    """The rule assumed for a node that declares none but takes whole-number `width` and `height` constants (and
    maybe `batch_size`), as ComfyUI's EmptyLatentImage and most packs' generators do: it makes that size."""
    return Size(max(batch_size, 1), max(height, 0), max(width, 0))


def _dimension_rule(inst: NodeInstance) -> Callable[..., Size] | None:
    values = [inst.inputs.get(name, 1) for name in ("width", "height", "batch_size")]
    whole = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    return dimension_size if whole and "width" in inst.inputs and "height" in inst.inputs else None


def _output_sizes(definition: NodeDef, inst: NodeInstance, rule: Callable[..., Any], call: _RuleCall,
                  known: Mapping[tuple[str, int], Size], resources: Any) -> Sequence[Size | None]:
    values: dict[str, Any] = {}
    for name, value in inst.inputs.items():
        if isinstance(value, Link):
            if (value.source, value.output) in known:
                values[name] = known[(value.source, value.output)]
        elif _takes_constants(definition, name):  # an explicit {"__value__": ...} for an IMAGE is no Size
            values[name] = value
    if call.wants_resources:
        values["resources"] = resources
    if not call.required <= values.keys():
        return ()
    if call.names is not None:
        values = {k: v for k, v in values.items() if k in call.names}
    return _per_output(definition, rule(**values))


def _takes_constants(definition: NodeDef, name: str) -> bool:
    spec = definition.input(name)
    return spec is not None and (spec.type in PRIMITIVE_TYPES or spec.type == ANY)


def _per_output(definition: NodeDef, returned: Any) -> Sequence[Size | None]:
    outputs = definition.outputs
    if returned is None:
        return ()
    if isinstance(returned, Size):
        sizes = [None if out.type in PRIMITIVE_TYPES else returned for out in outputs]
    elif isinstance(returned, tuple | list) and len(returned) == len(outputs):
        sizes = list(returned)
    else:
        raise TypeError(f"it returned {short_repr(returned, 60)}; a rule returns a Size, None, or a tuple of "
                        f"{len(outputs)} Size-or-None (one per output)")
    for size in sizes:
        if size is not None and not _is_size(size):
            raise TypeError(f"it returned {short_repr(size, 60)}; sizes are Size(batch, height, width) of whole "
                            "numbers >= 0")
    return sizes


def _is_size(value: Any) -> bool:
    return isinstance(value, Size) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                           for n in (value.batch, value.height, value.width))


def _over_limits(definition: NodeDef, inst: NodeInstance, sizes: Sequence[Size | None],
                 limits: SizeLimits) -> SizeProblem | None:
    for index, size in enumerate(sizes):
        if size is None:
            continue
        output = definition.outputs[index]
        what = (f"its {output.type} output {output.name!r} would be {_count(size.batch)} x {_count(size.width)}x"
                f"{_count(size.height)} pixels")
        extra = {"output": index, **{key: n if n < 10**18 else _count(n) for key, n in (
                     ("batch", size.batch), ("height", size.height), ("width", size.width))},
                 "max_image_pixels": limits.image_pixels, "max_batch_pixels": limits.batch_pixels}
        if size.pixels > limits.image_pixels:
            return SizeProblem("image_too_large", inst.id, inst.type,
                               f"{what}: {_mp(size.pixels)} megapixels per image, more than the limit of "
                               f"{_mp(limits.image_pixels)} (--max-image-megapixels); make it smaller "
                               "(size, scale factor) or raise the limit", extra)
        if size.total > limits.batch_pixels:
            return SizeProblem("image_too_large", inst.id, inst.type,
                               f"{what}: {_mp(size.total)} megapixels in the batch, more than the limit of "
                               f"{_mp(limits.batch_pixels)} (--max-batch-megapixels); use a smaller batch "
                               "or size, or raise the limit", extra)
    return None


def _mp(pixels: int) -> str:
    if pixels >= 1000 * MEGAPIXEL:  # integer maths: a rule may return sizes past what a float holds
        return _count(pixels // MEGAPIXEL)
    return f"{pixels / MEGAPIXEL:.1f}".removesuffix(".0")


def _count(n: int) -> str:
    """A whole number as text, also one too long to print (Python refuses more than 4,300 digits)."""
    return str(n) if n < 10**18 else f"about 2^{n.bit_length() - 1}"


def add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """The limits as command-line flags (`sdgraph run`, `validate` and `serve` share them)."""
    image, batch = DEFAULT_SIZE_LIMITS.image_pixels / MEGAPIXEL, DEFAULT_SIZE_LIMITS.batch_pixels / MEGAPIXEL
    parser.add_argument("--max-image-megapixels", type=_megapixels, default=image, metavar="MP",
                        help="largest image (or latent, or mask) any node may make, in megapixels of 2^20 pixels "
                        "(default 16: 4096x4096); larger graphs are refused before they run")
    parser.add_argument("--max-batch-megapixels", type=_megapixels, default=batch, metavar="MP",
                        help="largest batch of images any node may make, in megapixels (default 64)")


def _megapixels(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of megapixels")
    return value


def size_limits_from(args: argparse.Namespace) -> SizeLimits:
    """The SizeLimits of parsed flags (the defaults for a flag that is absent)."""
    return SizeLimits.megapixels(getattr(args, "max_image_megapixels", DEFAULT_SIZE_LIMITS.image_pixels / MEGAPIXEL),
                                 getattr(args, "max_batch_megapixels", DEFAULT_SIZE_LIMITS.batch_pixels / MEGAPIXEL))
