"""ComfyUI's websocket client flow with the real SD nodes: txt2img on a tiny random-weight checkpoint."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid

import aiohttp
import pytest
from PIL import Image
from serverkit import REPO, Api, messages_until_done, run


@pytest.mark.slow
def test_txt2img_through_the_websocket_flow(fresh, tmp_path):
    checkpoints = tmp_path / "base" / "models" / "checkpoints"
    subprocess.run([sys.executable, "-c", "import sys, cli; sys.exit(cli.main(sys.argv[1:]))", "make-checkpoint",
                    str(checkpoints / "tiny.safetensors"), "--preset", "tiny", "--seed", "0"],
                   check=True, cwd=REPO, capture_output=True)
    server = fresh()
    prompt = json.loads((REPO / "graphs" / "txt2img.json").read_text())
    prompt["4"]["inputs"]["ckpt_name"] = "tiny.safetensors"
    prompt["3"]["inputs"]["steps"] = 3
    prompt["5"]["inputs"].update(width=64, height=64)
    workflow = {"nodes": [], "links": [], "version": 0.4}

    async def scenario():
        client_id = str(uuid.uuid4())
        async with aiohttp.ClientSession() as session:
            api = Api(session, server.url)
            ws = await api.ws(client_id)
            status, answer = await api.post("/prompt", {"prompt": prompt, "client_id": client_id,
                                                        "extra_data": {"extra_pnginfo": {"workflow": workflow}}})
            assert status == 200, answer
            prompt_id = answer["prompt_id"]
            seen = await messages_until_done(ws, prompt_id, timeout=300)
            await ws.close()
            history = (await api.get(f"/history/{prompt_id}"))[1][prompt_id]
            assert history["status"]["status_str"] == "success", history["status"]
            images = [image for output in history["outputs"].values() for image in output.get("images", [])]
            assert len(images) == 1
            status, body = await api.get("/view", params=images[0])
            assert status == 200
            return seen, Image.open(io.BytesIO(body))

    seen, image = run(scenario())
    kinds = [m["type"] for m in seen if isinstance(m, dict)]
    progress = [m["data"] for m in seen if isinstance(m, dict) and m["type"] == "progress"]
    assert progress and progress[-1]["node"] == "3" and progress[-1]["value"] == progress[-1]["max"] == 3
    assert kinds.count("executed") == 1 and "execution_success" in kinds
    assert image.size == (64, 64)
    assert json.loads(image.text["prompt"])["3"]["class_type"] == "KSampler"
    assert json.loads(image.text["workflow"]) == workflow
    assert server.stop() == 0
