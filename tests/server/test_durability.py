"""The queue and history survive the process: kill -9, a poison prompt, SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest
from serverkit import Api, chain, run, slow


async def wait_state(api: Api, prompt_id: str, state: str, timeout: float = 30) -> dict:
    for _ in range(int(timeout / 0.05)):
        status, described = await api.get(f"/v1/prompts/{prompt_id}")
        if status == 200 and described["state"] == state:
            return described
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{prompt_id} never reached {state}")


def queue_running(server, prompt: dict) -> str:
    """Queue `prompt` on `server` and return its id once it is running."""
    async def go():
        async with aiohttp.ClientSession() as session:
            api = Api(session, server.url)
            prompt_id = await api.queue(prompt)
            await wait_state(api, prompt_id, "running")
            return prompt_id
    return run(go())


def test_kill_during_a_prompt_then_restart(fresh):
    first = fresh()

    async def before_crash():
        async with aiohttp.ClientSession() as session:
            api = Api(session, first.url)
            done = await api.queue(chain(1, prefix="before"))
            await api.history(done)
            running = await api.queue(slow(5, steps=60, delay=0.05))
            waiting = [await api.queue(chain(i, prefix="after")) for i in (2, 3)]
            await wait_state(api, running, "running")
            return done, running, waiting

    done, running, waiting = run(before_crash())
    first.kill()  # SIGKILL in the middle of `running`
    assert first.proc.returncode == -signal.SIGKILL
    second = fresh()

    async def after_restart():
        async with aiohttp.ClientSession() as session:
            api = Api(session, second.url)
            assert (await api.get(f"/history/{done}"))[1][done]["status"]["completed"]
            status, queue = await api.get("/queue")
            queued = [item[1] for item in queue["queue_running"] + queue["queue_pending"]]
            assert queued == [running, *waiting]  # still queued, in order, the interrupted one first
            for prompt_id in (running, *waiting):
                assert (await api.history(prompt_id))["status"]["completed"]
            assert (await api.get(f"/v1/prompts/{running}"))[1]["attempts"] == 2  # retried once
            assert (await api.get(f"/v1/prompts/{waiting[0]}"))[1]["attempts"] == 1
            status, history = await api.get("/history")
            assert list(history) == [done, running, *waiting]  # each exactly once
    run(after_restart())
    assert "was running when the server stopped" in second.log()
    assert not list(second.base.rglob("*.part"))
    assert second.stop() == 0


@pytest.mark.slow
def test_a_poison_prompt_is_marked_failed_after_bounded_crashes(fresh):
    poison = {"1": {"class_type": "ToyCrash", "inputs": {"value": 1}},
              "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}

    async def queue_all(server):
        async with aiohttp.ClientSession() as session:
            api = Api(session, server.url)
            await api.queue(slow(steps=10, delay=0.05))  # keeps the worker busy while the others are queued
            healthy = await api.queue(chain(4))
            return await api.queue(poison, front=True), healthy

    server = fresh("--max-attempts", "2")
    poison_id, healthy_id = run(queue_all(server))
    assert server.proc.wait(30) == -signal.SIGKILL  # attempt 1 takes the server down
    server = fresh("--max-attempts", "2", wait=False)  # it may crash before it has printed its address
    assert server.proc.wait(60) == -signal.SIGKILL  # attempt 2 as well
    server = fresh("--max-attempts", "2")  # attempt 2 was the last: marked failed, the server carries on

    async def check():
        async with aiohttp.ClientSession() as session:
            api = Api(session, server.url)
            failed = await api.history(poison_id)
            assert failed["status"]["status_str"] == "error" and not failed["status"]["completed"]
            kind, data = failed["status"]["messages"][-1]
            assert kind == "execution_error" and data["exception_type"] == "ServerCrashed"
            assert "--max-attempts 2" in data["exception_message"]
            assert (await api.get(f"/v1/prompts/{poison_id}"))[1] == {
                "prompt_id": poison_id, "state": "failed", "number": -2, "attempts": 2}
            assert (await api.history(healthy_id))["status"]["completed"]
    run(check())
    assert server.stop() == 0


def test_sigterm_lets_the_running_prompt_finish(fresh):
    server = fresh()
    prompt_id = queue_running(server, slow(7, steps=20, delay=0.05))
    server.proc.send_signal(signal.SIGTERM)

    async def refused_while_stopping():
        await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as session:
            status, body = await Api(session, server.url).post("/prompt", {"prompt": chain(1)})
            assert status == 503 and body["error"]["type"] == "shutting_down"
    run(refused_while_stopping())
    assert server.proc.wait(30) == 0
    again = fresh()

    async def check():
        async with aiohttp.ClientSession() as session:
            api = Api(session, again.url)
            history = await api.history(prompt_id, timeout=5)
            assert history["status"]["completed"]
            assert (await api.get(f"/v1/prompts/{prompt_id}"))[1]["attempts"] == 1
    run(check())


def test_sigterm_requeues_a_prompt_that_takes_too_long(fresh):
    server = fresh("--shutdown-timeout", "0.3")
    prompt_id = queue_running(server, slow(8, steps=400, delay=0.05))
    assert server.stop(signal.SIGTERM, timeout=30) == 0
    assert "back in the queue" in server.log()
    again = fresh()

    async def check():
        async with aiohttp.ClientSession() as session:
            api = Api(session, again.url)
            described = await wait_state(api, prompt_id, "running")
            assert described["attempts"] == 1  # a clean stop is not a crash
            await api.post("/interrupt", {"prompt_id": prompt_id})
            assert (await api.history(prompt_id))["status"]["status_str"] == "error"
    run(check())


def test_a_second_server_on_the_same_database_refuses_to_start(fresh):
    fresh()
    second = fresh(wait=False)
    assert second.proc.wait(60) == 2
    assert "another sdgraph server is using" in second.log()


def test_sigterm_exits_even_while_a_request_hangs(fresh):
    """A node's option list that never returns (here: nodes.folders walking a symlink loop in input/) must not
    keep the server from stopping."""
    server = fresh()
    (server.base / "input" / "loop").symlink_to(server.base)
    prompt = {"1": {"class_type": "ToyLoadImage", "inputs": {"image": "x.png"}},
              "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}

    async def hang():
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                status, _ = await Api(session, server.url).post("/prompt", {"prompt": prompt})
            except TimeoutError:
                return True
            assert status == 400  # the listing terminated after all (nodes.folders fixed)
            return False

    hung = run(hang())
    started = time.monotonic()
    assert server.stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - started < 20
    if hung:
        assert "still busy" in server.log()
