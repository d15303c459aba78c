"""compile_plan (issue #11: the executor's plan/run split): order, keys, what is cached, what must run and why,
consumers and lazy inputs, without calling a node function."""

from __future__ import annotations

import dataclasses
import time

import pytest
from toy_nodes import two_branches

from engine import INT, Executor, Input, KeyHistory, Output, OutputCache, Plan, compile_plan, node, validate
from engine.cache import KeyParts
from engine.graph import Graph, Link, NodeInstance
from engine.plan import CACHED, LAZY, RUN, SKIP, needed_in_order


def _graph(api, registry, **kwargs):
    result = validate(api, registry, **kwargs)
    assert result.ok, result.errors
    return result.graph


def test_a_first_plan_runs_everything_and_calls_no_node(registry, counter):
    plan = compile_plan(_graph(two_branches(), registry), registry, OutputCache(), resources=counter)
    assert counter.calls == {}
    assert plan.order[-1] == "6" and set(plan.order) == {"1", "2", "3", "4", "5", "6"}
    assert plan.with_status(RUN) == plan.order and plan.in_cache == ()
    assert plan["1"].why == "no earlier result for this node"
    assert plan.explain()["6"] == "will run: no earlier result for this node"


def test_after_a_run_the_plan_says_what_is_cached_and_why_the_rest_runs(registry, counter):
    executor = Executor(registry, resources=counter)
    executor.run(_graph(two_branches(), registry))
    calls = dict(counter.calls)
    plan = executor.plan(_graph(two_branches(left=5), registry))
    assert counter.calls == calls  # planning computed nothing
    assert {nid: step.status for nid, step in plan.steps.items()} == \
        {"1": RUN, "2": RUN, "3": SKIP, "4": CACHED, "5": RUN, "6": RUN}
    assert plan["1"].why == "input 'value' changed (1 -> 5)"
    assert plan["2"].why == "input 'a' changed upstream"
    assert plan.in_cache == ("3", "4")  # 3 is in the cache too, but nothing that runs needs it
    explained = plan.explain()
    assert explained["4"] == "cached" and explained["3"].startswith("skipped:")
    # the run then does what the plan said, and explains it in the same words
    report = executor.run(_graph(two_branches(left=5), registry))
    assert sorted(report.executed) == list(plan.with_status(RUN))
    assert report.explain["1"] == "ran: input 'value' changed (1 -> 5)"


def test_an_unchanged_graph_plans_only_its_cached_output(registry, counter):
    executor = Executor(registry, resources=counter)
    executor.run(_graph(two_branches(), registry))
    plan = executor.plan(_graph(two_branches(), registry))
    assert plan.with_status(CACHED) == ("6",) and len(plan.with_status(SKIP)) == 5
    assert plan["6"].why.startswith("same inputs as its last run, but")  # what a run would say if it had to run


def test_inputs_behind_lazy_inputs_are_planned_as_lazy(registry):
    api = {"1": {"class_type": "Add", "inputs": {"a": 1, "b": 2}},
           "2": {"class_type": "Mul", "inputs": {"a": ["1", 0], "b": 2}},
           "3": {"class_type": "Const", "inputs": {"value": 4}},
           "4": {"class_type": "Switch", "inputs": {"choose_a": True, "a": ["2", 0], "b": ["3", 0]}},
           "5": {"class_type": "Show", "inputs": {"value": ["4", 0]}}}
    plan = compile_plan(_graph(api, registry), registry, OutputCache())
    assert {nid: plan[nid].status for nid in plan.order} == {"1": LAZY, "2": LAZY, "3": LAZY, "4": RUN, "5": RUN}
    assert plan["4"].lazy == {"a", "b"} and plan["5"].lazy == frozenset()
    assert plan.explain()["2"].startswith("will run if a lazy input that needs it is asked for")


def test_readers_count_each_link_of_each_output(registry):
    api = {"1": {"class_type": "DivMod", "inputs": {"a": 7, "b": 2}},
           "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["1", 0]}},
           "3": {"class_type": "Show", "inputs": {"value": ["1", 1]}},
           "4": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    plan = compile_plan(_graph(api, registry), registry, OutputCache())
    assert dict(plan.readers) == {("1", 0): ("2", "2"), ("1", 1): ("3",), ("2", 0): ("4",)}
    assert plan["2"].links == (("a", Link("1", 0)), ("b", Link("1", 0)))


def test_identical_subchains_share_a_key(registry):
    api = {"1": {"class_type": "Const", "inputs": {"value": 3}},
           "2": {"class_type": "Const", "inputs": {"value": 3}},
           "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
           "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}
    plan = compile_plan(_graph(api, registry), registry, OutputCache())
    assert plan["1"].key == plan["2"].key != plan["3"].key


def test_the_plan_is_immutable(registry):
    plan = compile_plan(_graph(two_branches(), registry), registry, OutputCache())
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.order = ()
    with pytest.raises(TypeError):
        plan.steps["1"] = plan.steps["2"]
    with pytest.raises(TypeError):
        plan.readers["1", 0] = ()


def test_history_is_what_the_plan_compares_with(registry):
    graph = _graph(two_branches(), registry)
    history = KeyHistory()
    assert compile_plan(graph, registry, OutputCache(), history=history)["1"].why == "no earlier result for this node"
    history.record("1", KeyParts("Const", "1", {"value": "7"}, {}, ""))
    again = compile_plan(graph, registry, OutputCache(), history=history)
    assert again["1"].why == "input 'value' changed (7 -> 1)" and history.last("2") is None


def test_history_forgets_the_node_ids_recorded_longest_ago():
    history = KeyHistory(max_entries=2)
    for nid in ("1", "2", "1", "3"):
        history.record(nid, KeyParts("Const", "1", {"value": nid}, {}, ""))
    assert history.last("2") is None and history.last("1").constants == {"value": "1"} and history.last("3")


@pytest.mark.parametrize("raised", [ValueError("no file"), SystemExit(2), KeyboardInterrupt()])
def test_a_failing_fingerprint_means_always_run_and_does_not_stop_planning(registry, raised):
    """Issue #11: whatever a node's code raises (SystemExit too) must not escape the engine."""

    def stamp(resources, value):
        raise raised

    @node("Stamped", fingerprint=stamp, inputs=[Input("value", INT)], outputs=[Output("value", INT)])
    def stamped(ctx, value):
        return value

    registry.register(stamped)
    graph = _graph({"1": {"class_type": "Stamped", "inputs": {"value": 1}}}, registry, targets=["1"])
    keys = {compile_plan(graph, registry, OutputCache())["1"].key for _ in range(2)}
    assert len(keys) == 2


def test_the_order_of_a_diamond_puts_each_node_after_its_inputs(registry):
    api = {"9": {"class_type": "Show", "inputs": {"value": ["5", 0]}},
           "5": {"class_type": "Mul", "inputs": {"a": ["7", 0], "b": ["1", 0]}},
           "7": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
           "1": {"class_type": "Const", "inputs": {"value": 4}}}
    order, links = needed_in_order(_graph(api, registry))
    assert order == ["1", "7", "5", "9"] and links["5"] == (("a", Link("7", 0)), ("b", Link("1", 0)))


def test_a_cycle_is_refused(registry):
    nodes = {"1": NodeInstance("1", "Add", {"a": Link("2", 0), "b": 1}),
             "2": NodeInstance("2", "Add", {"a": Link("1", 0), "b": 1})}
    with pytest.raises(ValueError, match="cycle"):
        needed_in_order(Graph(nodes, ("2",)))


def chain(length: int) -> Graph:
    nodes = {"0": NodeInstance("0", "Const", {"value": 1})}
    for i in range(1, length):
        nodes[str(i)] = NodeInstance(str(i), "Add", {"a": Link(str(i - 1), 0), "b": 1})
    return Graph(nodes, (str(length - 1),))


def _planning_seconds(graph: Graph, registry, repeat: int) -> tuple[float, Plan]:
    """The least CPU time of `repeat` plans (CPU time, and the least: other processes share the machine)."""
    times = []
    for _ in range(repeat):
        started = time.process_time()
        plan = compile_plan(graph, registry, OutputCache())
        times.append(time.process_time() - started)
    return min(times), plan


@pytest.mark.slow
def test_planning_time_grows_linearly_up_to_a_100000_node_chain(registry):
    """Issue #11: a 100,000-node chain plans quickly; ten times the nodes take about ten times as long (a
    quadratic step would take a hundred times; caches allow some more). Measured: see docs/engine.md."""
    small_seconds, _ = _planning_seconds(chain(10_000), registry, repeat=3)
    large_seconds, plan = _planning_seconds(chain(100_000), registry, repeat=2)
    assert len(plan.order) == 100_000 and plan.order[0] == "0" and plan.with_status(RUN) == plan.order
    assert large_seconds < 30 * small_seconds, (small_seconds, large_seconds)  # caches make large dearer
    assert large_seconds < 5, large_seconds
