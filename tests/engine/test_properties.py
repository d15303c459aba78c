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
