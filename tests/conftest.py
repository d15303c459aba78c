"""What every test folder shares: how `pytest -n 2` (pytest-xdist) spreads the tests, one torch thread per
worker, and the full-size SD1.5 checkpoint made once.

`make test` runs the suite on two xdist workers (docs/testing.md). Two workers with two torch threads each would
put four busy threads on two cores, and torch's thread pool then spends most of its time waiting for a
descheduled thread (a tiny-model picture took 60 s instead of 5 s on a busy machine); so each worker, and the
subprocesses it starts (CLI runs, servers), uses one thread.

A worker takes a whole test file at a time (a module's fixtures are made once), except for the groups in
GROUPS, whose tests one worker runs together wherever they are. Those groups, then the other files, are handed
out in this order, so the longest start first and neither worker is left with a long file at the end.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# (group, nodeid prefixes): tests that share one expensive thing, or files that take longest; the slowest first.
GROUPS = (
    # every test that makes or loads the full-size checkpoint: one worker makes it once, and two full-size
    # processes (4-6 GB of RAM each) never run at once
    ("full_size", ("tests/diffusion/test_checkpoint.py::test_sd15_preset",
                   "tests/diffusion/test_checkpoint.py::test_full_size",
                   "tests/nodes/test_memory.py::test_full_size",
                   "tests/nodes/test_sd_nodes.py::test_full_size")),
    ("ray", ("tests/server/test_ray_",)),  # one local Ray cluster at a time
    ("browser", ("tests/browser/",)),  # one server and one chromium
    ("tests/server/test_durability.py", ("tests/server/test_durability.py",)),
    ("tests/demo_model/test_demo_model.py", ("tests/demo_model/test_demo_model.py",)),
    ("tests/server/test_faults.py", ("tests/server/test_faults.py",)),
    ("tests/test_replay.py", ("tests/test_replay.py",)),
)


def group_of(nodeid: str) -> str:
    """The unit of work a worker takes whole: a group of GROUPS, else the test's file."""
    return next((name for name, prefixes in GROUPS if nodeid.startswith(prefixes)), nodeid.split("::")[0])


def _rank(nodeid: str) -> int:
    names = [name for name, _ in GROUPS]
    group = group_of(nodeid)
    return names.index(group) if group in names else len(names)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Units of work by group_of, handed out in the order the workers collected them (see below)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    config.option.loadscopereorder = False  # keep the collection's order: GROUPS first
    return GroupScheduling(config, log)


def misplaced_full_size(items) -> list[str]:
    """The tests that use the full-size checkpoint but are not in the full_size group."""
    return [item.nodeid for item in items
            if "sd15_checkpoint" in getattr(item, "fixturenames", ()) and group_of(item.nodeid) != "full_size"]


def pytest_collection_modifyitems(items):
    misplaced = misplaced_full_size(items)
    if misplaced:
        raise pytest.UsageError(f"{', '.join(misplaced)} use the full-size checkpoint but are not in the full_size "
                                "group of tests/conftest.py GROUPS: add their node ids there")
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a serial run keeps pytest's own order
        items.sort(key=lambda item: _rank(item.nodeid))  # stable: files keep their order within a rank


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"  # read by torch when it is first imported, here and in subprocesses
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(1)


@pytest.fixture(scope="session")
def sd15_checkpoint(tmp_path_factory) -> Path:
    """The full-size SD1.5 checkpoint with random weights (seed 1, 2.1 GB fp16): the parity kit's reference file,
    made once per session for every full-size test (list them in GROUPS' full_size)."""
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
