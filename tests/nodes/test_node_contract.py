"""One contract for every registered node (issue #11): the built-in nodes and the example pack go through the same
declaration check as registration (the Input list against the function's parameters), and every node that makes
an IMAGE, LATENT or MASK declares a size rule that gives a size for ordinary inputs."""

from __future__ import annotations

import pytest

from engine.sizes import Size
from engine.spec import PRIMITIVE_TYPES, accepted_kwargs, check_definition
from nodes import build_registry

from .conftest import ROOT

SIZED_TYPES = {"IMAGE", "LATENT", "MASK"}
REGISTRY = build_registry(pack_dirs=[ROOT / "custom_nodes"], entry_points=False)
DEFINITIONS = sorted(REGISTRY, key=lambda d: d.name)


def test_the_registry_loads_without_errors_and_has_the_example_pack():
    assert REGISTRY.load_errors == []
    assert {"KSampler", "ImageScaleBy", "ExampleRepeatText", "ExampleClamp"} <= {d.name for d in DEFINITIONS}


@pytest.mark.parametrize("definition", DEFINITIONS, ids=lambda d: d.name)
def test_every_declaration_passes_the_registration_check(definition):
    check_definition(definition, REGISTRY.known_types)


@pytest.mark.parametrize("definition", [d for d in DEFINITIONS if d.source.startswith("nodes.")
                                        and any(o.type in SIZED_TYPES for o in d.outputs)], ids=lambda d: d.name)
def test_every_built_in_node_making_images_has_a_size_rule(definition):
    assert definition.size_rule is not None, f"{definition.name} makes images but declares no size_rule"
    values = {spec.name: Size(2, 64, 96) for spec in definition.inputs if spec.type in SIZED_TYPES}
    values.update({spec.name: spec.default for spec in definition.inputs
                   if spec.type in PRIMITIVE_TYPES and spec.has_default})
    if definition.name.startswith("LoadImage"):
        values.update(image="missing.png", resources=None)  # no folders: the size is unknown
        assert definition.size_rule(**accepted_kwargs(definition.size_rule, values)) is None
        return
    size = definition.size_rule(**accepted_kwargs(definition.size_rule, values))
    assert isinstance(size, Size) and size.batch >= 1 and size.height > 0 and size.width > 0
