"""A graph mixing sdgraph's nodes and a real ComfyUI pack's nodes runs from the CLI and from the server
(issue #18, "Targets"): LoadImage (ours) -> ConstrainImage|pysssss, its size from MathExpression|pysssss ->
SaveImage (ours). ComfyUI-Custom-Scripts is copied into the base folder's custom_nodes/; skipped when the
reference packs are absent."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "server"))
from serverkit import Api, ServerProcess  # noqa: E402

CANDIDATES = [REPO.parent / "shared/reference/custom-node-packs", Path("/work/shared/reference/custom-node-packs")]
SCRIPTS = next((c / "ComfyUI-Custom-Scripts" for c in CANDIDATES if (c / "ComfyUI-Custom-Scripts").is_dir()), None)
pytestmark = [pytest.mark.skipif(SCRIPTS is None, reason="the reference custom-node packs are not on this machine"),
              pytest.mark.slow]

GRAPH = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "wide.png"}},
    "2": {"class_type": "MathExpression|pysssss", "inputs": {"expression": "16 * 3"}},
    "3": {"class_type": "ConstrainImage|pysssss",
          "inputs": {"images": ["1", 0], "max_width": ["2", 0], "max_height": ["2", 0], "min_width": 0,
                     "min_height": 0, "crop_if_required": "no"}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "mixed"}},
}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    for name in ("input", "output", "custom_nodes"):
        (tmp_path / name).mkdir()
    shutil.copytree(SCRIPTS, tmp_path / "custom_nodes" / "ComfyUI-Custom-Scripts",
                    ignore=shutil.ignore_patterns(".git*", "pysssss.json"), copy_function=shutil.copyfile)
    for path in (tmp_path / "custom_nodes").rglob("*"):  # the reference copy is read-only
        path.chmod(0o755 if path.is_dir() else 0o644)
    Image.new("RGB", (96, 64), (200, 30, 30)).save(tmp_path / "input" / "wide.png")
    return tmp_path


def saved_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as picture:
        return picture.size


def test_mixed_graph_runs_from_the_cli(home):
    graph = home / "graph.json"
    graph.write_text(json.dumps(GRAPH))
    done = subprocess.run([sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "run", str(graph),
                           "--base-dir", str(home), "--json", "--no-disk-cache"],
                          cwd=home, capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"},
                          timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "success"
    assert sorted(result["executed"]) == ["1", "2", "3", "4"]
    assert saved_size(home / "output" / "mixed_00001_.png") == (48, 32)  # 96x64 constrained to 48x48


def test_mixed_graph_runs_from_the_server(home):
    """Also: the pack's HTTP routes are mounted, behind the server's security checks."""
    (home / "models" / "loras").mkdir(parents=True)
    (home / "models" / "loras" / "style.safetensors").write_bytes(b"x")
    server = ServerProcess(home).wait_ready()
    try:
        async def scenario() -> dict:
            async with aiohttp.ClientSession() as session:
                api = Api(session, server.url)
                assert await api.get("/pysssss/loras") == (200, ["style"])  # through folder_paths
                assert (await api.get("/api/pysssss/loras"))[0] == 200
                status, _ = await api.post("/pysssss/autocomplete", {"x": 1},
                                           headers={"Origin": "http://evil.example"})
                assert status == 403  # a cross-site page cannot change anything through a pack's route either
                status, info = await api.get("/object_info")
                assert status == 200 and "ConstrainImage|pysssss" in info and "SaveImage" in info
                prompt_id = await api.queue(GRAPH)
                entry = await api.history(prompt_id, timeout=300)
                image = entry["outputs"]["4"]["images"][0]
                status, body = await api.get("/view", params={"filename": image["filename"], "type": "output"})
                assert status == 200
                return {"entry": entry, "png": body}

        answer = asyncio.run(scenario())
        assert answer["entry"]["status"]["status_str"] == "success", answer["entry"]["status"]
        with Image.open(io.BytesIO(answer["png"])) as picture:
            assert picture.size == (48, 32)
    finally:
        server.stop()
