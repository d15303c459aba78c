"""The node API: what `@node` produces and which declarations it refuses (with a message naming the input)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from engine import BOOLEAN, COMBO, FLOAT, INT, STRING, Input, NodeDefinitionError, Output, Result, node
from engine.spec import MISSING, NodeDef, accepted_kwargs, check_definition

ONE_OUTPUT = (Output("out", INT),)


def _declare(*inputs: Input, outputs=ONE_OUTPUT, **kwargs) -> NodeDef:
    @node("Probe", inputs=list(inputs), outputs=list(outputs), **kwargs)
    def probe(ctx, **values):
        return 0

    return probe


def test_node_decorator_builds_a_complete_definition():
    @node("Scale", category="math/scale", version=3, output_node=True, cacheable=False, aliases=("Times",),
          inputs=[Input("x", FLOAT, default=1.0, min=-5, max=5, step=0.5, tooltip="the value"),
                  Input("mode", COMBO, options=("up", "down"), default="up"),
                  Input("note", STRING, default="", multiline=True, optional=True)],
          outputs=[Output("scaled", FLOAT, tooltip="x scaled")])
    def scale(ctx, x, mode, note=""):
        """Multiply x by two or halve it."""
        return x * 2 if mode == "up" else x / 2

    assert isinstance(scale, NodeDef)
    assert (scale.name, scale.category, scale.version, scale.output_node, scale.cacheable) == \
        ("Scale", "math/scale", "3", True, False)
    assert scale.description == "Multiply x by two or halve it."
    assert scale.aliases == ("Times",)
    assert scale.source.endswith("test_node_decorator_builds_a_complete_definition.<locals>.scale")
    assert scale.input_names == ("x", "mode", "note")
    x = scale.input("x")
    assert (x.default, x.min, x.max, x.step, x.tooltip, x.optional) == (1.0, -5, 5, 0.5, "the value", False)
    assert scale.input("note").multiline and scale.input("note").optional
    assert scale.input("missing") is None
    assert scale.outputs == (Output("scaled", FLOAT, tooltip="x scaled"),)
    assert scale.origin == "native"
    assert scale.fn(None, x=3.0, mode="down") == 1.5


def test_input_properties():
    assert Input("a", INT, default=0).has_default
    assert not Input("a", INT).has_default and Input("a", INT).default is MISSING
    assert Input("a", INT).is_widget and Input("s", COMBO, options=("x",)).is_widget
    assert not Input("a", INT, force_input=True).is_widget
    assert not Input("img", "IMAGE").is_widget
    assert Input("c", COMBO, options=("x", "y")).combo_options() == ("x", "y")
    assert Input("c", COMBO, options=lambda res: sorted(res)).combo_options({"b", "a"}) == ["a", "b"]
    assert Input("a", INT).combo_options() == ()


def test_result_defaults():
    assert Result() == Result((), None)
    assert Result((1,), {"text": ["x"]}).ui == {"text": ["x"]}


@pytest.mark.parametrize("bad_input, words", [
    (Input("n", INT, default=-1, min=0), ["'n'", "below its min 0"]),
    (Input("n", INT, default=11, max=10), ["'n'", "above its max 10"]),
    (Input("n", INT, default=1.5), ["INT input 'n'", "whole"]),
    (Input("n", INT, default="3"), ["'n'", "finite number"]),
    (Input("n", FLOAT, default=math.nan), ["'n'", "finite number"]),
    (Input("n", FLOAT, default=True), ["'n'", "finite number"]),
    (Input("n", INT, min=5, max=1), ["'n'", "min 5 > max 1"]),
    (Input("n", INT, min="0"), ["'n'", "min that is not a number"]),
    (Input("flag", BOOLEAN, default=1), ["BOOLEAN input 'flag'", "True or False"]),
    (Input("text", STRING, default=3), ["STRING input 'text'", "must be a string"]),
    (Input("mode", COMBO), ["combo input 'mode'", "needs options"]),
    (Input("mode", COMBO, options=("a", "b"), default="c"), ["'c'", "combo 'mode'", "not one of its options"]),
])
def test_inconsistent_inputs_are_refused_with_the_input_named(bad_input, words):
    with pytest.raises(NodeDefinitionError) as info:
        _declare(bad_input)
    message = str(info.value)
    assert "node 'Probe'" in message
    for word in words:
        assert word in message


def test_duplicate_names_are_refused():
    with pytest.raises(NodeDefinitionError, match="input 'a' is declared twice"):
        _declare(Input("a", INT), Input("a", FLOAT))
    with pytest.raises(NodeDefinitionError, match="output 'x' is declared twice"):
        _declare(outputs=(Output("x", INT), Output("x", FLOAT)))


def test_comfy_v1_definitions_may_repeat_output_names():
    definition = replace(_declare(outputs=(Output("INT", INT),)), outputs=(Output("INT", INT), Output("INT", INT)),
                         origin="comfy_v1")
    check_definition(definition)  # positional, as in ComfyUI: no error


def test_combo_with_callable_options_is_not_checked_at_declaration():
    definition = _declare(Input("file", COMBO, options=lambda resources: [], default="later.txt"))
    assert definition.input("file").default == "later.txt"


def test_check_definition_with_known_types():
    definition = _declare(Input("image", "IMAGE"), outputs=(Output("mask", "MASK"),))
    with pytest.raises(NodeDefinitionError, match="input 'image' has unknown type 'IMAGE'"):
        check_definition(definition, frozenset({"INT", "MASK"}))
    with pytest.raises(NodeDefinitionError, match="output 'mask' has unknown type 'MASK'"):
        check_definition(definition, frozenset({"IMAGE"}))
    check_definition(definition, frozenset({"IMAGE", "MASK"}))
    union = _declare(Input("x", "INT,FLOAT"))
    check_definition(union, frozenset({"INT", "FLOAT"}))


def test_not_a_definition_and_not_callable():
    with pytest.raises(NodeDefinitionError, match="not a node definition"):
        check_definition(lambda ctx: 0)
    with pytest.raises(NodeDefinitionError, match="not callable"):
        check_definition(replace(_declare(), fn=None))
    with pytest.raises(NodeDefinitionError, match="non-empty string name"):
        check_definition(replace(_declare(), name=""))
    with pytest.raises(NodeDefinitionError, match="inputs must be Input"):
        check_definition(replace(_declare(), inputs=(("a", INT),)))


def test_accepted_kwargs():
    def some(a, b=1):
        return a + b

    def every(**kwargs):
        return kwargs

    assert accepted_kwargs(some, {"a": 1, "b": 2, "c": 3}) == {"a": 1, "b": 2}
    assert accepted_kwargs(every, {"a": 1, "c": 3}) == {"a": 1, "c": 3}


# -- issue #11: the Input list and the function's parameters declare the inputs twice; they must agree -------------

def _with_fn(fn, *inputs: Input) -> NodeDef:
    return NodeDef("Probe", fn, inputs=tuple(inputs), outputs=ONE_OUTPUT, source="tests.probe")


def test_a_declared_input_the_function_does_not_take_is_refused_naming_node_and_input():
    with pytest.raises(NodeDefinitionError, match=r"node 'Probe' \(tests.probe\): input 'b' is declared but its "
                                                  r"function has no parameter 'b'"):
        check_definition(_with_fn(lambda ctx, a: a, Input("a", INT), Input("b", INT)))
    with pytest.raises(NodeDefinitionError, match="input 'b' is declared"):  # @node checks it too
        @node("Probe", inputs=[Input("a", INT), Input("b", INT)], outputs=list(ONE_OUTPUT))
        def probe(ctx, a):
            return a


def test_a_parameter_without_default_that_is_no_input_is_refused():
    with pytest.raises(NodeDefinitionError, match="parameter 'c' is not a declared input and has no default"):
        check_definition(_with_fn(lambda ctx, a, c: a, Input("a", INT)))
    check_definition(_with_fn(lambda ctx, a, c=1: a, Input("a", INT)))  # a default makes it the function's own


def test_an_optional_input_without_default_needs_a_parameter_default():
    with pytest.raises(NodeDefinitionError, match="optional input 'm' may be left unconnected.*write m=None"):
        check_definition(_with_fn(lambda ctx, m: m, Input("m", "MASK", optional=True)))
    check_definition(_with_fn(lambda ctx, m=None: m, Input("m", "MASK", optional=True)))
    check_definition(_with_fn(lambda ctx, m: m, Input("m", INT, optional=True, default=1)))


def test_the_function_takes_the_context_first_and_inputs_by_name():
    with pytest.raises(NodeDefinitionError, match="must take the run context first"):
        check_definition(_with_fn(lambda **values: 0, Input("a", INT)))
    with pytest.raises(NodeDefinitionError, match="takes 'a' by position only"):
        def positional(ctx, a, /):
            return a
        check_definition(_with_fn(positional, Input("a", INT)))
    check_definition(_with_fn(lambda ctx, **values: 0, Input("a", INT), Input("b", INT)))  # **kwargs takes all


def test_adapted_comfy_classes_are_not_compared_with_their_signature():
    check_definition(replace(_with_fn(lambda ctx: 0, Input("a", INT)), origin="comfy_v1"))
