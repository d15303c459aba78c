"""Issue #16 on a real local Ray cluster: one durable queue, two worker actors (tiny generated checkpoints A and B).

A module-scoped cluster (`ray.init(num_cpus=2)`, no dashboard) and one pool of two actors serve every test; each
test waits a bounded time. Skipped only when ray is not installed (`pip install -e '.[dev,ray]'`)."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray]

REPO = Path(__file__).resolve().parents[2]
SLOW_NODE = '''
import os, time
from engine import FLOAT, INT, Input, Result, node

@node("SlowPid", category="test/ray", output_node=True,
      inputs=[Input("seconds", FLOAT, default=1.0, min=0.0, max=60.0), Input("tag", INT, default=0)], outputs=[])
def slow_pid(ctx, seconds, tag):
    """Runs `seconds`, checking for cancellation, and shows the pid of the process that ran it."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ctx.check_cancelled()
        time.sleep(0.02)
    return Result((), {"pid": [os.getpid()]})


@node("StuckPid", category="test/ray", output_node=True, inputs=[Input("seconds", FLOAT, default=30.0)], outputs=[])
def stuck_pid(ctx, seconds):
    """Never checks for cancellation (as a node stuck in C code)."""
    time.sleep(seconds)
    return Result((), {"pid": [os.getpid()]})
'''


class RecordingHub:
    """The websocket hub's surface the workers use: what each client was sent."""

    def __init__(self):
        self.sent: dict[str, list] = {}

    def publish(self, client: str, message) -> None:
        self.sent.setdefault(client, []).append(message)

    def publish_all(self, message) -> None:
        pass

    def kinds(self, client: str) -> list[str]:
        return [json.loads(m)["type"] for m in self.sent.get(client, []) if isinstance(m, str)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from diffusion.make_checkpoint import make_checkpoint
    from engine.sizes import DEFAULT_SIZE_LIMITS
    from nodes import build_registry
    from nodes.folders import Folders
    from nodes.runtime import Runtime
    from service.queue import QueueStore
    from service.ray_pool import RayPool, WorkerSettings
    from service.scale_options import ScaleOut

    base = tmp_path_factory.mktemp("ray") / "base"
    for folder in ("custom_nodes", "input", "output", "models/checkpoints"):
        (base / folder).mkdir(parents=True)
    (base / "custom_nodes" / "slow_pid.py").write_text(SLOW_NODE)
    make_checkpoint(base / "models/checkpoints/a.safetensors", preset="tiny", seed=1)
    make_checkpoint(base / "models/checkpoints/b.safetensors", preset="tiny", seed=2)
    ray.init(num_cpus=2, include_dashboard=False, namespace="sdgraph", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    store = QueueStore(base / "user" / "q.sqlite3")
    registry = build_registry(pack_dirs=[base / "custom_nodes"])
    hub = RecordingHub()
    pool = RayPool(store=store, registry=registry, resources=Runtime(Folders.at(base)), hub=hub,
                   scale=ScaleOut("local", workers=2, memory=512 << 20), sizes=DEFAULT_SIZE_LIMITS,
                   settings=WorkerSettings(str(base), (str(base / "custom_nodes"),), device="cpu", dtype="fp32",
                                           memory=512 << 20, cpus=1))
    pool.start()
    yield pool, store, hub, base
    pool.stop(5, grace=5)
    store.close()
    ray.shutdown()


def submit(pool, store, prompt: dict, client: str | None = None) -> str:
    prompt_id = uuid.uuid4().hex
    store.put(prompt_id=prompt_id, prompt=prompt, extra_data={}, outputs=[n for n in prompt if n.startswith("o")],
              client_id=client, number=None, front=False, max_pending=100)
    pool.wake()
    return prompt_id


def wait_for(store, prompt_ids: list[str], *, timeout: float = 60) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {pid: store.describe(pid) for pid in prompt_ids}
        if all(s["state"] in ("success", "failed", "interrupted") for s in states.values()):
            return states
        time.sleep(0.1)
    raise AssertionError(f"not finished in {timeout} s: {states}")


def wait_running(pool, prompt_id: str, *, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r[0] == prompt_id for r in pool.running_all()):
            return pool.router.decision(prompt_id).worker
        time.sleep(0.05)
    raise AssertionError(f"{prompt_id} did not start")


def slow(seconds: float, tag: int) -> dict:
    return {"o1": {"class_type": "SlowPid", "inputs": {"seconds": seconds, "tag": tag}}}


def txt2img(ckpt: str, seed: int) -> dict:
    prompt = json.loads((REPO / "graphs" / "txt2img.json").read_text())
    prompt["4"]["inputs"]["ckpt_name"] = ckpt
    prompt["3"]["inputs"].update(steps=2, seed=seed)
    prompt["5"]["inputs"].update(width=64, height=64)
    prompt["o9"] = prompt.pop("9")
    return prompt


def test_prompts_are_spread_over_both_workers_with_the_websocket_events(cluster):
    pool, store, hub, _ = cluster
    ids = [submit(pool, store, slow(1.0, tag), client="c1") for tag in range(4)]
    states = wait_for(store, ids)
    assert all(s["state"] == "success" for s in states.values()), states
    assert {pool.router.decision(pid).worker for pid in ids} == {s.name for s in pool.slots}
    pids = {json.loads(store.history_entry_json(pid))["outputs"]["o1"]["pid"][0] for pid in ids}
    assert pids == {s.info["pid"] for s in pool.slots}  # ran in the two actor processes, not here
    assert os.getpid() not in pids
    kinds = hub.kinds("c1")
    assert kinds.count("execution_start") == 4 and kinds.count("execution_success") == 4
    assert kinds.count("executed") == 4


def test_a_prompt_needing_model_a_goes_to_the_worker_holding_a(cluster):
    pool, store, _, base = cluster
    first_a = submit(pool, store, txt2img("a.safetensors", 1))
    wait_for(store, [first_a], timeout=240)
    first_b = submit(pool, store, txt2img("b.safetensors", 1))
    wait_for(store, [first_b], timeout=240)
    holder_a, holder_b = pool.router.decision(first_a).worker, pool.router.decision(first_b).worker
    assert holder_a != holder_b, pool.routing()  # B went to the worker with most free memory, not A's holder
    later = [submit(pool, store, txt2img(name, seed)) for seed in (2, 3) for name in ("a.safetensors",
                                                                                      "b.safetensors")]
    states = wait_for(store, later, timeout=240)
    assert all(s["state"] == "success" for s in states.values()), states
    for pid, name in zip(later, ["a", "b", "a", "b"], strict=True):
        route = pool.router.decision(pid)
        assert route.worker == (holder_a if name == "a" else holder_b), (name, route, pool.routing())
        assert route.reason.startswith("holds its models"), route
    images = list((base / "output").glob("*.png"))
    assert len(images) >= 6 and not list((base / "output").glob(".*.part"))
    routing = pool.routing()
    assert routing["policy"] == "affinity" and {w["name"] for w in routing["workers"]} == {holder_a, holder_b}
    assert routing["decisions"][later[0]]["worker"] == holder_a


def test_killing_a_worker_mid_prompt_requeues_it_and_every_prompt_completes(cluster):
    pool, store, _, _ = cluster
    victim_prompt = submit(pool, store, slow(4.0, 100))
    worker = wait_running(pool, victim_prompt)
    others = [submit(pool, store, slow(0.5, 101 + i)) for i in range(3)]
    slot = next(s for s in pool.slots if s.name == worker)
    dead_pid = slot.info["pid"]
    time.sleep(0.5)
    os.kill(dead_pid, signal.SIGKILL)
    states = wait_for(store, [victim_prompt, *others], timeout=90)
    assert all(s["state"] == "success" for s in states.values()), states
    assert states[victim_prompt]["attempts"] == 2  # ran once more, after the loss
    assert pool.router.decision(victim_prompt).worker != worker  # on the other worker
    assert slot.info["pid"] != dead_pid  # the started worker was replaced


def test_cancel_reaches_the_worker_running_that_prompt(cluster):
    pool, store, hub, _ = cluster
    keep = submit(pool, store, slow(3.0, 200), client="c2")
    stop = submit(pool, store, slow(30.0, 201), client="c2")
    assert wait_running(pool, keep) != wait_running(pool, stop)
    assert pool.interrupt(stop)
    states = wait_for(store, [keep, stop], timeout=30)
    assert states[stop]["state"] == "interrupted" and states[keep]["state"] == "success"
    assert "execution_interrupted" in hub.kinds("c2")
    assert not pool.interrupt("no-such-prompt")


def test_the_http_api_is_unchanged_with_prompts_on_the_workers(cluster, tmp_path):
    """`sdgraph serve --ray auto` in-process, attached to the running worker actors (as to `sdgraph worker`
    ones): POST /prompt, the websocket events, history, /view, and the routing in GET /queue."""
    import asyncio

    import aiohttp
    from aiohttp.test_utils import TestServer
    from serverkit import Api, messages_until_done

    import server
    from service.core import Service
    from service.options import build_parser, config_from_args

    _, _, _, base = cluster
    config = config_from_args(build_parser().parse_args(["--base-dir", str(base), "--database",
                                                         str(tmp_path / "front.sqlite3"), "--ray", "auto"]))

    async def scenario():
        service = Service.open(config)
        service.start(asyncio.get_running_loop())
        assert {s.name for s in service.worker.slots} == {s.name for s in cluster[0].slots}
        assert not any(s.owned for s in service.worker.slots)
        test_server = TestServer(server.create_app(service), host="127.0.0.1")
        await test_server.start_server()
        try:
            async with aiohttp.ClientSession() as session:
                api = Api(session, str(test_server.make_url("")).rstrip("/"))
                async with session.ws_connect(str(test_server.make_url("/ws?clientId=web"))) as ws:
                    prompt = txt2img("a.safetensors", 77)
                    prompt_id = await api.queue(prompt, client_id="web")
                    seen = await messages_until_done(ws, prompt_id, timeout=90)
                kinds = [m["type"] for m in seen if isinstance(m, dict)]
                assert "execution_start" in kinds and "execution_success" in kinds and "progress" in kinds
                status, queue = await api.get("/queue")
                assert queue["routing"]["decisions"][prompt_id]["worker"] in {s.name for s in service.worker.slots}
                status, history = await api.get(f"/history/{prompt_id}")
                image = history[prompt_id]["outputs"]["o9"]["images"][0]
                status, data = await api.get(f"/view?filename={image['filename']}&type=output")
                assert status == 200 and data[:8] == b"\x89PNG\r\n\x1a\n"
        finally:
            await test_server.close()
            await service.stop()

    asyncio.run(scenario())
    assert ray.is_initialized()  # the front attached to a cluster it did not start: it leaves it running


def test_a_sweep_with_ray_fans_over_the_workers_and_collects_every_result(cluster, tmp_path, capsys):
    import cli

    pool, _, _, base = cluster
    graph = tmp_path / "g.json"
    graph.write_text(json.dumps(slow(0.3, 0)))
    code = cli.main(["run", str(graph), "--base-dir", str(base), "--sweep", "o1.tag=1..6", "--ray", "auto",
                     "--json", "--explain"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)["prompts"]
    assert len(rows) == 6 and all(r["status"] == "success" for r in rows)
    assert {r["worker"] for r in rows} == {s.name for s in pool.slots}  # both workers took part
    assert all(r["reason"] for r in rows)


def test_a_node_stuck_on_a_worker_fails_its_prompt_and_restarts_that_worker_not_the_server(cluster):
    """--prompt-timeout on a remote worker: the node ignores the interrupt, so after the grace period the prompt
    is failed (PromptTimeout, not retried) and its actor is killed and replaced; the pool carries on."""
    pool, store, _, _ = cluster
    for slot in pool.slots:
        slot.prompt_timeout, slot.stuck_grace = 1.0, 1.0
    try:
        stuck = submit(pool, store, {"o1": {"class_type": "StuckPid", "inputs": {"seconds": 60.0}}})
        worker = wait_running(pool, stuck, timeout=120)
        slot = next(s for s in pool.slots if s.name == worker)
        old_pid = slot.info["pid"]
        assert wait_for(store, [stuck], timeout=30)[stuck]["state"] == "failed"
        error = dict(json.loads(store.history_entry_json(stuck))["status"]["messages"])["execution_error"]
        assert error["exception_type"] == "PromptTimeout" and f"worker {worker} was restarted" in \
            error["exception_message"]
    finally:
        for slot in pool.slots:
            slot.prompt_timeout, slot.stuck_grace = None, 60.0
    after = [submit(pool, store, slow(0.2, 300 + i)) for i in range(2)]
    assert all(s["state"] == "success" for s in wait_for(store, after, timeout=90).values())
    assert pool.alive and slot.info["pid"] != old_pid
