"""The content-addressed cache: what re-runs, what is shared, and what is evicted under a byte budget."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
from toy_nodes import two_branches

from engine import Executor, NodeRegistry, OutputCache, validate
from engine.cache import CachedOutput, KeyParts, describe_change, estimate_nbytes, make_key


def test_rerunning_an_unchanged_graph_executes_nothing(runner, counter):
    first = runner(two_branches())
    assert first.ui["6"] == {"text": ["31"]}
    calls = dict(counter.calls)
    second = runner(two_branches())
    assert second.executed == [] and second.cached == ["6"]  # the output came from the cache: nothing else needed
    assert counter.calls == calls
    assert second.ui["6"] == {"text": ["31"]}
    assert runner.kinds() == ["run_started", "nodes_cached", "run_finished"]
    assert sorted(runner.events[1].node_ids) == ["1", "2", "3", "4", "5", "6"]


def test_changing_a_constant_reruns_that_node_and_what_depends_on_it(runner):
    runner(two_branches())
    report = runner(two_branches(left=5))
    assert report.executed == ["1", "2", "5", "6"]
    assert report.cached == ["4"]  # the other branch is reused
    assert report.ui["6"] == {"text": ["35"]}
    assert report.explain["1"] == "ran: input 'value' changed (1 -> 5)"
    assert report.explain["2"] == "ran: input 'a' changed upstream"
    assert report.explain["4"] == "cached in memory"
    assert report.explain["3"].startswith("skipped:")


def test_changing_a_downstream_constant_keeps_upstream_results(runner, counter):
    runner(two_branches())
    api = two_branches()
    api["4"]["inputs"]["b"] = 100
    report = runner(api)
    assert report.executed == ["4", "5", "6"] and sorted(report.cached) == ["2", "3"]
    assert report.ui["6"] == {"text": ["211"]}


def test_fingerprint_change_reruns(runner, counter, tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("one")
    api = {"1": {"class_type": "ReadText", "inputs": {"path": str(path)}},
           "2": {"class_type": "Concat", "inputs": {"left": ["1", 0], "right": "!"}},
           "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    assert runner(api).ui["3"] == {"text": ["one!"]}
    assert runner(api).executed == []
    path.write_text("two")
    os.utime(path, ns=(1, 1))  # a different mtime whatever the clock's resolution
    report = runner(api)
    assert report.executed == ["1", "2", "3"] and report.ui["3"] == {"text": ["two!"]}
    assert report.explain["1"] == "ran: its fingerprint changed (the file or resource it reads is different)"
    assert counter.calls["ReadText"] == 2


def test_identical_subchains_compute_once(runner, counter):
    api = {"1": {"class_type": "Const", "inputs": {"value": 3}},
           "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 1}},
           "3": {"class_type": "Const", "inputs": {"value": 3}},
           "4": {"class_type": "Add", "inputs": {"a": ["3", 0], "b": 1}},
           "5": {"class_type": "Mul", "inputs": {"a": ["2", 0], "b": ["4", 0]}},
           "6": {"class_type": "Show", "inputs": {"value": ["5", 0]}}}
    report = runner(api)
    assert report.ui["6"] == {"text": ["16"]}
    assert counter.calls == {"Const": 1, "Add": 1, "Mul": 1, "Show": 1}
    # 2 has the same key as 4, so it takes 4's result and its own input (1) is not even needed
    assert report.executed == ["3", "4", "5", "6"]
    assert report.explain["2"] == "same inputs as node 4, computed once"
    assert report.explain["1"].startswith("skipped:")


def test_identical_subchains_share_even_without_a_cache(registry, counter):
    executor = Executor(registry, cache=OutputCache(max_bytes=0), resources=counter)
    api = {"1": {"class_type": "Const", "inputs": {"value": 3}}, "2": {"class_type": "Const", "inputs": {"value": 3}},
           "3": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
           "4": {"class_type": "Show", "inputs": {"value": ["3", 0]}}}
    report = executor.run(validate(api, registry).graph)
    assert report.ui["4"] == {"text": ["6"]} and counter.calls["Const"] == 1


def test_not_cacheable_nodes_always_run(runner, counter):
    api = {"1": {"class_type": "Const", "inputs": {"value": 3}},
           "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    runner(api)
    report = runner(api)
    assert report.executed == ["2"] and counter.calls == {"Const": 1, "Sink": 2}
    assert report.explain["2"] == "ran: not cacheable (it has side effects)"


def test_a_new_node_version_reruns(registry, counter):
    executor = Executor(registry, resources=counter)
    api = {"1": {"class_type": "Const", "inputs": {"value": 3}},
           "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
    executor.run(validate(api, registry).graph)
    newer = NodeRegistry()  # the same nodes, Const in a new version
    for definition in registry:
        newer.register(replace(definition, version="2") if definition.name == "Const" else definition,
                       declare_types=True)
    executor.registry = newer
    report = executor.run(validate(api, newer).graph)
    assert report.executed == ["1", "2"]
    assert report.explain["1"] == "ran: node type/version changed (Const v1 -> Const v2)"


def test_lru_eviction_under_a_byte_budget():
    cache = OutputCache(max_bytes=100)
    entry = lambda n: CachedOutput(([n],), None, n)  # noqa: E731
    cache.put("a", entry(40))
    cache.put("b", entry(40))
    assert cache.nbytes == 80 and len(cache) == 2
    assert [key for key, _ in cache.items()] == ["a", "b"]
    assert cache.get("a") is not None  # a is now the most recently used
    assert [key for key, _ in cache.items()] == ["b", "a"]
    cache.put("c", entry(40))  # over budget: the least recently used (b) goes
    assert "b" not in cache and "a" in cache and "c" in cache and cache.nbytes == 80
    cache.put("d", entry(90))  # needs everything else gone
    assert [key for key, _ in cache.items()] == ["d"] and cache.nbytes == 90
    cache.put("huge", entry(101))  # larger than the budget: never stored
    assert "huge" not in cache and "d" in cache
    cache.put("d", entry(10))  # replacing an entry updates the byte count
    assert cache.nbytes == 10
    assert cache.get("missing") is None
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_executor_evicts_least_recently_used_results(registry, counter):
    # Each Range(200) output is a list of 200 ints (~7.5 kB); the budget holds about two of them.
    budget = 2 * estimate_nbytes(list(range(200))) + 1000
    executor = Executor(registry, cache=OutputCache(max_bytes=budget), resources=counter)

    def graph(start):
        return {"1": {"class_type": "Range", "inputs": {"count": 200}},
                "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": start}},
                "3": {"class_type": "Sum", "inputs": {"values": ["2", 0]}}}

    def run(start):
        return executor.run(validate(graph(start), registry, targets=["3"]).graph)

    run(1)
    assert run(1).executed == []
    run(2)
    run(3)  # the Add result for start=1 is now the least recently used and has been evicted
    assert executor.cache.nbytes <= budget
    again = run(1)
    assert again.executed == ["2", "3"] and again.cached == ["1"]


def _parts(**changes) -> KeyParts:
    fields = {"node_type": "Add", "version": "1", "constants": {"b": "1"}, "inputs": {"a": "k1:0"}, "fingerprint": ""}
    return KeyParts(**{**fields, **changes})


def test_make_key_depends_on_every_part():
    base = _parts()
    variants = [_parts(node_type="Mul"), _parts(version="2"), _parts(constants={"b": "2"}),
                _parts(inputs={"a": "k2:0"}), _parts(inputs={"a": "k1:1"}), _parts(fingerprint="x")]
    keys = {make_key(base)} | {make_key(v) for v in variants}
    assert len(keys) == 7
    assert make_key(base) == make_key(KeyParts("Add", "1", {"b": "1"}, {"a": "k1:0"}, ""))


def test_describe_change():
    text = "'" + "x" * 60 + "'"
    before = _parts(constants={"b": "1", "text": text}, fingerprint="f")
    assert describe_change(before, _parts(constants={"b": "2", "text": text}, fingerprint="f")) == \
        "input 'b' changed (1 -> 2)"
    assert describe_change(before, _parts(constants={"b": "1"}, fingerprint="f")).startswith(
        "input 'text' changed ('xxxxxxxxx")
    assert describe_change(before, _parts(constants={"b": "1", "text": text}, inputs={"a": "k9:0"},
                                          fingerprint="f")) == "input 'a' changed upstream"
    assert describe_change(before, before) == "its cached result was evicted"


def test_estimate_nbytes():
    assert estimate_nbytes(np.zeros((10, 10), dtype=np.float32)) == 400
    assert estimate_nbytes("abc") == 52
    assert estimate_nbytes([np.zeros(100, dtype=np.uint8)] * 2) == 56 + 16 + 200
    assert estimate_nbytes({"k": np.zeros(8, dtype=np.float64)}) == 64 + 64 + 50
