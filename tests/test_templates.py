"""Issue #18, today's UI workflows: the `comfyui-workflow-templates` whose nodes we have, and subgraphs the front end
made of them, convert to exactly the API prompt the front end's own `app.graphToPrompt()` produced (the fixtures in
tests/fixtures/templates, made by tools/frontend_oracle.py in Chromium), and validate.

NAME.workflow.json is the template; NAME-sub (a part made into a subgraph), NAME-nested (a subgraph inside a
subgraph, widgets promoted through both) and NAME-sub-modes (a bypassed and a muted node inside) were made by the
front end's "convert to subgraph" in the browser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import read_graph_file, validate, workflow_to_api

FIXTURES = Path(__file__).parent / "fixtures" / "templates"
WORKFLOWS = sorted(FIXTURES.glob("*.workflow.json"))


def _name(path: Path) -> str:
    return path.name.removesuffix(".workflow.json")


@pytest.fixture(scope="module")
def registry():
    from nodes import build_registry
    return build_registry(entry_points=False)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    """A base folder holding (empty) files under the model names the templates use, so their combos validate."""
    from nodes.folders import Folders
    from nodes.runtime import Runtime
    base = tmp_path_factory.mktemp("templates")
    for path in FIXTURES.glob("*.prompt.json"):
        for node in json.loads(path.read_text()).values():
            name = node["inputs"].get("ckpt_name")
            if isinstance(name, str):
                (base / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
                (base / "models" / "checkpoints" / name).touch()
    return Runtime(Folders.at(base))


def test_the_fixtures_cover_subgraphs_nesting_and_modes():
    names = {_name(p) for p in WORKFLOWS}
    assert len(names) == 12
    for suffix in ("-sub", "-nested", "-sub-modes"):
        assert any(n.endswith(suffix) for n in names)
    nested = json.loads((FIXTURES / "image_sdxl_simple-nested.workflow.json").read_text())
    assert len(nested["definitions"]["subgraphs"]) == 2


@pytest.mark.parametrize("path", WORKFLOWS, ids=_name)
def test_template_converts_to_the_front_ends_prompt(path: Path, registry):
    expected = json.loads(path.with_name(f"{_name(path)}.prompt.json").read_text())
    assert workflow_to_api(json.loads(path.read_text()), registry) == expected


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if not _name(p).endswith("-modes")], ids=_name)
def test_template_validates(path: Path, registry, runtime):
    api = read_graph_file(path, registry)
    result = validate(api, registry, resources=runtime)
    assert result.ok, [str(e) for e in result.errors]


def test_inner_node_ids_and_promoted_widgets_in_a_nested_subgraph(registry):
    """Ids are "outer:inner:node"; the seed promoted through two subgraph boundaries carries the outer instance's
    value to the KSampler inside."""
    api = workflow_to_api(json.loads((FIXTURES / "image_sdxl_simple-nested.workflow.json").read_text()), registry)
    assert api["18:17:12"]["class_type"] == "KSampler"
    assert api["18:17:12"]["inputs"]["seed"] == 812045847300606
    assert api["14"]["inputs"]["samples"] == ["18:17:12", 0]  # an output through two subgraph boundaries


def test_bypassed_and_muted_nodes_inside_a_subgraph(registry):
    """The bypassed CLIPTextEncode inside is gone and its consumer takes nothing of its type; the muted node inside
    is gone and what it fed lost that input."""
    api = workflow_to_api(json.loads((FIXTURES / "image_sdxl_simple-sub-modes.workflow.json").read_text()),
                          registry)
    assert "17:10" not in api and "17:14" not in api
    assert "positive" not in api["17:12"]["inputs"]
    assert "images" not in api["7"]["inputs"]


def _template_files() -> list[Path]:
    templates = pytest.importorskip("comfyui_workflow_templates_json")
    return sorted(p for p in (Path(templates.__file__).parent / "templates").glob("*.json")
                  if not p.name.startswith("index"))


def test_installed_templates_whose_nodes_we_have_match_the_fixtures(registry):
    """Over the installed package (skipped without it): every template using only our nodes converts, to the front
    end's prompt where the fixtures hold it (a template the package changed shows here)."""
    import sys
    sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
    from frontend_oracle import is_workflow, workflow_types

    names = {d.name for d in registry}
    ours = [p for p in _template_files() if is_workflow(p) and workflow_types(json.loads(p.read_text())) <= names]
    assert len(ours) >= 3
    for path in ours:
        api = read_graph_file(path, registry)
        expected = FIXTURES / f"{path.stem}.prompt.json"
        if expected.exists():
            assert api == json.loads(expected.read_text()), path.name


STRUCTURE = Path(__file__).parent / "fixtures" / "templates-structure"


def _links(inputs: dict) -> dict:
    return {name: value for name, value in inputs.items()
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)}


@pytest.mark.parametrize("path", sorted(STRUCTURE.glob("*.workflow.json")), ids=_name)
def test_subgraph_templates_flatten_to_the_front_ends_ids_and_links(path: Path, registry):
    """Real subgraph templates: the same node ids (inner ids the front end renumbers on load included) and the same
    links as the front end's prompt."""
    expected = json.loads(path.with_name(f"{_name(path)}.prompt.json").read_text())
    api = workflow_to_api(json.loads(path.read_text()), registry)
    assert sorted(api) == sorted(expected)
    assert {nid: _links(node["inputs"]) for nid, node in api.items()} == \
        {nid: _links(node["inputs"]) for nid, node in expected.items()}
