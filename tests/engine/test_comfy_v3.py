"""V3 nodes (`comfy_api.latest.io`) load natively into the typed registry (issue #18, "V3 nodes"): from
NODE_CLASS_MAPPINGS and from `comfy_entrypoint()`, with typed inputs, hidden values, fingerprints, lazy checks,
and a clear refusal for dynamic inputs. Toy packs only; no torch."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from comfy_compat import PackEnvironment
from engine import Executor, NodeRegistry, validate
from engine.discovery import load_pack_dir

V3_PACK = '''
from comfy_api.latest import ComfyExtension, io


class Scale(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ToyScale", display_name="Scale a number", category="toy/v3",
            inputs=[io.Int.Input("x", default=2, min=0, max=100),
                    io.Float.Input("factor", default=1.5, optional=True),
                    io.Combo.Input("mode", options=["floor", "round"], default="round")],
            outputs=[io.Int.Output(display_name="scaled"), io.String.Output(display_name="said")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, x, mode, factor=1.5):
        value = x * factor
        value = int(value // 1) if mode == "floor" else int(round(value))
        return io.NodeOutput(value, f"{cls.hidden.unique_id}:{value}", ui={"text": [str(value)]})

    @classmethod
    def fingerprint_inputs(cls, x, **kwargs):
        return f"fp{x}"


class Lazy(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="ToyLazyPick", inputs=[
            io.Boolean.Input("use_a", default=True),
            io.Int.Input("a", lazy=True, force_input=True), io.Int.Input("b", lazy=True, force_input=True)],
            outputs=[io.Int.Output()])

    @classmethod
    def check_lazy_status(cls, use_a, a=None, b=None):
        return ["a"] if use_a and a is None else (["b"] if not use_a and b is None else [])

    @classmethod
    async def execute(cls, use_a, a=None, b=None):
        return io.NodeOutput(a if use_a else b)


class Dynamic(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="ToyDynamic", inputs=[
            io.DynamicCombo.Input("choice", options=[io.DynamicCombo.Option("one", [])])],
            outputs=[io.Int.Output()])

    @classmethod
    def execute(cls, choice):
        return io.NodeOutput(1)


class FromEntry(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="ToyFromEntry", inputs=[io.String.Input("text", multiline=True)],
                         outputs=[io.String.Output(), io.Tracks.Output()])

    @classmethod
    def execute(cls, text):
        return io.NodeOutput(text.upper(), [])


NODE_CLASS_MAPPINGS = {"ToyScale": Scale, "ToyLazyPick": Lazy, "ToyDynamic": Dynamic}


class Extension(ComfyExtension):
    async def get_node_list(self):
        return [FromEntry]


async def comfy_entrypoint():
    return Extension()
'''


@pytest.fixture
def registry(tmp_path: Path) -> NodeRegistry:
    (tmp_path / "v3pack").mkdir()
    (tmp_path / "v3pack" / "__init__.py").write_text(textwrap.dedent(V3_PACK))
    registry = NodeRegistry()
    assert load_pack_dir(registry, tmp_path, environment=PackEnvironment()) == ["v3pack"]
    return registry


def test_v3_schema_becomes_typed_definition(registry):
    scale = registry.get("ToyScale")
    assert scale is not None and scale.origin == "comfy_v3"
    assert scale.display_name == "Scale a number" and scale.category == "toy/v3"
    x, factor, mode = scale.inputs
    assert (x.name, x.type, x.default, x.min, x.max, x.optional) == ("x", "INT", 2, 0, 100, False)
    assert factor.optional and factor.type == "FLOAT"
    assert mode.type == "COMBO" and tuple(mode.combo_options()) == ("floor", "round")
    assert [(o.name, o.type) for o in scale.outputs] == [("scaled", "INT"), ("said", "STRING")]
    assert scale.hidden == ("UNIQUE_ID",)
    # a type io does not list by name is ComfyUI's UPPER_SNAKE name, declared with the node
    assert [o.type for o in registry.get("ToyFromEntry").outputs] == ["STRING", "TRACKS"]
    assert "TRACKS" in registry.known_types


def test_v3_node_runs_with_hidden_values_and_ui(registry):
    prompt = {"7": {"class_type": "ToyScale", "inputs": {"x": 3, "mode": "floor"}}}
    graph = validate(prompt, registry, targets=["7"]).graph
    report = Executor(registry).run(graph)
    assert report.status == "success", report
    assert report.outputs["7"] == ([4], ["7:4"])  # 3 * 1.5 = 4.5 floored; cls.hidden.unique_id is the node id


def test_entrypoint_nodes_register(registry):
    prompt = {"1": {"class_type": "ToyFromEntry", "inputs": {"text": "abc"}}}
    report = Executor(registry).run(validate(prompt, registry, targets=["1"]).graph)
    assert report.outputs["1"][0] == ["ABC"]


def test_v3_lazy_inputs_and_async_execute(registry):
    prompt = {"1": {"class_type": "ToyScale", "inputs": {"x": 2, "mode": "round"}},
              "2": {"class_type": "ToyScale", "inputs": {"x": 10, "mode": "round"}},
              "3": {"class_type": "ToyLazyPick", "inputs": {"use_a": False, "a": ["1", 0], "b": ["2", 0]}}}
    report = Executor(registry).run(validate(prompt, registry, targets=["3"]).graph)
    assert report.outputs["3"] == ([15],)
    assert "1" not in report.executed  # the lazy input nobody asked for never ran


def test_v3_fingerprint_is_the_nodes(registry):
    fingerprint = registry.get("ToyScale").fingerprint
    assert fingerprint(None, x=5, mode="round") == "fp5"


def test_dynamic_inputs_are_refused_with_the_reason(registry):
    assert registry.get("ToyDynamic") is None
    reasons = [e.reason for e in registry.load_errors]
    assert any("ToyDynamic" in r and "input 'choice' uses io.DynamicCombo" in r for r in reasons), reasons
