"""ComfyUI V1 node classes load unmodified and behave as in ComfyUI."""

from __future__ import annotations

import math
import types

import pytest

from engine import COMBO, FLOAT, INT, STRING, Executor, NodeDefinitionError, NodeRegistry, validate
from engine.comfy_v1 import adapt_class
from engine.discovery import register_module


class ImageBlend:
    """A V1 class using most of ComfyUI's attributes."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "amount": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                     "tooltip": "how much of b"}),
                "mode": (["normal", "multiply"], {"default": "normal"}),
                "a": ("INT", {"forceInput": True}),
            },
            "optional": {"b": ("INT",), "label": ("STRING", {"multiline": True, "default": "x"})},
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ("INT", "STRING")
    RETURN_NAMES = ("blended", "report")
    FUNCTION = "blend"
    CATEGORY = "image/blend"
    DESCRIPTION = "Blends two numbers."
    OUTPUT_NODE = True

    def blend(self, amount, mode, a, b=0, label="x", prompt=None, unique_id=None, extra_pnginfo=None):
        value = round(a * (1 - amount) + b * amount)
        if mode == "multiply":
            value = a * b
        report = f"{label}:{unique_id}:{sorted(prompt)}:{extra_pnginfo}"
        return {"ui": {"text": [report]}, "result": (value, report)}


class Number:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": -100, "max": 100})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    def run(self, value):
        return (value,)


def _module(**attrs) -> types.ModuleType:
    module = types.ModuleType("v1_pack")
    module.__file__ = "/packs/v1_pack/__init__.py"
    for name, value in attrs.items():
        setattr(module, name, value)
    return module


def _registry(**mappings) -> NodeRegistry:
    registry = NodeRegistry()
    register_module(registry, _module(NODE_CLASS_MAPPINGS=mappings), pack="v1_pack")
    assert not registry.load_errors, registry.load_errors
    return registry


def _run(registry, api, executor=None, extra=None):
    result = validate(api, registry)
    assert result.ok, [str(e) for e in result.errors]
    executor = executor or Executor(registry)
    return executor.run(result.graph, prompt=api, extra=extra or {})


def test_attributes_become_a_typed_definition():
    definition = adapt_class("ImageBlend", ImageBlend, display_name="Image Blend", source="pack.py")
    assert (definition.name, definition.display_name, definition.category, definition.description) == \
        ("ImageBlend", "Image Blend", "image/blend", "Blends two numbers.")
    assert definition.output_node and definition.cacheable and definition.origin == "comfy_v1"
    assert definition.source == "pack.py"
    amount, mode, a, b, label = definition.inputs
    assert (amount.type, amount.default, amount.min, amount.max, amount.step, amount.tooltip, amount.optional) == \
        (FLOAT, 0.5, 0.0, 1.0, 0.01, "how much of b", False)
    assert (mode.type, tuple(mode.combo_options()), mode.default) == (COMBO, ("normal", "multiply"), "normal")
    assert a.force_input and not a.is_widget and not a.has_default
    assert (b.type, b.optional) == (INT, True)
    assert (label.type, label.multiline, label.optional) == (STRING, True, True)
    assert definition.hidden == ("PROMPT", "UNIQUE_ID", "EXTRA_PNGINFO")
    assert [(o.name, o.type) for o in definition.outputs] == [("blended", INT), ("report", STRING)]


def test_class_runs_with_hidden_inputs_and_ui_dict():
    registry = _registry(ImageBlend=ImageBlend, Number=Number)
    api = {"1": {"class_type": "Number", "inputs": {"value": 10}},
           "2": {"class_type": "Number", "inputs": {"value": 20}},
           "3": {"class_type": "ImageBlend", "inputs": {"amount": 0.25, "mode": "normal", "a": ["1", 0],
                                                        "b": ["2", 0], "label": "L"}}}
    report = _run(registry, api, extra={"extra_pnginfo": {"workflow": 1}})
    assert report.ok
    assert report.outputs["3"] == ([12], ["L:3:['1', '2', '3']:{'workflow': 1}"])
    assert report.ui["3"] == {"text": ["L:3:['1', '2', '3']:{'workflow': 1}"]}


def test_duplicate_return_types_without_names_load():
    class Pair:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("INT", "INT")
        FUNCTION = "run"
        OUTPUT_NODE = True

        def run(self):
            return (1, 2)

    registry = _registry(Pair=Pair)
    assert [o.name for o in registry.get("Pair").outputs] == ["INT", "INT"]
    assert _run(registry, {"1": {"class_type": "Pair", "inputs": {}}}).outputs["1"] == ([1], [2])


def test_is_changed_is_the_fingerprint():
    state = {"stamp": 1, "calls": 0}

    class Loader:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"name": ("STRING", {"default": "a"})}}

        RETURN_TYPES = ("STRING",)
        FUNCTION = "load"
        OUTPUT_NODE = True

        @classmethod
        def IS_CHANGED(cls, name):
            return state["stamp"] if name == "a" else float("nan")

        def load(self, name):
            state["calls"] += 1
            return (name,)

    registry = _registry(Loader=Loader)
    executor = Executor(registry)
    api = {"1": {"class_type": "Loader", "inputs": {}}}
    _run(registry, api, executor)
    _run(registry, api, executor)
    assert state["calls"] == 1  # same fingerprint: cached
    state["stamp"] = 2
    _run(registry, api, executor)
    assert state["calls"] == 2  # fingerprint changed: ran again
    nan_api = {"1": {"class_type": "Loader", "inputs": {"name": "b"}}}
    _run(registry, nan_api, executor)
    _run(registry, nan_api, executor)
    assert state["calls"] == 4  # NaN means "always changed", as in ComfyUI


def test_is_changed_without_classmethod_decorator():
    class Old:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": ("INT", {"default": 1})}}

        RETURN_TYPES = ()
        FUNCTION = "run"
        OUTPUT_NODE = True

        def IS_CHANGED(s, x):  # ComfyUI's example pack writes it like this
            return x * 10

        def run(self, x):
            return ()

    definition = adapt_class("Old", Old)
    assert definition.fingerprint(None, x=4) == 40  # fingerprints receive the resources first


def test_is_changed_may_name_only_some_inputs():
    calls = []

    class Partial:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"path": ("STRING", {"default": "a.txt"}), "mode": (["r", "rb"],)}}

        RETURN_TYPES = ()
        FUNCTION = "run"
        OUTPUT_NODE = True

        @classmethod
        def IS_CHANGED(cls, path):
            return path

        def VALIDATE_INPUTS(s, mode):  # without @classmethod: bound to None, its signature still counts
            return mode == "r" or "use mode r"

        def run(self, path, mode):
            calls.append(path)
            return ()

    registry = _registry(Partial=Partial)
    executor = Executor(registry)
    api = {"1": {"class_type": "Partial", "inputs": {"mode": "r"}}}
    _run(registry, api, executor)
    _run(registry, api, executor)
    assert calls == ["a.txt"]  # the fingerprint did not fail (which would mean "always changed")
    bad = validate({"1": {"class_type": "Partial", "inputs": {"mode": "zip"}}}, registry)
    assert [(e.code, e.message) for e in bad.errors] == [("custom_validation_failed", "use mode r")]


def test_not_idempotent_means_not_cacheable():
    calls = []

    class Noise:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("INT",)
        FUNCTION = "run"
        OUTPUT_NODE = True
        NOT_IDEMPOTENT = True

        def run(self):
            calls.append(1)
            return (len(calls),)

    registry = _registry(Noise=Noise)
    assert not registry.get("Noise").cacheable
    executor = Executor(registry)
    api = {"1": {"class_type": "Noise", "inputs": {}}}
    assert _run(registry, api, executor).outputs["1"] == ([1],)
    assert _run(registry, api, executor).outputs["1"] == ([2],)


class Checked:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": (["a.png", "b.png"],), "size": ("INT", {"default": 8, "min": 1, "max": 64}),
                             "other": ("INT", {"default": 1, "min": 1, "max": 2})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def VALIDATE_INPUTS(cls, path, size):
        if not path.endswith(".png"):
            return f"{path} is not a PNG file; choose a .png"
        return True

    def run(self, path, size, other):
        return (size,)


def test_validate_inputs_failure_is_reported_with_its_message():
    registry = _registry(Checked=Checked)
    result = validate({"1": {"class_type": "Checked", "inputs": {"path": "c.jpg"}}}, registry)
    assert [(e.code, e.node_id, e.node_type, e.message) for e in result.errors] == [
        ("custom_validation_failed", "1", "Checked", "c.jpg is not a PNG file; choose a .png")]


def test_validate_inputs_takes_over_the_checks_of_the_inputs_it_names():
    registry = _registry(Checked=Checked)
    # path and size are named by VALIDATE_INPUTS: no combo or range check (ComfyUI's rule); types still are.
    ok = validate({"1": {"class_type": "Checked", "inputs": {"path": "sub/x.png", "size": "500"}}}, registry)
    assert ok.ok and ok.graph["1"].inputs["size"] == 500
    bad = validate({"1": {"class_type": "Checked", "inputs": {"size": "big", "other": 3}}}, registry)
    assert sorted((e.code, e.input_name) for e in bad.errors) == [("invalid_input_type", "size"),
                                                                  ("required_input_missing", "path"),
                                                                  ("value_bigger_than_max", "other")]


def test_validate_inputs_with_input_types_accepts_any_linked_type():
    seen = {}

    class Anything:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"value": ("INT",)}}

        RETURN_TYPES = ()
        FUNCTION = "run"
        OUTPUT_NODE = True

        @classmethod
        def VALIDATE_INPUTS(cls, input_types, value=None):
            seen.update(input_types=input_types, value=value)
            return input_types.get("value") in ("INT", "STRING") or "link an INT or a STRING"

        def run(self, value):
            return ()

    class Text:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("STRING", "FLOAT")
        FUNCTION = "run"

        def run(self):
            return ("x", 1.0)

    registry = _registry(Anything=Anything, Text=Text)
    ok = validate({"1": {"class_type": "Text", "inputs": {}},
                   "2": {"class_type": "Anything", "inputs": {"value": ["1", 0]}}}, registry)
    assert ok.ok
    assert seen == {"input_types": {"value": "STRING"}, "value": None}
    bad = validate({"1": {"class_type": "Text", "inputs": {}},
                    "2": {"class_type": "Anything", "inputs": {"value": ["1", 1]}}}, registry)
    assert [(e.code, e.message) for e in bad.errors] == [("custom_validation_failed", "link an INT or a STRING")]


def test_input_is_list_and_output_is_list():
    class Explode:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"n": ("INT", {"default": 3})}}

        RETURN_TYPES = ("INT", "STRING")
        OUTPUT_IS_LIST = (True, False)
        FUNCTION = "run"

        def run(self, n):
            return (list(range(n)), f"{n} values")

    class Double:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": ("INT",)}}

        RETURN_TYPES = ("INT",)
        FUNCTION = "run"

        def run(self, x):
            return (x * 2,)

    class Collect:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"xs": ("INT",), "sep": ("STRING", {"default": ","})}}

        INPUT_IS_LIST = True
        RETURN_TYPES = ("STRING",)
        FUNCTION = "run"
        OUTPUT_NODE = True

        def run(self, xs, sep, ):
            return (sep[0].join(map(str, xs)),)

    registry = _registry(Explode=Explode, Double=Double, Collect=Collect)
    assert registry.get("Explode").outputs[0].is_list and not registry.get("Explode").outputs[1].is_list
    assert registry.get("Collect").input_is_list
    api = {"1": {"class_type": "Explode", "inputs": {"n": 4}},
           "2": {"class_type": "Double", "inputs": {"x": ["1", 0]}},
           "3": {"class_type": "Collect", "inputs": {"xs": ["2", 0], "sep": "-"}}}
    report = _run(registry, api)
    assert report.outputs["3"] == (["0-2-4-6"],)


def test_lazy_inputs_and_check_lazy_status():
    calls = []

    class Expensive:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"tag": ("STRING", {"default": ""})}}

        RETURN_TYPES = ("STRING",)
        FUNCTION = "run"

        def run(self, tag):
            calls.append(tag)
            return (tag,)

    class Choose:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"first": ("BOOLEAN", {"default": True}),
                                 "a": ("STRING", {"lazy": True}), "b": ("STRING", {"lazy": True})}}

        RETURN_TYPES = ("STRING",)
        FUNCTION = "run"
        OUTPUT_NODE = True

        def check_lazy_status(self, first, a=None, b=None):
            return ["a"] if first else ["b"]

        def run(self, first, a, b):
            return (a if first else b,)

    registry = _registry(Expensive=Expensive, Choose=Choose)
    assert registry.get("Choose").input("a").lazy
    api = {"1": {"class_type": "Expensive", "inputs": {"tag": "A"}},
           "2": {"class_type": "Expensive", "inputs": {"tag": "B"}},
           "3": {"class_type": "Choose", "inputs": {"first": False, "a": ["1", 0], "b": ["2", 0]}}}
    assert _run(registry, api).outputs["3"] == (["B"],)
    assert calls == ["B"]


def test_one_instance_per_node_and_run():
    instances = []

    class Stateful:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": ("INT",)}}

        RETURN_TYPES = ("INT",)
        FUNCTION = "run"
        OUTPUT_NODE = True

        def __init__(self):
            instances.append(self)
            self.seen = 0

        def run(self, x):
            self.seen += 1
            return (self.seen,)

    class Many:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ("INT",)
        OUTPUT_IS_LIST = (True,)
        FUNCTION = "run"

        def run(self):
            return ([5, 6, 7],)

    registry = _registry(Stateful=Stateful, Many=Many)
    api = {"1": {"class_type": "Many", "inputs": {}}, "2": {"class_type": "Stateful", "inputs": {"x": ["1", 0]}}}
    assert _run(registry, api).outputs["2"] == ([1, 2, 3],)
    assert len(instances) == 1


def test_seed_inputs_get_the_front_ends_control_widget():
    class Sampler:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"default": 0}), "noise_seed": ("INT", {"default": 0,
                                                                                      "control_after_generate": False}),
                                 "steps": ("INT", {"default": 20}),
                                 "variant": (["a", "b"], {"control_after_generate": True})}}

        RETURN_TYPES = ()
        FUNCTION = "run"

        def run(self, **kwargs):
            return ()

    definition = adapt_class("Sampler", Sampler)
    assert [s.control_after_generate for s in definition.inputs] == [True, False, False, True]


def test_float_default_of_int_input_is_made_whole():
    class Legacy:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"n": ("INT", {"default": 4.0})}}

        RETURN_TYPES = ()
        FUNCTION = "run"

        def run(self, n):
            return ()

    default = adapt_class("Legacy", Legacy).input("n").default
    assert default == 4 and isinstance(default, int)


@pytest.mark.parametrize("attrs, words", [
    ({"FUNCTION": "missing"}, ["FUNCTION must name a method", "'missing'"]),
    ({"RETURN_TYPES": "INT"}, ["RETURN_TYPES must be a tuple"]),
    ({"RETURN_TYPES": (3,)}, ["RETURN_TYPES[0] is not a type name"]),
])
def test_bad_classes_are_refused_with_a_reason(attrs, words):
    cls = type("Broken", (Number,), attrs)
    with pytest.raises(NodeDefinitionError) as info:
        adapt_class("Broken", cls, source="broken.py")
    assert "broken.py: class Broken (node 'Broken')" in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_input_types_that_raise_or_lie():
    class Raises(Number):
        @classmethod
        def INPUT_TYPES(cls):
            raise RuntimeError("no model folder")

    class BadEntry(Number):
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": "INT"}}

    with pytest.raises(NodeDefinitionError, match="INPUT_TYPES\\(\\) failed: RuntimeError: no model folder"):
        adapt_class("Raises", Raises)
    with pytest.raises(NodeDefinitionError, match="input 'x' must be a tuple"):
        adapt_class("BadEntry", BadEntry)


def test_a_wrong_return_value_fails_the_node_not_the_run():
    class Bare(Number):
        OUTPUT_NODE = True

        def run(self, value):
            return value  # not a tuple

    registry = _registry(Bare=Bare)
    report = _run(registry, {"1": {"class_type": "Bare", "inputs": {"value": 3}}})
    assert report.status == "failed"
    assert report.error.node_id == "1"
    assert "must return a tuple of 1 values" in report.error.message


def test_live_combo_options_follow_input_types():
    files = ["a.safetensors"]

    class Loader(Number):
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"name": (list(files),)}}

    definition = adapt_class("Loader", Loader)
    files.append("b.safetensors")
    assert tuple(definition.input("name").combo_options()) == ("a.safetensors", "b.safetensors")
    assert math.isclose(len(files), 2)
