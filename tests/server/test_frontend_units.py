"""Issue #14, the frontend's server side without a server: the API->UI converter (default workflow and
templates), the per-user store, the jobs view, the extension list, the text/plain rule for settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine.formats import workflow_to_api
from engine.schema import object_info
from nodes import build_registry
from service import jobs
from service.frontend import OWN_EXTENSION, FrontEnd, check_root
from service.templates import DEFAULT_GRAPH, TEMPLATE_PREFIX, Templates, api_to_workflow
from service.userdata import DEFAULT_SETTINGS, UserDataError, UserStore

REPO = Path(__file__).resolve().parents[2]
GRAPHS = sorted((REPO / "graphs").glob("*.json"))


@pytest.fixture(scope="module")
def registry():
    return build_registry(pack_dirs=[])


@pytest.fixture(scope="module")
def infos(registry):
    return object_info(registry, None)


@pytest.mark.parametrize("path", GRAPHS, ids=[p.stem for p in GRAPHS])
def test_every_graph_converts_to_a_ui_workflow_that_converts_back(path, registry, infos):
    """Default workflow and templates: our graphs in the frontend's UI format give back the same prompt."""
    prompt = json.loads(path.read_text())
    workflow = api_to_workflow(prompt, infos)
    assert workflow_to_api(workflow, registry) == prompt
    ids = [node["id"] for node in workflow["nodes"]]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == len(ids)
    for link_id, origin, slot, target, target_slot, kind in workflow["links"]:
        source = next(n for n in workflow["nodes"] if n["id"] == origin)
        assert link_id in source["outputs"][slot]["links"] and source["outputs"][slot]["type"] == kind
        sink = next(n for n in workflow["nodes"] if n["id"] == target)
        assert sink["inputs"][target_slot]["link"] == link_id


def test_seed_widget_is_followed_by_its_control_value(infos):
    prompt = json.loads((REPO / "graphs" / "txt2img.json").read_text())
    sampler = next(n for n in api_to_workflow(prompt, infos)["nodes"] if n["type"] == "KSampler")
    assert sampler["widgets_values"][:3] == [42, "fixed", 20]


def test_nodes_do_not_overlap_in_a_column(infos):
    prompt = json.loads((REPO / "graphs" / "txt2img.json").read_text())
    nodes = api_to_workflow(prompt, infos)["nodes"]
    for a in nodes:
        for b in nodes:
            if a is not b and a["pos"][0] == b["pos"][0] and a["pos"][1] < b["pos"][1]:
                assert a["pos"][1] + a["size"][1] <= b["pos"][1]


def test_unknown_node_type_is_named(infos):
    with pytest.raises(ValueError, match="node 1: there is no node type 'Nope'"):
        api_to_workflow({"1": {"class_type": "Nope", "inputs": {}}}, infos)


def test_template_index_lists_our_graphs_first(tmp_path):
    templates = Templates(REPO / "graphs")
    index = templates.index("index.json")
    assert index[0]["category"] == "sdgraph"
    assert index[0]["templates"][0]["name"] == TEMPLATE_PREFIX + DEFAULT_GRAPH
    assert templates.asset("../secret.json") is None
    for name in templates.graph_names():  # each of ours has a picture in the template browser
        assert templates.thumbnail(f"{TEMPLATE_PREFIX}{name}-1.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert templates.thumbnail(f"{TEMPLATE_PREFIX}nope-1.png") is None


# -- userdata ---------------------------------------------------------------------------------------------
def test_userdata_write_list_move_delete(tmp_path):
    store = UserStore(tmp_path / "user")
    store.write("workflows/a.json", b"{}", overwrite=False)
    store.write("workflows/sub/b.json", b"[]", overwrite=False)
    assert store.listing("workflows", recurse=True, full_info=False, split=False) == ["a.json", "sub/b.json"]
    assert store.listing("workflows", recurse=False, full_info=False, split=False) == ["a.json"]
    assert store.listing("workflows", recurse=True, full_info=False, split=True)[1] == ["sub/b.json", "sub", "b.json"]
    info = store.listing("workflows", recurse=False, full_info=True, split=False)[0]
    assert info["path"] == "a.json" and info["size"] == 2
    with pytest.raises(UserDataError) as exists:
        store.write("workflows/a.json", b"{}", overwrite=False)
    assert exists.value.status == 409
    moved = store.move("workflows/a.json", "workflows/c.json", overwrite=False)
    assert store.relative(moved) == "workflows/c.json" and not (tmp_path / "user/default/workflows/a.json").exists()
    store.delete("workflows/c.json")
    with pytest.raises(UserDataError) as missing:
        store.read("workflows/c.json")
    assert missing.value.status == 404


@pytest.mark.parametrize("name", ["../escape.json", "/etc/passwd", "a/../../escape.json", "x\0y"])
def test_userdata_refuses_paths_that_leave_the_user_folder(tmp_path, name):
    store = UserStore(tmp_path / "user")
    with pytest.raises(UserDataError) as refused:
        store.write(name, b"x", overwrite=True)
    assert refused.value.status == 400
    assert not (tmp_path / "escape.json").exists()


def test_userdata_refuses_a_symlink_out(tmp_path):
    store = UserStore(tmp_path / "user")
    store.prepare()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "user" / "default" / "link")
    with pytest.raises(UserDataError) as refused:
        store.write("link/x.json", b"x", overwrite=True)
    assert refused.value.status == 400 and not (tmp_path / "outside" / "x.json").exists()


def test_settings_start_from_defaults_and_merge(tmp_path):
    store = UserStore(tmp_path / "user")
    assert store.settings() == DEFAULT_SETTINGS
    store.update_settings({"Comfy.Locale": "fr"})
    assert store.settings() == {**DEFAULT_SETTINGS, "Comfy.Locale": "fr"}
    (tmp_path / "user/default/comfy.settings.json").write_text("{broken")
    assert store.settings() == DEFAULT_SETTINGS


# -- jobs -----------------------------------------------------------------------------------------------
def _entry(number, status_str, messages, outputs):
    return {"prompt": [number, "p", {}, {"create_time": 5}, []], "outputs": outputs,
            "status": {"status_str": status_str, "completed": status_str == "success", "messages": messages}}


def test_jobs_statuses_and_preview_output():
    image = {"filename": "a.png", "subfolder": "", "type": "output"}
    history = {
        "ok": _entry(0, "success", [["execution_start", {"timestamp": 10}], ["execution_success", {"timestamp": 20}]],
                     {"9": {"images": [image]}}),
        "stopped": _entry(1, "error", [["execution_interrupted", {"timestamp": 30}]], {}),
        "bad": _entry(2, "error", [["execution_error", {"timestamp": 40, "node_id": "3"}]], {}),
    }
    queue = {"queue_running": [[3, "run", {}, {}, []]], "queue_pending": [[4, "wait", {}, {}, []]]}
    listed = jobs.all_jobs(queue, history)
    assert [(j["id"], j["status"]) for j in listed] == [("run", "in_progress"), ("wait", "pending"),
                                                        ("bad", "failed"), ("stopped", "cancelled"),
                                                        ("ok", "completed")]
    done = next(j for j in listed if j["id"] == "ok")
    assert done["preview_output"] == {**image, "nodeId": "9", "mediaType": "images"}
    assert (done["execution_start_time"], done["execution_end_time"], done["outputs_count"]) == (10, 20, 1)
    page = jobs.page(listed, ["completed", "failed"], limit=1, offset=0)
    assert page["pagination"] == {"offset": 0, "limit": 1, "total": 2, "has_more": True}
    with pytest.raises(ValueError, match="'done' is not one of"):
        jobs.page(listed, ["done"], limit=None, offset=0)
    assert jobs.find_job("ok", queue, history)["outputs"] == {"9": {"images": [image]}}
    assert jobs.find_job("wait", queue, history)["status"] == "pending"
    assert jobs.find_job("nope", queue, history) is None


# -- extensions -------------------------------------------------------------------------------------------
def test_extension_list_has_ours_and_each_packs_web_directory(tmp_path):
    """Custom node packs with a WEB_DIRECTORY get their scripts listed under /extensions/<pack>/."""
    web = tmp_path / "pack_web"
    (web / "sub").mkdir(parents=True)
    (web / "main.js").write_text("")
    (web / "sub" / "more.js").write_text("")
    (web / "style.css").write_text("")
    urls = FrontEnd(None, {"my_pack": web, "gone": tmp_path / "missing"}).extension_urls()
    assert urls == [f"/extensions/{OWN_EXTENSION}/sdgraph.js", "/extensions/my_pack/main.js",
                    "/extensions/my_pack/sub/more.js"]


def test_front_end_root_must_hold_index_html(tmp_path):
    with pytest.raises(ValueError, match="--front-end-root .*no index.html"):
        check_root(tmp_path)
    (tmp_path / "index.html").write_text("<html></html>")
    assert check_root(tmp_path) == tmp_path


def test_a_packs_web_directory_is_served_under_extensions(tmp_path):
    """ComfyUI serves a pack's WEB_DIRECTORY at /extensions/<pack>/ (registry.web_directories names them)."""
    import asyncio
    from types import SimpleNamespace

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from service import webui

    web_dir = tmp_path / "web"
    web_dir.mkdir()
    (web_dir / "main.js").write_text("console.log('my pack')")
    stub = SimpleNamespace(config=SimpleNamespace(base_dir=tmp_path))
    app = web.Application()
    webui.install(app, stub, FrontEnd(None, {"my_pack": web_dir}))

    async def scenario():
        async with TestClient(TestServer(app)) as client:
            listed = await (await client.get("/api/extensions")).json()
            assert "/extensions/my_pack/main.js" in listed
            response = await client.get("/extensions/my_pack/main.js")
            assert response.status == 200 and "my pack" in await response.text()
            assert (await client.get("/extensions/my_pack/../../secret")).status == 404
    asyncio.run(scenario())
