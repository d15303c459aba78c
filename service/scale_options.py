"""The scale-out flags (`--ray`, `--ray-workers`, `--routing`, ...) shared by `sdgraph serve`, `sdgraph run
--sweep` and `sdgraph worker`, and the `ScaleOut` settings they make. Importing this does not import Ray."""

from __future__ import annotations

import argparse
import importlib.util
from dataclasses import dataclass

from runtime.memory import parse_bytes

from .affinity import POLICIES


@dataclass(frozen=True)
class ScaleOut:
    """How prompts run on a Ray cluster instead of in this process."""

    address: str  # "auto": a running cluster if there is one, else a local one; "local"; or "ray://host:10001"
    workers: int = 0  # worker actors the front starts itself (besides `sdgraph worker` ones); 0: 1 when none run
    policy: str = "affinity"  # or "round-robin"
    lookahead: int = 16  # pending prompts routing considers at once
    memory: int | None = None  # bytes of models each started worker may hold (its RAM or VRAM budget)
    cpus: float = 1.0  # Ray CPUs each started worker takes (its torch threads too)
    gpus: float = 0.0  # Ray GPUs each started worker takes (1 per device on a GPU cluster)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("scale-out on Ray (pip install 'sdgraph[ray]'; docs/scale-out.md)")
    g.add_argument("--ray", default=None, metavar="ADDRESS", help="run prompts on Ray worker actors: 'auto' (a "
                   "running cluster, else a local one), 'local', or a cluster address (ray://HOST:10001)")
    g.add_argument("--ray-workers", type=int, default=0, metavar="N", help="worker actors to start (default: "
                   "those `sdgraph worker` started, else 1)")
    g.add_argument("--routing", default="affinity", choices=POLICIES, help="affinity (default): a prompt goes to "
                   "a worker holding its models, else the one with most free memory; round-robin: in turn")
    g.add_argument("--routing-lookahead", type=int, default=16, metavar="N",
                   help="pending prompts routing looks at when a worker is free (default 16)")
    g.add_argument("--worker-memory", type=_size, default=None, metavar="SIZE", help="memory for models in each "
                   "started worker (e.g. 6GB; default: what its device has)")
    g.add_argument("--worker-cpus", type=float, default=1.0, metavar="N", help="Ray CPUs per started worker")
    g.add_argument("--worker-gpus", type=float, default=0.0, metavar="N", help="Ray GPUs per started worker")


def scale_out_from(args: argparse.Namespace) -> ScaleOut | None:
    """None without --ray. Raises ValueError naming the flag when a value cannot work."""
    if not getattr(args, "ray", None):
        return None
    if importlib.util.find_spec("ray") is None:  # looked up, not imported
        raise ValueError("--ray needs Ray, which is not installed: pip install 'sdgraph[ray]' (ray 2.60)")
    if args.ray_workers < 0:
        raise ValueError(f"--ray-workers must be 0 or more, got {args.ray_workers}")
    if args.routing_lookahead < 1:
        raise ValueError(f"--routing-lookahead must be at least 1, got {args.routing_lookahead}")
    if args.worker_cpus < 0 or args.worker_gpus < 0:
        raise ValueError("--worker-cpus and --worker-gpus must be 0 or more")
    return ScaleOut(address=args.ray, workers=args.ray_workers, policy=args.routing, lookahead=args.routing_lookahead,
                    memory=args.worker_memory, cpus=args.worker_cpus, gpus=args.worker_gpus)


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
