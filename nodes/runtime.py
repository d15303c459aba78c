"""The resources every node receives through its run context: folders, device and dtype choices, models.

One Runtime per process (CLI or server); nothing here is module-level state.
"""

from __future__ import annotations

from dataclasses import dataclass

from .folders import Folders


@dataclass
class Runtime:
    folders: Folders
    device: str | None = None  # "cpu", "cuda", "cuda:1"; None picks the best available
    dtype: str | None = None  # "fp32", "fp16", "bf16"; None follows the device's policy
    allow_pickle: bool = False  # load .ckpt/.pt files (weights_only) only when the user asks
