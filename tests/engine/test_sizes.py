"""Size rules (issue #11, pixel budget bypass): validation propagates the sizes nodes declare and refuses any
image, latent or mask over the limits before anything runs, naming the node."""

from __future__ import annotations

import json

import pytest

from engine import FLOAT, INT, Input, NodeDefinitionError, NodeRegistry, Output, node, validate
from engine.sizes import MEGAPIXEL, Size, SizeLimits


def _blank_size(width, height, batch):
    return Size(batch, height, width)


def _scaled_size(image, factor):
    return Size(image.batch, round(image.height * factor), round(image.width * factor))


def _same(image):
    return image


@node("Blank", size_rule=_blank_size, outputs=[Output("image", "PIC")],
      inputs=[Input("width", INT, default=64, min=1, max=16384), Input("height", INT, default=64, min=1, max=16384),
              Input("batch", INT, default=1, min=1, max=4096)])
def blank(ctx, width, height, batch):
    return (batch, height, width)


@node("Scale", size_rule=_scaled_size, outputs=[Output("image", "PIC")],
      inputs=[Input("image", "PIC"), Input("factor", FLOAT, default=2.0, min=0.01, max=8.0)])
def scale(ctx, image, factor):
    return image


@node("Opaque", outputs=[Output("image", "PIC")], inputs=[Input("image", "PIC")])
def opaque(ctx, image):
    """No size rule: what it makes has an unknown size."""
    return image


@node("Pair", size_rule=lambda image: (image, None), inputs=[Input("image", "PIC")],
      outputs=[Output("image", "PIC"), Output("factor", FLOAT)])
def pair(ctx, image):
    return image, 8.0


@node("Broken", size_rule=lambda image: image.depth, inputs=[Input("image", "PIC")], outputs=[Output("image", "PIC")])
def broken(ctx, image):
    return image


@node("Keep", output_node=True, inputs=[Input("image", "PIC")], outputs=[])
def keep(ctx, image):
    return None


@pytest.fixture
def reg() -> NodeRegistry:
    registry = NodeRegistry()
    registry.register_type("PIC")
    for definition in (blank, scale, opaque, pair, broken, keep):
        registry.register(definition)
    return registry


def _chain(*steps, start=None):
    """Blank -> each step (class_type, inputs) fed by the previous node -> Keep."""
    api = {"1": {"class_type": "Blank", "inputs": start or {"width": 16384, "height": 16384}}}
    for i, (class_type, inputs) in enumerate(steps, start=2):
        api[str(i)] = {"class_type": class_type, "inputs": {"image": [str(i - 1), 0], **inputs}}
    api["99"] = {"class_type": "Keep", "inputs": {"image": [str(len(steps) + 1), 0]}}
    return api


def test_a_chain_to_131072_pixels_a_side_is_refused_naming_the_first_node_over_the_limit(reg):
    api = _chain(("Scale", {"factor": 8.0}), ("Scale", {"factor": 8.0}), start={"width": 2048, "height": 2048})
    limits = SizeLimits(image_pixels=131072 * 131072, batch_pixels=131072 * 131072)
    assert validate(api, reg, sizes=limits).ok  # 131072 x 131072 under an absurd limit
    result = validate(api, reg)  # the defaults: 16 megapixels an image, 64 a batch
    (error,) = result.errors  # node 2 (16384 x 16384) is refused; node 3 is not reported again
    assert (error.code, error.node_id, error.node_type) == ("image_too_large", "2", "Scale")
    assert "1 x 16384x16384 pixels: 256 megapixels per image, more than the limit of 16" in error.message
    assert error.extra["width"] == 16384 and error.extra["max_image_pixels"] == 16 * MEGAPIXEL


def test_the_batch_limit_counts_every_item(reg):
    api = _chain(("Scale", {"factor": 1.0}), start={"width": 2048, "height": 2048, "batch": 16})
    assert validate(api, reg).ok  # 16 x 4 megapixels = 64: at the limit
    api["1"]["inputs"]["batch"] = 17
    (error,) = validate(api, reg).errors
    assert (error.node_id, error.code) == ("1", "image_too_large")
    assert "68 megapixels in the batch, more than the limit of 64" in error.message
    api["1"]["inputs"]["batch"] = 15
    result = validate(api, reg, sizes=SizeLimits.megapixels(16, 32))
    assert [(e.node_id, e.code) for e in result.errors] == [("1", "image_too_large")]


def test_4096_square_is_exactly_16_megapixels(reg):
    assert validate(_chain(start={"width": 4096, "height": 4096}), reg).ok
    assert not validate(_chain(start={"width": 4096, "height": 4104}), reg).ok


def test_unknown_sizes_stay_unknown_downstream(reg):
    api = _chain(("Opaque", {}), ("Scale", {"factor": 8.0}), ("Scale", {"factor": 8.0}),
                 start={"width": 64, "height": 64})
    assert validate(api, reg).ok  # nothing known after Opaque: not checked


def test_a_linked_number_leaves_the_size_unknown(reg):
    api = _chain(("Scale", {"factor": 8.0}), start={"width": 4096, "height": 4096})
    api["2"]["inputs"]["factor"] = ["5", 1]
    api["5"] = {"class_type": "Pair", "inputs": {"image": ["1", 0]}}
    assert validate(api, reg).ok


def test_a_tuple_gives_one_size_per_output(reg):
    api = _chain(("Pair", {}), ("Scale", {"factor": 8.0}), start={"width": 1024, "height": 1024})
    (error,) = validate(api, reg).errors
    assert error.node_id == "3" and "1 x 8192x8192" in error.message


def test_a_size_rule_that_fails_is_an_error_naming_the_node(reg):
    api = _chain(("Broken", {}), start={"width": 64, "height": 64})
    (error,) = validate(api, reg).errors
    assert (error.code, error.node_id) == ("size_rule_failed", "2")
    assert "AttributeError" in error.message


def test_a_size_rule_naming_an_input_that_does_not_exist_is_refused_at_declaration():
    with pytest.raises(NodeDefinitionError, match=r"'Typo'.*size rule takes 'imag'"):
        @node("Typo", size_rule=lambda imag: imag, inputs=[Input("image", "PIC")], outputs=[Output("image", "PIC")])
        def typo(ctx, image):
            return image


def test_a_size_rule_may_read_the_resources(reg):
    def from_resources(name, resources):
        return Size(1, *resources[name])

    @node("FromFile", size_rule=from_resources, inputs=[Input("name", "STRING")], outputs=[Output("image", "PIC")])
    def from_file(ctx, name):
        return name

    reg.register(from_file)
    api = {"1": {"class_type": "FromFile", "inputs": {"name": "big"}},
           "2": {"class_type": "Keep", "inputs": {"image": ["1", 0]}}}
    assert validate(api, reg, resources={"big": (100, 100)}).ok
    (error,) = validate(api, reg, resources={"big": (5000, 5000)}).errors
    assert error.node_id == "1" and error.code == "image_too_large"


def test_the_limits_as_command_line_flags():
    import argparse

    from engine.sizes import add_size_arguments, size_limits_from

    parser = argparse.ArgumentParser()
    add_size_arguments(parser)
    assert size_limits_from(parser.parse_args([])) == SizeLimits()
    args = parser.parse_args(["--max-image-megapixels", "4", "--max-batch-megapixels", "8.5"])
    assert size_limits_from(args) == SizeLimits(4 * MEGAPIXEL, int(8.5 * MEGAPIXEL))
    assert size_limits_from(argparse.Namespace()) == SizeLimits()  # a command without the flags
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-image-megapixels", "0"])


def test_an_explicit_constant_for_an_image_input_is_an_unknown_size(reg):
    api = _chain(("Scale", {"factor": 8.0}), start={"width": 64, "height": 64})
    api["2"]["inputs"]["image"] = {"__value__": [1, 2, 3]}
    assert validate(api, reg).ok  # not handed to the rule as if it were a Size


def test_absurd_sizes_are_refused_with_a_readable_message(reg):
    @node("Absurd", size_rule=lambda: Size(1, 10**5000, 10**5000), outputs=[Output("image", "PIC")])
    def absurd(ctx):
        return None

    @node("Garbage", size_rule=lambda: list(range(10**6)), outputs=[Output("image", "PIC")])
    def garbage(ctx):
        return None

    reg.register(absurd)
    reg.register(garbage)
    api = {"1": {"class_type": "Absurd", "inputs": {}}, "2": {"class_type": "Keep", "inputs": {"image": ["1", 0]}},
           "3": {"class_type": "Garbage", "inputs": {}}, "4": {"class_type": "Keep", "inputs": {"image": ["3", 0]}}}
    big, bad = validate(api, reg).errors
    assert big.code == "image_too_large" and "1 x about 2^16609x" in big.message
    assert bad.code == "size_rule_failed" and len(bad.message) < 300
    assert len(json.dumps([e.as_dict() for e in (big, bad)])) < 2000  # no number too long to write


@node("Canvas", outputs=[Output("image", "PIC")],
      inputs=[Input("width", INT, default=64), Input("height", INT, default=64), Input("batch_size", INT, default=1)])
def canvas(ctx, width, height, batch_size):
    """No size rule, but whole-number width/height/batch_size constants, as most packs' generators have."""
    return (batch_size, height, width)


def test_a_node_without_a_rule_makes_the_size_its_width_and_height_ask_for(reg):
    reg.register(canvas)
    api = {"1": {"class_type": "Canvas", "inputs": {"width": 4096, "height": 4096, "batch_size": 4}},
           "2": {"class_type": "Scale", "inputs": {"image": ["1", 0], "factor": 2.0}},
           "3": {"class_type": "Keep", "inputs": {"image": ["1", 0]}}}
    assert validate({k: v for k, v in api.items() if k != "2"}, reg).ok  # 4 x 16 megapixels: at both limits
    (error,) = validate(api | {"3": {"class_type": "Keep", "inputs": {"image": ["2", 0]}}}, reg).errors
    assert (error.node_id, error.code) == ("2", "image_too_large")  # the inferred size propagates downstream
    api["1"]["inputs"]["batch_size"] = 5
    (error,) = validate(api, reg).errors
    assert (error.node_id, error.code) == ("1", "image_too_large") and "80 megapixels in the batch" in error.message
