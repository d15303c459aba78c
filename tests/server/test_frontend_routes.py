"""Issue #14: every route the web frontend calls answers as ComfyUI's does (on a real server process)."""

from __future__ import annotations

import json
import struct
import uuid
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from serverkit import Api, chain, messages_until_done, run, slow

from engine.formats import workflow_to_api
from nodes import build_registry
from service.frontend import installed_root

REPO = Path(__file__).resolve().parents[2]
TXT2IMG = json.loads((REPO / "graphs" / "txt2img.json").read_text())


async def _session(shared, scenario):
    async with aiohttp.ClientSession() as session:
        await scenario(Api(session, shared.url), session)


@pytest.mark.skipif(installed_root() is None, reason="comfyui-frontend-package is not installed")
def test_browser_gets_the_page_and_api_clients_json(shared):
    async def scenario(api, session):
        status, page = await api.get("/", headers={"Accept": "text/html,application/xhtml+xml"})
        assert status == 200 and b"<html" in page[:200].lower()
        status, root = await api.get("/")
        assert status == 200 and root["name"] == "sdgraph"
        status, body = await api.get("/extensions/sdgraph/sdgraph.js")
        assert status == 200 and b"defaultGraph" in body
        async with session.get(shared.url + "/user.css") as response:
            assert response.status == 200 and response.content_type == "text/css"
    run(_session(shared, scenario))


def test_extensions_users_i18n_subgraphs_templates(shared):
    async def scenario(api, _session):
        for prefix in ("", "/api"):
            status, urls = await api.get(prefix + "/extensions")
            assert status == 200 and "/extensions/sdgraph/sdgraph.js" in urls
        assert await api.get("/api/users") == (200, {"storage": "server", "migrated": True})
        assert await api.get("/api/i18n") == (200, {})
        assert await api.get("/api/global_subgraphs") == (200, {})
        assert await api.get("/api/workflow_templates") == (200, {})
        status, index = await api.get("/templates/index.json")
        assert status == 200 and index[0]["templates"][0]["name"] == "sdgraph_txt2img"
        status, workflow = await api.get("/templates/sdgraph_txt2img.json")
        assert status == 200 and workflow_to_api(workflow, build_registry(pack_dirs=[])) == TXT2IMG
        assert (await api.get("/templates/sdgraph_nope.json"))[0] == 404
        assert (await api.get("/templates/..%2Fsecret.txt"))[0] == 404
    run(_session(shared, scenario))


def test_default_workflow_is_graphs_txt2img(shared):
    """A new user's first page: the default workflow is graphs/txt2img.json, in the UI format."""
    async def scenario(api, _session):
        status, workflow = await api.get("/api/sdgraph/default_workflow")
        assert status == 200 and workflow_to_api(workflow, build_registry(pack_dirs=[])) == TXT2IMG
        status, settings = await api.get("/api/settings")
        assert settings["Comfy.TutorialCompleted"] is True  # restore (our default), not the template browser
    run(_session(shared, scenario))


def test_settings_accept_text_plain_from_the_same_origin_only(shared):
    async def scenario(api, _session):
        key = f"Test.{uuid.uuid4().hex}"
        body = json.dumps({key: [1, 2]})
        same = {"Content-Type": "text/plain;charset=UTF-8", "Origin": shared.url}
        assert (await api.post("/api/settings", data=body, headers=same))[0] == 200
        assert (await api.get(f"/api/settings/{key}")) == (200, [1, 2])
        assert (await api.post(f"/api/settings/{key}", data="3", headers=same))[0] == 200
        assert (await api.get("/api/settings"))[1][key] == 3
        fetch_same = {"Content-Type": "text/plain", "Sec-Fetch-Site": "same-origin"}
        assert (await api.post(f"/api/settings/{key}", data="4", headers=fetch_same))[0] == 200
        # no Origin and no Sec-Fetch-Site: a plain-text post that does not say where it comes from
        status, answer = await api.post("/api/settings", data=body, headers={"Content-Type": "text/plain"})
        assert status == 415 and "text/plain only from this server's own pages" in answer["error"]["message"]
        cross = {"Content-Type": "text/plain", "Origin": "http://evil.example"}
        assert (await api.post("/api/settings", data=body, headers=cross))[0] == 403
        site = {"Content-Type": "text/plain", "Sec-Fetch-Site": "cross-site"}
        assert (await api.post("/api/settings", data=body, headers=site))[0] == 403
        assert (await api.post("/prompt", data="{}", headers=same))[0] == 415  # only settings read text/plain
        assert (await api.get(f"/api/settings/Missing.{key}")) == (200, None)
        status, answer = await api.post("/api/settings", data="[1]", headers=same)
        assert status == 400 and "JSON object" in answer["error"]["message"]
    run(_session(shared, scenario))


def test_userdata_routes(shared):
    async def scenario(api, _session):
        folder = f"workflows/t{uuid.uuid4().hex[:8]}"
        name = quote(f"{folder}/a.json", safe="")
        same = {"Origin": shared.url}
        status, answer = await api.post(f"/api/userdata/{name}?overwrite=false", data=b'{"a": 1}',
                                        headers={**same, "Content-Type": "application/json"})
        assert (status, answer) == (200, f"{folder}/a.json")
        status, answer = await api.post(f"/api/userdata/{name}?overwrite=false", data=b"{}",
                                        headers={**same, "Content-Type": "application/json"})
        assert status == 409 and answer["error"]["type"] == "exists"
        status, info = await api.post(f"/api/userdata/{name}?full_info=true", data=b"{}",
                                      headers={**same, "Content-Type": "text/plain"})
        assert status == 200 and info["path"] == f"{folder}/a.json" and info["size"] == 2
        assert await api.get(f"/api/userdata?dir={folder}") == (200, ["a.json"])
        status, found = await api.get(f"/api/userdata?dir={folder}&full_info=true")
        assert found[0]["path"] == "a.json" and {"size", "modified"} <= found[0].keys()
        assert (await api.get(f"/api/userdata/{name}"))[1] == {}
        status, answer = await api.post(f"/api/userdata/{name}/move/{quote(folder + '/b.json', safe='')}", headers=same)
        assert (status, answer) == (200, f"{folder}/b.json")
        assert (await api.get(f"/api/userdata/{name}"))[0] == 404
        moved = quote(folder + "/b.json", safe="")
        assert (await api.request("DELETE", f"/api/userdata/{moved}", headers=same))[0] == 204
        assert (await api.get("/api/userdata?dir=nowhere"))[0] == 404
        assert (await api.get("/api/userdata"))[0] == 400
        for bad in ("..%2F..%2Fsecret.txt", "%2Fetc%2Fpasswd"):
            status, answer = await api.post(f"/api/userdata/{bad}", data=b"x", headers={
                **same, "Content-Type": "application/json"})
            assert status == 400, answer
            assert (await api.get(f"/api/userdata/{bad}"))[0] == 400
    run(_session(shared, scenario))


def test_jobs_list_detail_and_cancel(shared):
    async def scenario(api, _session):
        done = await api.queue(chain(7, prefix="jobs"))
        await api.history(done)
        status, listed = await api.get("/api/jobs?status=completed,failed,cancelled&limit=200&offset=0")
        assert status == 200 and {"offset", "limit", "total", "has_more"} <= listed["pagination"].keys()
        job = next(j for j in listed["jobs"] if j["id"] == done)
        assert job["status"] == "completed" and job["outputs_count"] >= 1
        status, detail = await api.get(f"/api/jobs/{done}")
        assert status == 200 and detail["workflow"]["prompt"]["1"]["class_type"] == "Const"
        assert (await api.get("/api/jobs/unknown-id"))[0] == 404
        assert (await api.get("/api/jobs?status=done"))[0] == 400
        running = await api.queue(slow(steps=200, delay=0.05))
        waiting = await api.queue(slow(1, steps=2, delay=0.01))
        status, answer = await api.post("/api/jobs/cancel", {"job_ids": [waiting]})
        assert status == 200
        assert (await api.post(f"/api/jobs/{running}/cancel"))[0] == 200
        entry = await api.history(running)
        assert entry["status"]["status_str"] == "error"
        assert (await api.get(f"/api/jobs/{waiting}"))[0] == 404  # it left the queue before it ran
    run(_session(shared, scenario))


def test_model_folders(shared):
    async def scenario(api, _session):
        status, folders = await api.get("/api/experiment/models")
        assert status == 200 and {"name": "checkpoints", "folders": [str(shared.base / "models" / "checkpoints")]} \
            in folders
        assert (await api.get("/api/experiment/models/checkpoints"))[0] == 200
        assert (await api.get("/api/experiment/models/nope"))[0] == 404
        status, paths = await api.get("/internal/folder_paths")
        assert status == 200 and paths["loras"][0] == [str(shared.base / "models" / "loras")]
    run(_session(shared, scenario))


def test_websocket_answers_the_clients_feature_flags_and_sends_progress_state(shared):
    async def scenario(api, _session):
        client = uuid.uuid4().hex
        ws = await api.ws(client)
        await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": False}})
        first = [json.loads((await ws.receive(timeout=10)).data) for _ in range(2)]
        assert [m["type"] for m in first] == ["status", "feature_flags"]
        assert "supports_preview_metadata" in first[1]["data"] and "max_upload_size" in first[1]["data"]
        prompt_id = await api.queue(slow(3, steps=3, delay=0.01), client_id=client)
        seen = await messages_until_done(ws, prompt_id)
        states = [m["data"] for m in seen if isinstance(m, dict) and m["type"] == "progress_state"]
        assert states and states[-1]["prompt_id"] == prompt_id
        assert states[-1]["nodes"]["1"]["state"] == "finished"
        assert any(s["nodes"].get("1", {}).get("value") == 2 and s["nodes"]["1"]["max"] == 3 for s in states)
        await ws.close()
    run(_session(shared, scenario))


def test_previews_carry_their_node_for_a_client_that_asks(shared):
    """The frontend announces supports_preview_metadata and draws only previews that name their node (type 4)."""
    async def scenario(api, _session):
        frames = {}
        for wants in (True, False):
            client = uuid.uuid4().hex
            ws = await api.ws(client)
            await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": wants}})
            prompt = {"1": {"class_type": "ToyPreview", "inputs": {"steps": 2, "size": 8 + wants}},
                      "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
            prompt_id = await api.queue(prompt, client_id=client)
            seen = await messages_until_done(ws, prompt_id)
            frames[wants] = [m for m in seen if isinstance(m, bytes)]
            await ws.close()
        kind, length = struct.unpack(">II", frames[True][0][:8])
        metadata = json.loads(frames[True][0][8:8 + length])
        assert kind == 4 and metadata["node_id"] == "1" and metadata["image_type"] == "image/jpeg"
        assert struct.unpack(">II", frames[False][0][:8]) == (1, 1)
    run(_session(shared, scenario))
