"""Re-running a graph in a new process with the persistent output cache (issue #15).

With the committed demo model (models/checkpoints/sdgraph-demo.safetensors) and graphs/txt2img.json in a
temporary base folder, each in a fresh `sdgraph run` process:
  * cold: an empty cache directory, everything runs;
  * re-run: the same graph again (only SaveImage runs, from the decoded image on disk; no model is loaded);
  * seed change: KSampler's seed changed (the prompt encodings come from disk; the text encoder is not loaded).
It also times what any process pays before doing anything: `python -c pass`, `sdgraph validate` (start-up,
imports and the node registry; no torch), and importing torch (`import cli, torch, safetensors.torch` less
`import cli`): a re-run reads tensors from disk and SaveImage writes them, so it cannot avoid torch.
Prints wall times, the time beyond start-up (with and without torch's import), and the ratios against the cold
run. Target: the re-run within 1 s beyond start-up and imports (torch's included). Exits 1 when it is missed.

    .venv/bin/python bench/rerun.py [--repeat 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "checkpoints" / "sdgraph-demo.safetensors"
SDGRAPH = [sys.executable, "-c", "import sys, cli; sys.exit(cli.main())"]
TARGET_SECONDS = 1.0


def timed(command: list[str]) -> tuple[float, str]:
    """Wall seconds of a subprocess (which must succeed) and its stdout."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return seconds, done.stdout


def run_graph(graph: Path, base: Path, *extra: str) -> tuple[float, dict]:
    seconds, out = timed([*SDGRAPH, "run", str(graph), "--base-dir", str(base), "--json", *extra])
    return seconds, json.loads(out)


def median_of(repeat: int, measure) -> float:
    return statistics.median(measure(i) for i in range(repeat))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each kind (the median is shown)")
    parser.add_argument("--steps", type=int, default=20, help="KSampler steps")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdgraph-rerun-") as tmp:
        base = Path(tmp)
        (base / "models" / "checkpoints").mkdir(parents=True)
        (base / "models" / "checkpoints" / DEMO.name).symlink_to(DEMO)
        api = json.loads((ROOT / "graphs" / "txt2img.json").read_text())
        api["3"]["inputs"]["steps"] = args.steps
        graph = base / "txt2img.json"
        graph.write_text(json.dumps(api))

        # 1. What a process costs before it does anything.
        python = median_of(args.repeat, lambda _: timed([sys.executable, "-c", "pass"])[0])
        startup = median_of(args.repeat, lambda _: timed([*SDGRAPH, "validate", str(graph), "--base-dir",
                                                          str(base)])[0])
        import_cli = median_of(args.repeat, lambda _: timed([sys.executable, "-c", "import cli"])[0])
        with_torch = median_of(args.repeat, lambda _: timed([sys.executable, "-c", "import cli, torch, "
                                                             "safetensors.torch"])[0])
        imports = startup + with_torch - import_cli  # start-up, registry and torch

        # 2. Cold runs, each with an empty cache directory of its own.
        def cold(i: int) -> float:
            seconds, report = run_graph(graph, base, "--cache-dir", str(base / f"cold-{i}"))
            assert len(report["executed"]) == len(api), report["executed"]
            return seconds

        cold_s = median_of(args.repeat, cold)
        run_graph(graph, base)  # fill the default cache (BASE/user/cache)

        # 3. The same graph again, then with a new seed each time, each in a new process.
        def rerun(_: int) -> float:
            seconds, report = run_graph(graph, base)
            assert report["executed"] == ["9"], report["executed"]  # only SaveImage
            return seconds

        def reseed(i: int) -> float:
            seconds, report = run_graph(graph, base, "--set", f"3.seed={1000 + i}")
            assert {"6", "7"} <= set(report["cached"]), report  # the prompt encodings come from disk
            return seconds

        rerun_s = median_of(args.repeat, rerun)
        reseed_s = median_of(args.repeat, reseed)

    print(f"demo model, graphs/txt2img.json, {args.steps} steps, median of {args.repeat}")
    print(f"  python -c pass                      {python:6.2f} s")
    print(f"  start-up (sdgraph validate)         {startup:6.2f} s")
    print(f"  import torch (+ safetensors)        {with_torch - import_cli:6.2f} s")
    print(f"  {'':28s}{'wall':>8s}{'beyond start-up':>17s}{'beyond + torch':>16s}{'vs cold':>9s}")
    for name, seconds in (("cold run", cold_s), ("re-run, new process", rerun_s), ("seed change, new process",
                                                                                    reseed_s)):
        print(f"  {name:28s}{seconds:7.2f}s{seconds - startup:16.2f}s{seconds - imports:15.2f}s"
              f"{seconds / cold_s:8.2f}x")
    beyond = rerun_s - imports
    print(f"re-run beyond start-up and imports: {beyond:.2f} s (target < {TARGET_SECONDS:.0f} s): "
          f"{'met' if beyond < TARGET_SECONDS else 'MISSED'}")
    return 0 if beyond < TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
