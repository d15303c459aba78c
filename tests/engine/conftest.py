"""Shared fixtures for the engine tests: toy registries, a call counter, and a helper that validates and runs
a graph while recording its events."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import comfy_core_stub  # noqa: E402
from toy_nodes import CallCounter, toy_registry  # noqa: E402

from engine import Executor, NodeRegistry, RunReport, validate  # noqa: E402
from engine.discovery import register_module  # noqa: E402


@pytest.fixture
def registry() -> NodeRegistry:
    return toy_registry()


@pytest.fixture
def sd_registry() -> NodeRegistry:
    """ComfyUI's core node declarations (stubs) plus the toy nodes."""
    registry = toy_registry()
    assert register_module(registry, comfy_core_stub, pack="comfy_core_stub") == 7, registry.load_errors
    return registry


@pytest.fixture
def counter(tmp_path) -> CallCounter:
    return CallCounter(output_dir=tmp_path / "output")


@dataclass
class Runner:
    """Validates and runs API graphs on one executor (one cache), recording every run's events."""

    executor: Executor
    events: list = field(default_factory=list)

    def __call__(self, api: dict, **kwargs) -> RunReport:
        result = validate(api, self.executor.registry, targets=kwargs.pop("targets", None))
        assert result.ok, [str(e) for e in result.errors]
        self.events = []
        return self.executor.run(result.graph, listeners=[self.events.append], **kwargs)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


@pytest.fixture
def runner(registry, counter) -> Runner:
    return Runner(Executor(registry, resources=counter))
