"""How `make test` splits the suite over two xdist workers (tests/conftest.py, docs/testing.md)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


def suite_conftest():
    spec = importlib.util.spec_from_file_location("suite_conftest", ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_worker_takes_a_file_or_a_group_whole():
    group_of = suite_conftest().group_of
    assert {group_of(nodeid) for nodeid in ("tests/diffusion/test_checkpoint.py::test_sd15_preset_is_the_parity_"
                                            "reference_file", "tests/nodes/test_memory.py::test_full_size_load_x",
                                            "tests/nodes/test_sd_nodes.py::test_full_size_sd15_checkpoint_runs")} \
        == {"full_size"}
    assert group_of("tests/server/test_ray_pool.py::test_a") == group_of("tests/server/test_ray_serve.py::b") == "ray"
    assert group_of("tests/nodes/test_memory.py::test_cli_memory_flags") == "tests/nodes/test_memory.py"
    assert group_of("tests/nodes/test_graphs.py::test_graph_runs_and_saves_png[txt2img]") == \
        "tests/nodes/test_graphs.py"


def test_a_full_size_test_outside_its_group_is_named():
    """Each worker would make its own 2.1 GB checkpoint, and two full-size processes could run at once."""
    misplaced = suite_conftest().misplaced_full_size
    items = [SimpleNamespace(nodeid="tests/nodes/test_new.py::test_big", fixturenames=["link_sd15", "sd15_checkpoint"]),
             SimpleNamespace(nodeid="tests/nodes/test_sd_nodes.py::test_full_size_x", fixturenames=["sd15_checkpoint"]),
             SimpleNamespace(nodeid="tests/nodes/test_new.py::test_small", fixturenames=["tmp_path"])]
    assert misplaced(items) == ["tests/nodes/test_new.py::test_big"]


@pytest.mark.skipif(not os.environ.get("PYTEST_XDIST_WORKER"), reason="only an xdist worker runs on one thread")
def test_an_xdist_worker_and_its_subprocesses_use_one_torch_thread():
    import subprocess
    import sys

    import torch

    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1"
