"""`sdgraph run GRAPH --sweep 3.seed=1..64 [--sweep 6.text=a,b] [--ray auto]`: one graph, many values.

Each `--sweep ID.INPUT=VALUES` is an axis: `A..B` (whole numbers A to B, both included), `a,b,c` (a list; each
value parsed as JSON when it parses, else taken as text, as for --set) or one value. Several axes make their
product. Without --ray the prompts run here, one after another, with one Executor (so what they share, the
loaded models and every node upstream of the swept input, is computed once). With --ray they are queued in a
private durable queue and fanned over the cluster's workers (`service.ray_pool`, with affinity routing); the
outputs land in output/ (or --out) as usual and are collected from each prompt's history entry.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import CancelToken, Executor, GraphFormatError, NodeRegistry, apply_overrides, validate
from engine.sizes import DEFAULT_SIZE_LIMITS, SizeLimits

MAX_PROMPTS = 100_000


@dataclass(frozen=True)
class Axis:
    target: str  # ID.INPUT
    values: tuple[str, ...]  # as written (parsed like --set)


@dataclass
class SweepResult:
    overrides: tuple[str, ...]  # ID.INPUT=VALUE for each axis
    status: str  # success | failed | interrupted | invalid
    ui: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    worker: str | None = None  # with --ray: where it ran and why
    reason: str | None = None


def parse_axis(spec: str) -> Axis:
    """`ID.INPUT=A..B`, `ID.INPUT=a,b,c` or `ID.INPUT=v`; raises GraphFormatError saying how to write it."""
    target, sep, raw = spec.partition("=")
    node_id, dot, name = target.partition(".")
    how = "write it as NODE_ID.INPUT=A..B (whole numbers), NODE_ID.INPUT=a,b,c or NODE_ID.INPUT=VALUE, " \
          "e.g. --sweep 3.seed=1..64"
    if not sep or not dot or not node_id or not name or raw == "":
        raise GraphFormatError(f"--sweep {spec!r}: {how}")
    first, dots, last = raw.partition("..")
    if dots:
        try:
            low, high = int(first), int(last)
        except ValueError:
            raise GraphFormatError(f"--sweep {spec!r}: a range takes whole numbers; {how}") from None
        if high < low:
            raise GraphFormatError(f"--sweep {spec!r}: the range {low}..{high} is empty (write the smaller first)")
        if high - low + 1 > MAX_PROMPTS:
            raise GraphFormatError(f"--sweep {spec!r}: {high - low + 1} values; at most {MAX_PROMPTS}")
        return Axis(target, tuple(str(v) for v in range(low, high + 1)))
    return Axis(target, tuple(raw.split(",")))


def expand(api: dict[str, Any], axes: Sequence[Axis]) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every combination of the axes' values (the last axis varies fastest): (overrides, prompt)."""
    total = 1
    for axis in axes:
        total *= len(axis.values)
    if total > MAX_PROMPTS:
        raise GraphFormatError(f"--sweep: the axes make {total} prompts; at most {MAX_PROMPTS}")
    combos = itertools.product(*[[f"{a.target}={v}" for v in a.values] for a in axes])
    return [(tuple(c), _apply(api, list(c))) for c in combos]


def _apply(api: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    try:
        return apply_overrides(api, overrides)
    except GraphFormatError as exc:
        raise GraphFormatError(str(exc).replace("--set", "--sweep", 1)) from None


def run_here(prompts: list[tuple[tuple[str, ...], dict[str, Any]]], *, registry: NodeRegistry, runtime: Any,
             targets: list[str] | None, cancel: CancelToken, sizes: SizeLimits = DEFAULT_SIZE_LIMITS,
             disk: Any = None, listeners: Sequence[Callable] = ()) -> list[SweepResult]:
    """One after another with one Executor; stops (the rest `interrupted`) once `cancel` is set."""
    executor = Executor(registry, resources=runtime, disk=disk)
    results = []
    for overrides, prompt in prompts:
        if cancel.cancelled:
            results.append(SweepResult(overrides, "interrupted"))
            continue
        result = validate(prompt, registry, targets=targets, resources=runtime, sizes=sizes)
        if not result.ok:
            results.append(SweepResult(overrides, "invalid", error="; ".join(str(e) for e in result.errors[:5])))
            continue
        report = executor.run(result.graph, listeners=list(listeners), cancel=cancel, prompt=prompt,
                              extra={"extra_pnginfo": {}})
        error = report.error
        results.append(SweepResult(overrides, report.status, dict(report.ui), error=None if error is None else
                                   f"node {error.node_id} ({error.node_type}): {error.exception_type}: "
                                   f"{error.message}", worker="here"))
    return results


def run_on_ray(prompts: list[tuple[tuple[str, ...], dict[str, Any]]], *, registry: NodeRegistry, runtime: Any,
               targets: list[str] | None, cancel: CancelToken, scale: Any, settings: Any,
               sizes: SizeLimits = DEFAULT_SIZE_LIMITS, on_done: Callable[[int, int], None] = lambda d, t: None
               ) -> list[SweepResult]:
    """Queue every prompt in a private queue and let a pool of Ray workers run them (service.ray_pool)."""
    from .queue import QueueStore
    from .ray_pool import RayPool

    with tempfile.TemporaryDirectory(prefix="sdgraph-sweep-") as tmp:
        store = QueueStore(Path(tmp) / "sweep.sqlite3", max_history=len(prompts) + 1)
        pool = RayPool(store=store, registry=registry, resources=runtime, hub=None, scale=scale, settings=settings,
                       sizes=sizes)
        ids = []
        for _, prompt in prompts:
            result = validate(prompt, registry, targets=targets, resources=runtime, sizes=sizes)
            outputs = list(result.graph.outputs) if result.ok else []
            ids.append(uuid.uuid4().hex if result.ok else None)
            if result.ok:
                store.put(prompt_id=ids[-1], prompt=prompt, extra_data={}, outputs=outputs, client_id=None,
                          number=None, front=False, max_pending=len(prompts) + 1)
        pool.start()
        try:
            _wait(store, pool, cancel, len([i for i in ids if i]), on_done)
        finally:
            pool.stop(0 if cancel.cancelled else 5, grace=5)
        results = [_collected(store, pool, overrides, prompt_id)
                   for (overrides, _), prompt_id in zip(prompts, ids, strict=True)]
        store.close()
    return results


def _wait(store: Any, pool: Any, cancel: CancelToken, total: int, on_done: Callable[[int, int], None]) -> None:
    done = -1
    while store.remaining():
        if cancel.cancelled:
            store.clear_pending()
            pool.interrupt()
        left = store.remaining()
        if total - left != done:
            done = total - left
            on_done(done, total)
        time.sleep(0.1)
    on_done(total, total)


def _collected(store: Any, pool: Any, overrides: tuple[str, ...], prompt_id: str | None) -> SweepResult:
    if prompt_id is None:
        return SweepResult(overrides, "invalid", error="the prompt does not validate with these values")
    described = store.describe(prompt_id)
    route = pool.router.decision(prompt_id)
    where = {"worker": route.worker, "reason": route.reason} if route else {}
    if described is None:
        return SweepResult(overrides, "interrupted", **where)
    entry = json.loads(store.history_entry_json(prompt_id) or "{}")
    errors = [data for kind, data in entry.get("status", {}).get("messages", []) if kind == "execution_error"]
    error = f"{errors[0].get('exception_type')}: {errors[0].get('exception_message')}" if errors else None
    return SweepResult(overrides, described["state"], entry.get("outputs", {}), error=error, **where)


def run_sweep(args: Any, api: dict[str, Any], *, registry: NodeRegistry, runtime: Any, disk: Any,
              files_of: Callable[[dict[str, Any], Any], list[str]]) -> int:
    """`sdgraph run ... --sweep ... [--ray ADDRESS]`: prints each prompt's values and files (or JSON with
    --json; with --explain also where each ran and why). Exit 0 when every prompt succeeded, 1 when any failed,
    2 when any was invalid, 130 when interrupted."""
    import signal
    import sys

    from engine.sizes import size_limits_from

    from .scale_options import scale_out_from

    prompts = expand(api, [parse_axis(spec) for spec in args.sweep])
    try:
        scale = scale_out_from(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sizes, cancel = size_limits_from(args), CancelToken()
    previous = signal.signal(signal.SIGINT, lambda *_: cancel.cancel())
    try:
        if scale is None:
            results = run_here(prompts, registry=registry, runtime=runtime, targets=args.only, cancel=cancel,
                               sizes=sizes, disk=disk)
        else:
            from .ray_pool import WorkerSettings
            folders = runtime.folders
            packs = (str(folders.base / "custom_nodes"), *map(str, args.nodes_dir))
            settings = WorkerSettings(str(folders.base), packs, device=args.device, dtype=args.dtype,
                                      allow_pickle=args.unsafe_load_pickle, memory=scale.memory, cpus=scale.cpus,
                                      gpus=scale.gpus, output=str(folders.output) if args.out else None)
            results = run_on_ray(prompts, registry=registry, runtime=runtime, targets=args.only, cancel=cancel,
                                 scale=scale, settings=settings, sizes=sizes,
                                 on_done=lambda done, total: print(f"{done}/{total} prompts done", file=sys.stderr))
    finally:
        signal.signal(signal.SIGINT, previous)
    rows = [{"values": list(r.overrides), "status": r.status, "files": files_of(r.ui, runtime), "error": r.error,
             "worker": r.worker, "reason": r.reason} for r in results]
    if args.json:
        print(json.dumps({"prompts": rows}, indent=1, default=str))
    for row in rows:
        where = f" [on {row['worker']}: {row['reason']}]" if args.explain and row["reason"] else ""
        if not args.json:
            print(f"{' '.join(row['values']) or '(as given)'}: {row['status']}{where}  {' '.join(row['files'])}")
        if row["error"]:
            print(f"error ({' '.join(row['values'])}): {row['error']}", file=sys.stderr)
    statuses = {r.status for r in results}
    return 130 if "interrupted" in statuses else 2 if "invalid" in statuses else 1 if statuses - {"success"} else 0
