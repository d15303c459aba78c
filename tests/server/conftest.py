"""Fixtures of the server tests; the helpers are in serverkit.py."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serverkit import SHARED_ARGS, ServerProcess, make_base, start  # noqa: E402


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> Iterator[ServerProcess]:
    """One server for the tests that only add prompts and files of their own."""
    base = make_base(tmp_path_factory.mktemp("shared"))
    server = start(base, *SHARED_ARGS)
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture
def fresh(tmp_path) -> Iterator[callable]:
    """Start servers of this test's own (stopped, or killed, at the end)."""
    started: list[ServerProcess] = []
    base = make_base(tmp_path)

    def launch(*args: str, env: dict[str, str] | None = None, wait: bool = True) -> ServerProcess:
        server = ServerProcess(base, *args, env=env)
        started.append(server)
        return server.wait_ready() if wait else server

    yield launch
    for server in started:
        server.kill()
