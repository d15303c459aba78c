"""The `sdgraph` command line: run, replay, validate, nodes, convert, serve, make-checkpoint.

Exit codes: 0 success (for replay: the image matches); 1 a node failed (for replay: the image differs); 2 invalid
input (every validation error is listed; for replay also a PNG without a graph or manifest); 124 the run exceeded
--prompt-timeout (stopped at a node's next check, or, for a node that never checks, abandoned after the grace
period); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from engine import (
    CancelToken,
    Executor,
    GraphFormatError,
    NodeFailed,
    NodeStarted,
    Progress,
    RunInterrupted,
    apply_overrides,
    read_graph_file,
    validate,
)
from engine.deadline import Deadline, stuck_reason, timeout_reason
from engine.diskcache import add_cache_arguments, disk_cache_from
from engine.events import Event
from engine.schema import object_info
from engine.sizes import add_size_arguments, size_limits_from
from service.scale_options import add_ray_arguments

EXIT_OK, EXIT_NODE_FAILED, EXIT_INVALID, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 124, 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        import server
        return server.main(argv[1:])
    if argv and argv[0] == "make-checkpoint":
        from diffusion.make_checkpoint import main as make_checkpoint
        return make_checkpoint(argv[1:])
    if argv and argv[0] == "worker":  # scale-out: a Ray worker actor on this machine (imports ray)
        from service.ray_worker import worker_main
        return worker_main(argv[1:])
    if argv and argv[0] == "train-demo":
        from demo_model.cli import main as train_demo
        return train_demo(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except GraphFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdgraph", description="Run Stable Diffusion node graphs (ComfyUI "
                                     "API or workflow JSON, or a PNG saved by SaveImage).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-dir", default=None, help="folder holding models/, input/, output/, custom_nodes/ "
                        "(default: the working directory)")
    common.add_argument("--nodes-dir", action="append", default=[], metavar="DIR",
                        help="also load node packs from DIR (repeatable)")
    sizes = argparse.ArgumentParser(add_help=False)
    add_size_arguments(sizes)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common, sizes], help="run a graph")
    run.add_argument("graph")
    run.add_argument("--set", action="append", default=[], metavar="ID.INPUT=VALUE", help="override an input")
    run.add_argument("--only", action="append", default=None, metavar="ID", help="compute only this node "
                     "(and what it needs); repeatable")
    run.add_argument("--out", default=None, metavar="DIR", help="write output files here instead of output/")
    run.add_argument("--json", action="store_true", help="print a JSON result on stdout")
    run.add_argument("--explain", action="store_true", help="say, for each node, whether it ran or came from "
                     "the cache, and why")
    run.add_argument("--prompt-timeout", default=None, type=_seconds, metavar="S", help="stop the run after S "
                     "seconds and exit 124 (default: no limit)")
    run.add_argument("--prompt-timeout-grace", default=30.0, type=_seconds, metavar="S", help="after "
                     "--prompt-timeout, how long a node that does not stop (stuck in C code) has before the process "
                     "exits anyway with 124 (default 30)")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: best available)")
    run.add_argument("--dtype", default=None, choices=["auto", "fp32", "fp16", "bf16"], help="model precision "
                     "(default auto: fp16 on CUDA, bf16 on CPUs with native bf16 (about 2x faster than fp32, within "
                     "1%% of it), else fp32; fp32 reproduces ComfyUI's pixels)")
    run.add_argument("--ram-budget", default=None, type=_size, metavar="SIZE", help="RAM that models and their "
                     "working memory may take, e.g. 6G (default: what is available, less 1 GB)")
    run.add_argument("--vram-budget", default=None, type=_size, metavar="SIZE", help="the same for the GPU "
                     "(default: its free memory, less a reserve); bigger models are streamed block by block")
    run.add_argument("--unload", action="store_true", help="unload each model as soon as no later node needs it "
                     "(lowest peak memory)")
    run.add_argument("--unsafe-load-pickle", action="store_true", help="allow .ckpt/.pt model files "
                     "(loaded with weights_only=True)")
    add_cache_arguments(run, _size)
    run.add_argument("--sweep", action="append", default=[], metavar="ID.INPUT=A..B|a,b,c", help="run the graph "
                     "for each value (several --sweep: every combination), e.g. --sweep 3.seed=1..64")
    add_ray_arguments(run)
    run.set_defaults(handler=_cmd_run)

    replay = sub.add_parser("replay", parents=[common, sizes], help="re-run the graph a saved PNG carries and "
                            "compare the result with it (exit 0 only when it matches)")
    replay.add_argument("image", help="a PNG written by SaveImage (it carries the graph and the sdgraph manifest)")
    replay.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: what the image's run asked for)")
    replay.add_argument("--dtype", default=None, choices=["auto", "fp32", "fp16", "bf16"], help="model precision "
                        "(default: what the image's run asked for)")
    replay.add_argument("--out", default=None, metavar="DIR", help="keep the replayed image here (default: a "
                        "temporary folder, removed afterwards)")
    replay.add_argument("--json", action="store_true", help="print the comparison as JSON on stdout")
    replay.add_argument("--unsafe-load-pickle", action="store_true", help="allow .ckpt/.pt model files")
    replay.set_defaults(handler=_cmd_replay)

    check = sub.add_parser("validate", parents=[common, sizes], help="check a graph without running it")
    check.add_argument("graph")
    check.add_argument("--json", action="store_true")
    check.set_defaults(handler=_cmd_validate)

    listing = sub.add_parser("nodes", parents=[common], help="list node types")
    listing.add_argument("--json", action="store_true", help="ComfyUI /object_info-shaped JSON")
    listing.add_argument("--errors", action="store_true", help="list node packs that failed to load")
    listing.set_defaults(handler=_cmd_nodes)

    convert = sub.add_parser("convert", parents=[common], help="print a workflow (or PNG) in API format")
    convert.add_argument("graph")
    convert.set_defaults(handler=_cmd_convert)
    sub.add_parser("serve", help="start the HTTP/WebSocket server (see `sdgraph serve --help`)")
    sub.add_parser("make-checkpoint", help="write a random-weight checkpoint, LoRA or ControlNet (see its --help)")
    sub.add_parser("train-demo", help="train the bundled demo model (see its --help)")
    sub.add_parser("worker", help="serve prompts of `sdgraph serve --ray` from this machine (see its --help)")
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds (0 or more), got {text!r}")
    return value


def _size(text: str) -> int:
    from runtime.memory import parse_bytes
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _pack_dirs(args: argparse.Namespace, folders) -> list:
    return [folders.base / "custom_nodes", *args.nodes_dir]


def _app(args: argparse.Namespace, *, output: str | None = None, single_prompt: bool = False):
    """Registry and runtime for a command; `single_prompt`: the process runs one prompt and exits, so the model
    manager keeps no model for a next one (runtime/residency.py)."""
    from nodes import build_registry
    from nodes.folders import Folders
    from nodes.runtime import Runtime
    folders = Folders.at(args.base_dir, output=output, trusted=True)
    folders.remove_stale_temp_files()  # leftovers of writes a crash interrupted (issue #11)
    registry = build_registry(pack_dirs=_pack_dirs(args, folders), folders=folders)
    runtime = Runtime(folders, device=getattr(args, "device", None), dtype=getattr(args, "dtype", None),
                      allow_pickle=getattr(args, "unsafe_load_pickle", False),
                      ram_budget=getattr(args, "ram_budget", None), vram_budget=getattr(args, "vram_budget", None),
                      unload_after_use=getattr(args, "unload", False), single_prompt=single_prompt)
    return registry, runtime


def _load(args: argparse.Namespace, registry, runtime):
    api = read_graph_file(args.graph, registry)
    api = apply_overrides(api, getattr(args, "set", []) or [])
    result = validate(api, registry, targets=getattr(args, "only", None), resources=runtime,
                      sizes=size_limits_from(args))
    return api, result


def _print_errors(errors, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": False, "errors": [e.as_dict() for e in errors]}, indent=1))
        return
    print(f"the graph has {len(errors)} problem(s):", file=sys.stderr)
    for error in errors:
        print(f"  - {error}", file=sys.stderr)


def _cmd_validate(args: argparse.Namespace) -> int:
    registry, runtime = _app(args)
    _, result = _load(args, registry, runtime)
    if not result.ok:
        _print_errors(result.errors, args.json)
        return EXIT_INVALID
    if args.json:
        print(json.dumps({"ok": True, "nodes": len(result.graph), "outputs": list(result.graph.outputs)}))
    else:
        print(f"ok: {len(result.graph)} nodes, outputs {', '.join(result.graph.outputs)}")
    return EXIT_OK


def _cmd_nodes(args: argparse.Namespace) -> int:
    registry, runtime = _app(args)
    if args.errors:
        errors = [e.as_dict() for e in registry.load_errors]
        if args.json:
            print(json.dumps(errors, indent=1))
        else:
            from engine.discovery import load_report
            print("\n".join(load_report(registry)) or "every node pack loaded")
        return EXIT_OK
    if args.json:
        print(json.dumps(object_info(registry, runtime), indent=1))
    else:
        for definition in sorted(registry, key=lambda d: (d.category, d.name)):
            aliases = f" (also {', '.join(definition.aliases)})" if definition.aliases else ""
            print(f"{definition.category or '-':24s} {definition.name}{aliases}")
    return EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    registry, _ = _app(args)
    print(json.dumps(read_graph_file(args.graph, registry), indent=1))
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    registry, runtime = _app(args, output=args.out, single_prompt=not (args.sweep or args.ray))
    api, result = _load(args, registry, runtime)
    if not result.ok:
        _print_errors(result.errors, args.json)
        return EXIT_INVALID
    from nodes import code_identity
    disk = disk_cache_from(args, runtime.folders.base, code=code_identity(_pack_dirs(args, runtime.folders)))
    if args.sweep or args.ray:
        from service.sweep import run_sweep
        return run_sweep(args, api, registry=registry, runtime=runtime, disk=disk, files_of=_output_files)
    cancel = CancelToken()
    progress = _ProgressBar(sys.stderr)
    previous = signal.signal(signal.SIGINT, _interrupt_handler(cancel))
    deadline = Deadline(cancel, args.prompt_timeout, args.prompt_timeout_grace,
                        lambda: _abandon_stuck_run(args, progress)).start()
    try:
        executor = Executor(registry, resources=runtime, disk=disk)
        report = executor.run(result.graph, listeners=[progress], cancel=cancel, prompt=api,
                              extra={"extra_pnginfo": {}})
    finally:
        deadline.stop()
        signal.signal(signal.SIGINT, previous)
        progress.close()
    if report.status == "interrupted" and deadline.expired:
        return _timed_out(args, timeout_reason(args.prompt_timeout))
    files = _output_files(report.ui, runtime)
    if args.explain:
        for node_id in result.graph.nodes:
            if node_id in report.explain:
                print(f"node {node_id} ({result.graph[node_id].type}): {report.explain[node_id]}", file=sys.stderr)
            for decision in runtime.models.decisions(node_id):
                print(f"node {node_id} ({result.graph[node_id].type}): memory: {decision}", file=sys.stderr)
    if args.json:
        print(json.dumps({"status": report.status, "files": files, "ui": report.ui, "executed": report.executed,
                          "cached": report.cached, "explain": report.explain,
                          "error": _error_dict(report.error)}, indent=1, default=str))
    else:
        for path in files:
            print(path)
    if report.status == "interrupted":
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if report.error is not None:
        err = report.error
        print(f"error: node {err.node_id} ({err.node_type}) failed: {err.exception_type}: {err.message}",
              file=sys.stderr)
        return EXIT_NODE_FAILED
    return EXIT_OK


def _cmd_replay(args: argparse.Namespace) -> int:
    """Re-run the graph in args.image into a temporary folder; compare the image made by the same node at the
    same batch index with it, and name what differs in the manifest (nodes/replay.py)."""
    from nodes import replay
    from nodes.manifest import ManifestError, read_png
    try:
        prompt, saved, texts = read_png(args.image)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    output, asked = saved.get("output") or {}, saved.get("requested") or {}
    args.device = args.device or (None if asked.get("device") == "auto" else asked.get("device"))
    args.dtype = args.dtype or (None if asked.get("dtype") == "auto" else asked.get("dtype"))
    with tempfile.TemporaryDirectory(prefix="sdgraph-replay-") as temporary:
        # 1. What differs from the image's run already (model files, device, dtypes, node versions).
        registry, runtime = _app(args, output=args.out or temporary, single_prompt=True)
        try:
            reasons = replay.likely_reasons(saved, replay.current_manifest(prompt, runtime, registry))
        except ValueError as exc:  # a device that is not there
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_INVALID
        # 2. Run the saving node and what it needs, into the temporary folder.
        node_id = str(output.get("node"))
        result = validate(prompt, registry, targets=[node_id] if node_id in prompt else None, resources=runtime,
                          sizes=size_limits_from(args))
        if not result.ok:
            _print_errors(result.errors, args.json)
            _print_reasons(reasons, [])
            return EXIT_INVALID
        extra = {"extra_pnginfo": _json_chunks(texts)}  # the workflow, so the replayed PNG carries it too
        progress = _ProgressBar(sys.stderr)
        try:
            report = Executor(registry, resources=runtime).run(result.graph, listeners=[progress], prompt=prompt,
                                                               extra=extra)
        finally:
            progress.close()
        if report.error is not None:
            err = report.error
            print(f"error: the replay failed at node {err.node_id} ({err.node_type}): {err.exception_type}: "
                  f"{err.message}", file=sys.stderr)
            _print_reasons(reasons, [])
            return EXIT_NODE_FAILED
        # 3. Compare the image the same node made at the same batch index.
        path = replay.replayed_file(report.ui, output, runtime.folders)
        if path is None:
            print(f"error: the replay made no image at node {node_id}, batch index {output.get('batch_index')}",
                  file=sys.stderr)
            return EXIT_NODE_FAILED
        comparison = replay.compare_pixels(replay.read_pixels(args.image), replay.read_pixels(path))
        changed = replay.changed_keys(saved, read_png(path)[1])
    if args.json:
        print(json.dumps({"file": str(args.image), "verdict": comparison.verdict, "matches": comparison.matches,
                          "max_difference": comparison.max_difference, "within_2_255": comparison.within,
                          "psnr": None if comparison.psnr == float("inf") else comparison.psnr,
                          "reasons": reasons, "changed_keys": changed}, indent=1))
    else:
        print(f"{args.image}: {comparison.describe()}")
    _print_reasons(reasons, changed if not comparison.matches or reasons else [])
    if not comparison.matches and not reasons:
        print("  no likely reason in the manifest: the model files, device, dtypes and node versions are the same "
              "(a node that is not deterministic, or a change its version does not show)", file=sys.stderr)
    return EXIT_OK if comparison.matches else EXIT_NODE_FAILED


def _print_reasons(reasons: list[str], changed_keys: list[str]) -> None:
    for reason in reasons:
        print(f"  likely reason: {reason}", file=sys.stderr)
    if changed_keys:
        print(f"  nodes whose content key changed: {', '.join(changed_keys)}", file=sys.stderr)


def _json_chunks(texts: dict[str, str]) -> dict[str, Any]:
    """The PNG's other text chunks that hold JSON (ComfyUI's `workflow`), parsed."""
    parsed = {}
    for name, text in texts.items():
        try:
            parsed[name] = json.loads(text)
        except ValueError:
            continue
    return parsed


def _timed_out(args: argparse.Namespace, reason: str) -> int:
    if args.json:
        print(json.dumps({"status": "failed", "error": {"exception_type": "PromptTimeout", "message": reason}}),
              flush=True)
    print(f"error: {reason}", file=sys.stderr, flush=True)
    return EXIT_TIMEOUT


def _abandon_stuck_run(args: argparse.Namespace, progress) -> None:
    """From the deadline's timer thread: a node ignores the interruption; Python cannot stop it, so exit."""
    progress.close()
    os._exit(_timed_out(args, stuck_reason(args.prompt_timeout, args.prompt_timeout_grace)))


def _interrupt_handler(cancel: CancelToken):
    def handle(signum: int, frame: Any) -> None:
        if cancel.cancelled:
            raise KeyboardInterrupt
        cancel.cancel()
        print("\ninterrupting at the next check (Ctrl-C again to abort at once)", file=sys.stderr)
    return handle


def _output_files(ui: dict[str, Any], runtime) -> list[str]:
    """Files named in the nodes' UI payloads (ComfyUI's shape: {"images": [{"filename", "subfolder", "type"}]},
    likewise "gifs", "audio", ...)."""
    files = []
    for payload in ui.values():
        for items in payload.values() if isinstance(payload, dict) else ():
            for item in items if isinstance(items, list) else ():
                if isinstance(item, dict) and isinstance(item.get("filename"), str):
                    root = runtime.folders.root(item.get("type", "output"))
                    files.append(str(root / item.get("subfolder", "") / item["filename"]))
    return files


def _error_dict(error: NodeFailed | None) -> dict[str, Any] | None:
    if error is None:
        return None
    return {"node_id": error.node_id, "node_type": error.node_type, "exception_type": error.exception_type,
            "message": error.message, "traceback": error.traceback}


class _ProgressBar:
    """Progress of long nodes on stderr; silent when nothing reports progress.

    On a terminal, a tqdm bar per node. Elsewhere (a log file, a pipe) plain lines and never a carriage return:
    the first report of a node, each further tenth of the way, and the last step.
    """

    def __init__(self, stream):
        self.stream = stream
        self.terminal = bool(getattr(stream, "isatty", lambda: False)())
        self.node = ""
        self.bar = None
        self.tenths = -1

    def __call__(self, event: Event) -> None:
        if isinstance(event, NodeStarted):
            self.close()
            self.node = f"{event.node_id} {event.node_type}"
        elif isinstance(event, Progress) and event.max:
            if self.terminal:
                self._draw(event)
            else:
                self._log(event)
        elif isinstance(event, NodeFailed | RunInterrupted):
            self.close()

    def _draw(self, event: Progress) -> None:
        if self.bar is None:
            from tqdm import tqdm
            self.bar = tqdm(total=event.max, desc=self.node, file=self.stream, leave=True, dynamic_ncols=True)
        self.bar.n = event.value
        self.bar.refresh()

    def _log(self, event: Progress) -> None:
        tenths = int(10 * event.value / event.max)
        if tenths > self.tenths:
            self.stream.write(f"{self.node}: {event.value:g}/{event.max:g}\n")
            self.stream.flush()
            self.tenths = tenths

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.tenths = -1


if __name__ == "__main__":
    sys.exit(main())
