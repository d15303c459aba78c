"""Training state on disk: atomic snapshots of a stage (weights, optimiser, step) that a later run resumes.

Batches and noise are pure functions of (seed, step), so a resumed run continues exactly where the snapshot left
off: nothing about the data stream needs saving.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from engine.files import atomic_write


def save_snapshot(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write(path, buffer.getvalue())


def load_snapshot(path: str | os.PathLike) -> dict[str, Any] | None:
    """The saved state, or None if there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """The random stream of one training step (noise, timesteps, caption dropout)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + salt)


def warmup_lr(base: float, step: int, warmup: int) -> float:
    return base * min(1.0, (step + 1) / max(1, warmup))
