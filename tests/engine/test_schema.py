"""/object_info: node descriptions derived from the declarations, in ComfyUI's shape."""

from __future__ import annotations

import json

from engine import FLOAT, INT, Input, Output, node
from engine.comfy_v1 import adapt_class
from engine.schema import input_info, node_info, object_info


def test_native_node_info(registry):
    info = node_info(registry.get("Concat"))
    assert info == {
        "input": {"required": {"left": ["STRING", {"default": ""}],
                               "right": ["STRING", {"default": "", "multiline": True}],
                               "upper": ["BOOLEAN", {"default": False}]}},
        "input_order": {"required": ["left", "right", "upper"]},
        "output": ["STRING"], "output_is_list": [False], "output_name": ["text"], "output_tooltips": [""],
        "name": "Concat", "display_name": "Concat", "description": "", "python_module": "toy_nodes",
        "category": "toy", "output_node": False, "aliases": [],
    }


def test_combos_optional_lists_and_output_nodes(registry):
    assert node_info(registry.get("Format"))["input"]["required"]["style"] == [["plain", "hex"], {"default": "plain"}]
    assert node_info(registry.get("Range"))["output_is_list"] == [True]
    assert node_info(registry.get("Show"))["output_node"] is True
    assert node_info(registry.get("Switch"))["input"]["required"]["a"] == ["INT", {"lazy": True}]
    assert input_info(Input("x", FLOAT, default=0.5, min=0, max=1, step=0.1, tooltip="t")) == \
        ["FLOAT", {"default": 0.5, "min": 0, "max": 1, "step": 0.1, "tooltip": "t"}]
    assert input_info(Input("image", "IMAGE")) == ["IMAGE"]
    assert input_info(Input("n", INT, force_input=True)) == ["INT", {"forceInput": True}]
    assert input_info(Input("files", "COMBO", options=lambda res: res), ["a", "b"]) == [["a", "b"], {}]

    @node("Opt", inputs=[Input("a", INT, default=1), Input("b", INT, optional=True)], outputs=[Output("o", INT)])
    def opt(ctx, a, b=None):
        return a

    info = node_info(opt)
    assert info["input"] == {"required": {"a": ["INT", {"default": 1}]}, "optional": {"b": ["INT"]}}
    assert info["input_order"] == {"required": ["a"], "optional": ["b"]}


def test_seed_control_flag_is_explicit_either_way():
    assert input_info(Input("seed", INT, default=0, control_after_generate=True)) == \
        ["INT", {"default": 0, "control_after_generate": True}]
    # without the flag the front end would still add a control widget to an INT named seed: say so
    assert input_info(Input("seed", INT, default=0)) == ["INT", {"default": 0, "control_after_generate": False}]
    assert input_info(Input("count", INT, default=0)) == ["INT", {"default": 0}]


def test_v1_node_info_matches_what_comfyui_reports():
    class Blur:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"image": ("IMAGE",), "radius": ("INT", {"default": 1, "min": 1, "max": 31,
                                                                         "display": "slider"})},
                    "hidden": {"unique_id": "UNIQUE_ID"}}

        RETURN_TYPES = ("IMAGE",)
        RETURN_NAMES = ("blurred",)
        FUNCTION = "run"
        CATEGORY = "image/filters"

        def run(self, image, radius, unique_id=None):
            return (image,)

    info = node_info(adapt_class("Blur", Blur, display_name="Blur It", source="custom_nodes.blur.nodes"))
    assert info["input"] == {"required": {"image": ["IMAGE"],
                                          "radius": ["INT", {"default": 1, "min": 1, "max": 31, "display": "slider"}]},
                             "hidden": {"unique_id": "UNIQUE_ID"}}
    assert (info["display_name"], info["category"], info["output_name"], info["python_module"]) == \
        ("Blur It", "image/filters", ["blurred"], "custom_nodes.blur")


def test_python_module_names_packs_as_comfyui_does():
    from dataclasses import replace

    from engine.schema import python_module

    class Pack:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        RETURN_TYPES = ()
        FUNCTION = "run"

        def run(self):
            return ()

    assert python_module(adapt_class("A", Pack, source="/x/custom_nodes/blur/__init__.py")) == "custom_nodes.blur"
    assert python_module(adapt_class("A", Pack, source="/x/custom_nodes/single.py")) == "custom_nodes.single"

    @node("N", outputs=[])
    def native(ctx):
        return None

    assert python_module(replace(native, fn=type("F", (), {"__module__": "sdgraph_packs.example",
                                                           "__call__": lambda self: None})())) == \
        "custom_nodes.example"


def test_object_info_covers_the_registry_and_is_json(registry):
    everything = object_info(registry)
    assert sorted(everything) == sorted(d.name for d in registry)
    assert json.loads(json.dumps(everything)) == everything
