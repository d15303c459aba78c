"""ComfyUI's jobs view of the queue and the history (`GET /api/jobs`, `/api/jobs/{id}`), which the frontend's
queue and assets panels read: one record per prompt with its status (pending, in_progress, completed, failed,
cancelled), times in milliseconds, its first previewable output and the count of outputs. Pure functions over
the parsed /queue and /history answers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
MEDIA_KEYS = ("images", "video", "audio", "gifs", "3d")


def _message_time(messages: Iterable[Any], kind: str) -> int | None:
    for message in messages:
        if isinstance(message, list) and len(message) == 2 and message[0] == kind:
            return message[1].get("timestamp")
    return None


def _outputs(outputs: Mapping[str, Any]) -> tuple[dict[str, Any] | None, int, int]:
    """(the first previewable output, all output items, previewable ones)."""
    first, total, previewable = None, 0, 0
    for node_id, ui in outputs.items():
        for key, items in ui.items():
            if not isinstance(items, list):
                continue
            total += len(items)
            if key not in MEDIA_KEYS:
                continue
            for item in items:
                if isinstance(item, Mapping) and item.get("type") in ("output", "temp"):
                    previewable += 1
                    if first is None or (first["type"] == "temp" and item.get("type") == "output"):
                        first = {**item, "nodeId": str(node_id), "mediaType": key}
    return first, total, previewable


def history_job(prompt_id: str, entry: Mapping[str, Any], *, detail: bool = False) -> dict[str, Any]:
    number, _pid, prompt, extra_data, _outs = entry["prompt"]
    status = entry.get("status", {})
    messages = status.get("messages", [])
    kinds = {m[0] for m in messages if isinstance(m, list) and m}
    state = ("completed" if status.get("status_str") == "success" else
             "cancelled" if "execution_interrupted" in kinds else "failed")
    first, total, previewable = _outputs(entry.get("outputs", {}))
    start = _message_time(messages, "execution_start")
    end = next((t for k in ("execution_success", "execution_error", "execution_interrupted")
                if (t := _message_time(messages, k)) is not None), None)
    error = next((m[1] for m in messages if isinstance(m, list) and m and m[0] == "execution_error"), None)
    job = {"id": prompt_id, "status": state, "priority": number,
           "create_time": extra_data.get("create_time") or start or 0, "execution_start_time": start,
           "execution_end_time": end, "preview_output": first, "outputs_count": total,
           "previewable_outputs_count": previewable, "execution_error": error,
           "workflow_id": _workflow_id(extra_data)}
    if detail:
        job.update(workflow={"prompt": prompt, "extra_data": extra_data}, outputs=entry.get("outputs", {}),
                   execution_status=status)
    return job


def queue_job(row: list[Any], state: str, *, detail: bool = False) -> dict[str, Any]:
    number, prompt_id, prompt, extra_data, _outputs_to_run = row
    job = {"id": prompt_id, "status": state, "priority": number, "create_time": extra_data.get("create_time", 0),
           "execution_start_time": None, "execution_end_time": None, "preview_output": None,
           "outputs_count": 0, "previewable_outputs_count": 0, "execution_error": None,
           "workflow_id": _workflow_id(extra_data)}
    if detail:
        job["workflow"] = {"prompt": prompt, "extra_data": extra_data}
    return job


def _workflow_id(extra_data: Mapping[str, Any]) -> str | None:
    workflow = extra_data.get("extra_pnginfo", {}).get("workflow") if isinstance(extra_data, Mapping) else None
    found = workflow.get("id") if isinstance(workflow, Mapping) else None
    return found if isinstance(found, str) else None


def all_jobs(queue: Mapping[str, Any], history: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Running first, then pending in queue order, then finished ones newest first."""
    running = [queue_job(row, "in_progress") for row in queue.get("queue_running", [])]
    pending = [queue_job(row, "pending") for row in queue.get("queue_pending", [])]
    done = [history_job(pid, entry) for pid, entry in reversed(list(history.items()))]
    return running + pending + done


def find_job(prompt_id: str, queue: Mapping[str, Any], history: Mapping[str, Any]) -> dict[str, Any] | None:
    if prompt_id in history:
        return history_job(prompt_id, history[prompt_id], detail=True)
    for key, state in (("queue_running", "in_progress"), ("queue_pending", "pending")):
        for row in queue.get(key, []):
            if row[1] == prompt_id:
                return queue_job(row, state, detail=True)
    return None


def page(jobs: list[dict[str, Any]], statuses: Iterable[str], *, limit: int | None, offset: int) -> dict[str, Any]:
    wanted = set(statuses) or set(STATUSES)
    unknown = wanted - set(STATUSES)
    if unknown:
        raise ValueError(f"status {sorted(unknown)[0]!r} is not one of {', '.join(STATUSES)}")
    chosen = [job for job in jobs if job["status"] in wanted]
    shown = chosen[offset:] if limit is None else chosen[offset:offset + limit]
    return {"jobs": shown, "pagination": {"offset": offset, "limit": limit if limit is not None else len(shown),
                                          "total": len(chosen), "has_more": offset + len(shown) < len(chosen)}}
