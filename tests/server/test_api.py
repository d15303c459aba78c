"""The ComfyUI API against a real server: the canonical websocket client flow, queue, history, interrupt,
node and model listings, files."""

from __future__ import annotations

import asyncio
import io
import json
import urllib.parse
import urllib.request
import uuid

import aiohttp
from PIL import Image
from serverkit import Api, chain, messages_until_done, run, slow

import server as server_module


def queue_with_urllib(url: str, prompt: dict, client_id: str) -> str:
    """queue_prompt of ComfyUI's script_examples/websockets_api_example.py, as written there (urllib, which labels
    the JSON body as a urlencoded form)."""
    data = json.dumps({"prompt": prompt, "client_id": client_id}).encode("utf-8")
    request = urllib.request.Request(f"{url}/prompt", data=data)
    return json.loads(urllib.request.urlopen(request).read())["prompt_id"]


def test_canonical_websocket_client_flow(shared):
    async def scenario():
        client_id = str(uuid.uuid4())
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            ws = await api.ws(client_id)
            first = json.loads((await ws.receive(timeout=10)).data)
            assert first["type"] == "status" and first["data"]["sid"] == client_id
            assert "queue_remaining" in first["data"]["status"]["exec_info"]
            prompt_id = await asyncio.to_thread(queue_with_urllib, shared.url, chain(7, prefix="canon"), client_id)
            seen = await messages_until_done(ws, prompt_id)
            await ws.close()

            def history_and_images():
                with urllib.request.urlopen(f"{shared.url}/history/{prompt_id}") as response:
                    history = json.loads(response.read())[prompt_id]
                images = {}
                for node_id, node_output in history["outputs"].items():
                    for image in node_output.get("images", []):
                        query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image["subfolder"],
                                                        "type": image["type"]})
                        with urllib.request.urlopen(f"{shared.url}/view?{query}") as response:
                            images.setdefault(node_id, []).append(response.read())
                return history, images

            history, images = await asyncio.to_thread(history_and_images)
        events = [m for m in seen if isinstance(m, dict) and m["type"] != "status"]
        kinds = [m["type"] for m in events]
        assert kinds[:2] == ["execution_start", "execution_cached"]
        assert kinds[-2:] == ["execution_success", "executing"]
        assert all(m["data"]["prompt_id"] == prompt_id for m in events)
        executed = {m["data"]["node"]: m["data"]["output"] for m in events if m["type"] == "executed"}
        assert executed["4"] == {"text": ["17"]}
        assert executed["3"]["images"][0]["filename"].startswith("canon_")
        assert history["status"] == {"status_str": "success", "completed": True,
                                     "messages": history["status"]["messages"]}
        assert [k for k, _ in history["status"]["messages"]] == ["execution_start", "execution_cached",
                                                                 "execution_success"]
        assert history["prompt"][:2] == [history["prompt"][0], prompt_id]
        assert history["prompt"][3]["client_id"] == client_id and sorted(history["prompt"][4]) == ["3", "4"]
        assert history["outputs"]["4"] == {"text": ["17"]}
        assert set(history["meta"]) == {"3", "4"} and history["meta"]["3"]["display_node"] == "3"
        pixel = Image.open(io.BytesIO(images["3"][0])).getpixel((0, 0))
        assert pixel == (17, 40, 200)
    run(scenario())


def test_api_prefix_get_prompt_and_root(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            for path in ("/prompt", "/api/prompt"):
                status, body = await api.get(path)
                assert status == 200 and isinstance(body["exec_info"]["queue_remaining"], int)
            prompt_id = await api.queue(chain(1), client_id="x")
            assert (await api.history(prompt_id))["status"]["completed"]
            status, body = await api.get(f"/api/history/{prompt_id}")
            assert list(body) == [prompt_id]
            status, root = await api.get("/")
            assert status == 200 and root["name"] == "sdgraph"
            status, body = await api.get("/no/such/route")
            assert status == 404 and body["error"]["type"] == "not_found"
            status, body = await api.request("DELETE", "/prompt")
            assert status == 405 and body["error"]["type"] == "method_not_allowed"
    run(scenario())


def test_queue_history_and_prompt_state(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            blocker = await api.queue(slow(1, steps=40, delay=0.05))
            later = await api.queue(chain(2))
            dropped = await api.queue(chain(3))
            first = await api.queue(chain(4), front=True)
            status, answer = await api.post("/prompt", {"prompt": chain(5), "prompt_id": "my-own-id.1", "number": 0.5})
            assert status == 200 and answer == {"prompt_id": "my-own-id.1", "number": 0.5, "node_errors": {}}
            status, again = await api.post("/prompt", {"prompt": chain(5), "prompt_id": "my-own-id.1"})
            assert status == 409 and again["error"]["type"] == "duplicate_prompt_id"
            for _ in range(100):
                status, queue = await api.get("/queue")
                if queue["queue_running"]:
                    break
                await asyncio.sleep(0.05)
            running = queue["queue_running"][0]
            assert running[1] == blocker and running[2]["1"]["class_type"] == "Slow" and running[4] == ["2"]
            pending = [item[1] for item in queue["queue_pending"]]
            assert pending[0] == first and pending.index(later) < pending.index(dropped)
            status, state = await api.get(f"/v1/prompts/{later}")
            assert status == 200 and state["state"] == "pending" and state["position"] >= 1
            status, state = await api.get(f"/v1/prompts/{blocker}")
            assert state["state"] == "running" and state["attempts"] == 1
            status, removed = await api.post("/queue", {"delete": [dropped, blocker]})  # a running one stays
            assert status == 200 and removed == {"removed": 1}
            for prompt_id in (blocker, later, first, "my-own-id.1"):
                assert (await api.history(prompt_id))["status"]["status_str"] == "success"
            assert (await api.get(f"/v1/prompts/{dropped}"))[0] == 404
            assert await api.get(f"/history/{dropped}") == (200, {})
            status, body = await api.get(f"/v1/history/{dropped}")
            assert status == 404 and body["error"]["type"] == "not_found"
            assert (await api.get(f"/v1/history/{later}"))[1][later]["status"]["completed"]
            status, newest = await api.get("/history?max_items=2")
            assert status == 200 and list(newest) == ["my-own-id.1", later]  # run order: front, 0.5, then the rest
            status, page = await api.get("/history?max_items=1&offset=0")
            assert len(page) == 1
            assert (await api.get("/history?max_items=x"))[0] == 400
            status, _ = await api.post("/history", {"delete": [first]})
            assert await api.get(f"/history/{first}") == (200, {})
            status, body = await api.post("/queue", {"delete": "not-a-list"})
            assert status == 400 and "delete" in body["error"]["message"]
    run(scenario())


def test_interrupt_only_the_named_prompt(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            ws = await api.ws("interrupter")
            long_one = await api.queue(slow(9, steps=400, delay=0.05), client_id="interrupter")
            while (await api.get(f"/v1/prompts/{long_one}"))[1]["state"] != "running":
                await asyncio.sleep(0.05)
            status, answer = await api.post("/interrupt", {"prompt_id": "stale-id"})
            assert status == 200 and answer == {"interrupted": False}
            await asyncio.sleep(0.3)
            assert (await api.get(f"/v1/prompts/{long_one}"))[1]["state"] == "running"
            status, answer = await api.post("/interrupt", {"prompt_id": long_one})
            assert answer == {"interrupted": True}
            seen = await messages_until_done(ws, long_one)
            await ws.close()
            kinds = [m["type"] for m in seen if isinstance(m, dict)]
            assert "execution_interrupted" in kinds and "execution_success" not in kinds
            interrupted = next(m["data"] for m in seen if isinstance(m, dict) and m["type"] == "execution_interrupted")
            assert interrupted["node_id"] == "1" and interrupted["node_type"] == "Slow"
            history = await api.history(long_one)
            assert history["status"]["status_str"] == "error" and not history["status"]["completed"]
            assert (await api.get(f"/v1/prompts/{long_one}"))[1]["state"] == "interrupted"
            # without an id, whatever runs is interrupted (ComfyUI's behaviour); with nothing running, nothing is
            assert (await api.post("/interrupt"))[1] == {"interrupted": False}
            after = await api.queue(chain(11))
            assert (await api.history(after))["status"]["completed"]
    run(scenario())


def test_node_errors_at_run_time_reach_the_client(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            ws = await api.ws("failing")
            prompt = {"1": {"class_type": "Fail", "inputs": {"value": 5}},
                      "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
            prompt_id = await api.queue(prompt, client_id="failing")
            seen = await messages_until_done(ws, prompt_id)
            await ws.close()
            error = next(m["data"] for m in seen if isinstance(m, dict) and m["type"] == "execution_error")
            assert error["node_id"] == "1" and error["exception_type"] == "ValueError"
            history = await api.history(prompt_id)
            assert history["status"]["status_str"] == "error"
            assert history["status"]["messages"][-1][0] == "execution_error"
    run(scenario())


def test_object_info_and_load_errors(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            status, info = await api.get("/object_info")
            assert status == 200 and {"Const", "ToySaveImage", "Show"} <= set(info)
            const = info["Const"]
            for key in ("input", "input_order", "output", "output_is_list", "output_name", "name", "display_name",
                        "description", "category", "output_node"):
                assert key in const
            assert const["input"]["required"]["value"][0] == "INT" and const["output"] == ["INT"]
            assert info["ToySaveImage"]["output_node"] is True
            status, one = await api.get("/object_info/Add")
            assert list(one) == ["Add"] and one["Add"] == info["Add"]
            assert await api.get("/object_info/NoSuchNode") == (200, {})
            status, errors = await api.get("/v1/node_load_errors")
            assert any(e["pack"] == "broken_pack" and "ZeroDivisionError" in e["reason"] for e in errors)
            async with session.get(shared.url + "/object_info") as response:
                assert int(response.headers["X-Sdgraph-Load-Errors"]) == len(errors)
    run(scenario())


def test_models_embeddings_stats_features(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            status, folders = await api.get("/models")
            assert "checkpoints" in folders and "embeddings" in folders
            assert await api.get("/models/embeddings") == (200, ["style.pt"])
            assert (await api.get("/models/nope"))[0] == 404
            assert await api.get("/embeddings") == (200, ["style"])
            status, stats = await api.get("/system_stats")
            assert {"os", "ram_total", "ram_free", "python_version"} <= set(stats["system"])
            assert stats["devices"] and "vram_total" in stats["devices"][0]
            assert stats["sdgraph"]["worker_alive"] is True and stats["sdgraph"]["cache_entries"] >= 0
            status, features = await api.get("/features")
            assert features["max_upload_size"] == 1 << 20 and features["sdgraph"]["max_batch_megapixels"] == 1
    run(scenario())


def test_free_unload_models_clears_the_cache(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            ws = await api.ws("freer")
            prompt = chain(123, prefix="free")

            async def cached_nodes() -> list[str]:
                prompt_id = await api.queue(prompt, client_id="freer")
                seen = await messages_until_done(ws, prompt_id)
                return next(m["data"]["nodes"] for m in seen if isinstance(m, dict)
                            and m["type"] == "execution_cached")

            await cached_nodes()
            assert sorted(await cached_nodes()) == ["1", "2", "3", "4"]
            assert (await api.post("/free", {"unload_models": True}))[0] == 200
            await asyncio.sleep(0.3)
            assert await cached_nodes() == []
            await ws.close()
    run(scenario())


def test_openapi_documents_every_route(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            status, document = await Api(session, shared.url).get("/openapi.json")
        assert status == 200 and document["openapi"].startswith("3.")
        declared = {(r.method.lower(), r.path) for r in server_module.route_table().routes}
        documented = {(method, path) for path, ops in document["paths"].items() for method in ops}
        assert declared == documented
        for path in ("/prompt", "/queue", "/interrupt", "/history", "/history/{prompt_id}", "/object_info",
                     "/view", "/upload/image", "/upload/mask", "/system_stats", "/free", "/models",
                     "/models/{folder}", "/embeddings", "/features", "/ws"):
            assert path in document["paths"], path
        body = document["paths"]["/prompt"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        schema = document["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
        assert {"prompt", "client_id", "prompt_id", "extra_data", "front", "number",
                "partial_execution_targets"} <= set(schema["properties"])
        upload = document["paths"]["/upload/image"]["post"]["requestBody"]["content"]
        assert "multipart/form-data" in upload
    run(scenario())


def test_partial_execution_targets(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            prompt = chain(31, prefix="partial")
            prompt["5"] = {"class_type": "Fail", "inputs": {"value": 1}}
            prompt["6"] = {"class_type": "Sink", "inputs": {"value": ["5", 0]}}
            prompt_id = await api.queue(prompt, partial_execution_targets=["4"])
            history = await api.history(prompt_id)
            assert history["status"]["completed"] and list(history["outputs"]) == ["4"]
            status, body = await api.post("/prompt", {"prompt": prompt, "partial_execution_targets": ["99"]})
            assert status == 400 and body["error"]["type"] == "bad_target"
    run(scenario())
