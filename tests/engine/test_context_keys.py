"""Issue #15: a running node sees the plan's content key and declared version of every planned node
(`ctx.node_keys`, `ctx.node_versions`), which savers record in the reproducibility manifest."""

from __future__ import annotations

from toy_nodes import two_branches

from engine import INT, Executor, Input, node, validate


@node("SeeKeys", category="test", version=3, output_node=True, inputs=[Input("value", INT)], outputs=[])
def see_keys(ctx, value):
    ctx.resources.calls["seen"] = (dict(ctx.node_keys), dict(ctx.node_versions))


def test_a_node_sees_every_planned_nodes_key_and_version(registry, counter):
    registry.register(see_keys)
    api = {**two_branches(), "7": {"class_type": "SeeKeys", "inputs": {"value": ["1", 0]}}}
    result = validate(api, registry, targets=["7"])
    assert result.ok, result.errors
    executor = Executor(registry, resources=counter)
    plan = executor.plan(result.graph)
    executor.run(result.graph)
    keys, versions = counter.calls["seen"]
    assert keys == {nid: step.key for nid, step in plan.steps.items()} and set(keys) == {"1", "7"}
    assert versions == {"1": "1", "7": "3"}
