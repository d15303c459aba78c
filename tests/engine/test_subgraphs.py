"""Issue #18: workflows with subgraphs (`definitions.subgraphs`) flatten as the front end queues them (rules read
from frontend 1.58's graphToPrompt; the real-template cases against the browser's own output are in
tests/test_templates.py). Toy nodes, hand-written subgraphs."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

from engine import GraphFormatError, validate, workflow_to_api
from engine.subgraphs import flatten_workflow

FIXTURES = Path(__file__).parents[1] / "fixtures" / "subgraphs"
SUB = "11111111-2222-4333-8444-555555555555"
INNER = "66666666-7777-4888-9999-aaaaaaaaaaaa"


def _slot(name, kind, link=None, widget=False):
    slot = {"name": name, "type": kind, "link": link}
    if widget:
        slot["widget"] = {"name": name}
    return slot


def _sub(sub_id, nodes, links, inputs, outputs):
    return {"id": sub_id, "name": f"sub {sub_id[:4]}", "nodes": nodes, "inputs": inputs, "outputs": outputs,
            "links": [dict(zip(("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"), link,
                               strict=True)) for link in links]}


def adder_workflow(*, instance_mode=0, inner_mode=0, b_value=None, b_link=None, named=None) -> dict:
    """Const(1) -> [subgraph: Add(a from input 0, b from input 1 (a promoted widget)) -> Mul(a, b=3)] -> Show.

    Subgraph inputs 0 "a" and 1 "b" both feed the Add's widgets, so both are promoted widgets of the instance (its
    `widgets_values` are [a, b]); "a" is linked outside; output 0 is the Mul's value."""
    inner_nodes = [
        {"id": 1, "type": "Add", "mode": inner_mode,
         "inputs": [_slot("a", "INT", 101, True), _slot("b", "INT", 102, True)],
         "outputs": [{"name": "sum", "type": "INT", "links": [103]}], "widgets_values": [0, 7]},
        {"id": 2, "type": "Mul", "mode": 0, "inputs": [_slot("a", "INT", 103, True), _slot("b", "INT", None, True)],
         "outputs": [{"name": "product", "type": "INT", "links": [104]}], "widgets_values": [1, 3]},
    ]
    inner_links = [[101, -10, 0, 1, 0, "INT"], [102, -10, 1, 1, 1, "INT"], [103, 1, 0, 2, 0, "INT"],
                   [104, 2, 0, -20, 0, "INT"]]
    sub = _sub(SUB, inner_nodes, inner_links,
               [{"id": "in-a", "name": "a", "type": "INT", "linkIds": [101]},
                {"id": "in-b", "name": "b", "type": "INT", "linkIds": [102]}],
               [{"id": "out", "name": "product", "type": "INT", "linkIds": [104]}])
    instance = {"id": 5, "type": SUB, "mode": instance_mode,
                "inputs": [_slot("a", "INT", 1), _slot("b", "INT", b_link, widget=True)],
                "outputs": [{"name": "product", "type": "INT", "links": [2]}],
                "widgets_values": [] if b_value is None else [0, b_value]}  # both inputs feed inner widgets
    if named is not None:
        instance["widgets_values_named"] = named
    nodes = [{"id": 3, "type": "Const", "mode": 0, "inputs": [], "outputs": [{"name": "value", "type": "INT",
                                                                             "links": [1] + ([3] if b_link else [])}],
              "widgets_values": [1]},
             instance,
             {"id": 6, "type": "Show", "mode": 0, "inputs": [_slot("value", "*", 2)], "outputs": []}]
    links = [[1, 3, 0, 5, 0, "INT"], [2, 5, 0, 6, 0, "INT"]] + ([[3, 3, 0, 5, 1, "INT"]] if b_link else [])
    return _loadable({"nodes": nodes, "links": links, "definitions": {"subgraphs": [sub]}})


def _loadable(workflow: dict) -> dict:
    """The few fields the front end needs to load a hand-written workflow (for tools/frontend_oracle.py)."""
    workflow.update(version=0.4, last_node_id=20, last_link_id=300)
    for sub in workflow["definitions"]["subgraphs"]:
        sub.update(version=1, revision=0, config={}, widgets=[],
                   state={"lastGroupId": 0, "lastNodeId": 20, "lastLinkId": 300, "lastRerouteId": 0},
                   inputNode={"id": -10, "bounding": [0, 0, 100, 100]},
                   outputNode={"id": -20, "bounding": [500, 0, 100, 100]})
    return workflow


def _inputs(api):
    return {nid: node["inputs"] for nid, node in api.items()}


def test_inner_nodes_get_instance_ids_and_links_cross_the_boundary(registry):
    api = workflow_to_api(adder_workflow(), registry)
    assert sorted(api) == ["3", "5:1", "5:2", "6"]
    assert api["5:1"]["inputs"]["a"] == ["3", 0]  # the instance's input 0, linked outside
    assert api["5:2"]["inputs"] == {"a": ["5:1", 0], "b": 3}
    assert api["6"]["inputs"] == {"value": ["5:2", 0]}  # the instance's output is the Mul inside
    result = validate(api, registry)
    assert result.ok, [str(e) for e in result.errors]


def test_a_promoted_widget_value_on_the_instance_reaches_the_inner_node(registry):
    assert workflow_to_api(adder_workflow(b_value=40), registry)["5:1"]["inputs"]["b"] == 40


def test_a_promoted_widget_without_a_value_leaves_the_inner_widget_its_own(registry):
    assert workflow_to_api(adder_workflow(), registry)["5:1"]["inputs"]["b"] == 7


def test_a_linked_promoted_widget_takes_the_link(registry):
    assert workflow_to_api(adder_workflow(b_value=40, b_link=3), registry)["5:1"]["inputs"]["b"] == ["3", 0]


def test_named_widget_values_are_ignored_like_the_front_end_does(registry):
    assert workflow_to_api(adder_workflow(named={"b": 41}), registry)["5:1"]["inputs"]["b"] == 7


def test_a_muted_instance_queues_nothing_inside_and_its_consumer_loses_the_input(registry):
    api = workflow_to_api(adder_workflow(instance_mode=2), registry)
    assert sorted(api) == ["3", "6"]
    assert api["6"]["inputs"] == {}


def test_a_bypassed_instance_passes_its_input_through(registry):
    api = workflow_to_api(adder_workflow(instance_mode=4), registry)
    assert sorted(api) == ["3", "6"]
    assert api["6"]["inputs"] == {"value": ["3", 0]}


def test_a_bypassed_node_inside_passes_the_outer_link_through(registry):
    api = workflow_to_api(adder_workflow(inner_mode=4), registry)
    assert "5:1" not in api
    assert api["5:2"]["inputs"]["a"] == ["3", 0]


def test_a_muted_node_inside_is_dropped(registry):
    api = workflow_to_api(adder_workflow(inner_mode=2), registry)
    assert "5:1" not in api
    assert api["5:2"]["inputs"] == {"a": 1, "b": 3}  # the front end keeps the widget's own value


def nested_workflow(*, middle_mode=0) -> dict:
    """The adder subgraph used inside another subgraph (instance 7 of INNER inside instance 9 of the root)."""
    base = adder_workflow(b_value=40)
    adder = base["definitions"]["subgraphs"][0]
    instance = copy.deepcopy(base["nodes"][1]) | {"id": 7, "mode": middle_mode}
    instance["inputs"][0]["link"] = 201
    instance["outputs"][0]["links"] = [202]
    outer = _sub(INNER, [instance], [[201, -10, 0, 7, 0, "INT"], [202, 7, 0, -20, 0, "INT"]],
                 [{"id": "x", "name": "a", "type": "INT", "linkIds": [201]}],
                 [{"id": "y", "name": "product", "type": "INT", "linkIds": [202]}])
    root_instance = {"id": 9, "type": INNER, "mode": 0, "inputs": [_slot("a", "INT", 1)],
                     "outputs": [{"name": "product", "type": "INT", "links": [2]}]}
    nodes = [base["nodes"][0], root_instance, base["nodes"][2]]
    links = [[1, 3, 0, 9, 0, "INT"], [2, 9, 0, 6, 0, "INT"]]
    return _loadable({"nodes": nodes, "links": links, "definitions": {"subgraphs": [adder, outer]}})


def test_nested_subgraphs_get_outer_inner_node_ids(registry):
    api = workflow_to_api(nested_workflow(), registry)
    assert sorted(api) == ["3", "6", "9:7:1", "9:7:2"]
    assert api["9:7:1"]["inputs"] == {"a": ["3", 0], "b": 40}
    assert api["6"]["inputs"] == {"value": ["9:7:2", 0]}


def test_a_muted_nested_instance_still_queues_its_inner_nodes_like_the_front_end(registry):
    """The front end expands nested instances whatever their mode; only what they output follows the mode."""
    api = workflow_to_api(nested_workflow(middle_mode=2), registry)
    assert sorted(api) == ["3", "6", "9:7:1", "9:7:2"]
    assert api["6"]["inputs"] == {}


def test_a_bypassed_nested_instance_passes_through(registry):
    api = workflow_to_api(nested_workflow(middle_mode=4), registry)
    assert api["6"]["inputs"] == {"value": ["3", 0]}


def test_a_subgraph_inside_itself_is_refused_with_its_name(registry):
    workflow = nested_workflow()
    outer = workflow["definitions"]["subgraphs"][1]
    outer["nodes"][0]["type"] = INNER  # the outer subgraph now contains an instance of itself
    with pytest.raises(GraphFormatError, match="contains itself"):
        workflow_to_api(workflow, registry)


def test_flattening_gives_a_plain_workflow_with_string_ids():
    flat = flatten_workflow(adder_workflow())
    assert {n["id"] for n in flat["nodes"]} == {"3", "5:1", "5:2", "6"}
    assert all(isinstance(link[0], str) for link in flat["links"])


def cases() -> dict[str, dict]:
    """The hand-written workflows whose front-end prompts are in tests/fixtures/subgraphs (regenerate with
    `python tests/engine/test_subgraphs.py` then tools/frontend_oracle.py, see the README there)."""
    return {"plain": adder_workflow(), "promoted": adder_workflow(b_value=40),
            "promoted-linked": adder_workflow(b_value=40, b_link=3),
            "named-only": adder_workflow(named={"b": 41}),
            "positions-over-names": adder_workflow(b_value=40, named={"b": 41}),
            "instance-muted": adder_workflow(instance_mode=2), "instance-bypassed": adder_workflow(instance_mode=4),
            "inner-muted": adder_workflow(inner_mode=2), "inner-bypassed": adder_workflow(inner_mode=4),
            "nested": nested_workflow(), "nested-muted": nested_workflow(middle_mode=2),
            "nested-bypassed": nested_workflow(middle_mode=4)}


@pytest.mark.parametrize("name", sorted(cases()))
def test_hand_written_subgraphs_convert_as_the_front_end_does(name, registry):
    """Each case against the prompt frontend 1.58 made of it in Chromium (tools/frontend_oracle.py)."""
    expected = json.loads((FIXTURES / f"{name}.prompt.json").read_text())
    assert workflow_to_api(cases()[name], registry) == expected


if __name__ == "__main__":  # write the cases for the oracle
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for case, workflow in cases().items():
        (FIXTURES / f"{case}.workflow.json").write_text(json.dumps(workflow, indent=1) + "\n")
    sys.exit(0)
