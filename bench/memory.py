"""Two full-size checkpoints used alternately under a RAM budget that holds one: does peak RSS stay within the
process's baseline plus the budget (which covers the models and their working memory)?

Runs txt2img (256 px, 2 steps, CFG) with checkpoint A, B, A, B through the nodes in one process, in a fresh
subprocess with `--ram-budget` set to one checkpoint's weights (in --dtype, default auto) plus the largest
working-memory estimate of the run, and for contrast in another without a budget.

    .venv/bin/python bench/memory.py [--size 256] [--steps 2]

A is the parity kit's file (models/checkpoints/sd15_random_seed1.safetensors) and B the same architecture with
seed 2, generated into ~/.cache/sdgraph-bench on first use (2.1 GB each).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import proc_status  # noqa: E402
from demo_model.evaluate import txt2img_graph  # noqa: E402

CACHE = Path.home() / ".cache" / "sdgraph-bench"


def checkpoints() -> tuple[Path, Path]:
    from diffusion.make_checkpoint import make_checkpoint

    a = ROOT / "models" / "checkpoints" / "sd15_random_seed1.safetensors"
    if not a.exists():
        a = CACHE / "sd15_random_seed1.safetensors"
    b = CACHE / "sd15_random_seed2.safetensors"
    for path, seed in ((a, 1), (b, 2)):
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            print(f"generating {path} (seed {seed})", flush=True)
            make_checkpoint(path, preset="sd15", seed=seed)
    return a, b


def graph(name: str, size: int, steps: int, round_: int) -> dict:
    """txt2img whose prompt and seed change every round, so nothing comes from the output cache."""
    return txt2img_graph(name, f"a red circle, take {round_}", negative=f"blurry {round_}", size=size, steps=steps,
                         seed=round_, cfg=7.0)


def worker(a: Path, b: Path, size: int, steps: int, budgeted: bool, dtype: str | None) -> dict:
    from types import SimpleNamespace

    from engine import Executor, validate
    from nodes import build_registry
    from nodes.folders import Folders
    from nodes.loaders import checkpoint_loader
    from nodes.runtime import Runtime

    base = Path(tempfile.mkdtemp(prefix="sdgraph-memory-"))
    (base / "models" / "checkpoints").mkdir(parents=True)
    for path in (a, b):
        (base / "models" / "checkpoints" / path.name).symlink_to(path.resolve())
    folders = Folders.at(base)
    # the budget: one checkpoint's weights in the chosen dtype + the largest working memory of the run
    probe = Runtime(folders, dtype=dtype)
    model, clip, vae = checkpoint_loader.fn(SimpleNamespace(resources=probe), a.name)
    weights = sum(v.handle.weight_bytes for v in (model, clip, vae))
    latent = (1, 4, size // 8, size // 8)
    working = max(model.working_bytes(latent, 2), vae.decode_working_bytes(latent))
    budget = weights + working if budgeted else None
    runtime = Runtime(folders, dtype=dtype, ram_budget=budget)
    registry = build_registry(entry_points=False)
    executor = Executor(registry, resources=runtime)
    baseline = proc_status("VmRSS:")
    rounds = []
    for round_, name in enumerate((a.name, b.name, a.name, b.name)):
        start = time.perf_counter()
        api = graph(name, size, steps, round_)
        report = executor.run(validate(api, registry, targets=["8"], resources=runtime).graph)
        if not report.ok:
            raise RuntimeError(report.error.traceback)
        rounds.append({"checkpoint": name, "seconds": time.perf_counter() - start, "peak_rss": proc_status("VmHWM:"),
                       "rss": proc_status("VmRSS:"), "held": runtime.models.held("cpu")})
    return {"budget": budget, "weights": weights, "working": working, "baseline_rss": baseline, "rounds": rounds,
            "stats": dict(runtime.models.stats), "dtype": runtime.placement()[1].names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-contrast", action="store_true", help="skip the run without a budget")
    parser.add_argument("--dtype", default="auto", help="as sdgraph run --dtype (default auto: bf16 on CPUs with "
                        "native bf16)")
    parser.add_argument("--worker", choices=["budget", "none"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--a")
    parser.add_argument("--b")
    args = parser.parse_args(argv)
    if args.worker:
        out = worker(Path(args.a), Path(args.b), args.size, args.steps, args.worker == "budget", args.dtype)
        print("RESULT " + json.dumps(out))
        return 0
    a, b = checkpoints()
    ok = True
    for mode in ("budget",) if args.no_contrast else ("budget", "none"):
        load = Path("/proc/loadavg").read_text().split()[:3]
        done = subprocess.run([sys.executable, __file__, "--worker", mode, "--a", str(a), "--b", str(b), "--size",
                               str(args.size), "--steps", str(args.steps), "--dtype", args.dtype], capture_output=True,
                              text=True, cwd=ROOT)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if done.returncode or line is None:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        r = json.loads(line[len("RESULT "):])
        gb = 1e9
        title = "no budget"
        if r["budget"]:
            title = f"budget {r['budget'] / gb:.2f} GB (weights {r['weights'] / gb:.2f} + working " \
                    f"{r['working'] / gb:.2f})"
        print(f"== {title}; dtypes {'/'.join(r['dtype'])}; baseline RSS {r['baseline_rss'] / gb:.2f} GB; "
              f"load average {' '.join(load)}")
        for i, step in enumerate(r["rounds"], 1):
            print(f"  {i}. {step['checkpoint']:32s} {step['seconds']:6.1f} s  models held {step['held'] / gb:.2f} GB"
                  f"  RSS {step['rss'] / gb:.2f} GB  peak so far {step['peak_rss'] / gb:.2f} GB")
        peak = r["rounds"][-1]["peak_rss"]
        print(f"  peak above baseline {(peak - r['baseline_rss']) / gb:.2f} GB; manager: {r['stats']}")
        if r["budget"]:
            within = peak - r["baseline_rss"] <= r["budget"]
            ok &= within
            print(f"  {'OK' if within else 'OVER'}: peak - baseline {'<=' if within else '>'} budget")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
