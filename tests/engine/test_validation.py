"""Validation: a pure function that reports every problem at once, each with its code, place and a fix."""

from __future__ import annotations

import copy
import json
import sys
import time

import pytest

from engine import INT, Input, Link, Output, node, validate
from engine.validation import types_compatible


def _between(low, high):
    return True if low < high else f"low ({low}) must be below high ({high}); swap them"


@node("Interval", category="toy", validate=_between,
      inputs=[Input("low", INT, default=0), Input("high", INT, default=1)], outputs=[Output("width", INT)])
def interval(ctx, low, high):
    return high - low


@pytest.fixture
def reg(registry):
    registry.register(interval)
    return registry


def _codes(result):
    return sorted((e.code, e.node_id, e.input_name) for e in result.errors)


def test_a_valid_graph_gives_a_graph_with_coerced_values_and_defaults(reg):
    api = {"1": {"class_type": "Const", "inputs": {"value": "7"}, "_meta": {"title": "Seven"}},
           "2": {"class_type": "Concat", "inputs": {"left": "a", "upper": "false"}},
           "3": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    result = validate(api, reg)
    assert result.ok and result.errors == ()
    graph = result.graph
    assert graph["1"].inputs == {"value": 7} and graph["1"].title == "Seven"
    assert graph["2"].inputs == {"left": "a", "right": "", "upper": False}  # default filled, "false" is False
    assert graph["3"].inputs == {"value": Link("1", 0)}
    assert graph.outputs == ("3",)


def test_required_input_missing(reg):
    result = validate({"1": {"class_type": "DivMod", "inputs": {}}, "2": {"class_type": "Show", "inputs": {}}}, reg)
    assert _codes(result) == [("required_input_missing", "1", "a"), ("required_input_missing", "2", "value")]
    by_node = {e.node_id: e for e in result.errors}
    assert by_node["1"].node_type == "DivMod"
    assert by_node["1"].message == "required input 'a' (INT) is missing; give it a value or link it"
    assert by_node["2"].message == "required input 'value' (*) is missing; link it to an output"


def test_bad_linked_input(reg):
    api = {"1": {"class_type": "Const", "inputs": {}},
           "2": {"class_type": "Add", "inputs": {"a": ["9", 0], "b": ["1", 3]}},
           "3": {"class_type": "Unbox", "inputs": {"box": ["1", "0", 2]}},
           "4": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    result = validate(api, reg)
    assert _codes(result) == [("bad_linked_input", "2", "a"), ("bad_linked_input", "2", "b"),
                              ("bad_linked_input", "3", "box")]
    messages = {e.input_name: e.message for e in result.errors}
    assert "linked to node '9', which is not in the graph" in messages["a"]
    assert "output 3 of node '1' (Const), which has 1 output(s); use an index from 0 to 0" in messages["b"]
    assert "is not a link" in messages["box"]


def test_return_type_mismatch(reg):
    api = {"1": {"class_type": "Concat", "inputs": {}}, "2": {"class_type": "Add", "inputs": {"a": ["1", 0]}},
           "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    (error,) = validate(api, reg).errors
    assert (error.code, error.node_id, error.node_type, error.input_name) == ("return_type_mismatch", "2", "Add", "a")
    assert error.message == ("input 'a' expects INT but is linked to output 0 of node '1' (Concat), which gives "
                             "STRING; link an output of type INT")
    assert error.extra["received_type"] == "STRING"


def test_invalid_input_type(reg):
    api = {"1": {"class_type": "Const", "inputs": {"value": "abc"}},
           "2": {"class_type": "Unbox", "inputs": {"box": "a box"}},
           "3": {"class_type": "Add", "inputs": {"a": [1, 2, 3]}},
           "4": {"class_type": "Show", "inputs": {"value": 1}}}
    result = validate(api, reg)
    assert _codes(result) == [("invalid_input_type", "1", "value"), ("invalid_input_type", "2", "box"),
                              ("invalid_input_type", "3", "a")]
    messages = {e.node_id: e.message for e in result.errors}
    assert messages["1"] == "input 'value' expects a whole number, got 'abc'"
    assert "takes a BOX from another node's output; link it as [node_id, output_index]" in messages["2"]
    assert 'a list constant is written {"__value__": [...]}' in messages["3"]


def test_range_and_option_errors(reg):
    api = {"1": {"class_type": "Const", "inputs": {"value": -5000}},
           "2": {"class_type": "Const", "inputs": {"value": 5000.0}},
           "3": {"class_type": "Format", "inputs": {"number": ["1", 0], "style": "octal"}},
           "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}
    result = validate(api, reg)
    assert _codes(result) == [("value_bigger_than_max", "2", "value"), ("value_not_in_list", "3", "style"),
                              ("value_smaller_than_min", "1", "value")]
    combo = next(e for e in result.errors if e.code == "value_not_in_list")
    assert combo.extra["input_config"] == ["plain", "hex"] and combo.extra["received_value"] == "octal"


def test_custom_validation_failed(reg):
    api = {"1": {"class_type": "Interval", "inputs": {"low": 5, "high": 2}},
           "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    (error,) = validate(api, reg).errors
    assert (error.code, error.node_id, error.node_type) == ("custom_validation_failed", "1", "Interval")
    assert error.message == "low (5) must be below high (2); swap them"


def test_custom_validation_waits_for_constants(reg):
    # `high` is linked: its value is unknown before the run, so the node's own check is not called.
    api = {"1": {"class_type": "Const", "inputs": {"value": 1}},
           "2": {"class_type": "Interval", "inputs": {"low": 5, "high": ["1", 0]}},
           "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    assert validate(api, reg).ok


def test_custom_validation_is_skipped_when_the_inputs_are_already_wrong(reg):
    api = {"1": {"class_type": "Interval", "inputs": {"low": "x", "high": 2}},
           "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    assert _codes(validate(api, reg)) == [("invalid_input_type", "1", "low")]


def test_prompt_no_outputs(reg):
    result = validate({"1": {"class_type": "Const", "inputs": {}}}, reg)
    assert [(e.code, e.node_id) for e in result.errors] == [("prompt_no_outputs", None)]
    assert "add one" in result.errors[0].message
    # reported beside other problems too
    both = validate({"1": {"class_type": "Const", "inputs": {"value": "x"}}}, reg)
    assert _codes(both) == [("invalid_input_type", "1", "value"), ("prompt_no_outputs", None, None)]
    # ... but not when an unknown node (perhaps the output node) is there
    unknown = validate({"1": {"class_type": "SaveImg", "inputs": {}}}, reg)
    assert _codes(unknown) == [("unknown_node_type", "1", None)]


def test_each_dependency_cycle_is_one_error_naming_its_members_in_order(reg):
    api = {"1": {"class_type": "Add", "inputs": {"a": ["3", 0]}},
           "2": {"class_type": "Add", "inputs": {"a": ["1", 0]}},
           "3": {"class_type": "Add", "inputs": {"a": ["2", 0]}},
           "4": {"class_type": "Add", "inputs": {"a": ["4", 0]}},
           "5": {"class_type": "Show", "inputs": {"value": ["3", 0]}},
           "6": {"class_type": "Show", "inputs": {"value": ["4", 0]}}}
    result = validate(api, reg)
    assert _codes(result) == [("dependency_cycle", "1", None), ("dependency_cycle", "4", None)]
    messages = {e.node_id: e.message for e in result.errors}
    assert messages["1"] == ("node 1 is part of a cycle of 3 node(s): 1 -> 2 -> 3 -> 1; break the cycle by "
                             "removing one of these links")
    assert "cycle of 1 node(s): 4 -> 4;" in messages["4"]
    assert result.errors[0].extra == {"cycle": ["1", "2", "3"], "cycle_length": 3, "component_size": 3}


def test_unknown_node_type_and_unknown_input(reg):
    api = {"1": {"class_type": "Cosnt", "inputs": {}},
           "2": {"class_type": "Const", "inputs": {"valeu": 3}},
           "3": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    result = validate(api, reg)
    assert _codes(result) == [("unknown_input", "2", "valeu"), ("unknown_node_type", "1", None)]
    messages = {e.code: e.message for e in result.errors}
    assert "there is no node type 'Cosnt'" in messages["unknown_node_type"]
    assert "`sdgraph nodes --errors`" in messages["unknown_node_type"]
    assert messages["unknown_input"] == "Const has no input 'valeu' (its inputs: value); remove it or fix its name"


def test_malformed_graphs(reg):
    assert _codes(validate([1, 2], reg)) == [("invalid_prompt", None, None)]
    result = validate({"1": "Const", "2": {"inputs": {}}, "3": {"class_type": "Show", "inputs": [1]}}, reg)
    assert _codes(result) == [("invalid_node", "1", None), ("invalid_node", "3", None),
                              ("missing_node_type", "2", None), ("required_input_missing", "3", "value")]


def test_every_problem_is_reported_at_once(reg):
    api = {"1": {"class_type": "Const", "inputs": {"value": 99999}},
           "2": {"class_type": "Nope", "inputs": {}},
           "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["7", 0], "c": 1}},
           "4": {"class_type": "Concat", "inputs": {"upper": "maybe"}},
           "5": {"class_type": "Add", "inputs": {"a": ["6", 0]}},
           "6": {"class_type": "Add", "inputs": {"a": ["5", 0]}},
           "7": {"class_type": "Show", "inputs": {"value": ["6", 0]}},
           "8": {"class_type": "Interval", "inputs": {"low": 3, "high": 3}}}
    result = validate(api, reg)
    assert result.graph is None and not result.ok
    assert _codes(result) == [
        ("bad_linked_input", "3", "b"), ("custom_validation_failed", "8", None),
        ("dependency_cycle", "5", None), ("invalid_input_type", "4", "upper"),
        ("unknown_input", "3", "c"), ("unknown_node_type", "2", None), ("value_bigger_than_max", "1", "value")]


def test_validation_never_mutates_its_input(reg):
    api = {"1": {"class_type": "Const", "inputs": {"value": "3"}},
           "2": {"class_type": "Show", "inputs": {"value": {"__value__": [1, [2, 3]]}}},
           "3": {"class_type": "Concat", "inputs": {"upper": "true"}, "_meta": {"title": "t"}},
           "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}
    before = copy.deepcopy(api)
    result = validate(api, reg)
    assert result.ok
    assert api == before
    # the graph holds its own copies: changing them does not reach the caller's JSON
    result.graph["2"].inputs["value"][1].append(4)
    assert api == before


def test_list_constants(reg):
    api = {"1": {"class_type": "Show", "inputs": {"value": {"__value__": [512, 512]}}}}
    result = validate(api, reg)
    assert result.ok and result.graph["1"].inputs["value"] == [512, 512]
    bad = validate({"1": {"class_type": "Const", "inputs": {"value": {"__value__": [1, 2]}}},
                    "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}, reg)
    assert _codes(bad) == [("invalid_input_type", "1", "value")]
    # an explicit constant for a linked type is taken as given (a custom widget's value, say)
    explicit = validate({"1": {"class_type": "Unbox", "inputs": {"box": {"__value__": [1]}}}}, reg, targets=["1"])
    assert explicit.ok and explicit.graph["1"].inputs["box"] == [1]


def test_aliases_resolve_to_the_canonical_type(reg):
    from engine import NodeRegistry, Result  # a registry with an aliased output node
    aliased = NodeRegistry()

    @node("PreviewAny", aliases=("ShowAny",), output_node=True, inputs=[Input("value", "*")], outputs=[])
    def preview(ctx, value):
        return Result((), {"text": [str(value)]})

    aliased.register(preview)
    result = validate({"1": {"class_type": "ShowAny", "inputs": {"value": 1}}}, aliased)
    assert result.ok and result.graph["1"].type == "PreviewAny"


def test_targets_restrict_validation_to_what_they_need(reg):
    api = {"1": {"class_type": "Const", "inputs": {"value": 2}},
           "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 3}},
           "3": {"class_type": "Const", "inputs": {"value": "broken"}},
           "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}
    result = validate(api, reg, targets=["2"])
    assert result.ok
    assert set(result.graph.nodes) == {"1", "2"} and result.graph.outputs == ("2",)
    missing = validate(api, reg, targets=["2", "42"])
    assert _codes(missing) == [("bad_target", "42", None)]


def test_frontend_upload_value_is_tolerated(sd_registry):
    api = {"1": {"class_type": "LoadImage", "inputs": {"image": "example.png", "upload": "image"}},
           "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    assert validate(api, sd_registry).ok
    api["1"]["inputs"]["uploaded"] = 1
    assert _codes(validate(api, sd_registry)) == [("unknown_input", "1", "uploaded")]


def test_errors_render_and_serialise(reg):
    (error,) = validate({"1": {"class_type": "Const", "inputs": {"value": "x"}},
                         "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}, reg).errors
    assert str(error) == "node 1 (Const): input 'value' expects a whole number, got 'x' [invalid_input_type]"
    missing = validate({"1": {"class_type": "Show", "inputs": {}}}, reg).errors[0]
    assert str(missing) == "node 1 (Show), input 'value': required input 'value' (*) is missing; link it to an " \
                           "output [required_input_missing]"
    assert error.as_dict() == {"code": "invalid_input_type", "message": error.message, "node_id": "1",
                               "node_type": "Const", "input_name": "value", "details": "",
                               "extra": {"received_value": "x"}}


def test_types_compatible():
    assert types_compatible("INT", "INT") and types_compatible("*", "IMAGE") and types_compatible("IMAGE", "*")
    assert types_compatible("INT,FLOAT", "FLOAT") and types_compatible("LATENT", "IMAGE, LATENT")
    assert not types_compatible("INT", "FLOAT")


def _chain(n: int) -> dict:
    api = {"0": {"class_type": "Const", "inputs": {"value": 1}}}
    for i in range(1, n - 1):
        api[str(i)] = {"class_type": "Add", "inputs": {"a": [str(i - 1), 0], "b": i % 5}}
    api[str(n - 1)] = {"class_type": "Show", "inputs": {"value": [str(n - 2), 0]}}
    return api


def test_ten_thousand_nodes_validate_well_under_a_second(reg):
    api = _chain(10_000)
    started = time.process_time()
    result = validate(api, reg)
    elapsed = time.process_time() - started
    assert result.ok and len(result.graph) == 10_000
    assert elapsed < 1.0, f"validation of 10,000 nodes took {elapsed:.2f} s"


def test_a_5000_long_chain_stays_clear_of_the_recursion_limit(reg, counter):
    from engine import Executor
    assert sys.getrecursionlimit() < 5000 * 2  # a recursive walk would fail here
    result = validate(_chain(5000), reg, targets=["4999"])
    assert result.ok
    report = Executor(reg).run(result.graph)
    expected = 1 + sum(i % 5 for i in range(1, 4999))
    assert report.ok and report.ui["4999"] == {"text": [str(expected)]}
    cycle = _chain(5000)
    cycle["0"] = {"class_type": "Add", "inputs": {"a": ["4998", 0]}}
    (error,) = validate(cycle, reg).errors  # one error for the whole cycle
    assert error.extra["cycle_length"] == 4999


def _ring(n: int) -> dict:
    """A chain whose first node reads the last Add: one cycle of n - 1 nodes (the Show hangs off it)."""
    api = _chain(n)
    api["0"] = {"class_type": "Add", "inputs": {"a": [str(n - 2), 0]}}
    return api


def test_a_9999_node_cycle_is_one_short_error(reg):
    """Issue #11: a 9,999-node cycle made one error per member (a reply of hundreds of MB)."""
    result = validate(_ring(10_000), reg)
    (error,) = result.errors
    assert (error.code, error.node_id) == ("dependency_cycle", "0")
    assert error.message.startswith("node 0 is part of a cycle of 9999 node(s): 0 -> 1 -> 2 -> ")
    assert " -> 29 -> ... (9969 more); break the cycle" in error.message
    assert error.extra["cycle"] == [str(i) for i in range(30)] and error.extra["cycle_length"] == 9999
    assert len(json.dumps([e.as_dict() for e in result.errors])) < 2000


def test_a_cycle_shorter_than_its_component_says_how_many_nodes_are_tangled(reg):
    api = {"1": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["3", 0]}},
           "2": {"class_type": "Add", "inputs": {"a": ["1", 0]}},
           "3": {"class_type": "Add", "inputs": {"a": ["2", 0]}},
           "4": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    (error,) = validate(api, reg).errors
    assert "cycle of 2 node(s): 1 -> 2 -> 1 (3 nodes depend on each other)" in error.message


def test_at_most_100_errors_then_one_that_counts_the_rest(reg):
    api = {str(i): {"class_type": "Const", "inputs": {"value": 5000}} for i in range(1000)}
    api["show"] = {"class_type": "Show", "inputs": {"value": ["0", 0]}}
    errors = validate(api, reg).errors
    assert len(errors) == 101 and {e.code for e in errors[:100]} == {"value_bigger_than_max"}
    assert errors[-1].code == "too_many_errors" and errors[-1].extra == {"not_listed": 900, "total": 1000}
    assert errors[-1].message.startswith("and 900 more problem(s) not listed")


def test_a_huge_received_value_is_not_echoed_whole(reg):
    huge = ["x"] * 1_000_000
    api = {"1": {"class_type": "Const", "inputs": {"value": huge, "extra": "y" * 1_000_000}},
           "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    result = validate(api, reg)
    assert _codes(result) == [("invalid_input_type", "1", "value"), ("unknown_input", "1", "extra")]
    assert len(json.dumps([e.as_dict() for e in result.errors])) < 2000
    api["1"]["inputs"] = {"value": [1, 2, 3]}
    (small,) = validate(api, reg).errors
    assert small.extra["received_value"] == [1, 2, 3]  # small values are echoed as received


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["chain", "cycle"])
def test_100000_nodes_validate_in_under_2_seconds(reg, shape):
    """Issue #11: any graph of up to 100,000 nodes is validated in under 2 s (linear steps only). CPU time of this
    process, so other work on a shared machine does not decide the outcome; the best of up to three tries (another
    xdist worker on the other core still slows this one's memory and caches)."""
    api = _chain(100_000) if shape == "chain" else _ring(100_000)
    elapsed = float("inf")
    for _ in range(3):
        started = time.process_time()
        result = validate(api, reg)
        elapsed = min(elapsed, time.process_time() - started)
        if elapsed < 2.0:
            break
    assert result.ok if shape == "chain" else [e.code for e in result.errors] == ["dependency_cycle"]
    assert elapsed < 2.0, f"validation of a 100,000-node {shape} took {elapsed:.2f} s"


def test_needed_walks_from_every_target_at_once_without_recursion(reg):
    """Issue #11: ancestor walks are networkx breadth-first searches (linear, no recursion)."""
    from engine.graph import ancestors, dependency_graph, needed

    n = 50_000
    edges = [(str(i - 1), str(i)) for i in range(1, n)] + [("side", "7")]
    graph = dependency_graph(edges, {*map(str, range(n)), "side", "alone"})
    assert needed(graph, ["3", "nope"]) == {"0", "1", "2", "3"}
    assert needed(graph, ["8", "alone"]) == {*map(str, range(9)), "side", "alone"}
    assert len(needed(graph, [str(n - 1)])) == n + 1 and needed(graph, []) == set()
    result = validate(_chain(20), reg, targets=["5"])
    assert ancestors(result.graph.nodes, ["5"]) == set(result.graph.nodes) == {*map(str, range(6))}
