from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_threads():
    """`train-demo`'s CLI sets torch's thread count (default 2): each test gives the session back its own (one per
    xdist worker, tests/conftest.py)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
