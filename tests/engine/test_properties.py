"""Property tests: on random DAGs of toy nodes, cached runs give exactly what uncached runs give."""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from toy_nodes import CallCounter, toy_registry

from engine import Executor, OutputCache, validate

REGISTRY = toy_registry()


@st.composite
def dags(draw) -> dict:
    """A random API graph: constants, arithmetic, list producers and consumers, and Show outputs."""
    size = draw(st.integers(min_value=1, max_value=18))
    api: dict[str, dict] = {}
    for i in range(size):
        kinds = ["Const", "Range"] + (["Add", "Mul", "Sum", "Add"] if i else [])
        kind = draw(st.sampled_from(kinds))

        def operand(i=i):
            if i and draw(st.booleans()):
                return [str(draw(st.integers(0, i - 1))), 0]
            return draw(st.integers(-5, 5))

        if kind == "Const":
            inputs = {"value": draw(st.integers(-1000, 1000))}
        elif kind == "Range":
            inputs = {"count": draw(st.integers(0, 3))}
        elif kind == "Sum":
            inputs = {"values": operand()}
        else:
            inputs = {"a": operand(), "b": operand()}
        api[str(i)] = {"class_type": kind, "inputs": inputs}
    shown = draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=4, unique=True))
    for j, source in enumerate(shown):
        api[f"show{j}"] = {"class_type": "Show", "inputs": {"value": [str(source), 0]}}
    return api


def _run(executor: Executor, api: dict):
    result = validate(api, REGISTRY)
    assert result.ok, [str(e) for e in result.errors]
    report = executor.run(result.graph)
    assert report.ok, report.error
    return report


def _fresh() -> Executor:
    return Executor(REGISTRY, resources=CallCounter())


def _mutate(api: dict, data) -> dict:
    changed = copy.deepcopy(api)
    constants = [(nid, name) for nid, entry in changed.items() for name, value in entry["inputs"].items()
                 if isinstance(value, int) and entry["class_type"] != "Range"]
    if constants:
        nid, name = data.draw(st.sampled_from(constants))
        step = data.draw(st.integers(1, 3))
        value = changed[nid]["inputs"][name]
        changed[nid]["inputs"][name] = value - step if value > 0 else value + step  # stays within Const's limits
    return changed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(api=dags(), data=st.data(), budget=st.sampled_from([0, 2000, 1 << 30]))
def test_cached_and_uncached_runs_agree(api, data, budget):
    expected = _run(_fresh(), api).ui
    shared = Executor(REGISTRY, cache=OutputCache(max_bytes=budget), resources=CallCounter())
    assert _run(shared, api).ui == expected
    variant = _mutate(api, data)
    _run(shared, variant)
    # back to the original graph after a change: whatever comes from the cache must equal a fresh run
    assert _run(shared, api).ui == expected
    assert _run(shared, variant).ui == _run(_fresh(), variant).ui


@settings(max_examples=40, deadline=None)
@given(api=dags())
def test_an_unchanged_graph_reruns_nothing(api):
    executor = _fresh()
    first = _run(executor, api)
    calls = dict(executor.resources.calls)
    second = _run(executor, api)
    assert second.executed == []
    assert executor.resources.calls == calls
    assert second.ui == first.ui


@st.composite
def tangles(draw) -> dict:
    """A random graph of Add nodes whose links may point anywhere, so cycles of every shape occur."""
    size = draw(st.integers(min_value=1, max_value=14))
    link = st.one_of(st.integers(-5, 5), st.integers(0, size - 1).map(lambda j: [str(j), 0]))
    api = {str(i): {"class_type": "Add", "inputs": {"a": draw(link), "b": draw(link)}} for i in range(size)}
    api["show"] = {"class_type": "Show", "inputs": {"value": ["0", 0]}}
    return api


@settings(max_examples=150, deadline=None)
@given(api=tangles())
def test_each_cycle_is_reported_once_with_a_real_cycle(api):
    """Issue #11: one dependency_cycle error per strongly connected tangle, naming a cycle that exists."""
    import networkx as nx

    graph = nx.DiGraph((value[0], node_id) for node_id, entry in api.items()
                       for value in entry["inputs"].values() if isinstance(value, list))
    tangled = [c for c in nx.strongly_connected_components(graph)
               if len(c) > 1 or any(graph.has_edge(n, n) for n in c)]
    errors = [e for e in validate(api, REGISTRY).errors if e.code == "dependency_cycle"]
    assert len(errors) == len(tangled)
    for error in errors:
        path = error.extra["cycle"]
        assert path[0] == error.node_id and len(path) == error.extra["cycle_length"]
        assert all(graph.has_edge(a, b) for a, b in zip(path, path[1:] + path[:1], strict=True))
