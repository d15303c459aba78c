"""JSON schemas of the routes' 200 answers, for the OpenAPI document (service/openapi.py). They say what every
answer has; objects stay open (`additionalProperties` allowed) where ComfyUI's clients may meet more fields.
A schemathesis run in the test suite (tests/server/test_openapi_conformance.py) checks the answers against them."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def obj(required: dict[str, Schema], **optional: Schema) -> Schema:
    return {"type": "object", "properties": {**required, **optional}, "required": list(required)}


STRING: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
NUMBER: Schema = {"type": "number"}
BOOL: Schema = {"type": "boolean"}
OBJECT: Schema = {"type": "object"}
NULLABLE_STRING: Schema = {"type": ["string", "null"]}
STRINGS: Schema = {"type": "array", "items": STRING}
QUEUE_ITEM: Schema = {"type": "array", "description": "[number, prompt_id, prompt, extra_data, outputs_to_execute]",
                      "minItems": 5, "maxItems": 5}
WORKER = {"worker_alive": {**BOOL, "description": "false once the worker thread died or gave up on a stuck prompt: "
                           "the server is about to exit (code 3 or 4) for its supervisor to restart it"},
          "worker_error": {**NULLABLE_STRING, "description": "why the worker is out of action, else null"}}
HISTORY_ENTRY = obj({
    "prompt": {"type": "array", "description": "[number, prompt_id, prompt, extra_data, outputs_to_execute]"},
    "outputs": OBJECT,
    "status": obj({"status_str": {"enum": ["success", "error"]}, "completed": BOOL,
                   "messages": {"type": "array", "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                                           "description": "[type, data]"}}}),
    "meta": OBJECT})
HISTORY = {"type": "object", "additionalProperties": HISTORY_ENTRY, "description": "prompt_id -> history entry"}
REMOVED = obj({"removed": {**INT, "minimum": 0}})
UPLOADED = obj({"name": STRING, "subfolder": STRING, "type": STRING})

ROOT = obj({"name": STRING, "version": STRING, "openapi": STRING, "websocket": STRING})
PROMPT_ACCEPTED = obj({"prompt_id": STRING, "number": NUMBER, "node_errors": OBJECT})
QUEUE_REMAINING = obj({"exec_info": obj({"queue_remaining": {**INT, "minimum": 0}})})
ROUTING = {**obj({"policy": STRING, "workers": {"type": "array", "items": OBJECT}, "decisions": OBJECT}),
           "description": "with --ray only (docs/scale-out.md): the workers, what they hold, and prompt_id -> "
                          "{worker, reason}"}
QUEUE = obj({"queue_running": {"type": "array", "items": QUEUE_ITEM},
             "queue_pending": {"type": "array", "items": QUEUE_ITEM}, **WORKER}, routing=ROUTING)
INTERRUPTED = obj({"interrupted": BOOL})
PROMPT_STATE = obj({"prompt_id": STRING, "state": {"enum": ["pending", "running", "success", "failed",
                                                            "interrupted"]},
                    "number": NUMBER, "attempts": {**INT, "minimum": 0}},
                   position={**INT, "minimum": 0, "description": "pending only: prompts ahead of it"},
                   node={**NULLABLE_STRING, "description": "running only: the node being executed"})
NODE_TYPES = {"type": "object", "additionalProperties": obj({
    "input": OBJECT, "input_order": OBJECT, "output": {"type": "array"}, "output_is_list": {"type": "array"},
    "output_name": {"type": "array"}, "name": STRING, "display_name": STRING, "description": STRING,
    "category": STRING, "output_node": BOOL})}
LOAD_ERRORS = {"type": "array", "items": obj({"pack": STRING, "file": STRING, "reason": STRING})}
SYSTEM_STATS = obj({
    "system": obj({"os": STRING, "ram_total": INT, "ram_free": INT, "comfyui_version": STRING,
                   "python_version": STRING, "pytorch_version": STRING, "embedded_python": BOOL, "argv": STRINGS}),
    "devices": {"type": "array", "items": obj({"name": STRING, "type": STRING, "index": {"type": ["integer", "null"]},
                                               "vram_total": INT, "vram_free": INT})},
    "sdgraph": obj({"cache_entries": INT, "cache_bytes": INT, "queue_remaining": INT, "prompts_run": INT,
                    "websocket_clients": INT, "slow_clients_dropped": INT, **WORKER})})
FEATURES = obj({"supports_preview_metadata": BOOL, "max_upload_size": INT, "sdgraph": OBJECT})
FREED = obj({"unload_models": BOOL, "free_memory": BOOL})
