"""What every test folder shares: one torch thread per xdist worker, and the full-size SD1.5 checkpoint made once.

`make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`, docs/testing.md). Two workers
with two torch threads each would put four busy threads on two cores, and torch's thread pool then spends most
of its time waiting for a descheduled thread (a tiny-model test ran 9x slower); so each worker, and the
subprocesses it starts (CLI runs, servers), uses one thread. Tests that share one expensive thing (a full-size
checkpoint, a Ray cluster, the browser) carry `pytest.mark.xdist_group(...)`, so one worker runs them all:
"full_size" (one worker makes the file once, and two full-size processes, 4-6 GB of RAM each, never run at
once), "ray", "browser".
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"  # read by torch when it is first imported, here and in subprocesses
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """A test that uses a module-scoped fixture runs on the worker of its module's other such tests (the fixture is
    made once), unless it names a group of its own."""
    for item in items:
        defs = getattr(item, "_fixtureinfo", None)
        shares = defs and any(d.scope == "module" for fixture in defs.name2fixturedefs.values() for d in fixture)
        if shares and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


@pytest.fixture(scope="session")
def sd15_checkpoint(tmp_path_factory) -> Path:
    """The full-size SD1.5 checkpoint with random weights (seed 1, 2.1 GB fp16): the parity kit's reference file,
    made once per session for every full-size test (mark them `pytest.mark.xdist_group("full_size")`)."""
    from diffusion.make_checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("sd15") / "sd15.safetensors", preset="sd15", seed=1)


@pytest.fixture(scope="session")
def link_sd15(sd15_checkpoint):
    """`link_sd15(base, name)`: base/models/checkpoints/name as a symbolic link to the full-size checkpoint."""
    def link(base: Path, name: str) -> Path:
        target = base / "models" / "checkpoints" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(sd15_checkpoint)
        return target
    return link
