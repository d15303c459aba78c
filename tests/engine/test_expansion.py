"""Issue #18: node expansion. A node returns a graph to run in its place (`Expansion`, or ComfyUI's
`{"expand": graph, "result": ...}`); inner nodes get ids derived from the parent, are cached by content like any
other, and the expansion's outputs replace the node's (ComfyUI's comfy_execution/graph.py and execution.py)."""

from __future__ import annotations

from engine import INT, STRING, CancelToken, Executor, Input, Output, validate
from engine import node as declare
from engine.comfy_v1 import adapt_class
from engine.expansion import Expansion


@declare("TimesThree", category="toy", inputs=[Input("x", INT, default=0), Input("label", STRING, default="")],
         outputs=[Output("value", INT), Output("x", INT)])
def times_three(ctx, x, label):
    """x + x + x as two inner Adds; the second output is a constant."""
    graph = {"first": {"class_type": "Add", "inputs": {"a": x, "b": x}},
             "second": {"class_type": "Add", "inputs": {"a": ["first", 0], "b": x}}}
    return Expansion(graph, (["second", 0], x))


@declare("NineTimes", category="toy", inputs=[Input("x", INT, default=0)], outputs=[Output("value", INT)])
def nine_times(ctx, x):
    """An expansion into expanding nodes: TimesThree of TimesThree."""
    graph = {"inner": {"class_type": "TimesThree", "inputs": {"x": x}},
             "outer": {"class_type": "Mul", "inputs": {"a": ["inner", 0], "b": 3}}}
    return Expansion(graph, (["outer", 0],))


@declare("BadExpansion", category="toy", inputs=[Input("kind", STRING, default="invalid")],
         outputs=[Output("value", INT)])
def bad_expansion(ctx, kind):
    if kind == "invalid":
        return Expansion({"n": {"class_type": "Add", "inputs": {"a": "not a number"}}}, (["n", 0],))
    if kind == "outer":
        return Expansion({"n": {"class_type": "Add", "inputs": {"a": ["1", 0]}}}, (["n", 0],))
    return Expansion({"n": {"class_type": "Fail", "inputs": {"value": 1}}}, (["n", 0],))


class ComfyTimesTwo:
    """A ComfyUI V1 class expanding with the dict form, as the GraphBuilder's users write it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("INT", {"default": 0})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    CATEGORY = "toy"

    def run(self, x):
        return {"result": (["double", 0],), "expand": {"double": {"class_type": "Add", "inputs": {"a": x, "b": x}}}}


def _executor(registry, counter):
    for definition in (times_three, nine_times, bad_expansion, adapt_class("ComfyTimesTwo", ComfyTimesTwo)):
        registry.register(definition)
    return Executor(registry, resources=counter)


def _run(executor, api):
    result = validate(api, executor.registry, targets=["1", "2"])  # "1" too: the report returns its outputs
    assert result.ok, [str(e) for e in result.errors]
    return executor.run(result.graph)


def _graph(node_type="TimesThree", **inputs):
    return {"1": {"class_type": node_type, "inputs": inputs},
            "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}


def test_the_expansions_outputs_replace_the_nodes(registry, counter):
    report = _run(_executor(registry, counter), _graph(x=5))
    assert report.ok, report.error
    assert report.outputs["1"] == ([15], [5])  # a linked inner output and a constant
    assert report.ui["2"] == {"text": ["15"]}


def test_inner_nodes_get_ids_derived_from_the_parent(registry, counter):
    report = _run(_executor(registry, counter), _graph(x=5))
    assert report.executed[:2] == ["1.first", "1.second"] and "1" in report.executed
    assert report.explain["1.first"].startswith("ran")


def test_an_unchanged_graph_takes_the_parents_result_from_the_cache_without_expanding(registry, counter):
    executor = _executor(registry, counter)
    _run(executor, _graph(x=5))
    report = _run(executor, _graph(x=5))
    assert report.executed == [] and "1" in report.cached
    assert counter.calls["Add"] == 2


def test_inner_nodes_are_cached_by_content_like_any_other(registry, counter):
    """The parent re-runs for a changed input its expansion ignores; the identical inner nodes come from the cache."""
    executor = _executor(registry, counter)
    _run(executor, _graph(x=5, label="a"))
    report = _run(executor, _graph(x=5, label="b"))
    assert report.outputs["1"] == ([15], [5])
    assert "1" in report.executed and "1.second" in report.cached  # (1.first is not even needed)
    assert counter.calls["Add"] == 2


def test_expansions_nest(registry, counter):
    report = _run(_executor(registry, counter), _graph("NineTimes", x=2))
    assert report.ok, report.error
    assert report.outputs["1"] == ([18],)
    assert {"1.inner.first", "1.inner.second", "1.inner", "1.outer"} <= set(report.executed)


def test_a_comfyui_class_expands_with_the_dict_form(registry, counter):
    report = _run(_executor(registry, counter), _graph("ComfyTimesTwo", x=21))
    assert report.ok, report.error
    assert report.outputs["1"] == ([42],)
    assert "1.double" in report.executed


def test_an_invalid_expansion_fails_the_parent_and_says_why(registry, counter):
    report = _run(_executor(registry, counter), _graph("BadExpansion", kind="invalid"))
    assert report.status == "failed" and report.error.node_id == "1"
    assert "expanded into a graph that is not valid" in report.error.message
    assert "1.n" in report.error.message


def test_an_expansion_linking_outside_itself_is_refused(registry, counter):
    report = _run(_executor(registry, counter), _graph("BadExpansion", kind="outer"))
    assert report.status == "failed" and "not a node of the expansion" in report.error.message


def test_a_failing_inner_node_fails_the_parent_naming_it(registry, counter):
    report = _run(_executor(registry, counter), _graph("BadExpansion", kind="fail"))
    assert report.status == "failed" and report.error.node_id == "1"
    assert "node 1.n (Fail)" in report.error.message


def test_inner_nodes_report_their_events_in_the_outer_run(registry, counter):
    executor = _executor(registry, counter)
    events = []
    result = validate(_graph(x=5), executor.registry)
    executor.run(result.graph, listeners=[events.append])
    started = [e.node_id for e in events if e.kind == "node_started"]
    assert {"1", "1.first", "1.second", "2"} <= set(started)
    assert [e.kind for e in events].count("run_started") == 1
    assert [e.kind for e in events].count("run_finished") == 1


def test_cancelling_inside_an_expansion_interrupts_the_run(registry, counter):
    executor = _executor(registry, counter)
    cancel = CancelToken()

    def cancel_at_inner(event):
        if event.kind == "node_started" and event.node_id == "1.second":
            cancel.cancel()

    result = validate({**_graph(x=5), "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
                       "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}, executor.registry)
    report = executor.run(result.graph, listeners=[cancel_at_inner], cancel=cancel)
    assert report.status == "interrupted"
