"""Issue #16 end to end: `sdgraph serve --ray local` in a subprocess (its own local Ray cluster, one worker actor):
prompts run on the actor, /queue shows the routing, SIGTERM puts the running prompt back in the durable queue and
the restarted front runs it."""

from __future__ import annotations

import asyncio
import time

import pytest
from serverkit import Api, chain, slow

pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.slow]


async def _until(api: Api, prompt_id: str, state: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, described = await api.get(f"/v1/prompts/{prompt_id}")
        if status == 200 and described["state"] == state:
            return described
        await asyncio.sleep(0.2)
    raise AssertionError(f"{prompt_id} not {state} in {timeout} s: {described}")


def test_serve_with_ray_runs_on_a_worker_and_keeps_its_queue_across_a_restart(fresh):
    import aiohttp

    args = ("--ray", "local", "--ray-workers", "1", "--worker-cpus", "0.5", "--shutdown-timeout", "0")

    async def first(url: str) -> tuple[str, str]:
        async with aiohttp.ClientSession() as session:
            api = Api(session, url)
            done = await api.queue(chain(5, prefix="ray"))
            await _until(api, done, "success")
            _, queue = await api.get("/queue")
            assert queue["routing"]["decisions"][done]["worker"] == queue["routing"]["workers"][0]["name"]
            assert queue["routing"]["workers"][0]["pid"] != server.proc.pid
            _, history = await api.get(f"/history/{done}")
            assert history[done]["outputs"]["4"] == {"text": ["15"]}
            stopped = await api.queue(slow(steps=400, delay=0.05))
            await _until(api, stopped, "running")
            return done, stopped

    server = fresh(*args, wait=False).wait_ready(timeout=180)
    done, stopped = asyncio.run(first(server.url))
    assert server.stop() == 0, server.log()

    async def second(url: str) -> None:
        async with aiohttp.ClientSession() as session:
            api = Api(session, url)
            assert (await api.get(f"/v1/prompts/{done}"))[1]["state"] == "success"
            await _until(api, stopped, "running", timeout=120)
            _, answer = await api.post("/interrupt", {"prompt_id": stopped})
            assert answer == {"interrupted": True}
            await _until(api, stopped, "interrupted")

    again = fresh(*args, wait=False).wait_ready(timeout=180)
    asyncio.run(second(again.url))
    assert again.stop() == 0, again.log()
