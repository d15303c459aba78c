"""Shared fixtures for node tests: a base folder with a tiny generated checkpoint and the example inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINT = "sdgraph-tiny.safetensors"
TINY_CONTROLNET = "sdgraph-tiny-controlnet.safetensors"  # graphs/controlnet.json names it


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    from diffusion.make_checkpoint import make_checkpoint
    from diffusion.make_controlnet import write_controlnet

    base = tmp_path_factory.mktemp("base")
    make_checkpoint(base / "models" / "checkpoints" / DEFAULT_CHECKPOINT, preset="tiny", seed=0)
    write_controlnet(base / "models" / "controlnet" / TINY_CONTROLNET, preset="tiny", seed=0)
    shutil.copytree(ROOT / "input", base / "input")
    return base


def run_api(api: dict, base: Path, **runtime_options):
    """Validate and run an API graph the way the CLI does; returns (report, runtime)."""
    from engine import Executor, validate
    from nodes import build_registry
    from nodes.folders import Folders
    from nodes.runtime import Runtime

    registry = build_registry(entry_points=False)
    runtime = Runtime(Folders.at(base), **runtime_options)
    result = validate(api, registry, resources=runtime)
    assert result.ok, [str(e) for e in result.errors]
    report = Executor(registry, resources=runtime).run(result.graph, prompt=api)
    assert report.error is None, report.error and report.error.traceback
    return report, runtime
