"""Request bodies of the state-changing routes, as pydantic models: they check each request and give the
OpenAPI document its schemas. Strict types (no "false" -> True coercion); unknown fields are ignored, so ComfyUI
clients that send more than this server reads keep working."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

PromptId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:\-]+$")]
MAX_NUMBER = float(1 << 53)  # queue positions stay exact integers when they are whole
ClientId = Annotated[str, StringConstraints(max_length=128)]
NodeId = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class PromptRequest(_Body):
    """POST /prompt: a graph in ComfyUI's API format and how to queue it."""

    prompt: dict[str, Any] = Field(description="the graph: node id -> {class_type, inputs, _meta?}")
    client_id: ClientId | None = Field(None, description="the websocket clientId that receives this prompt's events")
    prompt_id: PromptId | None = Field(None, description="an id of your own (letters, digits, . _ : -); default: "
                                       "a new UUID")
    extra_data: dict[str, Any] = Field(default_factory=dict, description="kept with the prompt; extra_pnginfo is "
                                       "embedded in saved images")
    front: bool = Field(False, description="queue before every other pending prompt")
    number: float | None = Field(None, ge=-MAX_NUMBER, le=MAX_NUMBER,
                                 description="explicit queue position (lower runs first)")
    partial_execution_targets: list[NodeId] | None = Field(
        None, max_length=10000, description="run only these nodes and what they need")

    @field_validator("number")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("number must be finite")
        return value


class QueueRequest(_Body):
    """POST /queue: remove pending prompts (a running one is stopped with /interrupt)."""

    clear: bool = Field(False, description="remove every pending prompt")
    delete: list[Annotated[str, StringConstraints(max_length=128)]] = Field(
        default_factory=list, max_length=10000, description="prompt ids to remove from the queue")


class HistoryRequest(_Body):
    """POST /history: forget finished prompts."""

    clear: bool = Field(False, description="forget the whole history")
    delete: list[Annotated[str, StringConstraints(max_length=128)]] = Field(
        default_factory=list, max_length=10000, description="prompt ids to forget")


class InterruptRequest(_Body):
    """POST /interrupt: stop the running prompt; with prompt_id, only if that is the one running."""

    prompt_id: Annotated[str, StringConstraints(max_length=128)] | None = None


class FreeRequest(_Body):
    """POST /free: applied between prompts, never under a running one."""

    unload_models: bool = Field(False, description="drop loaded models and every cached output")
    free_memory: bool = Field(False, description="release what the runtime can release")
