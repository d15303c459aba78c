"""`sdgraph serve`'s flags (ComfyUI's names where ComfyUI has one: --listen, --port, --max-upload-size) and the
ServerConfig they make."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from engine.diskcache import add_cache_arguments, disk_cache_from
from engine.sizes import add_size_arguments, size_limits_from
from nodes import code_identity
from runtime.memory import parse_bytes

from .config import MIB, PREVIEW_METHODS, Limits, ServerConfig
from .frontend import check_root, installed_root
from .scale_options import add_ray_arguments, scale_out_from
from .security import TOKEN_ENV


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdgraph serve", description="Serve the ComfyUI-compatible HTTP + WebSocket "
                                "API. Binds 127.0.0.1 unless told otherwise; other addresses need a token.")
    d = Limits()
    p.add_argument("--listen", nargs="?", const="0.0.0.0", default="127.0.0.1", metavar="ADDR",
                   help="address(es) to listen on, comma-separated (default 127.0.0.1; without a value: 0.0.0.0)")
    p.add_argument("--port", type=int, default=8188, help="port (default 8188; 0 picks a free one)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV), help="require this token on every route "
                   f"(default: ${TOKEN_ENV}); needed for any non-loopback address")
    p.add_argument("--allowed-origins", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin (e.g. http://localhost:5173) allowed to queue prompts; repeatable")
    p.add_argument("--allowed-hosts", action="append", default=[], metavar="NAME",
                   help="a Host name clients may use besides loopback and the listen addresses; repeatable")
    p.add_argument("--base-dir", default=None, help="folder with models/, input/, output/, custom_nodes/, user/ "
                   "(default: the working directory)")
    p.add_argument("--front-end-root", default=None, metavar="DIR", help="serve this frontend build at / "
                   "(default: the installed comfyui-frontend-package)")
    p.add_argument("--preview-method", default="latent2rgb", choices=PREVIEW_METHODS, help="live previews while "
                   "sampling: latent2rgb (a fast colour projection), taesd (models/vae_approx weights, else "
                   "latent2rgb), none")
    p.add_argument("--nodes-dir", action="append", default=[], metavar="DIR", help="also load node packs from DIR")
    p.add_argument("--database", default=None, metavar="PATH", help="the queue and history (default: "
                   "BASE/user/sdgraph.sqlite3)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: best available)")
    p.add_argument("--dtype", default=None, choices=["auto", "fp32", "fp16", "bf16"], help="model precision, as for "
                   "sdgraph run (default auto; fp32 reproduces ComfyUI's pixels)")
    p.add_argument("--unsafe-load-pickle", action="store_true", help="allow .ckpt/.pt model files")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="pending prompts before 429")
    p.add_argument("--max-history", type=int, default=d.max_history, help="finished prompts kept")
    p.add_argument("--max-attempts", type=int, default=d.max_attempts,
                   help="starts of a prompt that keeps crashing the server before it is marked failed")
    p.add_argument("--max-upload-size", type=float, default=d.max_upload_bytes / MIB, metavar="MB")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / MIB, metavar="MB",
                   help="largest JSON request body")
    p.add_argument("--max-nodes", type=int, default=d.max_nodes, help="nodes in one prompt")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="uploaded/viewed image budget")
    p.add_argument("--max-ws-clients", type=int, default=d.max_ws_clients)
    add_size_arguments(p)
    add_cache_arguments(p, _size)
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S", help="on SIGTERM, how long the "
                   "running prompt may take to finish before it is stopped and put back in the queue")
    p.add_argument("--prompt-timeout", type=float, default=3600.0, metavar="S", help="stop and fail a prompt that "
                   "runs longer than this (default 3600; 0: no limit)")
    p.add_argument("--prompt-timeout-grace", type=float, default=60.0, metavar="S", help="after --prompt-timeout, "
                   "how long a node that does not stop has before the prompt is marked failed and the server exits "
                   "(code 4) to be restarted")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_ray_arguments(p)
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """Raises ValueError naming the flag when a value cannot work."""
    for name, value in vars(args).items():
        if (name.startswith("max_") or name == "cache_size") and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    for flag, value in (("--prompt-timeout", args.prompt_timeout), ("--prompt-timeout-grace",
                                                                   args.prompt_timeout_grace)):
        if not 0 <= value < float("inf"):
            raise ValueError(f"{flag} must be a number of seconds, 0 or more, got {value}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    base = Path(args.base_dir or os.getcwd()).absolute()
    limits = Limits(max_queue=args.max_queue, max_history=args.max_history, max_attempts=args.max_attempts,
                    max_body_bytes=int(args.max_body_mb * MIB), max_nodes=args.max_nodes,
                    max_upload_bytes=int(args.max_upload_size * MIB), max_image_pixels=args.max_image_pixels,
                    max_ws_clients=args.max_ws_clients, sizes=size_limits_from(args))
    database = Path(args.database).absolute() if args.database else base / "user" / "sdgraph.sqlite3"
    return ServerConfig(
        base_dir=base, database=database, port=args.port, token=args.token or None,
        listen=tuple(h.strip() for h in args.listen.split(",") if h.strip()) or ("127.0.0.1",),
        allowed_origins=frozenset(_split(args.allowed_origins)), allowed_hosts=frozenset(_split(args.allowed_hosts)),
        nodes_dirs=tuple(Path(p) for p in args.nodes_dir), device=args.device, dtype=args.dtype,
        allow_pickle=args.unsafe_load_pickle, shutdown_timeout=args.shutdown_timeout, limits=limits,
        prompt_timeout=args.prompt_timeout or None, stuck_grace=args.prompt_timeout_grace,
        front_end_root=check_root(Path(args.front_end_root)) if args.front_end_root else installed_root(),
        preview_method=args.preview_method,
        disk_cache=disk_cache_from(args, base, code=code_identity([base / "custom_nodes", *map(Path, args.nodes_dir)])),
        scale_out=scale_out_from(args))


def _size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _split(values: list[str]) -> list[str]:
    return [part.strip() for value in values for part in value.split(",") if part.strip()]
