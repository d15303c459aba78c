"""Issue #15, the reproducibility manifest: every saved PNG carries an `sdgraph` chunk (versions, device and
dtypes, model sha256, seeds, each planned node's content key and version), a saver of other files writes it
beside them, and model files are hashed once (cached by size and mtime in user/)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from engine import INT, STRING, CancelToken, Executor, Input, Result, RunContext, node, validate
from engine.files import atomic_write
from engine.formats import png_text_chunks
from nodes import build_registry
from nodes.folders import Folders
from nodes.manifest import MANIFEST_CHUNK, ManifestError, read_png, sidecar_path, write_manifest_beside
from nodes.runtime import Runtime
from runtime import hashes

from .conftest import DEFAULT_CHECKPOINT, run_api


def txt2img() -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": DEFAULT_CHECKPOINT}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "3": {"class_type": "KSampler", "inputs": {"seed": 1234, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "manifest"}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "unused"}},
    }


@pytest.fixture(scope="module")
def saved(tiny_base) -> tuple[dict, list[Path], Path]:
    """(the graph, the two PNGs node 9 wrote, the base) of a run of node 9 only (a plan without node 10)."""
    api = txt2img()
    registry = build_registry(entry_points=False)
    runtime = Runtime(Folders.at(tiny_base), dtype="fp32")
    result = validate(api, registry, targets=["9"], resources=runtime)
    assert result.ok, [str(e) for e in result.errors]
    report = Executor(registry, resources=runtime).run(result.graph, prompt=api,
                                                       extra={"extra_pnginfo": {"workflow": {"nodes": []}}})
    assert report.error is None, report.error and report.error.traceback
    files = [tiny_base / "output" / item["filename"] for item in report.ui["9"]["images"]]
    return api, files, tiny_base


def test_saved_png_carries_the_manifest_beside_comfyui_chunks(saved):
    """The PNG keeps ComfyUI's prompt and workflow chunks as they were and adds the `sdgraph` manifest."""
    api, files, _ = saved
    chunks = png_text_chunks(files[0].read_bytes())
    assert set(chunks) == {"prompt", "workflow", MANIFEST_CHUNK}
    assert chunks["prompt"] == json.dumps(api) and chunks["workflow"] == json.dumps({"nodes": []})


def test_manifest_fields(saved):
    """Model sha256 equal to hashlib over the file, the seeds, one content key (and version) per planned node,
    the device and dtypes the run used, and which node and batch index saved the file."""
    _, files, base = saved
    prompt, manifest, _ = read_png(files[1])
    checkpoint = base / "models" / "checkpoints" / DEFAULT_CHECKPOINT
    assert manifest["models"] == [{"node": "4", "input": "ckpt_name", "kind": "checkpoints",
                                   "name": DEFAULT_CHECKPOINT,
                                   "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}]
    assert manifest["seeds"] == [{"node": "3", "input": "seed", "value": 1234}]
    planned = {"3", "4", "5", "6", "7", "8", "9"}  # node 10 was not asked for
    assert set(manifest["keys"]) == planned and len(set(manifest["keys"].values())) == len(planned)
    assert manifest["nodes"]["3"] == {"type": "KSampler", "version": "1"} and set(manifest["nodes"]) == planned
    assert manifest["device"] == "cpu" and manifest["requested"] == {"device": "auto", "dtype": "fp32"}
    assert manifest["dtype"] == {"unet": "float32", "text": "float32", "vae": "float32", "unet_output_fp32": False}
    assert manifest["torch"] and manifest["sdgraph"]
    assert manifest["output"] == {"node": "9", "batch_index": 1, "batch_size": 2}
    assert read_png(files[0])[1]["output"]["batch_index"] == 0


def test_keys_follow_the_graph(saved, tiny_base):
    """The keys are the plan's: another seed changes the sampler's key and what follows, not the encoders'."""
    api, files, _ = saved
    first = read_png(files[0])[1]["keys"]
    changed = txt2img()
    changed["3"]["inputs"]["seed"] = 99
    del changed["10"]
    report, runtime = run_api(changed, tiny_base, dtype="fp32")
    second = read_png(runtime.folders.output / report.ui["9"]["images"][0]["filename"])[1]["keys"]
    assert {nid for nid in first if first[nid] != second[nid]} == {"3", "8", "9"}


def test_model_files_are_hashed_once(saved):
    """The run remembered the checkpoint's digest in user/model_hashes.json under its size and mtime."""
    _, _, base = saved
    entries = json.loads((base / "user" / hashes.HASHES_FILE).read_text())
    checkpoint = os.path.realpath(base / "models" / "checkpoints" / DEFAULT_CHECKPOINT)
    assert entries[checkpoint]["size"] == os.stat(checkpoint).st_size


def test_png_without_manifest_is_refused_naming_it(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("prompt", "{}")
    Image.new("RGB", (2, 2)).save(tmp_path / "comfy.png", pnginfo=info)
    with pytest.raises(ManifestError, match=r"comfy\.png.*no 'sdgraph' text chunk"):
        read_png(tmp_path / "comfy.png")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ManifestError, match=r"text\.png: not a PNG"):
        read_png(tmp_path / "text.png")


# --- a saver of other files -------------------------------------------------------------------------------------

@node("ToyTextSaver", category="test", output_node=True,
      inputs=[Input("text", STRING), Input("noise_seed", INT, default=0, min=0, max=2**32),
              Input("ckpt_name", STRING, default="")], outputs=[])
def toy_text_saver(ctx, text, noise_seed, ckpt_name):
    path = atomic_write(ctx.resources.folders.output / "note.txt", f"{text} {noise_seed}".encode())
    write_manifest_beside(ctx, path)
    return Result((), {"files": [{"filename": path.name, "subfolder": "", "type": "output"}]})


def test_saver_of_other_files_writes_the_manifest_beside_them(tmp_path):
    """A node that writes no PNG calls write_manifest_beside: `note.txt.sdgraph.json` holds the graph, the
    seeds, the model file's sha256 and the plan's keys."""
    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "m.safetensors").write_bytes(b"weights")
    registry = build_registry(entry_points=False)
    registry.register(toy_text_saver)
    api = {"1": {"class_type": "ToyTextSaver",
                 "inputs": {"text": "hi", "noise_seed": 7, "ckpt_name": "m.safetensors"}}}
    runtime = Runtime(Folders.at(tmp_path))
    result = validate(api, registry, resources=runtime)
    assert result.ok, [str(e) for e in result.errors]
    report = Executor(registry, resources=runtime).run(result.graph, prompt=api)
    assert report.error is None, report.error and report.error.traceback
    sidecar = sidecar_path(tmp_path / "output" / "note.txt")
    assert sidecar.name == "note.txt.sdgraph.json"
    manifest = json.loads(sidecar.read_text())
    assert manifest["prompt"] == api and manifest["output"] == {"node": "1", "file": "note.txt"}
    assert manifest["seeds"] == [{"node": "1", "input": "noise_seed", "value": 7}]
    assert manifest["models"][0]["sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert list(manifest["keys"]) == ["1"] and manifest["nodes"]["1"]["type"] == "ToyTextSaver"


def test_unusable_device_does_not_fail_a_save_that_needs_no_model(tmp_path):
    """A graph without models saves even when the asked-for device is absent; the manifest records the request."""
    import torch

    from nodes.image_io import save_image

    ctx = RunContext("run", "9", "SaveImage", Runtime(Folders.at(tmp_path), device="cuda:7"), CancelToken(),
                     lambda event: None, {"9": {"class_type": "SaveImage", "inputs": {}}})
    ui = save_image.fn(ctx, torch.zeros(1, 2, 2, 3), "x").ui["images"][0]
    _, manifest, _ = read_png(tmp_path / "output" / ui["filename"])
    assert manifest["device"] == "cuda:7" and manifest["requested"]["device"] == "cuda:7"


def test_embedding_words_and_vae_files_are_hashed(tmp_path):
    """`embedding:name` in a prompt and a VAE loader's file count as model files too; a missing one is None."""
    import torch  # noqa: F401 - a run that encodes prompts has torch loaded

    from nodes.manifest import model_files

    (tmp_path / "models" / "embeddings").mkdir(parents=True)
    (tmp_path / "models" / "embeddings" / "style.safetensors").write_bytes(b"style")
    (tmp_path / "models" / "vae").mkdir(parents=True)
    (tmp_path / "models" / "vae" / "v.safetensors").write_bytes(b"vae")
    prompt = {"2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat, embedding:style and embedding:gone"}},
              "3": {"class_type": "VAELoader", "inputs": {"vae_name": "v.safetensors"}}}
    found = model_files(prompt, Runtime(Folders.at(tmp_path)))
    assert found == [
        {"node": "2", "input": "text", "kind": "embeddings", "name": "style",
         "sha256": hashlib.sha256(b"style").hexdigest()},
        {"node": "2", "input": "text", "kind": "embeddings", "name": "gone", "sha256": None},
        {"node": "3", "input": "vae_name", "kind": "vae", "name": "v.safetensors",
         "sha256": hashlib.sha256(b"vae").hexdigest()}]
