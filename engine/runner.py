"""Running a `Plan`: evaluate on demand from the outputs, take from the cache or compute, release, report.

Each computation goes through the application's hook (`AroundNode`, keyword-only arguments). Whatever a node
raises (an exception, `SystemExit`, `KeyboardInterrupt`) fails that node: it is reported in the `RunReport` and
a `NodeFailed` event, and never escapes. Only a cancelled run ends "interrupted"; a node that raises
`Interrupted` while nobody cancelled the run has failed like any other.
"""

from __future__ import annotations

import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .cache import About, CachedOutput, OutputCache, estimate_nbytes
from .context import AroundNode, CancelToken, Interrupted, Resources, RunContext, step_keys, step_versions
from .diskcache import describe_written
from .events import (
    Event,
    Listener,
    NodeFailed,
    NodeFinished,
    NodesCached,
    NodeStarted,
    RunFinished,
    RunInterrupted,
    RunStarted,
)
from .expansion import (
    Expansion,
    ExpansionError,
    as_expansion,
    inner_prefix,
    node_events_only,
    prefixed_graph,
    resolved_outputs,
)
from .graph import Link
from .plan import KeyHistory, Plan, Step, compile_plan
from .registry import NodeRegistry
from .spec import NodeDef, Result, accepted_kwargs
from .tiers import TieredCache
from .validation import validate

SKIPPED = ("skipped: nothing that ran needed it (its consumers came from the cache, or it feeds a lazy input that "
           "was not asked for)")


class NodeError(RuntimeError):
    """A node's function returned something its declaration does not allow."""


@dataclass
class RunReport:
    run_id: str
    status: str  # "success" | "failed" | "interrupted"
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    ui: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    outputs: dict[str, tuple[list, ...]] = field(default_factory=dict)
    explain: dict[str, str] = field(default_factory=dict)
    error: NodeFailed | None = None

    @property
    def ok(self) -> bool:
        return self.status == "success"


def run_plan(plan: Plan, *, registry: NodeRegistry, cache: OutputCache | TieredCache, history: KeyHistory, run_id: str,
             resources: Resources | None = None, around_node: AroundNode | None = None,
             listeners: Iterable[Listener] = (), cancel: CancelToken | None = None,
             prompt: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> RunReport:
    """Execute `plan`. Results of cacheable nodes go into `cache`, what each computed node ran with into
    `history`. Never raises for a node's failure: the report (and the events) say what happened."""
    run = _PlanRun(plan, registry, cache, history, resources, around_node, list(listeners),
                   cancel or CancelToken(), RunReport(run_id, "success"), {} if prompt is None else prompt,
                   extra or {})
    return run.execute()


class _PlanRun:
    """The state of one run of a plan: values computed so far, consumers still to come, the report."""

    def __init__(self, plan: Plan, registry: NodeRegistry, cache: OutputCache | TieredCache, history: KeyHistory,
                 resources: Resources | None, around_node: AroundNode | None, listeners: list[Listener],
                 cancel: CancelToken, report: RunReport, prompt: Mapping[str, Any], extra: Mapping[str, Any]):
        self.plan, self.registry, self.cache, self.history = plan, registry, cache, history
        self.resources, self.around_node, self.listeners, self.cancel = resources, around_node, listeners, cancel
        self.report, self.prompt, self.extra = report, prompt, extra
        self.results: dict[str, CachedOutput] = {}
        self.by_key: dict[str, str] = {}  # key -> the node that computed it in this run
        self.current: str | None = None
        self.outputs = frozenset(plan.outputs)  # never released during the run: the report returns them
        # Consumers still to run, per output (the look-ahead) and per node (release after the last one).
        self.output_refs: Counter[tuple[str, int]] = Counter({ref: len(ids) for ref, ids in plan.readers.items()})
        self.refcount: Counter[str] = Counter()
        for (source, _), ids in plan.readers.items():
            self.refcount[source] += len(ids)

    def emit(self, event: Event) -> None:
        for listener in self.listeners:
            listener(event)

    def execute(self) -> RunReport:
        plan, report = self.plan, self.report
        self.emit(RunStarted(report.run_id, plan.order))
        if plan.in_cache:
            self.emit(NodesCached(report.run_id, plan.in_cache))
        try:
            self._evaluate()
            report.outputs.update((nid, self.results[nid].outputs) for nid in plan.outputs)
            for nid in plan.order:
                report.explain.setdefault(nid, SKIPPED)
            self.emit(RunFinished(report.run_id, "success", tuple(report.executed)))
        except Interrupted:
            report.status = "interrupted"
            node_type = self.current and plan[self.current].definition.name
            self.emit(RunInterrupted(report.run_id, self.current, node_type, tuple(report.executed)))
        except _NodeFailure as failure:
            report.status, report.error = "failed", failure.event
            self.emit(failure.event)
            self.emit(RunFinished(report.run_id, "failed", tuple(report.executed)))
        finally:  # the run's values go now, whatever happened (the cache keeps what it keeps)
            self.results.clear()
            self.by_key.clear()
        return report

    def _evaluate(self) -> None:
        """Demand-driven from the outputs, with an explicit stack: a cached node is taken without looking at its
        inputs; otherwise its (asked-for) inputs are evaluated first, then it runs."""
        plan, results = self.plan, self.results
        requested: dict[str, set[str]] = {}
        stack = list(reversed(plan.outputs))
        while stack:
            nid = stack[-1]
            if nid in results or self._take_cached(plan[nid]):
                stack.pop()
                continue
            step = plan[nid]
            wanted = requested.setdefault(nid, set())
            missing = [link.source for name, link in step.links
                       if (name not in step.lazy or name in wanted) and link.source not in results]
            if missing:
                stack.extend(missing)
                continue
            self.current = nid
            if step.definition.check_lazy is not None and step.lazy:
                more = self._lazy_requests(step, wanted)
                if more:
                    wanted.update(more)
                    continue
            self.cancel.check()
            results[nid] = self._compute(step)
            self.by_key.setdefault(step.key, nid)
            stack.pop()
            self._release_inputs(step)
        self.current = None

    def _take_cached(self, step: Step) -> bool:
        """Take the node's result from the cache, or from a node of this run with the same key."""
        hit = self.cache.get(step.key)
        twin = self.by_key.get(step.key)
        if hit is None and twin is not None:
            hit = self.results.get(twin)
        if hit is None:
            return False
        nid = step.node_id
        self.results[nid] = hit
        self.report.cached.append(nid)
        self.report.explain[nid] = (f"same inputs as node {twin}, computed once" if twin else
                                    "cached in memory" if hit.written is None else
                                    f"cached on disk ({describe_written(*hit.written)})")
        if hit.ui:
            self.report.ui[nid] = hit.ui
        self._release_inputs(step)
        return True

    def _lazy_requests(self, step: Step, wanted: set[str]) -> set[str]:
        """Which lazy inputs the node asks for, given what is known so far (unevaluated ones are None)."""
        check_lazy = step.definition.check_lazy
        values = {name: v[0] if v else None for name, v in self._input_lists(step).items()}
        try:
            asked = check_lazy(**accepted_kwargs(check_lazy, values)) or ()
        except BaseException as exc:  # noqa: BLE001 - whatever the node's code raises fails the node
            shown = {name: _describe([v]) for name, v in values.items()}
            raise self._failure(step, exc, shown, "while choosing its lazy inputs: ") from exc
        linked = {name for name, _ in step.links}
        return {name for name in asked if name in step.lazy and name in linked and name not in wanted}

    def _input_lists(self, step: Step) -> dict[str, list]:
        values: dict[str, list] = {}
        for name, value in step.node.inputs.items():
            if isinstance(value, Link):
                source = self.results.get(value.source)
                values[name] = source.outputs[value.output] if source is not None else [None]
            else:
                values[name] = [value]
        return values

    def _upcoming(self, step: Step) -> list[Any]:
        """Values computed so far that a node other than this one has still to read (the plan's look-ahead)."""
        mine = Counter((link.source, link.output) for _, link in step.links)
        return [value for source, result in self.results.items() for output, values in enumerate(result.outputs)
                if self.output_refs[source, output] - mine[source, output] > 0 for value in values]

    def _release_inputs(self, step: Step) -> None:
        for _, link in step.links:
            source = link.source
            self.refcount[source] -= 1
            self.output_refs[source, link.output] -= 1
            if self.refcount[source] == 0 and source not in self.outputs:
                self.results.pop(source, None)

    def _compute(self, step: Step) -> CachedOutput:
        definition, nid, run_id = step.definition, step.node_id, self.report.run_id
        self.emit(NodeStarted(run_id, nid, definition.name))
        ctx = RunContext(run_id, nid, definition.name, self.resources, self.cancel, self.emit, self.prompt,
                         self.extra, upcoming=lambda: self._upcoming(step), node_keys=step_keys(self.plan.steps),
                         node_versions=step_versions(self.plan.steps))
        inputs = self._input_lists(step)
        expand = lambda expansion, index, calls: self._expand(step, expansion, index, calls)  # noqa: E731
        call = lambda: call_node(definition, ctx, inputs, self.registry, expand=expand)  # noqa: E731
        started = time.perf_counter()
        try:
            result = call() if self.around_node is None else self.around_node(definition=definition, call=call,
                                                                               ctx=ctx)
        except BaseException as exc:  # noqa: BLE001 - SystemExit, KeyboardInterrupt too: the node fails
            raise self._failure(step, exc, {name: _describe(values) for name, values in inputs.items()}) from exc
        seconds = time.perf_counter() - started
        self.report.executed.append(nid)
        if result.ui:
            self.report.ui[nid] = result.ui
        self.report.explain[nid] = f"ran: {step.why}"
        self.history.record(nid, step.parts)
        if definition.cacheable:
            input_types = tuple(self.plan[link.source].definition.outputs[link.output].type for _, link in step.links)
            self.cache.put(step.key, result, About(step.parts, tuple(out.type for out in definition.outputs),
                                                   run_id, seconds, definition.output_node, input_types))
        self.emit(NodeFinished(run_id, nid, definition.name, result.ui, seconds))
        return result

    def _expand(self, step: Step, expansion: Expansion, call_index: int, calls: int) -> list[list]:
        """Run the graph the node expanded into (engine/expansion.py), in this run, and return the node's outputs:
        inner ids derived from the parent's, inner nodes cached by content, the inner outputs the node's own."""
        nid, name = step.node_id, step.definition.name
        prefix = inner_prefix(nid, call_index, calls)
        api, links = prefixed_graph(expansion, prefix, nid)
        outputs = {inner for inner, node in api.items()
                   if (d := self.registry.get(str(node.get("class_type")))) is not None and d.output_node}
        checked = validate(api, self.registry, targets=sorted({source for source, _ in links} | outputs),
                           resources=self.resources)
        if not checked.ok:
            raise ExpansionError(f"node {nid} ({name}) expanded into a graph that is not valid: "
                                 + "; ".join(str(error) for error in checked.errors[:5]))
        plan = compile_plan(checked.graph, self.registry, self.cache, resources=self.resources, history=self.history)
        inner = run_plan(plan, registry=self.registry, cache=self.cache, history=self.history,
                         run_id=self.report.run_id, resources=self.resources, around_node=self.around_node,
                         listeners=[node_events_only(self.emit)], cancel=self.cancel, prompt=self.prompt,
                         extra=self.extra)
        self.report.executed.extend(inner.executed)
        self.report.cached.extend(inner.cached)
        self.report.ui.update(inner.ui)
        self.report.explain.update(inner.explain)
        if inner.status == "interrupted":
            raise Interrupted(f"the run was cancelled inside the expansion of node {nid}")
        if inner.error is not None:
            error = inner.error
            raise ExpansionError(f"node {error.node_id} ({error.node_type}) of the graph node {nid} expanded into "
                                 f"failed: {error.exception_type}: {error.message}")
        return resolved_outputs(expansion, prefix, inner.outputs, len(step.definition.outputs), nid)

    def _failure(self, step: Step, exc: BaseException, shown: dict[str, str], doing: str = "") -> _NodeFailure:
        """The failure to report for what a node's code raised; re-raises `Interrupted` if the run was cancelled.
        Called inside the `except` block (for the traceback)."""
        if isinstance(exc, Interrupted) and self.cancel.cancelled:
            raise exc
        message = str(exc)
        if isinstance(exc, Interrupted):
            message = f"{message} (the node raised Interrupted, but the run was not cancelled)"
        elif not isinstance(exc, Exception):
            message = f"the node raised {exc!r}; a node must not stop the process: the run failed, the process goes on"
        return _NodeFailure(NodeFailed(self.report.run_id, step.node_id, step.definition.name, type(exc).__name__,
                                       doing + message, traceback.format_exc(), shown))


class _NodeFailure(Exception):
    def __init__(self, event: NodeFailed):
        super().__init__(event.message)
        self.event = event


def call_node(definition: NodeDef, ctx: RunContext, inputs: dict[str, list], registry: NodeRegistry, *,
              expand: Callable[[Expansion, int, int], list[list]] | None = None) -> CachedOutput:
    """Call the node's function, once per list element unless it takes whole lists (ComfyUI's list rules:
    the longest input sets the count, shorter ones repeat their last element). A call that returns a graph to
    expand (engine/expansion.py) gets its outputs from `expand(expansion, call_index, calls)`."""
    if definition.input_is_list:
        calls = [inputs]
    else:
        count = max((len(v) for v in inputs.values()), default=1)
        if any(len(v) == 0 for v in inputs.values()):
            count = 0
        calls = [{name: v[min(i, len(v) - 1)] for name, v in inputs.items()} for i in range(count)]
    outputs: tuple[list, ...] = tuple([] for _ in definition.outputs)
    ui: dict[str, Any] | None = None
    for index, kwargs in enumerate(calls):
        returned = definition.fn(ctx, **kwargs)
        expansion = as_expansion(returned)
        if expansion is not None:
            if expand is None:
                raise NodeError(f"{definition.name} returned a graph to expand, which only a run can do")
            for j, values in enumerate(expand(expansion, index, len(calls))):
                outputs[j].extend(values)
            continue
        values, call_ui = _split_return(definition, returned)
        for j, out in enumerate(definition.outputs):
            if out.is_list:
                if not isinstance(values[j], list | tuple):
                    raise NodeError(f"{definition.name} declares output {out.name!r} as a list but returned "
                                    f"{type(values[j]).__name__}")
                outputs[j].extend(values[j])
            else:
                outputs[j].append(values[j])
        if call_ui:
            ui = _merge_ui(ui, call_ui)
    for j, out in enumerate(definition.outputs):
        info = registry.type_info(out.type)
        if info is not None and info.adapt is not None:
            outputs[j][:] = [info.adapt(v) for v in outputs[j]]
    nbytes = sum(estimate_nbytes(v) for values in outputs for v in values) + (estimate_nbytes(ui) if ui else 0)
    return CachedOutput(outputs, ui, nbytes)


def _split_return(definition: NodeDef, returned: Any) -> tuple[tuple, Mapping[str, Any] | None]:
    n_out = len(definition.outputs)
    if isinstance(returned, Result):
        values, ui = tuple(returned.outputs), returned.ui
    elif n_out == 1:
        values, ui = (returned,), None
    elif n_out == 0:
        values, ui = (), None
    else:
        values, ui = returned, None
    if not isinstance(values, tuple) or len(values) != n_out:
        got = len(values) if isinstance(values, tuple) else type(values).__name__
        raise NodeError(f"{definition.name} must return {n_out} output value(s) "
                        f"({', '.join(o.name for o in definition.outputs)}), returned {got}")
    return values, ui


def _merge_ui(ui: dict[str, Any] | None, more: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(ui or {})
    for name, value in more.items():
        if name in merged and isinstance(merged[name], list) and isinstance(value, list):
            merged[name] = merged[name] + value
        else:
            merged[name] = value
    return merged


def _describe(values: list) -> str:
    value = values[0] if len(values) == 1 else values
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__} shape {tuple(shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
