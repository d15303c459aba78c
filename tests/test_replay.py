"""Issue #15, `sdgraph replay IMAGE.png`, run as a subprocess on a tiny generated checkpoint (64x64, 2 steps):
identical -> exit 0; a rewritten model file, another dtype, a node whose version changed -> the reason is
named (exit 1 when the pixels differ); a PNG without a manifest -> exit 2 naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
SDGRAPH = [sys.executable, "-c", "import sys, cli; sys.exit(cli.main())"]
CHECKPOINT = "tiny.safetensors"
PACK = '''
from engine import Input, Output, node

VERSION, STRENGTH = {version}, {strength}


@node("ReplayTint", category="test", version=VERSION, inputs=[Input("images", "IMAGE")],
      outputs=[Output("IMAGE", "IMAGE")])
def tint(ctx, images):
    return images * STRENGTH
'''


def write_pack(base: Path, version: int, strength: float) -> None:
    (base / "packs").mkdir(exist_ok=True)
    (base / "packs" / "tint.py").write_text(PACK.format(version=version, strength=strength))


def graph() -> dict:
    api = json.loads((ROOT / "graphs" / "txt2img.json").read_text())
    api["4"]["inputs"]["ckpt_name"] = CHECKPOINT
    api["3"]["inputs"]["steps"] = 2
    api["5"]["inputs"].update(width=64, height=64)
    api["10"] = {"class_type": "ReplayTint", "inputs": {"images": ["8", 0]}}
    api["9"]["inputs"]["images"] = ["10", 0]
    return api


def sdgraph(base: Path, *args: str) -> subprocess.CompletedProcess:
    command = [*SDGRAPH, args[0], "--base-dir", str(base), "--nodes-dir", str(base / "packs"), *args[1:]]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)


def make_checkpoint(base: Path, seed: int) -> None:
    from diffusion.make_checkpoint import make_checkpoint as make

    make(base / "models" / "checkpoints" / CHECKPOINT, preset="tiny", seed=seed)


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> tuple[Path, Path]:
    """(a base folder, the PNG `sdgraph run --dtype fp32` saved there)."""
    base = tmp_path_factory.mktemp("replay")
    make_checkpoint(base, seed=0)
    write_pack(base, version=1, strength=1.0)
    (base / "graph.json").write_text(json.dumps(graph()))
    done = sdgraph(base, "run", str(base / "graph.json"), "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    return base, Path(done.stdout.strip())


@pytest.fixture
def copy(original, tmp_path) -> tuple[Path, Path]:
    """A copy of the base folder and its image, for a test that changes something."""
    base, image = original
    shutil.copytree(base, tmp_path / "base", symlinks=True)
    return tmp_path / "base", tmp_path / "base" / image.relative_to(base)


@pytest.mark.slow
def test_untouched_image_replays_identical(original):
    base, image = original
    done = sdgraph(base, "replay", str(image), "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["verdict"] == "identical" and answer["matches"] and answer["reasons"] == []
    assert answer["max_difference"] == 0 and answer["within_2_255"] == 1.0
    assert sorted(p.name for p in (base / "output").iterdir()) == [image.name]  # the replay wrote elsewhere


@pytest.mark.slow
def test_changed_model_file_is_named(copy):
    """The checkpoint rewritten with another seed: the image differs (exit 1) and the reason names the file's
    hash."""
    base, image = copy
    make_checkpoint(base, seed=1)
    done = sdgraph(base, "replay", str(image))
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith(f"{image}: different: PSNR")
    assert f"likely reason: model file checkpoints/{CHECKPOINT} (node 4 input 'ckpt_name') changed: its sha256" \
        in done.stderr


@pytest.mark.slow
def test_other_dtype_is_named(original):
    base, image = original
    done = sdgraph(base, "replay", str(image), "--dtype", "bf16", "--json")
    answer = json.loads(done.stdout)
    assert answer["verdict"] != "identical"
    assert done.returncode == (0 if answer["matches"] else 1)
    assert any(reason.startswith("dtype: unet float32, text float32, vae float32 when the image was saved, "
                                 "unet bfloat16") for reason in answer["reasons"]), answer["reasons"]


@pytest.mark.slow
def test_node_version_change_is_named(copy):
    """A node pack's node changed its behaviour and bumped its version: different, and the node is named."""
    base, image = copy
    write_pack(base, version=2, strength=0.5)
    done = sdgraph(base, "replay", str(image))
    assert done.returncode == 1, done.stderr
    assert ("likely reason: node 10 (ReplayTint) changed version: 1 when the image was saved, 2 now"
            in done.stderr), done.stderr
    assert "nodes whose content key changed: 10, " in done.stderr  # the copy's checkpoint path changed the rest


def test_png_without_manifest_exits_2_naming_it(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", json.dumps(graph()))
    Image.new("RGB", (8, 8)).save(tmp_path / "from_comfyui.png", pnginfo=info)
    done = sdgraph(tmp_path, "replay", str(tmp_path / "from_comfyui.png"))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"error: {tmp_path / 'from_comfyui.png'}: the PNG has no 'sdgraph' text chunk")
    done = sdgraph(tmp_path, "replay", str(tmp_path / "missing.png"))
    assert done.returncode == 2 and "missing.png: no such file" in done.stderr


@pytest.mark.slow
def test_missing_model_file_is_named(copy):
    """The checkpoint is gone: the graph no longer validates (exit 2) and the reason says which file is missing."""
    base, image = copy
    (base / "models" / "checkpoints" / CHECKPOINT).unlink()
    done = sdgraph(base, "replay", str(image))
    assert done.returncode == 2
    assert f"likely reason: model file checkpoints/{CHECKPOINT} (node 4 input 'ckpt_name') is missing now" \
        in done.stderr, done.stderr
