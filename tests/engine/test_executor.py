"""The executor: planning, list semantics, lazy inputs, releasing values, failures, events and cancellation."""

from __future__ import annotations

import gc

import pytest

from engine import (
    CancelToken,
    Executor,
    NodeFailed,
    NodeFinished,
    NodeStarted,
    OutputCache,
    Progress,
    RunInterrupted,
    validate,
)
from engine.cache import CachedOutput


def _sum_graph(a=2, b=3):
    return {"1": {"class_type": "Const", "inputs": {"value": a}},
            "2": {"class_type": "Const", "inputs": {"value": b}},
            "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
            "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}


def test_runs_a_graph_and_reports_outputs_and_ui(runner):
    report = runner(_sum_graph())
    assert report.ok and report.status == "success"
    assert sorted(report.executed) == ["1", "2", "3", "4"] and report.cached == []
    assert report.ui == {"4": {"text": ["5"]}}
    assert report.outputs == {"4": ()}  # Show has no outputs; only requested nodes are reported
    assert report.error is None


def test_topological_order(runner):
    api = {"9": {"class_type": "Show", "inputs": {"value": ["5", 0]}},
           "5": {"class_type": "Mul", "inputs": {"a": ["7", 0], "b": ["1", 0]}},
           "7": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
           "1": {"class_type": "Const", "inputs": {"value": 4}}}
    report = runner(api)
    assert report.executed == ["1", "7", "5", "9"]
    assert report.ui["9"] == {"text": ["20"]}
    started = [e.node_id for e in runner.events if isinstance(e, NodeStarted)]
    assert started == report.executed


def test_prunes_to_requested_outputs(runner, counter):
    api = _sum_graph()
    api["5"] = {"class_type": "Mul", "inputs": {"a": 6, "b": 7}}  # feeds nothing: never runs
    api["6"] = {"class_type": "Concat", "inputs": {"left": "x"}}
    report = runner(api)
    assert "5" not in report.executed and "6" not in report.executed
    assert counter.calls.get("Mul", 0) == 0 and counter.calls.get("Concat", 0) == 0


def test_only_runs_a_target_and_what_it_needs(runner, counter):
    api = _sum_graph()
    api["5"] = {"class_type": "Mul", "inputs": {"a": ["1", 0], "b": 10}}
    api["6"] = {"class_type": "Show", "inputs": {"value": ["5", 0]}}
    report = runner(api, targets=["5"])
    assert sorted(report.executed) == ["1", "5"]
    assert report.outputs == {"5": ([20],)}
    assert counter.calls == {"Const": 1, "Mul": 1}


def test_a_failing_node_is_reported_not_raised(runner, counter):
    api = {"1": {"class_type": "Const", "inputs": {"value": 7}},
           "2": {"class_type": "Fail", "inputs": {"value": ["1", 0]}},
           "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    report = runner(api)
    assert report.status == "failed" and not report.ok
    error = report.error
    assert (error.node_id, error.node_type, error.exception_type, error.message) == \
        ("2", "Fail", "ValueError", "toy failure on 7")
    assert "Traceback" in error.traceback and "toy failure on 7" in error.traceback
    assert error.inputs == {"value": "7"}
    assert report.executed == ["1"] and counter.calls.get("Show", 0) == 0
    assert runner.kinds() == ["run_started", "node_started", "node_finished", "node_started", "node_failed",
                              "run_finished"]
    assert runner.events[-1].status == "failed"


def test_a_wrong_number_of_outputs_fails_the_node(registry):
    from engine import INT, Output, node
    from engine.executor import NodeError

    @node("Broken", output_node=True, outputs=[Output("a", INT), Output("b", INT)])
    def broken(ctx):
        return 1, 2, 3

    registry.register(broken)
    result = validate({"1": {"class_type": "Broken", "inputs": {}}}, registry)
    report = Executor(registry).run(result.graph)
    assert report.error.exception_type == NodeError.__name__
    assert report.error.message == "Broken must return 2 output value(s) (a, b), returned 3"


def test_event_stream_of_a_run(runner):
    api = {"1": {"class_type": "Const", "inputs": {"value": 1}},
           "2": {"class_type": "Slow", "inputs": {"value": ["1", 0], "steps": 3}},
           "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    report = runner(api)
    assert runner.kinds() == ["run_started", "node_started", "node_finished", "node_started", "progress",
                              "progress", "progress", "node_finished", "node_started", "node_finished",
                              "run_finished"]
    first = runner.events[0]
    assert first.node_ids == ("1", "2", "3") and first.run_id == report.run_id
    progress = [(e.node_id, e.value, e.max) for e in runner.events if isinstance(e, Progress)]
    assert progress == [("2", 1, 3), ("2", 2, 3), ("2", 3, 3)]
    finished = [e for e in runner.events if isinstance(e, NodeFinished)]
    assert [(e.node_id, e.node_type) for e in finished] == [("1", "Const"), ("2", "Slow"), ("3", "Show")]
    assert finished[-1].ui == {"text": ["1"]} and finished[0].ui is None
    assert all(e.seconds >= 0 for e in finished)
    assert runner.events[-1].executed == ("1", "2", "3")
    # a second run: everything cached
    runner(api)
    assert runner.kinds() == ["run_started", "nodes_cached", "run_finished"]
    assert runner.events[1].node_ids == ("1", "2", "3")


def test_cancel_during_progress_stops_the_node(runner, counter):
    api = {"1": {"class_type": "Const", "inputs": {"value": 1}},
           "2": {"class_type": "Slow", "inputs": {"value": ["1", 0], "steps": 10}},
           "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    token = CancelToken()

    def cancel_at_step_2(event):
        if isinstance(event, Progress) and event.value == 2:
            token.cancel()

    result = validate(api, runner.executor.registry)
    events = []
    report = runner.executor.run(result.graph, listeners=[events.append, cancel_at_step_2], cancel=token)
    assert report.status == "interrupted"
    assert report.executed == ["1"]
    assert [e.value for e in events if isinstance(e, Progress)] == [1, 2]
    last = events[-1]
    assert isinstance(last, RunInterrupted)
    assert (last.node_id, last.node_type, last.executed) == ("2", "Slow", ("1",))
    assert counter.calls.get("Show", 0) == 0
    # nothing of the interrupted node was cached: the next run computes it
    again = runner(api)
    assert again.executed == ["2", "3"] and again.cached == ["1"]


def test_cancel_between_nodes(runner, counter):
    token = CancelToken()

    def cancel_after_first(event):
        if isinstance(event, NodeFinished):
            token.cancel()

    result = validate(_sum_graph(), runner.executor.registry)
    events = []
    report = runner.executor.run(result.graph, listeners=[events.append, cancel_after_first], cancel=token)
    assert report.status == "interrupted" and len(report.executed) == 1
    assert [e.kind for e in events] == ["run_started", "node_started", "node_finished", "run_interrupted"]
    assert events[-1].node_id is not None and events[-1].node_id not in report.executed


def test_cancelled_before_start_runs_nothing(runner, counter):
    token = CancelToken()
    token.cancel()
    result = validate(_sum_graph(), runner.executor.registry)
    report = runner.executor.run(result.graph, cancel=token)
    assert report.status == "interrupted" and report.executed == [] and counter.calls == {}


def test_list_outputs_map_over_downstream_nodes(runner, counter):
    api = {"1": {"class_type": "Range", "inputs": {"count": 3}},
           "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 10}},
           "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    report = runner(api)
    assert counter.calls["Add"] == 3 and counter.calls["Show"] == 3
    assert report.ui["3"] == {"text": ["10", "11", "12"]}  # ui lists of each call are joined


def test_shorter_lists_repeat_their_last_element(runner):
    api = {"1": {"class_type": "Range", "inputs": {"count": 4}},
           "2": {"class_type": "Range", "inputs": {"count": 2}},
           "3": {"class_type": "Mul", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
           "4": {"class_type": "Sum", "inputs": {"values": ["3", 0]}},
           "5": {"class_type": "Show", "inputs": {"value": ["4", 0]}}}
    report = runner(api, targets=["3", "5"])
    assert report.outputs["3"] == ([0 * 0, 1 * 1, 2 * 1, 3 * 1],)
    assert report.ui["5"] == {"text": ["6"]}  # Sum takes the whole list at once


def test_input_is_list_receives_constants_as_lists(runner):
    api = {"1": {"class_type": "Sum", "inputs": {"values": 5}},
           "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    assert runner(api).ui["2"] == {"text": ["5"]}


def test_an_empty_list_means_no_calls(runner, counter):
    api = {"1": {"class_type": "Range", "inputs": {"count": 0}},
           "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
           "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    report = runner(api)
    assert report.ok and counter.calls.get("Add", 0) == 0 and counter.calls.get("Show", 0) == 0
    assert report.ui == {}


@pytest.mark.parametrize("choose_a, ran, value", [(True, "Add", "3"), (False, "Mul", "2")])
def test_lazy_inputs_run_only_when_asked_for(runner, counter, choose_a, ran, value):
    api = {"1": {"class_type": "Add", "inputs": {"a": 1, "b": 2}},
           "2": {"class_type": "Mul", "inputs": {"a": 1, "b": 2}},
           "3": {"class_type": "Switch", "inputs": {"choose_a": choose_a, "a": ["1", 0], "b": ["2", 0]}},
           "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}
    report = runner(api)
    assert report.ui["4"] == {"text": [value]}
    assert counter.calls == {ran: 1, "Show": 1}
    skipped = "2" if choose_a else "1"
    assert report.explain[skipped].startswith("skipped:")


@pytest.mark.parametrize("raised, message", [
    (KeyError("which one?"), "'which one?'"),
    # issue #11: the node's lazy check is the node's code too; SystemExit from it must not escape
    (SystemExit("bye"), "the node raised SystemExit('bye'); a node must not stop the process"),
])
def test_a_failing_lazy_check_fails_the_node(registry, raised, message):
    from engine import INT, Input, Output, node

    def confused(**values):
        raise raised

    @node("Confused", output_node=True, check_lazy=confused,
          inputs=[Input("a", INT, lazy=True)], outputs=[Output("a", INT)])
    def confused_node(ctx, a):
        return a

    registry.register(confused_node)
    result = validate({"1": {"class_type": "Const", "inputs": {}},
                       "2": {"class_type": "Confused", "inputs": {"a": ["1", 0]}}}, registry)
    report = Executor(registry).run(result.graph)
    assert report.status == "failed"
    assert (report.error.node_id, report.error.exception_type) == ("2", type(raised).__name__)
    assert report.error.message.startswith(f"while choosing its lazy inputs: {message}")


def test_values_are_released_after_their_last_consumer(registry, counter):
    # A budget of zero keeps nothing in the cache, so only the run itself could hold the Box.
    executor = Executor(registry, cache=OutputCache(max_bytes=0), resources=counter)
    api = {"1": {"class_type": "MakeBox", "inputs": {"value": 4}},
           "2": {"class_type": "Unbox", "inputs": {"box": ["1", 0]}},
           "3": {"class_type": "Show", "inputs": {"value": ["1", 0]}},
           "4": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["2", 0]}},
           "5": {"class_type": "Slow", "inputs": {"value": ["4", 0], "steps": 1}},
           "6": {"class_type": "Show", "inputs": {"value": ["5", 0]}}}
    alive_at = {}

    def watch(event):
        if isinstance(event, NodeStarted):
            gc.collect()
            alive_at[event.node_id] = counter.boxes[0]() is not None if counter.boxes else None

    report = executor.run(validate(api, registry).graph, listeners=[watch])
    assert report.ui["6"] == {"text": ["8"]}
    assert report.executed == ["1", "3", "2", "4", "5", "6"]
    # the Box lives while a consumer (3, then 2) has still to run, and not a node longer
    assert alive_at == {"1": None, "3": True, "2": True, "4": False, "5": False, "6": False}


def test_type_adapters_run_on_outputs(registry):
    registry.register_type("BOX", adapt=lambda box: box if isinstance(box, dict) else {"boxed": box.value})
    report = Executor(registry).run(validate({"1": {"class_type": "MakeBox", "inputs": {"value": 3}}}, registry,
                                             targets=["1"]).graph)
    assert report.outputs["1"] == ([{"boxed": 3}],)


def test_around_node_wraps_every_computation(registry):
    seen = []

    def around(*, definition, call, ctx):
        seen.append(definition.name)
        result = call()
        assert isinstance(result, CachedOutput)
        return result

    report = Executor(registry, around_node=around).run(validate(_sum_graph(), registry).graph)
    assert report.ok and sorted(seen) == ["Add", "Const", "Const", "Show"]


def test_context_carries_prompt_and_extra(registry):
    from engine import Input, Result, node
    seen = {}

    @node("Peek", output_node=True, inputs=[Input("x", "INT", default=0)], outputs=[])
    def peek(ctx, x):
        seen.update(node_id=ctx.node_id, node_type=ctx.node_type, prompt=dict(ctx.prompt), extra=dict(ctx.extra))
        return Result((), None)

    registry.register(peek)
    api = {"5": {"class_type": "Peek", "inputs": {"x": 1}}}
    Executor(registry).run(validate(api, registry).graph, prompt=api, extra={"extra_pnginfo": {"w": 1}},
                           run_id="run-1")
    assert seen == {"node_id": "5", "node_type": "Peek", "prompt": api, "extra": {"extra_pnginfo": {"w": 1}}}


def test_failed_event_is_the_same_as_the_report(runner):
    api = {"1": {"class_type": "Fail", "inputs": {"value": 1}},
           "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    report = runner(api)
    (failed,) = [e for e in runner.events if isinstance(e, NodeFailed)]
    assert failed is report.error


def test_context_prompt_defaults_to_the_graph_in_api_form(registry):
    from engine import Input, Result, node
    seen = {}

    @node("PeekPrompt", output_node=True, inputs=[Input("x", "*")], outputs=[])
    def peek(ctx, x):
        seen.update(dict(ctx.prompt))
        return Result((), None)

    registry.register(peek)
    api = {"1": {"class_type": "Const", "inputs": {"value": "4"}, "_meta": {"title": "Four"}},
           "2": {"class_type": "PeekPrompt", "inputs": {"x": {"__value__": [1, 2]}}},
           "3": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    Executor(registry).run(validate(api, registry).graph)
    assert seen == {"1": {"class_type": "Const", "inputs": {"value": 4}, "_meta": {"title": "Four"}},
                    "2": {"class_type": "PeekPrompt", "inputs": {"x": {"__value__": [1, 2]}}},
                    "3": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}


def test_the_node_hook_receives_keyword_arguments_only(registry):
    """Issue #11: the hook protocol (`engine.Resources.around_node`) is called with keywords, ctx included."""
    from engine import Resources, RunContext

    seen = []

    class Hooked:
        def around_node(self, *, definition, call, ctx):
            assert isinstance(ctx, RunContext) and ctx.resources is self
            seen.append((definition.name, ctx.node_id))
            return call()

    resources = Hooked()
    assert isinstance(resources, Resources)
    report = Executor(registry, resources=resources).run(validate(_sum_graph(), registry).graph)
    assert report.ok, report.error
    assert sorted(seen) == [("Add", "3"), ("Const", "1"), ("Const", "2"), ("Show", "4")]


@pytest.mark.parametrize("raised", [SystemExit, KeyboardInterrupt, GeneratorExit])
def test_a_node_that_exits_fails_the_run_and_the_executor_goes_on(registry, counter, raised):
    """Issue #11: SystemExit, KeyboardInterrupt (any BaseException) from a node never escape Executor.run."""
    from engine import INT, Input, Output, node

    @node("Exit", inputs=[Input("box", "BOX")], outputs=[Output("value", INT)])
    def exit_node(ctx, box):
        raise raised(3)

    registry.register(exit_node)
    executor = Executor(registry, cache=OutputCache(max_bytes=0), resources=counter)
    api = {"1": {"class_type": "MakeBox", "inputs": {"value": 4}},
           "2": {"class_type": "Exit", "inputs": {"box": ["1", 0]}},
           "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    events = []
    report = executor.run(validate(api, registry).graph, listeners=[events.append])
    assert report.status == "failed" and report.executed == ["1"]
    error = report.error
    assert (error.node_id, error.node_type, error.exception_type) == ("2", "Exit", raised.__name__)
    assert error.message.startswith(f"the node raised {raised.__name__}(3); a node must not stop the process")
    assert [e.kind for e in events][-2:] == ["node_failed", "run_finished"] and events[-1].status == "failed"
    gc.collect()
    assert counter.boxes[0]() is None  # the run's values are gone
    assert executor.run(validate(_sum_graph(), registry).graph).ok


def test_a_node_raising_interrupted_when_nobody_cancelled_has_failed(registry):
    """Issue #11: only a cancelled run is "interrupted"; a node raising Interrupted on its own fails."""
    from engine import INT, Input, Interrupted, Output, node

    @node("GiveUp", inputs=[Input("value", INT)], outputs=[Output("value", INT)])
    def give_up(ctx, value):
        raise Interrupted("giving up")

    registry.register(give_up)
    api = {"1": {"class_type": "GiveUp", "inputs": {"value": 1}},
           "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    events = []
    report = Executor(registry).run(validate(api, registry).graph, listeners=[events.append])
    assert report.status == "failed"
    assert (report.error.node_id, report.error.exception_type) == ("1", "Interrupted")
    assert report.error.message == "giving up (the node raised Interrupted, but the run was not cancelled)"
    assert [e.kind for e in events][-2:] == ["node_failed", "run_finished"]
