"""Scale-out on Ray: 32 prompts over 1 and 2 local worker actors, two models, affinity routing against round-robin.

    nice python bench/scale_out.py [--prompts 32] [--pattern alternate|pairs] [--steps 4] [--size 64]

Two tiny random-weight checkpoints A and B (`sdgraph make-checkpoint --preset tiny`, seeds 1 and 2); prompts use
them in turn (`alternate`: A B A B ..., `pairs`: A A B B ...), each with its own seed so nothing comes from the
output cache. Each worker may hold one model at a time (a memory budget of 1.5 checkpoints plus the working memory
the model manager reserves at 64 px), so a worker given the other model must load it again. For each of 1 and 2
workers and each policy, a fresh pool (actors started before the clock starts) runs the same prompts: wall time from
queueing to the last prompt done, prompts/s, and model loads (every part of a checkpoint counts: UNet, text encoder,
VAE). The closing note prints both, and the ratios affinity / round-robin and 2 workers / 1 worker. On a real
cluster see docs/scale-out.md."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKING = 144 << 20  # calibrated for the tiny preset at 64 px (a budget that holds one model, not two)
sys.path.insert(0, str(REPO))


def prompts_for(count: int, pattern: str, steps: int, size: int) -> list[dict]:
    graph = json.loads((REPO / "graphs" / "txt2img.json").read_text())
    prompts = []
    for i in range(count):
        model = "a" if (i if pattern == "alternate" else i // 2) % 2 == 0 else "b"
        prompt = json.loads(json.dumps(graph))
        prompt["4"]["inputs"]["ckpt_name"] = f"{model}.safetensors"
        prompt["3"]["inputs"].update(steps=steps, seed=1000 + i)
        prompt["5"]["inputs"].update(width=size, height=size)
        prompts.append(prompt)
    return prompts


def run_pool(base: Path, prompts: list[dict], *, workers: int, policy: str, memory: int) -> dict:
    import ray

    from engine import validate
    from nodes import build_registry
    from nodes.folders import Folders
    from nodes.runtime import Runtime
    from service.queue import QueueStore
    from service.ray_pool import RayPool, WorkerSettings
    from service.scale_options import ScaleOut

    registry = build_registry(pack_dirs=[base / "custom_nodes"])
    runtime = Runtime(Folders.at(base))
    with tempfile.TemporaryDirectory() as tmp:
        store = QueueStore(Path(tmp) / "q.sqlite3", max_history=len(prompts) + 1)
        pool = RayPool(store=store, registry=registry, resources=runtime, hub=None,
                       scale=ScaleOut("local", workers=workers, policy=policy, memory=memory),
                       settings=WorkerSettings(str(base), (str(base / "custom_nodes"),), device="cpu", dtype="fp32",
                                               memory=memory, cpus=1))
        pool.start()
        try:
            started = time.perf_counter()
            for prompt in prompts:
                graph = validate(prompt, registry, resources=runtime).graph
                store.put(prompt_id=uuid.uuid4().hex, prompt=prompt, extra_data={}, outputs=list(graph.outputs),
                          client_id=None, number=None, front=False, max_pending=len(prompts) + 1)
            pool.wake()
            while store.remaining():
                time.sleep(0.05)
            seconds = time.perf_counter() - started
            infos = ray.get([slot.actor.info.remote() for slot in pool.slots])
            failed = store.history_json().count('"status_str":"error"')
            shares = [info["prompts"] for info in infos]
        finally:
            pool.stop(5, grace=5)
            store.close()
    return {"workers": workers, "policy": policy, "seconds": seconds, "per_s": len(prompts) / seconds,
            "loads": sum(i["loads"] for i in infos), "failed": failed, "shares": shares}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--pattern", choices=["alternate", "pairs"], default="alternate")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    args = p.parse_args()
    import ray

    from diffusion.make_checkpoint import make_checkpoint

    with tempfile.TemporaryDirectory(prefix="sdgraph-scale-out-") as tmp:
        base = Path(tmp) / "base"
        for folder in ("custom_nodes", "output", "models/checkpoints"):
            (base / folder).mkdir(parents=True)
        for seed, name in ((1, "a"), (2, "b")):
            make_checkpoint(base / "models" / "checkpoints" / f"{name}.safetensors", preset="tiny", seed=seed)
        # room for one model's weights and the working memory the model manager reserves beside them (its
        # estimate for the VAE at 64 px is about 140 MB), not for two models' weights
        memory = WORKING + int(1.5 * os.path.getsize(base / "models" / "checkpoints" / "a.safetensors"))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="sdgraph-bench",
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        prompts = prompts_for(args.prompts, args.pattern, args.steps, args.size)
        rows = []
        try:
            for workers in (1, 2):
                for policy in ("affinity", "round-robin"):
                    row = run_pool(base, prompts, workers=workers, policy=policy, memory=memory)
                    rows.append(row)
                    print(f"{workers} worker(s) {policy:12s} {row['seconds']:7.1f} s  {row['per_s']:.2f} prompts/s  "
                          f"{row['loads']:3d} model loads  {row['failed']} failed  prompts per worker "
                          f"{row['shares']}", flush=True)
        finally:
            ray.shutdown()
    by = {(r["workers"], r["policy"]): r for r in rows}
    print(f"\n{args.prompts} prompts, pattern {args.pattern}, {args.steps} steps at {args.size}px, each worker "
          "holding one model:")
    for workers in (1, 2):
        a, r = by[(workers, "affinity")], by[(workers, "round-robin")]
        print(f"  {workers} worker(s): affinity {a['per_s']:.2f}/s, {a['loads']} loads; round-robin "
              f"{r['per_s']:.2f}/s, {r['loads']} loads; throughput x{a['per_s'] / r['per_s']:.2f}, loads "
              f"x{a['loads'] / max(1, r['loads']):.2f}")
    for policy in ("affinity", "round-robin"):
        print(f"  {policy}: 2 workers / 1 worker throughput x{by[(2, policy)]['per_s'] / by[(1, policy)]['per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
