"""Faulty nodes against the worker (issue #11): SystemExit and KeyboardInterrupt from a node, prompts that overrun
--prompt-timeout (stopping at a check, or stuck past the grace period), and a worker thread that dies anyway."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from serverkit import Api, chain, run, slow


def raising(kind: str) -> dict:
    return {"1": {"class_type": "ToyRaise", "inputs": {"kind": kind, "value": 1}},
            "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}


def last_message(entry: dict) -> tuple[str, dict]:
    kind, data = entry["status"]["messages"][-1]
    return kind, data


async def wait_exit(server, timeout: float = 30) -> int:
    for _ in range(int(timeout / 0.05)):
        if server.proc.poll() is not None:
            return server.proc.returncode
        await asyncio.sleep(0.05)
    raise TimeoutError("the server did not exit")


def test_system_exit_and_keyboard_interrupt_in_a_node_fail_only_their_prompt(shared):
    """Old code: SystemExit/KeyboardInterrupt ended the worker thread silently; the next prompt never ran."""
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            for kind in ("SystemExit", "KeyboardInterrupt"):
                entry = await api.history(await api.queue(raising(kind)))
                assert entry["status"]["status_str"] == "error"
                message, data = last_message(entry)
                assert message == "execution_error" and data["exception_type"] == kind
                assert (data["node_id"], data["node_type"]) == ("1", "ToyRaise")
            after = await api.queue(chain(5, prefix="after-exit"))
            assert (await api.history(after))["status"]["completed"]
            status, stats = await api.get("/system_stats")
            assert stats["sdgraph"]["worker_alive"] is True and stats["sdgraph"]["worker_error"] is None
            status, queue = await api.get("/queue")
            assert queue["worker_alive"] is True
    run(scenario())


def test_a_prompt_over_its_time_limit_is_failed_with_the_reason(fresh):
    """Old code: no limit, the prompt ran for as long as its nodes liked."""
    server = fresh("--prompt-timeout", "1")

    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, server.url)
            long = await api.queue(slow(1, steps=400, delay=0.05))  # 20 s, checking every 50 ms
            short = await api.queue(chain(2, prefix="in-time"))
            entry = await api.history(long, timeout=20)
            message, data = last_message(entry)
            assert message == "execution_error" and data["exception_type"] == "PromptTimeout"
            assert data["exception_message"] == "the prompt exceeded its time limit of 1 s (--prompt-timeout)"
            assert data["node_id"] == "1"
            assert (await api.get(f"/v1/prompts/{long}"))[1]["state"] == "failed"
            assert (await api.history(short))["status"]["completed"]
    run(scenario())
    assert server.stop() == 0


def test_a_stuck_node_past_the_grace_fails_its_prompt_and_the_server_exits_4(fresh):
    """Old code: a node that never checks ran forever and held the queue. Now: failed after limit + grace, the
    process exits with 4 for its supervisor, and the restarted server runs the rest (and not the stuck one)."""
    server = fresh("--prompt-timeout", "1", "--prompt-timeout-grace", "1")
    stuck = {"1": {"class_type": "ToyStuck", "inputs": {"seconds": 120}},
             "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}

    async def before():
        async with aiohttp.ClientSession() as session:
            api = Api(session, server.url)
            ids = await api.queue(stuck), await api.queue(chain(3, prefix="after-stuck"))
            assert await wait_exit(server, timeout=30) == 4
            return ids

    stuck_id, waiting = run(before())
    assert "did not stop within 1 s more" in server.log()
    again = fresh("--prompt-timeout", "1", "--prompt-timeout-grace", "1")

    async def after():
        async with aiohttp.ClientSession() as session:
            api = Api(session, again.url)
            message, data = last_message(await api.history(stuck_id, timeout=1))
            assert message == "execution_error" and data["exception_type"] == "PromptTimeout"
            assert "did not stop" in data["exception_message"] and data["node_type"] == "ToyStuck"
            assert (await api.history(waiting))["status"]["completed"]
            assert (await api.get(f"/v1/prompts/{stuck_id}"))[1]["attempts"] == 1  # never retried
    run(after())
    assert again.stop() == 0


def test_a_worker_that_dies_anyway_exits_3_and_keeps_the_queue(fresh):
    """Old code: the server kept answering 200 and queueing prompts that never ran."""
    server = fresh()
    breaker = {"1": {"class_type": "ToyBreakWorker", "inputs": {"value": 1}},
               "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}

    async def before():
        async with aiohttp.ClientSession() as session:
            api = Api(session, server.url)
            await api.queue(slow(steps=20, delay=0.05))  # busy while the next two are queued
            await api.queue(breaker)
            waiting = await api.queue(chain(4, prefix="kept"))
            assert await wait_exit(server) == 3
            return waiting

    waiting = run(before())
    assert "the worker thread died" in server.log() and "injected fault" in server.log()
    again = fresh()

    async def after():
        async with aiohttp.ClientSession() as session:
            api = Api(session, again.url)
            assert (await api.history(waiting))["status"]["completed"]
    run(after())
    assert again.stop() == 0


def test_a_dead_worker_is_reported_by_system_stats_and_queue(tmp_path):
    """In-process, to look between the death and the exit: /system_stats and /queue say the worker is dead and
    why, POST /prompt answers 503, and the server is told to exit with code 3. Old code: worker_alive only in
    /system_stats, nothing in /queue, 200 for new prompts, no exit."""
    from aiohttp.test_utils import TestClient, TestServer
    from serverkit import make_base

    import server
    from service.config import ServerConfig
    from service.core import Service

    base = make_base(tmp_path)
    service = Service.open(ServerConfig(base_dir=base, database=base / "user" / "q.sqlite3"))

    def broken_claim():
        raise SystemExit("injected fault outside any prompt")
    service.store.claim = broken_claim

    async def scenario():
        told = asyncio.Event()
        service.start(asyncio.get_running_loop(), on_fatal=told.set)
        async with TestClient(TestServer(server.create_app(service))) as client:
            await asyncio.wait_for(told.wait(), 10)
            stats = await (await client.get("/system_stats")).json()
            assert stats["sdgraph"]["worker_alive"] is False
            assert "SystemExit: injected fault" in stats["sdgraph"]["worker_error"]
            queue = await (await client.get("/queue")).json()
            assert queue["worker_alive"] is False and "injected fault" in queue["worker_error"]
            assert queue["queue_running"] == [] and queue["queue_pending"] == []
            response = await client.post("/prompt", json={"prompt": chain(1)})
            assert response.status == 503 and "worker thread died" in (await response.json())["error"]["message"]
        assert service.exit_code == 3
        await service.stop()
    asyncio.run(scenario())


@pytest.mark.parametrize("args", [("--prompt-timeout", "-1"), ("--prompt-timeout", "inf"),
                                  ("--prompt-timeout-grace", "nan")])
def test_bad_time_limits_refuse_to_start(fresh, args):
    server = fresh(*args, wait=False)
    assert server.proc.wait(60) == 2
    assert args[0] in server.log()
