"""Loading node packs from folders and entry points: a broken pack never stops the others."""

from __future__ import annotations

import textwrap
import types
from pathlib import Path

import pytest

from engine import NodeRegistry, discovery
from engine.discovery import load_entry_points, load_pack_dir, load_packs, register_module

NATIVE_PACK = '''
from engine import INT, Input, Output, node

TYPES = {"WIDGET": "a thing only this pack knows"}

@node("Triple", category="good", inputs=[Input("x", INT, default=1)], outputs=[Output("x3", INT)])
def triple(ctx, x):
    return 3 * x

@node("MakeWidget", category="good", inputs=[], outputs=[Output("w", "WIDGET")])
def make_widget(ctx):
    return object()
'''

V1_INIT = '''
from .nodes import Negate

NODE_CLASS_MAPPINGS = {"Negate": Negate}
NODE_DISPLAY_NAME_MAPPINGS = {"Negate": "Negate a number"}
'''

V1_NODES = '''
class Negate:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"default": 0})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "v1"
    def run(self, x):
        return (-x,)
'''

HALF_GOOD = '''
from engine import INT, Input, Output, node

@node("Fine", inputs=[Input("x", INT, default=1)], outputs=[Output("x", INT)])
def fine(ctx, x):
    return x

@node("NeedsType", inputs=[Input("x", "UNDECLARED")], outputs=[Output("x", INT)])
def needs_type(ctx, x):
    return x

class NoFunction:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}
    RETURN_TYPES = ()

NODE_CLASS_MAPPINGS = {"NoFunction": NoFunction}
'''


def _write(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def packs(tmp_path) -> Path:
    return _write(tmp_path / "custom_nodes", {
        "good_native.py": NATIVE_PACK,
        "v1pack/__init__.py": V1_INIT,
        "v1pack/nodes.py": V1_NODES,
        "broken_import/__init__.py": "import comfy.model_management\n",
        "syntax_error.py": "def oops(:\n",
        "exits.py": "import sys\nsys.exit(3)\n",
        "half_good.py": HALF_GOOD,
        "dup_of_triple.py": NATIVE_PACK.replace('TYPES = {"WIDGET": "a thing only this pack knows"}', ""),
        "skipped.disabled/__init__.py": "raise RuntimeError('must not be imported')\n",
        "_private.py": "raise RuntimeError('must not be imported')\n",
        "not_a_pack/readme.txt": "data",
    })


def test_good_packs_load_beside_broken_ones(packs):
    registry = NodeRegistry()
    loaded = load_pack_dir(registry, packs)
    # packs import in name order; a pack that fails to import is not "loaded"
    assert loaded == ["dup_of_triple", "good_native", "half_good", "v1pack"]
    assert {"Triple", "MakeWidget", "Negate", "Fine"} <= {d.name for d in registry}
    assert registry.get("Negate").display_name == "Negate a number"
    assert registry.get("Negate").category == "v1"
    assert "WIDGET" in registry.known_types
    errors = {(e.pack, Path(e.file).name): e.reason for e in registry.load_errors}
    assert set(errors) == {("broken_import", "__init__.py"), ("syntax_error", "syntax_error.py"),
                           ("exits", "exits.py"), ("half_good", "half_good.py"),
                           ("good_native", "good_native.py"), ("dup_of_triple", "dup_of_triple.py")}
    assert errors[("broken_import", "__init__.py")].startswith("ModuleNotFoundError: No module named 'comfy'")
    assert "SyntaxError" in errors[("syntax_error", "syntax_error.py")]
    assert errors[("exits", "exits.py")].startswith("SystemExit: 3")
    # dup_of_triple loaded first (name order) and declares no WIDGET type: its MakeWidget fails, Triple loads
    assert registry.get("Triple").source.startswith("sdgraph_packs.dup_of_triple")
    assert "'Triple' is defined twice" in errors[("good_native", "good_native.py")]
    assert "sdgraph_packs.dup_of_triple" in errors[("good_native", "good_native.py")]
    assert "sdgraph_packs.good_native" in errors[("good_native", "good_native.py")]


def test_every_problem_in_a_pack_is_listed(packs):
    registry = NodeRegistry()
    load_pack_dir(registry, packs)
    half = [e.reason for e in registry.load_errors if e.pack == "half_good"]
    assert len(half) == 2
    assert any("input 'x' has unknown type 'UNDECLARED'" in reason for reason in half)
    assert any("class NoFunction" in reason and "FUNCTION must name a method" in reason for reason in half)
    dup = [e.reason for e in registry.load_errors if e.pack == "dup_of_triple"]
    assert len(dup) == 1 and "unknown type 'WIDGET'" in dup[0]


def test_loaded_packs_run(packs):
    from engine import Executor, validate
    registry = NodeRegistry()
    load_pack_dir(registry, packs)
    api = {"1": {"class_type": "Triple", "inputs": {"x": 5}}, "2": {"class_type": "Negate", "inputs": {"x": ["1", 0]}}}
    result = validate(api, registry, targets=["2"])
    assert result.ok, result.errors
    assert Executor(registry).run(result.graph).outputs["2"] == ([-15],)


def test_missing_folder_loads_nothing(tmp_path):
    registry = NodeRegistry()
    assert load_pack_dir(registry, tmp_path / "nope") == []
    assert not registry.load_errors


def test_module_problems_are_recorded_not_raised():
    registry = NodeRegistry()
    module = types.ModuleType("odd")
    module.__file__ = "odd.py"
    module.NODES = "Triple"
    module.TYPES = ["A"]
    module.NODE_CLASS_MAPPINGS = {"NotAClass": 42}
    assert register_module(registry, module, pack="odd") == 0
    reasons = [e.reason for e in registry.load_errors]
    assert any("TYPES must map type names to descriptions" in r for r in reasons)
    assert any("NODES must be a list of node definitions, got str" in r for r in reasons)
    assert any("'NotAClass'" in r for r in reasons)
    assert len(reasons) == 3


class _EntryPoint:
    def __init__(self, name, value, target):
        self.name, self.value, self._target = name, value, target

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


def test_entry_point_packs(monkeypatch):
    good = types.ModuleType("ep_good")
    good.__file__ = "ep_good.py"
    exec(NATIVE_PACK, good.__dict__)
    points = [_EntryPoint("good", "ep_good", good), _EntryPoint("broken", "ep_broken", ImportError("no torch here")),
              _EntryPoint("notmodule", "ep_mod:thing", 42)]
    seen_groups = []

    def fake_entry_points(*, group):
        seen_groups.append(group)
        return points

    monkeypatch.setattr(discovery.importlib.metadata, "entry_points", fake_entry_points)
    registry = NodeRegistry()
    assert load_entry_points(registry) == ["good"]
    assert seen_groups == ["sdgraph.nodes"]
    assert "Triple" in registry
    assert [(e.pack, e.file) for e in registry.load_errors] == [("broken", "ep_broken"), ("notmodule", "ep_mod:thing")]
    assert registry.load_errors[0].reason.startswith("ImportError: no torch here (at ")
    assert registry.load_errors[1].reason == "the entry point must name a module"


def test_load_packs_reads_every_folder_then_entry_points(tmp_path, monkeypatch):
    first = _write(tmp_path / "a", {"one.py": NATIVE_PACK})
    second = _write(tmp_path / "b", {"two/__init__.py": V1_INIT, "two/nodes.py": V1_NODES})
    monkeypatch.setattr(discovery.importlib.metadata, "entry_points", lambda *, group: [])
    registry = NodeRegistry()
    assert load_packs(registry, [first, second]) == ["one", "two"]
    assert {"Triple", "Negate"} <= {d.name for d in registry}


# -- the shipped example pack and the tutorial ----------------------------------------------------------------

REPO = Path(__file__).parents[2]


class _Folders:
    """The part of sdgraph's Folders the example pack uses: the input folder and its resolver."""

    def __init__(self, root: Path):
        self.input = root

    def inside(self, kind: str, name: str, *, what: str = "file name") -> Path:
        assert kind == "input"
        path = (self.input / name).resolve()
        if self.input.resolve() not in path.parents:
            raise ValueError(f"{what} {name!r} points outside the input/ folder")
        return path


class _Resources:
    def __init__(self, root: Path):
        self.folders = _Folders(root)


@pytest.fixture
def example_registry() -> NodeRegistry:
    registry = NodeRegistry()
    assert load_pack_dir(registry, REPO / "custom_nodes") == ["example"]
    assert registry.load_errors == []
    return registry


def test_example_pack_loads_and_runs(example_registry, tmp_path):
    from engine import Executor, validate
    (tmp_path / "poem.txt").write_text("roses are red")
    resources = _Resources(tmp_path)
    assert {d.name for d in example_registry} == {"ExampleRepeatText", "ExampleWordCount", "ExampleShowText",
                                                  "ExampleCountdown", "ExampleLoadText", "ExampleClamp"}
    api = {"1": {"class_type": "ExampleLoadText", "inputs": {"name": "poem.txt"}},
           "2": {"class_type": "ExampleRepeatText", "inputs": {"text": ["1", 0], "times": 3, "separator": " / "}},
           "3": {"class_type": "ExampleWordCount", "inputs": {"text": ["2", 0]}},
           "4": {"class_type": "ExampleClamp", "inputs": {"value": ["3", 0], "low": 0, "high": 5}},
           "5": {"class_type": "ExampleShowText", "inputs": {"text": ["4", 0]}},
           "6": {"class_type": "ExampleCountdown", "inputs": {"seconds": 2}},
           "7": {"class_type": "ExampleShowText", "inputs": {"text": ["3", 1]}}}
    result = validate(api, example_registry, resources=resources)
    assert result.ok, [str(e) for e in result.errors]
    events = []
    executor = Executor(example_registry, resources=resources)
    report = executor.run(result.graph, listeners=[events.append], extra={})
    assert report.ui == {"5": {"text": ["5"]}, "7": {"text": [str(len("roses are red / " * 3) - 3)]}}
    assert executor.run(result.graph).executed == []
    (tmp_path / "poem.txt").write_text("violets are blue and so on")  # the fingerprint sees the edit
    assert sorted(executor.run(result.graph).executed) == ["1", "2", "3", "4", "5", "7"]  # not the countdown
    bad = dict(api, **{"4": {"class_type": "ExampleClamp", "inputs": {"value": ["3", 0], "low": 9, "high": 5}},
                       "8": {"class_type": "ExampleLoadText", "inputs": {"name": "missing.txt"}}})
    errors = [(e.code, e.node_id, e.message) for e in validate(bad, example_registry, resources=resources).errors]
    assert errors[0] == ("custom_validation_failed", "4", "low (9) is above high (5); swap them")
    assert errors[1][:2] == ("value_not_in_list", "8")


def test_example_pack_reads_files_through_the_resolver(example_registry, tmp_path):
    """Issue #11: every path a node reads goes through one resolver, also a name that skipped validation."""
    from engine import CancelToken, RunContext
    (tmp_path / "input").mkdir()
    (tmp_path / "secret.txt").write_text("not for nodes")
    resources = _Resources(tmp_path / "input")
    ctx = RunContext("run", "1", "ExampleLoadText", resources, CancelToken(), lambda event: None)
    with pytest.raises(ValueError, match="ExampleLoadText input 'name' '../secret.txt' points outside"):
        example_registry.get("ExampleLoadText").fn(ctx, name="../secret.txt")


def _python_blocks(text: str) -> list[str]:
    blocks, inside, current = [], False, []
    for line in text.splitlines():
        if line.startswith("```"):
            if inside:
                blocks.append("\n".join(current))
            inside, current = line == "```python" and not inside, []
        elif inside:
            current.append(line)
    return blocks


def test_the_tutorial_code_works(example_registry):
    import json

    from engine import Executor, validate
    text = (REPO / "docs" / "custom-nodes.md").read_text()
    blocks = _python_blocks(text)
    assert len(blocks) == 5
    namespace: dict = {}
    for block in blocks:  # the declaration, the size rule, the lazy switch, TYPES, the test: all run as written
        exec(compile(block, "custom-nodes.md", "exec"), namespace)
    assert namespace["tile"].size_rule(image=namespace["Size"](1, 2, 3), times=2) == namespace["Size"](1, 4, 6)
    example_registry.register(namespace["scale_number"])
    graph = json.loads(text.split("```json")[1].split("```")[0])
    result = validate(graph, example_registry)
    assert result.ok
    assert Executor(example_registry).run(result.graph).ui == {"2": {"text": ["6.0"]}}
    too_big = validate({**graph, "1": {**graph["1"], "inputs": {"value": 1.5, "factor": 20}}}, example_registry)
    assert str(too_big.errors[0]) in text  # the message the tutorial shows is the one users get
