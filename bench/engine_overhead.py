"""How much the engine itself costs, measured on a 1,000-node toy graph whose nodes do almost nothing.

Prints:
  * per-node executor overhead of an uncached run (target < 50 us),
  * the cached re-run of the whole graph (target < 20 ms),
  * `sdgraph validate graphs/txt2img.json` wall time in a fresh process (target < 0.5 s, torch not imported);
    a toy graph file when graphs/txt2img.json does not exist.
Exits 1 when a target is missed.

    .venv/bin/python bench/engine_overhead.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import INT, Executor, Input, NodeRegistry, Output, Result, node, validate  # noqa: E402
from engine.context import CancelToken, RunContext  # noqa: E402

N_NODES = 1000
N_OUTPUTS = 10


@node("BenchConst", inputs=[Input("value", INT, default=0)], outputs=[Output("value", INT)])
def bench_const(ctx, value):
    return value


@node("BenchAdd", inputs=[Input("a", INT, default=0), Input("b", INT, default=0)], outputs=[Output("sum", INT)])
def bench_add(ctx, a, b):
    return a + b


@node("BenchShow", output_node=True, inputs=[Input("value", INT)], outputs=[])
def bench_show(ctx, value):
    return Result((), {"text": [str(value)]})


def bench_registry() -> NodeRegistry:
    registry = NodeRegistry()
    for definition in (bench_const, bench_add, bench_show):
        registry.register(definition)
    return registry


def bench_graph(n: int = N_NODES, outputs: int = N_OUTPUTS) -> dict:
    """A DAG, not just a chain: each Add takes the previous node and one further back, with a constant mixed in;
    `outputs` Show nodes read points along it."""
    api: dict[str, dict] = {"0": {"class_type": "BenchConst", "inputs": {"value": 1}}}
    adds = n - outputs - 1
    for i in range(1, adds + 1):
        far = max(0, i - 13)
        b = [str(far), 0] if i % 3 else i % 7
        api[str(i)] = {"class_type": "BenchAdd", "inputs": {"a": [str(i - 1), 0], "b": b}}
    for j in range(outputs):
        source = adds * (j + 1) // outputs
        api[f"show{j}"] = {"class_type": "BenchShow", "inputs": {"value": [str(source), 0]}}
    assert len(api) == n
    return api


def best(seconds: list[float]) -> float:
    return min(seconds)


def measure_executor(repeat: int) -> dict[str, float]:
    registry = bench_registry()
    api = bench_graph()
    validations, uncached, cached = [], [], []
    for _ in range(repeat):
        started = time.perf_counter()
        result = validate(api, registry)
        validations.append(time.perf_counter() - started)
        assert result.ok, result.errors[:3]
        executor = Executor(registry)  # a fresh cache: every node runs
        started = time.perf_counter()
        report = executor.run(result.graph)
        uncached.append(time.perf_counter() - started)
        assert report.ok and len(report.executed) == N_NODES
        started = time.perf_counter()
        again = executor.run(result.graph)
        cached.append(time.perf_counter() - started)
        assert again.ok and again.executed == []
    # What the node functions themselves cost, called directly: subtracted to get the engine's share.
    ctx = RunContext("bench", "1", "BenchAdd", None, CancelToken(), lambda event: None)
    started = time.perf_counter()
    for i in range(N_NODES):
        bench_add.fn(ctx, a=i, b=1)
    own = time.perf_counter() - started
    return {"validate": best(validations), "uncached": best(uncached), "cached": best(cached), "own": own}


def validate_file() -> tuple[Path, str, Path | None]:
    """graphs/txt2img.json when it exists, else a toy graph file (with its pack) in a temporary folder."""
    graph = ROOT / "graphs" / "txt2img.json"
    if graph.exists():
        return graph, "graphs/txt2img.json", None
    folder = Path(tempfile.mkdtemp(prefix="sdgraph-bench-"))
    (folder / "packs").mkdir()
    shutil.copy(__file__, folder / "packs" / "bench_nodes.py")
    (folder / "graph.json").write_text(json.dumps(bench_graph()))
    return folder / "graph.json", f"a {N_NODES}-node toy graph", folder


def measure_validate_cli(repeat: int) -> dict:
    graph, label, folder = validate_file()
    script = shutil.which("sdgraph", path=str(Path(sys.executable).parent)) or "sdgraph"
    command = [script, "validate", str(graph)]
    if folder is not None:
        command += ["--base-dir", str(folder), "--nodes-dir", str(folder / "packs")]
    walls, code = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        walls.append(time.perf_counter() - started)
        code = done.returncode
        lines = (done.stdout or done.stderr).strip().splitlines()
        first_line = lines[1:2] if len(lines) > 1 and lines[0].startswith("the graph has") else lines[:1]
    probe = ("import sys, cli; cli.main(sys.argv[1:]); "
             "print('TORCH', 'torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", probe, *command[1:]], capture_output=True, text=True, cwd=ROOT)
    torch_loaded = "TORCH True" in done.stderr
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    return {"label": label, "wall": statistics.median(walls), "best": min(walls), "exit": code,
            "first_line": first_line[0] if first_line else "", "torch": torch_loaded}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (the best is kept)")
    args = parser.parse_args(argv)

    ex = measure_executor(args.repeat)
    per_node = (ex["uncached"] - ex["own"]) / N_NODES
    cli = measure_validate_cli(args.repeat)
    checks = [per_node < 50e-6, ex["cached"] < 20e-3, cli["wall"] < 0.5 and not cli["torch"]]

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    print(f"engine overhead on a {N_NODES:,}-node toy graph ({N_OUTPUTS} outputs), best of {args.repeat}, "
          f"{os.cpu_count()} CPU(s)")
    print(f"  validate (in process)       {ex['validate'] * 1e3:8.2f} ms")
    print(f"  uncached run                {ex['uncached'] * 1e3:8.2f} ms  "
          f"(node functions themselves {ex['own'] * 1e3:.2f} ms)")
    print(f"  per-node executor overhead  {per_node * 1e6:8.2f} us   target < 50 us   {verdict(checks[0])}")
    print(f"  cached re-run, whole graph  {ex['cached'] * 1e3:8.2f} ms   target < 20 ms   {verdict(checks[1])}")
    print(f"  sdgraph validate {cli['label']}: {cli['wall']:.3f} s wall (median; best {cli['best']:.3f} s)   "
          f"target < 0.5 s   torch imported: {'yes' if cli['torch'] else 'no'}   {verdict(checks[2])}")
    print(f"    exit {cli['exit']}: {cli['first_line']}")
    return 0 if all(checks) else 1


if __name__ == "__main__":
    sys.exit(main())
