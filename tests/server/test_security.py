"""Secure defaults: paths stay inside their roots, Host/Origin/token checks, content types, size limits."""

from __future__ import annotations

import asyncio
import io
import json
import os
import uuid

import aiohttp
import pytest
from PIL import Image
from serverkit import SENTINEL, TOKEN, Api, chain, messages_until_done, png, run, slow, upload
from yarl import URL

import server as server_module


def text_of(body) -> str:
    return body.decode("utf-8", "replace") if isinstance(body, bytes) else json.dumps(body)


@pytest.fixture(scope="module")
def escape_hatches(shared):
    """Symlinks inside input/ and output/ that point out of them (the folder they point to holds the sentinel too;
    it does not contain the base dir, since a symlink loop hangs nodes.folders' listing, see docs/server.md)."""
    root = shared.base.parent
    (root / "outside").mkdir(exist_ok=True)
    (root / "outside" / "secret.txt").write_text(SENTINEL)
    links = {shared.base / "input" / "link_out.png": root / "secret.txt",
             shared.base / "input" / "dir_out": root / "outside", shared.base / "output" / "out_link": root / "outside"}
    for link, target in links.items():
        if not link.is_symlink():
            link.symlink_to(target)
    return root


VIEW_ATTEMPTS = [
    {"filename": "../../secret.txt"},
    {"filename": "secret.txt", "subfolder": "../.."},
    {"filename": "../../secret.txt", "type": "input"},
    {"filename": "..\\..\\secret.txt"},
    {"filename": "secret.txt", "subfolder": "..\\.."},
    {"filename": "../../secret.txt\x00.png"},
    {"filename": "link_out.png", "type": "input"},
    {"filename": "secret.txt", "subfolder": "dir_out", "type": "input"},
    {"filename": "dir_out/secret.txt", "type": "input"},
    {"filename": "secret.txt", "subfolder": "out_link"},
    {"filename": "../../secret.txt [input]"},
    {"filename": "secret.txt", "type": "../.."},
]


def test_view_refuses_every_way_out(shared, escape_hatches):
    root = escape_hatches
    attempts = VIEW_ATTEMPTS + [{"filename": str(root / "secret.txt")},
                                {"filename": "secret.txt", "subfolder": str(root)}]
    raw = ["/view?filename=..%2F..%2Fsecret.txt", "/view?filename=..%252F..%252Fsecret.txt",
           "/view?filename=%2E%2E/%2E%2E/secret.txt&type=temp", "/view?filename=secret.txt&subfolder=%2E%2E%5C%2E%2E",
           "/view/../../secret.txt", "/%2e%2e/%2e%2e/secret.txt", "/api/view?filename=..%2F..%2Fsecret.txt",
           f"/view?filename={str(root / 'secret.txt').replace('/', '%2F')}"]

    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            for query in attempts:
                status, body = await api.get("/view", params=query)
                assert status in (400, 404), (query, status)
                assert SENTINEL not in text_of(body), query
            for path in raw:
                async with session.get(URL(shared.url + path, encoded=True)) as response:
                    body = await response.read()
                    assert response.status in (400, 404), (path, response.status)
                    assert SENTINEL.encode() not in body, path
            assert (await api.get("/view", params={"filename": "link_out.png", "type": "input"}))[1]["error"][
                "type"] == "unsafe_path"
    run(scenario())


def test_uploads_refuse_every_way_out(shared, escape_hatches):
    root = escape_hatches
    names = ["../evil.png", "..\\evil.png", "/tmp/evil.png", str(root / "evil.png"), "ev\x00il.png",
             "sub/../../evil.png", ".evil.png", ".."]
    subfolders = ["..", "../..", "/tmp", str(root), "dir_out", "..\\..", "a/../../..", "sub\x00dir"]

    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            for name in names:
                status, body = await upload(api, png(), name)
                assert status == 400, (name, body)
            for subfolder in subfolders:
                status, body = await upload(api, png(), "evil.png", subfolder=subfolder)
                assert status == 400 and body["error"]["type"] == "unsafe_path", (subfolder, body)
            ref = json.dumps({"filename": "link_out.png", "type": "input"})
            status, body = await upload(api, png(), "m.png", route="/upload/mask", original_ref=ref)
            assert status == 400 and SENTINEL not in text_of(body)
    run(scenario())
    assert not [p for p in root.rglob("*evil*")] and not os.path.exists("/tmp/evil.png")


def test_load_image_names_stay_inside_input(shared, escape_hatches):
    root = escape_hatches

    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            for name in ("../../secret.txt", "..\\..\\secret.txt", str(root / "secret.txt"), "dir_out/secret.txt",
                         "secret.txt\x00.png"):
                prompt = {"1": {"class_type": "ToyLoadImage", "inputs": {"image": name}},
                          "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
                status, body = await api.post("/prompt", {"prompt": prompt})
                assert status == 400 and body["node_errors"]["1"]["errors"][0]["type"] == "value_not_in_list"
                assert SENTINEL not in text_of(body)
            # a symlink inside input/ that points out is not even offered: it could not be opened
            prompt = {"1": {"class_type": "ToyLoadImage", "inputs": {"image": "link_out.png"}},
                      "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
            status, body = await api.post("/prompt", {"prompt": prompt})
            assert status == 400 and body["node_errors"]["1"]["errors"][0]["type"] == "value_not_in_list"
            assert SENTINEL not in text_of(body)
    run(scenario())


def test_save_image_prefix_stays_inside_output(shared, escape_hatches):
    root = escape_hatches
    outside = f"/tmp/sdgraph-evil-{uuid.uuid4().hex}"
    prefixes = ["../evil", "../../evil", outside, str(root / "evil"), "a/../../evil", "..\\..\\evil", "out_link/evil"]

    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            ids = [await api.queue({"1": {"class_type": "ToySaveImage", "inputs": {"value": 1, "filename_prefix": p}}})
                   for p in prefixes]
            for prompt_id in ids:
                history = await api.history(prompt_id)
                assert history["status"]["status_str"] == "error", history
            status, body = await api.post("/prompt", {"prompt": {"1": {"class_type": "ToySaveImage", "inputs": {
                "value": 1, "filename_prefix": "ok/inside"}}}})
            assert (await api.history(body["prompt_id"]))["outputs"]["1"]["images"][0]["subfolder"] == "ok"
    run(scenario())
    assert not [p for p in root.rglob("*evil*")] and not [p for p in (root.parent.glob("evil*"))]
    assert not [p for p in os.listdir("/tmp") if p.startswith(os.path.basename(outside))]


def test_real_load_and_save_image_stay_inside_their_folders(shared, escape_hatches):
    """The SD LoadImage and SaveImage nodes (nodes/image_io.py) under the same attacks, and a real round trip:
    upload -> LoadImage -> SaveImage -> /history -> /view."""
    root = escape_hatches

    def graph(image: str, prefix: str = "ok") -> dict:
        return {"1": {"class_type": "LoadImage", "inputs": {"image": image}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}}}

    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            if not (await api.get("/object_info/SaveImage"))[1]:
                pytest.skip("the SD image nodes are not registered")
            assert (await upload(api, png((9, 8, 7, 255), size=(8, 8), mode="RGB"), "real.png"))[0] == 200
            for name in ("../../secret.txt", "..\\..\\secret.txt", str(root / "secret.txt"), "dir_out/secret.txt",
                         "real.png\x00"):
                status, body = await api.post("/prompt", {"prompt": graph(name)})
                assert status == 400 and "1" in body["node_errors"] and SENTINEL not in text_of(body), name
            for prefix in ("../evil", "..\\..\\evil", "/tmp/evil", str(root / "evil"), "a/../../evil", "x\x00y", ""):
                status, body = await api.post("/prompt", {"prompt": graph("real.png", prefix)})
                assert status == 400 and "2" in body["node_errors"], (prefix, body)
            status, body = await api.post("/prompt", {"prompt": graph("real.png", "out_link/evil")})  # issue #11
            assert status == 400 and "2" in body["node_errors"] and str(root) not in text_of(body), body
            saved = await api.queue(graph("real.png", "roundtrip/img"))
            image = (await api.history(saved, timeout=120))["outputs"]["2"]["images"][0]
            assert image["subfolder"] == "roundtrip" and image["type"] == "output"
            status, body = await api.get("/view", params=image)
            assert status == 200 and Image.open(io.BytesIO(body)).getpixel((0, 0)) == (9, 8, 7)
    run(scenario())
    assert not [p for p in root.rglob("*evil*")] and not os.path.exists("/tmp/evil")


def test_cross_origin_state_changes_are_refused(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            for origin in ("http://evil.example", "null", "http://127.0.0.1.evil.example", "file://"):
                headers = {"Origin": origin}
                for path, body in (("/prompt", {"prompt": chain(1)}), ("/interrupt", {}), ("/queue", {"clear": True}),
                                   ("/history", {"clear": True}), ("/free", {"unload_models": True})):
                    status, answer = await api.post(path, body, headers=headers)
                    assert status == 403 and answer["error"]["type"] == "forbidden_origin", (origin, path)
                form = aiohttp.FormData()
                form.add_field("image", png(), filename="x.png")
                assert (await api.post("/upload/image", data=form, headers=headers))[0] == 403
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await api.ws("cross", headers=headers)
                assert refused.value.status == 403
                assert (await api.request("OPTIONS", "/prompt", headers=headers))[0] == 403
            async with session.get(shared.url + "/queue", headers={"Origin": "http://evil.example"}) as response:
                assert "Access-Control-Allow-Origin" not in response.headers  # readable by no foreign page
            same = {"Origin": shared.url}
            assert (await api.post("/prompt", {"prompt": chain(1)}, headers=same))[0] == 200
            ws = await api.ws("same-origin", headers=same)
            await ws.close()
    run(scenario())


def test_forged_host_is_refused(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            port = shared.url.rsplit(":", 1)[1]
            for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.nip.io:{port}", "192.168.1.10"):
                status, body = await api.get("/queue", headers={"Host": host})
                assert status == 403 and body["error"]["type"] == "forbidden_host", host
                assert (await api.post("/prompt", {"prompt": chain(1)}, headers={"Host": host}))[0] == 403
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await api.ws("rebind", headers={"Host": host})
                assert refused.value.status == 403
            assert (await api.get("/queue", headers={"Host": f"localhost:{port}"}))[0] == 200
    run(scenario())


def test_content_types_and_body_limits(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            text = json.dumps({"prompt": chain(1)})
            status, body = await api.post("/prompt", data=text, headers={"Content-Type": "text/plain"})
            assert status == 415 and body["error"]["type"] == "unsupported_media_type"
            status, body = await api.post("/prompt", data="a=b", headers={
                "Content-Type": "application/x-www-form-urlencoded"})
            assert status == 400 and body["error"]["type"] == "invalid_json"
            huge = {"prompt": {"1": {"class_type": "Show", "inputs": {"value": "x" * (2 << 20)}}}}
            status, body = await api.post("/prompt", huge)
            assert status == 413 and body["error"]["type"] == "request_too_large"

            async def chunks():
                for _ in range(40):
                    yield b" " * 65536
            status, body = await api.post("/prompt", data=chunks(), headers={"Content-Type": "application/json"})
            assert status == 413
            deep = "[" * 100000 + "]" * 100000
            status, body = await api.post("/prompt", data=deep, headers={"Content-Type": "application/json"})
            assert status == 400 and body["error"]["type"] == "invalid_json"
            status, body = await api.post("/prompt", data='{"prompt": {"1": NaN}}',
                                          headers={"Content-Type": "application/json"})
            assert status == 400 and "NaN" in body["error"]["message"]
            latent = {"1": {"class_type": "ToyLatent", "inputs": {"width": 2000, "height": 1000, "batch_size": 1}},
                      "2": {"class_type": "Show", "inputs": {"value": ["1", 0]}}}
            status, body = await api.post("/prompt", {"prompt": latent})
            assert status == 400
            assert body["node_errors"]["1"]["errors"][0]["type"] == "image_too_large"
            latent["1"]["inputs"].update(width=500, batch_size=2)
            assert (await api.post("/prompt", {"prompt": latent}))[0] == 200
    run(scenario())


def test_queue_length_and_prompt_size_limits(fresh):
    server = fresh("--max-queue", "2", "--max-nodes", "5")

    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, server.url)
            status, body = await api.post("/prompt", {"prompt": {str(i): {"class_type": "Show", "inputs": {
                "value": i}} for i in range(6)}})
            assert status == 400 and body["error"]["type"] == "prompt_too_large" and body["node_errors"] == {}
            running = await api.queue(slow(steps=200, delay=0.05))
            while (await api.get(f"/v1/prompts/{running}"))[1]["state"] != "running":
                await asyncio.sleep(0.05)
            await api.queue(chain(1))
            await api.queue(chain(2))
            status, body = await api.post("/prompt", {"prompt": chain(3)})
            assert status == 429 and body["error"]["type"] == "queue_full" and "--max-queue" in body["error"]["message"]
            await api.post("/interrupt")
    run(scenario())


def test_token_is_checked_on_every_route(fresh):
    server = fresh("--token", TOKEN)
    routes = [(r.method, r.path.replace("{", "").replace("}", "")) for r in server_module.route_table().routes]

    async def scenario():
        async with aiohttp.ClientSession() as session:
            anonymous, wrong, owner = (Api(session, server.url), Api(session, server.url, token="w" * 26),
                                       Api(session, server.url, token=TOKEN))
            for method, path in routes:
                body = {} if method == "POST" else None
                for prefix in ("", "/api"):
                    for client in (anonymous, wrong):
                        status, answer = await client.request(method, prefix + path, json=body)
                        assert status == 401 and answer["error"]["type"] == "unauthorized", (method, path)
                    status, _ = await owner.request(method, prefix + path, json=body)
                    assert status != 401, (method, path)
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await anonymous.ws("me")
            assert refused.value.status == 401
            ws = await anonymous.session.ws_connect(f"{server.url}/ws?clientId=me&token={TOKEN}")
            assert json.loads((await ws.receive(timeout=10)).data)["type"] == "status"
            await ws.close()
            ws = await owner.ws("me")
            await ws.close()
            assert (await anonymous.get(f"/view?filename=none.png&token={TOKEN}"))[0] == 404
            assert (await anonymous.get("/view?filename=none.png&token=nope"))[0] == 401
            status, stats = await owner.get("/system_stats")
            assert TOKEN not in json.dumps(stats)  # argv is shown without the token
    run(scenario())


def test_token_from_environment(fresh):
    server = fresh(env={"SDGRAPH_TOKEN": TOKEN})

    async def scenario():
        async with aiohttp.ClientSession() as session:
            assert (await Api(session, server.url).get("/queue"))[0] == 401
            assert (await Api(session, server.url, token=TOKEN).get("/queue"))[0] == 200
    run(scenario())


@pytest.mark.parametrize("args", [("--listen", "0.0.0.0"), ("--listen",), ("--listen", "127.0.0.1,192.0.2.1"),
                                  ("--listen", "0.0.0.0", "--token", "short")])
def test_non_loopback_bind_without_a_real_token_refuses_to_start(fresh, args):
    server = fresh(*args, wait=False)
    assert server.proc.wait(60) == 2
    assert "token" in server.log()
    assert "listening" not in server.out_path.read_text()


def test_allowed_origins_open_the_door_for_a_front_end(fresh):
    server = fresh("--allowed-origins", "http://localhost:5173")

    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, server.url)
            front = {"Origin": "http://localhost:5173", "Sec-Fetch-Site": "cross-site"}  # as a browser sends it
            async with session.post(server.url + "/prompt", json={"prompt": chain(1)}, headers=front) as response:
                assert response.status == 200
                assert response.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
            async with session.options(server.url + "/prompt", headers={
                    **front, "Access-Control-Request-Method": "POST"}) as response:
                assert response.status == 204 and "POST" in response.headers["Access-Control-Allow-Methods"]
            ws = await api.ws("front", headers=front)
            await ws.close()
            assert (await api.post("/prompt", {"prompt": chain(1)}, headers={"Origin": "http://localhost:5174"}))[
                0] == 403
    run(scenario())


@pytest.mark.parametrize("site, allowed", [("cross-site", False), ("same-site", False), ("Cross-Site", False),
                                           ("same-origin", True), ("none", True)])
def test_sec_fetch_site_without_origin_is_judged_like_an_origin(shared, site, allowed):
    """Issue #11: a browser's cross-site POST that carries no Origin, only `Sec-Fetch-Site: cross-site`, was
    accepted. same-site (another port of this host) is another origin, as the Origin rules have it."""
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            headers = {"Sec-Fetch-Site": site}
            status, answer = await api.post("/interrupt", {}, headers=headers)
            if allowed:
                assert status == 200, answer
                ws = await api.ws("fetch-site", headers=headers)
                await ws.close()
                return
            assert status == 403 and answer["error"]["type"] == "forbidden_origin", answer
            assert (await api.post("/prompt", {"prompt": chain(1)}, headers=headers))[0] == 403
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await api.ws("fetch-site", headers=headers)
            assert refused.value.status == 403
            assert (await api.get("/queue", headers=headers))[0] == 200  # reads stay open (no CORS for them)
    run(scenario())


def test_errors_reach_clients_without_tracebacks_or_absolute_paths(shared):
    """Issue #11: history entries and execution_error carried the traceback with the server's absolute paths. Now
    the client gets the node, the exception type and the message with paths relative to the roots (any other
    absolute path reduced to its file name); the traceback stays in the server's log."""
    failing = {"1": {"class_type": "ToyFailWithPaths", "inputs": {"value": 1}},
               "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}

    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            ws = await api.ws("paths")
            prompt_id = await api.queue(failing, client_id="paths")
            seen = await messages_until_done(ws, prompt_id)
            await ws.close()
            live = [m["data"] for m in seen if isinstance(m, dict) and m["type"] == "execution_error"]
            entry = await api.history(prompt_id)
            return live, entry, (await api.get("/history"))[1]

    live, entry, everything = run(scenario())
    recorded = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert live == recorded and len(live) == 1
    error = live[0]
    assert (error["node_id"], error["node_type"], error["exception_type"]) == ("1", "ToyFailWithPaths",
                                                                               "FileNotFoundError")
    assert error["exception_message"] == ("cannot open 'models/checkpoints/missing.safetensors' (config in "
                                          "settings.yaml)")
    assert isinstance(error["traceback"], list) and error["traceback"]
    assert "FileNotFoundError: cannot open 'models/checkpoints/missing.safetensors'" in error["traceback"][0]
    assert str(shared.base) not in json.dumps(everything) and "/etc/sdgraph-secret" not in json.dumps(everything)
    assert 'File "' not in json.dumps(everything)  # no traceback frames for any prompt
    log = shared.log()
    assert str(shared.base / "models" / "checkpoints" / "missing.safetensors") in log and "Traceback" in log
