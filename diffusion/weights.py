"""Networks built around tensors that already exist: no allocation, no copy."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn

Module = TypeVar("Module", bound=nn.Module)


def module_holding(build: Callable[[], Module], state_dict: Mapping[str, torch.Tensor]) -> Module:
    """`build()` run on the meta device, then given exactly these tensors (dtype and device as given), in eval
    mode without gradients. Every key must match."""
    with torch.device("meta"):
        model = build()
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)
