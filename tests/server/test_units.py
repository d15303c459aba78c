"""In-process checks of the pieces: messages, the hub's slow-client handling, security rules, limits."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from pathlib import Path

import pytest

from engine import Executor, validate
from service.hub import Hub
from service.messages import RunMessages, validation_failure
from service.security import Guard, bind_problem, normalise_origin

_spec = importlib.util.spec_from_file_location(
    "toy_nodes_for_server_tests", Path(__file__).resolve().parents[1] / "engine" / "toy_nodes.py")
toy = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(toy)


def run_messages(prompt: dict, executor: Executor) -> tuple[list, RunMessages]:
    result = validate(prompt, executor.registry)
    assert result.ok, result.errors
    messages = RunMessages("p1")
    out = []
    report = executor.run(result.graph, listeners=[lambda e: out.extend(messages.translate(e))], run_id="p1")
    out += messages.finish(report)
    return out, messages


def test_run_messages_follow_comfyui_order_and_payloads():
    executor = Executor(toy.toy_registry())
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 2}},
              "2": {"class_type": "Slow", "inputs": {"value": ["1", 0], "steps": 2}},
              "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    out, messages = run_messages(prompt, executor)
    states = [data for kind, data in out if kind == "progress_state"]
    out = [(kind, data) for kind, data in out if kind != "progress_state"]  # (checked below)
    kinds = [kind for kind, _ in out]
    assert kinds == ["execution_start", "execution_cached", "executing", "executing", "progress", "progress",
                     "executing", "executed", "execution_success", "executing"]
    assert out[1][1]["nodes"] == []
    assert out[4][1] == {"value": 1, "max": 2, "prompt_id": "p1", "node": "2"}
    assert out[7][1]["output"] == {"text": ["2"]} and out[7][1]["node"] == "3"
    assert out[-1][1] == {"node": None, "prompt_id": "p1"}
    assert [kind for kind, _ in messages.recorded] == ["execution_start", "execution_cached", "execution_success"]
    # issue #14: progress_state carries every started node's state, as the frontend's progress bars read it
    assert states[-1]["prompt_id"] == "p1" and sorted(states[-1]["nodes"]) == ["1", "2", "3"]
    assert {n["state"] for n in states[-1]["nodes"].values()} == {"finished"}
    assert {"value": 1, "max": 2, "state": "running"}.items() <= states[3]["nodes"]["2"].items()

    again, _ = run_messages(prompt, executor)  # everything cached: the output node shows its result again
    again = [(kind, data) for kind, data in again if kind != "progress_state"]
    assert [kind for kind, _ in again] == ["execution_start", "execution_cached", "executed", "execution_success",
                                           "executing"]
    assert sorted(again[1][1]["nodes"]) == ["1", "2", "3"]


def test_failure_message_has_comfyui_fields():
    executor = Executor(toy.toy_registry())
    prompt = {"1": {"class_type": "Const", "inputs": {"value": 4}},
              "2": {"class_type": "Fail", "inputs": {"value": ["1", 0]}},
              "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    out, _ = run_messages(prompt, executor)
    kind, data = out[-2]
    assert kind == "execution_error"
    assert data["node_id"] == "2" and data["node_type"] == "Fail" and data["executed"] == ["1"]
    assert data["exception_type"] == "ValueError" and "toy failure on 4" in data["exception_message"]
    assert isinstance(data["traceback"], list) and data["current_inputs"] == {"value": ["4"]}


def test_validation_failure_shape():
    registry = toy.toy_registry()
    prompt = {"1": {"class_type": "Const", "inputs": {"value": "abc"}},
              "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": ["9", 0]}},
              "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}
    result = validate(prompt, registry)
    body = validation_failure(result.errors, prompt, ["3"])
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert set(body["error"]) == {"type", "message", "details", "extra_info"}
    assert set(body["node_errors"]) == {"1", "2"}
    entry = body["node_errors"]["1"]
    assert entry["class_type"] == "Const" and entry["dependent_outputs"] == ["3"]
    error = entry["errors"][0]
    assert error["type"] == "invalid_input_type" and error["extra_info"]["input_name"] == "value"
    assert body["node_errors"]["2"]["errors"][0]["type"] == "bad_linked_input"

    whole = validation_failure(validate([1, 2], registry).errors, [1, 2], [])
    assert whole["error"]["type"] == "invalid_prompt" and whole["node_errors"] == {}


def test_validation_failure_messages_lose_the_servers_paths(tmp_path):
    """A check that names a file by its absolute path (as nodes.folders' refusals do) reaches the client with the
    path relative to its root."""
    from engine import ValidationError
    from service.scrub import PathScrubber

    scrub = PathScrubber({"input": tmp_path / "input"})
    error = ValidationError("custom_validation_failed", f"image name '../x' points outside {tmp_path}/input; use a "
                            "name inside that folder", "1", "Const", "value")
    body = validation_failure([error], {"1": {"class_type": "Const", "inputs": {}}}, ["1"], scrub)
    shown = body["node_errors"]["1"]["errors"][0]["message"]
    assert shown == "image name '../x' points outside input; use a name inside that folder"
    assert str(tmp_path) not in str(body)


class StuckSocket:
    """A websocket whose peer never reads: every send waits forever."""

    def __init__(self):
        self.sent = 0

    async def send_str(self, text):
        self.sent += 1
        await asyncio.Event().wait()

    send_bytes = send_str


def test_a_slow_client_is_dropped_and_never_blocks_the_publisher():
    async def scenario():
        loop = asyncio.get_running_loop()
        hub = Hub(loop, outbox_size=300)
        aborted = []
        slow = hub.attach("slow", StuckSocket(), abort=lambda: aborted.append(True))
        received = []

        class Fast:
            async def send_str(self, text):
                received.append(text)
        hub.attach("fast", Fast(), abort=lambda: None)

        def worker():  # the worker thread publishes at its own pace and never waits for a client
            started = time.perf_counter()
            for i in range(1000):
                hub.publish("slow", f"m{i}")
                hub.publish("fast", f"f{i}")
                if i % 5 == 0:
                    time.sleep(0.001)
            return time.perf_counter() - started

        elapsed = await asyncio.to_thread(worker)
        await asyncio.sleep(0.2)
        assert elapsed < 5
        assert aborted == [True] and slow.dropped and hub.dropped_slow == 1
        assert hub.count == 1  # only the fast client is left, and it got everything in order
        assert received == [f"f{i}" for i in range(1000)]
    asyncio.run(scenario())


@pytest.mark.parametrize(("listen", "host", "ok"), [
    (("127.0.0.1",), "127.0.0.1:8188", True),
    (("127.0.0.1",), "localhost:8188", True),
    (("127.0.0.1",), "[::1]:8188", True),
    (("127.0.0.1",), "evil.example:8188", False),
    (("127.0.0.1",), "127.0.0.1.nip.io", False),
    (("127.0.0.1",), "192.168.1.5:8188", False),
    (("127.0.0.1",), "", False),
    (("127.0.0.1",), "127.0.0.1:notaport", False),
    (("0.0.0.0",), "192.168.1.5:8188", True),
    (("0.0.0.0",), "evil.example", False),
    (("10.1.2.3",), "10.1.2.3:8188", True),
])
def test_host_allow_list(listen, host, ok):
    assert Guard(listen=listen, token="x" * 16).host_ok(host) is ok


def test_allowed_hosts_and_origins():
    guard = Guard(listen=("127.0.0.1",), token=None, allowed_hosts=["studio.lan"],
                  allowed_origins=["http://localhost:5173"])
    assert guard.host_ok("studio.lan:8188")
    assert guard.origin_ok("http://127.0.0.1:8188", "127.0.0.1:8188", "http")
    assert guard.origin_ok("http://localhost:5173", "127.0.0.1:8188", "http")
    assert not guard.origin_ok("http://localhost:5174", "127.0.0.1:8188", "http")
    assert not guard.origin_ok("null", "127.0.0.1:8188", "http")
    assert not guard.origin_ok("https://127.0.0.1:8188", "127.0.0.1:8188", "http")
    assert not guard.origin_ok("http://evil.example", "127.0.0.1:8188", "http")
    assert normalise_origin("HTTP://LocalHost") == "http://localhost:80"


def test_bind_rules():
    assert bind_problem(["127.0.0.1", "::1", "localhost"], None) is None
    assert "without a token" in bind_problem(["0.0.0.0"], None)
    assert "without a token" in bind_problem(["127.0.0.1", "192.168.1.5"], None)
    assert "too short" in bind_problem(["0.0.0.0"], "short")
    assert bind_problem(["0.0.0.0"], "a" * 32) is None


def test_free_reaches_the_runtime_and_clears_the_cache(tmp_path):
    from service.queue import QueueStore
    from service.worker import FreesMemory, Worker

    class Runtime:
        def __init__(self):
            self.calls = []

        def free_memory(self, unload_models: bool, free_memory: bool) -> None:
            self.calls.append((unload_models, free_memory))

    async def scenario():
        runtime = Runtime()
        assert isinstance(runtime, FreesMemory)
        executor = Executor(toy.toy_registry(), resources=runtime)
        store = QueueStore(tmp_path / "q.sqlite3")
        worker = Worker(store=store, executor=executor, registry=executor.registry,
                        hub=Hub(asyncio.get_running_loop()))
        worker.start()
        prompt = {"1": {"class_type": "Const", "inputs": {"value": 3}}, "2": {"class_type": "Show",
                                                                           "inputs": {"value": ["1", 0]}}}
        store.put(prompt_id="a", prompt=prompt, extra_data={}, outputs=["2"], client_id=None, number=None,
                  front=False, max_pending=10)
        worker.wake()
        while store.describe("a")["state"] != "success":
            await asyncio.sleep(0.01)
        assert len(executor.cache) == 2
        worker.request_free(unload_models=False, free_memory=True)
        while not runtime.calls:
            await asyncio.sleep(0.01)
        assert runtime.calls == [(False, True)] and len(executor.cache) == 2
        worker.request_free(unload_models=True, free_memory=False)
        while len(runtime.calls) < 2:
            await asyncio.sleep(0.01)
        assert runtime.calls == [(False, True), (True, False)] and len(executor.cache) == 0
        assert worker.stop(5)
        store.close()
    asyncio.run(scenario())


def test_history_is_written_before_the_client_is_told_the_prompt_is_done(tmp_path):
    """ComfyUI's client flow reads /history/{id} as soon as `executing` with node null arrives."""
    import json

    from service.queue import QueueStore
    from service.worker import Worker

    store = QueueStore(tmp_path / "q.sqlite3")
    found_at_end: dict[str, bool] = {}

    class RecordingHub:
        def publish(self, client_id, message):
            data = json.loads(message)
            if data["type"] == "executing" and data["data"]["node"] is None:
                prompt_id = data["data"]["prompt_id"]
                found_at_end[prompt_id] = store.history_entry_json(prompt_id) is not None

        def publish_all(self, message):
            pass

    executor = Executor(toy.toy_registry())
    worker = Worker(store=store, executor=executor, registry=executor.registry, hub=RecordingHub())
    worker.start()
    ok = {"1": {"class_type": "Const", "inputs": {"value": 3}}, "2": {"class_type": "Show",
                                                                   "inputs": {"value": ["1", 0]}}}
    failing = {"1": {"class_type": "Fail", "inputs": {"value": 3}}, "2": {"class_type": "Sink",
                                                                        "inputs": {"value": ["1", 0]}}}
    stale = {"1": {"class_type": "NoLongerInstalled", "inputs": {}}}  # fails the worker's re-validation
    for prompt_id, prompt in (("ok", ok), ("failing", failing), ("stale", stale)):
        store.put(prompt_id=prompt_id, prompt=prompt, extra_data={}, outputs=["2"], client_id="me", number=None,
                  front=False, max_pending=10)
    worker.wake()
    deadline = time.monotonic() + 10
    while len(found_at_end) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.stop(5)
    store.close()
    assert found_at_end == {"ok": True, "failing": True, "stale": True}


def test_content_errors_past_the_checks_are_400_and_bugs_500_both_logged(caplog):
    """The catch-all: UnicodeError, OverflowError, RecursionError can only come from a request's content, so they
    are the client's 400 (old code: 500); any other exception is a server bug, a 500. Both log the traceback."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from service.routing import json_errors

    async def overflow(request):
        raise OverflowError("Python int too large to convert to SQLite INTEGER")

    async def bug(request):
        return {}["missing"]

    async def scenario():
        app = web.Application(middlewares=[json_errors])
        app.router.add_get("/overflow", overflow)
        app.router.add_get("/bug", bug)
        async with TestClient(TestServer(app)) as client:
            content, broken = await client.get("/overflow"), await client.get("/bug")
            return (content.status, await content.json()), (broken.status, await broken.json())

    (status, answer), (bug_status, bug_answer) = asyncio.run(scenario())
    assert (status, answer["error"]["type"]) == (400, "unprocessable_content")
    assert (bug_status, bug_answer["error"]["type"]) == (500, "internal_error")
    logged = [r for r in caplog.records if r.exc_info]
    assert [r.exc_info[0] for r in logged] == [OverflowError, KeyError]


def test_path_scrubber_makes_root_paths_relative_and_hides_the_rest(tmp_path):
    from service.scrub import PathScrubber

    base = tmp_path / "base"
    (base / "models").mkdir(parents=True)
    (tmp_path / "link").symlink_to(base)
    scrub = PathScrubber({"models": base / "models", "input": base / "input", "output": tmp_path / "elsewhere"})
    assert scrub(f"no file '{base}/models/checkpoints/x.safetensors'") == "no file 'models/checkpoints/x.safetensors'"
    through_link = PathScrubber({"models": tmp_path / "link" / "models"})  # the message names the resolved path
    assert through_link(f"{base}/models/vae/v.pt missing") == "models/vae/v.pt missing"
    assert scrub(f"[Errno 2] {base}/input/a b.png") == "[Errno 2] input/a b.png"
    assert scrub(f"wrote {tmp_path}/elsewhere/out_00001_.png") == "wrote output/out_00001_.png"
    assert scrub(f"see {base}/models") == "see models"
    assert scrub("/usr/lib/python3.11/site-packages/torch/nn/functional.py line 3") == "functional.py line 3"
    assert scrub("kept: http://host/path, a/b/c, ./rel/x, 3/4, ~/notes") == \
        "kept: http://host/path, a/b/c, ./rel/x, 3/4, ~/notes"
