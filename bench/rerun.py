"""Re-running a graph in a new process with the persistent output cache (issue #15).

With the committed demo model (models/checkpoints/sdgraph-demo.safetensors) and graphs/txt2img.json in a
temporary base folder, each in a fresh `sdgraph run` process:
  * cold: an empty cache directory, everything runs;
  * re-run: the same graph again (only SaveImage runs, from the decoded image on disk; no model is loaded);
  * seed change: KSampler's seed changed (the prompt encodings come from disk; the text encoder is not loaded).
Each `sdgraph run` process times itself: its imports (cli, torch, safetensors: a re-run reads tensors from disk
and SaveImage writes them, so it cannot avoid torch) and then the run. Also shown: `python -c pass` and
`sdgraph validate` (start-up, imports and registry; no torch). Prints wall times, the imports and the run after
them, and the ratios against the cold run. Target: the re-run within 1 s beyond start-up and imports. Exits 1
when it is missed.

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
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "checkpoints" / "sdgraph-demo.safetensors"
SDGRAPH = [sys.executable, "-c", "import sys, cli; sys.exit(cli.main())"]
# `sdgraph` timing itself: imports, then the run; the figures go to stderr's last line.
TIMED_SDGRAPH = [sys.executable, "-c", "import json, sys, time; t0 = time.perf_counter(); import cli, torch, "
                 "safetensors.torch; t1 = time.perf_counter(); rc = cli.main(sys.argv[1:]); "
                 "print(json.dumps([t1 - t0, time.perf_counter() - t1]), file=sys.stderr); sys.exit(rc)"]
TARGET_SECONDS = 1.0


def timed(command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of a subprocess (which must succeed) and what it printed."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    return seconds, done


def run_graph(graph: Path, base: Path, *extra: str) -> tuple[Times, dict]:
    seconds, done = timed([*TIMED_SDGRAPH, "run", str(graph), "--base-dir", str(base), "--json", *extra])
    imports, run = json.loads(done.stderr.splitlines()[-1])
    return Times(seconds, imports, run), json.loads(done.stdout)


class Times(NamedTuple):
    wall: float
    imports: float  # cli, torch and safetensors, in the run's own process
    run: float  # cli.main after them: registry, validation, plan, run, output


def median_of(repeat: int, measure):
    """The median of `repeat` measurements (of each field, for Times)."""
    found = [measure(i) for i in range(repeat)]
    if isinstance(found[0], Times):
        return Times(*(statistics.median(values) for values in zip(*found, strict=True)))
    return statistics.median(found)


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

        # 2. Cold runs, each with an empty cache directory of its own.
        def cold(i: int) -> Times:
            times, report = run_graph(graph, base, "--cache-dir", str(base / f"cold-{i}"))
            assert len(report["executed"]) == len(api), report["executed"]
            return times

        cold_s = median_of(args.repeat, cold)
        run_graph(graph, base)  # fill the default cache (BASE/user/cache)

        # 3. The same graph again, then with a new seed each time, each in a new process.
        def rerun(_: int) -> Times:
            times, report = run_graph(graph, base)
            assert report["executed"] == ["9"], report["executed"]  # only SaveImage
            return times

        def reseed(i: int) -> Times:
            times, report = run_graph(graph, base, "--set", f"3.seed={1000 + i}")
            assert {"6", "7"} <= set(report["cached"]), report  # the prompt encodings come from disk
            return times

        rerun_s = median_of(args.repeat, rerun)
        reseed_s = median_of(args.repeat, reseed)

    print(f"demo model, graphs/txt2img.json, {args.steps} steps, median of {args.repeat}")
    print(f"  python -c pass                      {python:6.2f} s")
    print(f"  start-up (sdgraph validate)         {startup:6.2f} s")
    print(f"  {'':28s}{'wall':>8s}{'imports':>10s}{'run after':>11s}{'vs cold (wall)':>16s}")
    for name, t in (("cold run", cold_s), ("re-run, new process", rerun_s), ("seed change, new process", reseed_s)):
        print(f"  {name:28s}{t.wall:7.2f}s{t.imports:9.2f}s{t.run:10.2f}s{t.wall / cold_s.wall:15.2f}x")
    beyond = rerun_s.run
    print(f"re-run beyond start-up and imports: {beyond:.2f} s (target < {TARGET_SECONDS:.0f} s): "
          f"{'met' if beyond < TARGET_SECONDS else 'MISSED'}")
    return 0 if beyond < TARGET_SECONDS else 1


if __name__ == "__main__":
    sys.exit(main())
