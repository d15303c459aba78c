"""The registry: lookups, aliases, types, and the checks made when a definition registers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine import INT, Input, LoadError, NodeDefinitionError, NodeRegistry, Output, node
from engine.spec import PRIMITIVE_TYPES

ONE_OUTPUT = (Output("v", INT),)


def _make(name: str, *, inputs=(), outputs=ONE_OUTPUT, aliases=(), source: str | None = None):
    @node(name, inputs=list(inputs), outputs=list(outputs), aliases=aliases)
    def fn(ctx, **kwargs):
        return 0

    return replace(fn, source=source) if source is not None else fn


def test_lookup_by_name_and_alias():
    registry = NodeRegistry()
    loader = _make("CheckpointLoaderSimple", aliases=("LoadCheckpoint",))
    registry.register(loader)
    assert registry.get("CheckpointLoaderSimple") is loader
    assert registry.get("LoadCheckpoint") is loader
    assert registry.canonical_name("LoadCheckpoint") == "CheckpointLoaderSimple"
    assert registry.canonical_name("Other") == "Other"
    assert "LoadCheckpoint" in registry and "Other" not in registry and 3 not in registry
    assert registry.get("Other") is None
    assert list(registry) == [loader] and len(registry) == 1
    assert registry.aliases == {"LoadCheckpoint": "CheckpointLoaderSimple"}


def test_primitive_and_any_types_are_known_from_the_start():
    assert NodeRegistry().known_types == PRIMITIVE_TYPES | {"*"}


def test_unknown_type_is_refused_until_registered():
    registry = NodeRegistry()
    definition = _make("Blur", inputs=[Input("image", "IMAGE")], outputs=[Output("image", "IMAGE")])
    with pytest.raises(NodeDefinitionError, match="input 'image' has unknown type 'IMAGE'; register the type"):
        registry.register(definition)
    assert "Blur" not in registry
    registry.register_type("IMAGE", description="pixels")
    registry.register(definition)
    assert registry.type_info("IMAGE").description == "pixels"


def test_declare_types_registers_what_a_v1_node_uses():
    registry = NodeRegistry()
    definition = _make("Mix", inputs=[Input("a", "LATENT,IMAGE")], outputs=[Output("m", "MASK")])
    registry.register(definition, declare_types=True)
    assert {"LATENT", "IMAGE", "MASK"} <= registry.known_types


def test_duplicate_name_names_both_sources():
    registry = NodeRegistry()
    registry.register(_make("Add", source="packs/first/__init__.py:add"))
    with pytest.raises(NodeDefinitionError) as info:
        registry.register(_make("Add", source="packs/second/nodes.py:add"))
    message = str(info.value)
    assert "'Add' is defined twice" in message
    assert "packs/first/__init__.py:add" in message and "packs/second/nodes.py:add" in message
    assert registry.get("Add").source == "packs/first/__init__.py:add"


def test_alias_may_not_shadow_a_name_and_a_name_may_not_shadow_an_alias():
    registry = NodeRegistry()
    registry.register(_make("Add", aliases=("Plus",), source="a"))
    with pytest.raises(NodeDefinitionError, match="'Add' is defined twice: by a and by b"):
        registry.register(_make("Sum", aliases=("Add",), source="b"))
    with pytest.raises(NodeDefinitionError, match="'Plus' is defined twice: by a and by c"):
        registry.register(_make("Plus", source="c"))
    assert "Sum" not in registry


def test_register_all_records_errors_and_keeps_going():
    registry = NodeRegistry()
    good = _make("Good")
    bad_type = _make("BadType", inputs=[Input("x", "NOPE")])
    added = registry.register_all([bad_type, good, "not a node", _make("Good")], pack="mixed", file="mixed.py")
    assert added == 1
    assert "Good" in registry and "BadType" not in registry
    assert [e.pack for e in registry.load_errors] == ["mixed", "mixed", "mixed"]
    reasons = [e.reason for e in registry.load_errors]
    assert "unknown type 'NOPE'" in reasons[0]
    assert "not a node definition" in reasons[1]
    assert "'Good' is defined twice" in reasons[2]
    assert registry.load_errors[0].as_dict() == {"pack": "mixed", "file": "mixed.py", "reason": reasons[0]}


def test_type_adapters_may_not_conflict():
    registry = NodeRegistry()

    def first(value):
        return value

    def second(value):
        return value

    registry.register_type("LATENT", adapt=first, source="core")
    registry.register_type("LATENT", description="again, without an adapter")  # keeps the adapter
    assert registry.type_info("LATENT").adapt is first
    registry.register_type("LATENT", adapt=first, source="core")  # the same adapter again is fine
    with pytest.raises(NodeDefinitionError, match="'LATENT' is registered twice with different adapters "
                                                  r"\(core and pack\)"):
        registry.register_type("LATENT", adapt=second, source="pack")


def test_load_error_is_a_value():
    assert LoadError("p", "f", "r") == LoadError("p", "f", "r")
