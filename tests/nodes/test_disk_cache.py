"""The disk cache with the Stable Diffusion nodes (issue #15): codecs round-trip without pickle, a new process
(a new Runtime and Executor on the same cache directory) loads no model when nothing changed and no text encoder
when only the seed changed, and a changed model file gives new keys."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from engine import Executor, validate
from engine.diskcache import STORE_EVERYTHING, DiskCache
from engine.plan import CACHED, RUN
from nodes import build_registry
from nodes.codecs import CODECS
from nodes.folders import Folders
from nodes.runtime import Runtime

from .conftest import DEFAULT_CHECKPOINT, ROOT


def _txt2img(seed: int = 1) -> dict:
    api = json.loads((ROOT / "graphs" / "txt2img.json").read_text())
    api["4"]["inputs"]["ckpt_name"] = DEFAULT_CHECKPOINT
    api["3"]["inputs"].update(seed=seed, steps=2)
    api["5"]["inputs"].update(width=64, height=64)
    return api


def _process(base: Path, cache: Path):
    """A new process: its own registry, runtime (model manager) and executor, on the shared cache directory."""
    registry = build_registry(entry_points=False)
    runtime = Runtime(Folders.at(base), dtype="fp32")
    return Executor(registry, resources=runtime, disk=DiskCache(cache, policy=STORE_EVERYTHING)), runtime


def _run(executor: Executor, api: dict):
    result = validate(api, executor.registry, resources=executor.resources)
    assert result.ok, [str(e) for e in result.errors]
    report = executor.run(result.graph, prompt=api)
    assert report.error is None, report.error and report.error.traceback
    return report


def test_codecs_round_trip_through_safetensors_bytes_not_pickle():
    from diffusion.latent import CondEntry, Conditioning, Latent

    latent = Latent(torch.randn(2, 4, 8, 8), torch.rand(1, 1, 64, 64), (3, 5))
    cond = Conditioning((CondEntry(torch.randn(1, 77, 32), torch.randn(1, 32), 0.5),
                         CondEntry(torch.randn(1, 77, 32).to(torch.bfloat16))))
    image = torch.rand(1, 16, 16, 3)
    for type_name, value in (("LATENT", latent), ("CONDITIONING", cond), ("IMAGE", image), ("MASK", image[..., 0])):
        data = CODECS[type_name].dump(value)
        assert data[8:9] == b"{" and not data.startswith(b"\x80")  # a safetensors header, not a pickle stream
        back = CODECS[type_name].load(data)
        if type_name == "LATENT":
            assert torch.equal(back.samples, latent.samples) and torch.equal(back.noise_mask, latent.noise_mask)
            assert back.batch_index == (3, 5)
        elif type_name == "CONDITIONING":
            assert [e.strength for e in back.entries] == [0.5, 1.0] and back.entries[1].pooled is None
            assert torch.equal(back.entries[0].pooled, cond.entries[0].pooled)
            assert back.entries[1].context.dtype == torch.bfloat16
        else:
            assert torch.equal(back, value)


def test_a_new_process_loads_no_model_and_after_a_seed_change_no_text_encoder(tiny_base, tmp_path):
    first, _ = _process(tiny_base, tmp_path)
    _run(first, _txt2img())
    again, runtime = _process(tiny_base, tmp_path)
    report = _run(again, _txt2img())
    assert report.executed == ["9"]  # only SaveImage, from the decoded image on disk
    assert runtime.models.loaded() == []
    reseeded, runtime = _process(tiny_base, tmp_path)
    report = _run(reseeded, _txt2img(seed=2))
    assert {"6", "7"} <= set(report.cached) and report.executed == ["4", "3", "8", "9"]  # the loader reads a header
    assert report.explain["3"] == "ran: input 'seed' changed (1 -> 2)"
    loaded = [model.name for model in runtime.models.loaded()]
    assert loaded and not [name for name in loaded if name.startswith("CLIP-L")]


def test_a_changed_model_file_changes_the_keys_of_what_it_feeds(tiny_base, tmp_path):
    """Size and modification time are the checkpoint's identity: a replaced file misses every stored entry."""
    base = tmp_path / "base"
    (base / "models" / "checkpoints").mkdir(parents=True)
    model = base / "models" / "checkpoints" / DEFAULT_CHECKPOINT
    model.write_bytes((tiny_base / "models" / "checkpoints" / DEFAULT_CHECKPOINT).read_bytes())
    executor, _ = _process(base, tmp_path / "cache")
    graph = validate(_txt2img(), executor.registry, resources=executor.resources).graph
    before = executor.plan(graph)
    encoder = before["6"]
    executor.disk.write(encoder.key, {"key": encoder.key, "types": ["CONDITIONING"]}, [[CODECS["CONDITIONING"].dump(
        [[torch.zeros(1, 77, 32), {}]])]])
    assert executor.plan(graph)["6"].status == CACHED
    stat = model.stat()
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    after = executor.plan(graph)
    assert after["6"].status == RUN and after["6"].key != encoder.key
    assert after["4"].key != before["4"].key and after["4"].parts.fingerprint != before["4"].parts.fingerprint


@pytest.mark.slow
def test_the_cli_reuses_the_demo_models_results_in_a_second_process(tmp_path):
    """`sdgraph run` twice and once with another seed, as the issue's user does, with the default cost rule."""
    import subprocess
    import sys

    (tmp_path / "models" / "checkpoints").mkdir(parents=True)
    (tmp_path / "models" / "checkpoints" / "sdgraph-demo.safetensors").symlink_to(
        ROOT / "models" / "checkpoints" / "sdgraph-demo.safetensors")
    api = json.loads((ROOT / "graphs" / "txt2img.json").read_text())
    api["3"]["inputs"]["steps"] = 4
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps(api))

    def sdgraph(*extra: str) -> dict:
        done = subprocess.run([sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "run", str(graph),
                               "--base-dir", str(tmp_path), "--json", *extra], capture_output=True, text=True,
                              timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert len(sdgraph()["executed"]) == 7
    second = sdgraph()
    assert second["executed"] == ["9"] and second["cached"] == ["8"]
    assert second["explain"]["8"].startswith("cached on disk (entry written by run ")
    reseeded = sdgraph("--set", "3.seed=7")
    assert {"6", "7"} <= set(reseeded["cached"]) and "3" in reseeded["executed"]
    assert not {"6", "7"} & set(reseeded["executed"])


def test_a_prompt_naming_an_embedding_is_keyed_by_the_embedding_files(tiny_base, tmp_path):
    """CLIPTextEncode reads models/embeddings for `embedding:name`: a changed file must not reuse a stored encoding."""
    executor, _ = _process(tiny_base, tmp_path)
    folder = tiny_base / "models" / "embeddings"
    folder.mkdir(exist_ok=True)

    def keys() -> tuple[str, str]:
        api = _txt2img()
        api["6"]["inputs"]["text"] = "a photo, embedding:style"
        plan = executor.plan(validate(api, executor.registry, resources=executor.resources).graph)
        return plan["6"].key, plan["7"].key

    before = keys()
    (folder / "style.safetensors").write_bytes(b"new weights")
    after = keys()
    assert after[0] != before[0] and after[1] == before[1]  # the other prompt names no embedding
    (folder / "style.safetensors").unlink()
