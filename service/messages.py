"""ComfyUI's JSON payloads: validation errors as `node_errors`, engine events as websocket messages, history
entries. Pure functions and one small per-run translator; nothing here does I/O."""

from __future__ import annotations

import io
import json
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine import NodeFailed, NodeFinished, NodesCached, NodeStarted, Progress, RunReport, ValidationError
from engine.events import Event, RunInterrupted, RunStarted

from .queue import json_text
from .scrub import short_traceback

PREVIEW_IMAGE = 1  # ComfyUI's binary event type for a preview; then 1 = JPEG, 2 = PNG
PREVIEW_IMAGE_WITH_METADATA = 4  # then the metadata's length, the metadata (JSON: node, prompt, image type), the image
_IMAGE_TYPES = {"JPEG": 1, "PNG": 2}


def now_ms() -> int:
    return int(time.time() * 1000)


def error_body(kind: str, message: str, details: str = "", extra_info: Mapping[str, Any] | None = None,
               **more: Any) -> dict[str, Any]:
    """ComfyUI's error object under "error" (type, message, details, extra_info)."""
    return {"error": {"type": kind, "message": message, "details": details, "extra_info": dict(extra_info or {})},
            **more}


def ws_text(kind: str, data: Mapping[str, Any]) -> str:
    return json_text({"type": kind, "data": data})


def status_text(remaining: int, sid: str | None = None) -> str:
    data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": remaining}}}
    if sid is not None:
        data["sid"] = sid
    return ws_text("status", data)


# -- validation -------------------------------------------------------------------------------------------
def validation_failure(errors: Sequence[ValidationError], prompt: Any, outputs: Iterable[str],
                       scrub: Callable[[str], str] = str) -> dict[str, Any]:
    """POST /prompt's 400 body: `{error, node_errors}`. Errors about a node go under its id, each with the output
    nodes that depend on it; errors about the whole prompt become the top-level error. `scrub` takes the server's
    paths out of the messages."""
    nodes = prompt if isinstance(prompt, Mapping) else {}
    dependents = _dependent_outputs(nodes, [o for o in outputs if o in nodes])
    node_errors: dict[str, dict[str, Any]] = {}
    general: list[ValidationError] = []
    for error in errors:
        if error.node_id is None or error.node_id not in nodes:
            general.append(error)
            continue
        raw = nodes[error.node_id]
        class_type = error.node_type or (raw.get("class_type") if isinstance(raw, Mapping) else None)
        entry = node_errors.setdefault(error.node_id, {"errors": [], "dependent_outputs": sorted(
            dependents.get(error.node_id, ())), "class_type": class_type if isinstance(class_type, str) else None})
        entry["errors"].append({"type": error.code, "message": scrub(error.message),
                                "details": scrub(error.details or error.input_name or ""),
                                "extra_info": {"input_name": error.input_name, **error.extra}})
    if general:
        first = general[0]
        top = error_body(first.code, scrub(first.message),
                         scrub(first.details or "\n".join(str(e) for e in errors[:50])),
                         {"node_id": first.node_id} if first.node_id is not None else {})
    else:
        top = error_body("prompt_outputs_failed_validation", "Prompt outputs failed validation",
                         scrub("\n".join(str(e) for e in errors[:50])))
    return {**top, "node_errors": node_errors}


def _dependent_outputs(nodes: Mapping[str, Any], outputs: Sequence[str]) -> dict[str, set[str]]:
    """For each node, the output nodes whose inputs lead back to it (links read defensively: the prompt may be
    malformed, cyclic or dangling)."""
    sources: dict[str, list[str]] = {}
    for node_id, raw in nodes.items():
        inputs = raw.get("inputs") if isinstance(raw, Mapping) else None
        links = []
        for value in (inputs.values() if isinstance(inputs, Mapping) else ()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str | int) \
                    and not isinstance(value[0], bool):
                links.append(str(value[0]))
        sources[str(node_id)] = links
    dependents: dict[str, set[str]] = {}
    for output in outputs:
        stack, seen = [output], set()
        while stack:
            current = stack.pop()
            if current in seen or current not in sources:
                continue
            seen.add(current)
            dependents.setdefault(current, set()).add(output)
            stack.extend(sources[current])
    return dependents


# -- a run's events ----------------------------------------------------------------------------------------
class RunMessages:
    """Translates one run's engine events into ComfyUI's websocket messages, in order, and keeps the ones ComfyUI
    records in the history entry (`status.messages`). Terminal messages come from `finish`, which also sees the
    report (cached output nodes' UI, the failure)."""

    def __init__(self, prompt_id: str, *, scrub: Callable[[str], str] | None = None):
        self.prompt_id = prompt_id
        self.scrub = scrub or (lambda text: text)
        self.recorded: list[list[Any]] = []
        self.executed: list[str] = []
        self.cached: list[str] = []
        self.shown: set[str] = set()
        self.current: str | None = None
        self._cached_sent = False
        self._interrupted: RunInterrupted | None = None
        self.node_states: dict[str, dict[str, Any]] = {}  # progress_state: every node started so far

    def translate(self, event: Event) -> list[tuple[str, dict[str, Any]]]:
        pid = self.prompt_id
        out: list[tuple[str, dict[str, Any]]] = []
        if isinstance(event, RunStarted):
            out.append(self._record("execution_start", {"prompt_id": pid, "timestamp": now_ms()}))
            return out
        if isinstance(event, NodesCached):
            self._cached_sent = True
            self.cached = list(event.node_ids)
            out.append(self._record("execution_cached", {"nodes": list(event.node_ids), "prompt_id": pid,
                                                         "timestamp": now_ms()}))
            return out
        out.extend(self._cached_once())
        if isinstance(event, NodeStarted):
            self.current = event.node_id
            out.append(("executing", {"node": event.node_id, "display_node": event.node_id, "prompt_id": pid}))
            out.append(self._progress_state(event.node_id, "running", 0, 1))
        elif isinstance(event, Progress):
            out.append(("progress", {"value": event.value, "max": event.max, "prompt_id": pid,
                                     "node": event.node_id}))
            out.append(self._progress_state(event.node_id, "running", event.value, event.max))
        elif isinstance(event, NodeFinished):
            self.executed.append(event.node_id)
            out.append(self._progress_state(event.node_id, "finished", 1, 1))
            if event.ui:
                self.shown.add(event.node_id)
                out.append(("executed", {"node": event.node_id, "display_node": event.node_id,
                                         "output": dict(event.ui), "prompt_id": pid}))
        elif isinstance(event, RunInterrupted):
            self._interrupted = event
        return out

    def start(self) -> tuple[str, dict[str, Any]]:
        """execution_start, for a prompt that fails before the engine starts it."""
        return self._record("execution_start", {"prompt_id": self.prompt_id, "timestamp": now_ms()})

    def finish(self, report: RunReport) -> list[tuple[str, dict[str, Any]]]:
        pid = self.prompt_id
        out = self._cached_once()
        for node_id in report.cached:  # cached output nodes show their results again, as in ComfyUI
            if node_id in report.ui and node_id not in self.shown:
                self.shown.add(node_id)
                out.append(("executed", {"node": node_id, "display_node": node_id, "output": dict(report.ui[node_id]),
                                         "prompt_id": pid}))
        if report.status == "success":
            out.append(self._record("execution_success", {"prompt_id": pid, "timestamp": now_ms()}))
        elif report.status == "interrupted":
            event = self._interrupted
            out.append(self._record("execution_interrupted", {
                "prompt_id": pid, "node_id": event.node_id if event else None,
                "node_type": event.node_type if event else None, "executed": list(report.executed),
                "timestamp": now_ms()}))
        else:
            out.append(self.error(report.error, report.executed + report.cached))
        out.append(("executing", {"node": None, "prompt_id": pid}))
        return out

    def error(self, failure: NodeFailed | None, outputs: Sequence[str], *, node_id: str | None = None,
              node_type: str | None = None, exception_type: str = "", message: str = "") -> tuple[str, dict]:
        """The execution_error message (recorded), from a node's failure or from a problem the worker met. The
        message has its paths made relative (`scrub`); `traceback` is the exception alone (the full one is for
        the server's log: it names the server's files)."""
        exception_type = failure.exception_type if failure else exception_type
        message = self.scrub(failure.message if failure else message)
        data = {
            "prompt_id": self.prompt_id,
            "node_id": failure.node_id if failure else node_id,
            "node_type": failure.node_type if failure else node_type,
            "executed": list(self.executed),
            "exception_message": message,
            "exception_type": exception_type,
            "traceback": short_traceback(exception_type, message),
            "current_inputs": {k: [self.scrub(str(v))] for k, v in failure.inputs.items()} if failure else {},
            "current_outputs": list(outputs),
            "timestamp": now_ms(),
        }
        return self._record("execution_error", data)

    def _progress_state(self, node_id: str, state: str, value: float, most: float) -> tuple[str, dict[str, Any]]:
        """ComfyUI's progress_state: the state of every node of the prompt that has started (the frontend draws
        each node's progress bar from it)."""
        self.node_states[node_id] = {"value": value, "max": most, "state": state, "node_id": node_id,
                                     "prompt_id": self.prompt_id, "display_node_id": node_id,
                                     "parent_node_id": None, "real_node_id": node_id}
        return "progress_state", {"prompt_id": self.prompt_id, "nodes": {k: dict(v) for k, v in
                                                                         self.node_states.items()}}

    def _cached_once(self) -> list[tuple[str, dict[str, Any]]]:
        """ComfyUI always says which nodes were cached, even when none were."""
        if self._cached_sent:
            return []
        self._cached_sent = True
        return [self._record("execution_cached", {"nodes": [], "prompt_id": self.prompt_id, "timestamp": now_ms()})]

    def _record(self, kind: str, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        self.recorded.append([kind, data])
        return kind, data


def history_entry(*, number: float, prompt_id: str, prompt: Mapping, extra_data: Mapping, outputs: Sequence[str],
                  ui: Mapping[str, Any], status_str: str, completed: bool, messages: list) -> dict[str, Any]:
    """ComfyUI's history entry: {prompt, outputs, status: {status_str, completed, messages}, meta}."""
    from .queue import number_json
    return {
        "prompt": [number_json(number), prompt_id, dict(prompt), dict(extra_data), list(outputs)],
        "outputs": {node_id: dict(value) for node_id, value in ui.items()},
        "status": {"status_str": status_str, "completed": completed, "messages": messages},
        "meta": {node_id: {"node_id": node_id, "display_node": node_id, "parent_node": None,
                           "real_node_id": node_id} for node_id in ui},
    }


def client_flags(text: str) -> dict[str, bool]:
    """The true/false feature flags of a client's `{"type": "feature_flags", "data": {...}}` message ({} when the
    message is not that)."""
    try:
        message = json.loads(text)
    except ValueError:
        return {}
    data = message.get("data") if isinstance(message, dict) and message.get("type") == "feature_flags" else None
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, bool)} if isinstance(data, dict) \
        else {}


@dataclass(frozen=True)
class PreviewFrames:
    """One preview in both of ComfyUI's binary encodings; the hub sends each client the one it asked for (the
    frontend announces `supports_preview_metadata` in its feature flags and draws previews on their node)."""

    plain: bytes
    with_metadata: bytes


def preview_frame(preview: Any, render: Callable[[Any], Any] | None = None, *, node_id: str | None = None,
                  prompt_id: str | None = None) -> PreviewFrames | None:
    """The binary websocket frames for a progress preview: a PIL image, or ComfyUI's (format, image, max_size), or
    what `render` makes of it (a sampler's latent, diffusion/previews.py). None when there is nothing to send."""
    if render is not None and preview is not None:
        preview = render(preview)
    if preview is None:
        return None
    kind, image, max_size = "JPEG", preview, None
    if isinstance(preview, tuple) and len(preview) == 3:
        kind, image, max_size = preview
    if kind not in _IMAGE_TYPES or not hasattr(image, "save"):
        return None
    if max_size:
        from PIL import ImageOps
        image = ImageOps.contain(image, (max_size, max_size))
    buffer = io.BytesIO()
    if kind == "JPEG":
        image.convert("RGB").save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format="PNG", compress_level=1)
    data = buffer.getvalue()
    metadata = json_text({"node_id": node_id, "display_node_id": node_id, "parent_node_id": None,
                          "real_node_id": node_id, "prompt_id": prompt_id,
                          "image_type": f"image/{kind.lower()}"}).encode()
    return PreviewFrames(struct.pack(">II", PREVIEW_IMAGE, _IMAGE_TYPES[kind]) + data,
                         struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(metadata)) + metadata + data)
