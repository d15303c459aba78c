"""Issue #13 (memory): the model manager plans an SDXL txt2img at 1024x1024 with SDXL's real byte counts
(tests/fixtures/sdxl_full_size.json): on this 24 GB machine the text encoders (cheap to reload) are dropped before
sampling because they would raise the process's peak, and the UNet and VAE stay loaded; on smaller RAM budgets the
UNet goes too; on a GPU too small for the UNet it is streamed; and each decision says why
(what `run --explain` prints). Fake device accounting, no torch."""

from __future__ import annotations

import json
from pathlib import Path

from runtime.memory import GiB
from runtime.models import ModelHandle, ModelManager

FULL = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "sdxl_full_size.json").read_text())
TWO_BYTES, FOUR_BYTES = 2, 4  # fp16/bf16 (the default precision's UNet and text encoders), fp32


class Part:
    """A weightless stand-in for a module: the manager counts its handle's declared bytes; nothing to stream."""

    def children(self) -> list:
        return []


class Memory:
    """Free bytes per device as the test says (this machine: 24 GB, about 22 GB available); moves recorded."""

    def __init__(self, cpu: int = 22 * GiB, cuda: int = 64 * GiB):
        self.free_bytes = {"cpu": cpu, "cuda:0": cuda}
        self.moves: list[tuple[str, str]] = []

    def free(self, device: str) -> int:
        return self.free_bytes[device]

    def move(self, module, device: str, *, recurse: bool = True) -> None:
        self.moves.append((module, device))

    def release(self, device: str) -> None:
        pass

    def settle(self, device: str) -> None:
        pass


def sdxl_handles(unet_bytes: int = TWO_BYTES, device: str = "cpu") -> dict[str, ModelHandle]:
    params = FULL["params"]
    size = {"text": unet_bytes, "unet": unet_bytes, "vae": FOUR_BYTES}
    labels = {"text": "CLIP-L + OpenCLIP-G text encoders", "unet": "UNet", "vae": "VAE"}
    return {part: ModelHandle(origin=f"sd_xl_base_1.0.safetensors#{part}", weight_bytes=params[part] * size[part],
                              device=device, load=lambda _device: Part(), label=labels[part],
                              streamable=part != "text", cheap_reload=part == "text")
            for part in params}


class Ctx:
    def __init__(self, node_id: str, node_type: str, upcoming: list):
        self.node_id, self.node_type, self._upcoming = node_id, node_type, upcoming

    def upcoming(self) -> list:
        return self._upcoming


def run_txt2img(models: ModelManager, handles: dict[str, ModelHandle]) -> None:
    """The nodes of graphs/sdxl_txt2img.json that use models, in order, each with the plan's look-ahead."""
    text, unet, vae = handles["text"], handles["unet"], handles["vae"]
    working = FULL["working_1024"]
    steps = [("6", "CLIPTextEncodeSDXL", text, 0, [text, unet, vae]),
             ("7", "CLIPTextEncode", text, 0, [unet, vae]),
             ("3", "KSampler", unet, working["unet"], [vae]),
             ("8", "VAEDecode", vae, working["vae_decode_fp32"], [])]
    for node_id, node_type, handle, nbytes, upcoming in steps:
        def call(handle=handle, nbytes=nbytes):
            with models.use(handle, working=nbytes):
                pass
        models.run_node(call, ctx=Ctx(node_id, node_type, upcoming))


def parts_loaded(models: ModelManager) -> list[str]:
    return sorted(m.name for m in models.loaded())


def test_on_this_24_gb_machine_the_text_encoders_go_before_sampling_and_the_rest_stays_loaded():
    """Issue #17 (3 GB by default): a model no later node uses and that is cheap to reload is dropped rather than
    raise the process's peak; one that is expensive to reload stays for the next prompt, and both say why."""
    models = ModelManager(Memory())
    run_txt2img(models, sdxl_handles())
    assert parts_loaded(models) == ["UNet", "VAE"]
    [dropped] = models.decisions("3")
    assert dropped == ("dropped CLIP-L + OpenCLIP-G text encoders (1.52 GB): no later node of this run uses it, it "
                       "is cheap to read again from its file, and keeping it while UNet takes 6.80 GB (4.78 GB of "
                       "weights + 2.02 GB working memory) would raise the process's peak to 8.32 GB (it has needed "
                       "1.52 GB so far)")
    [kept] = models.decisions("8")
    assert kept.startswith("kept UNet (4.78 GB) although no later node of this run uses it") and "expensive" in kept
    assert models.stats["drops"] == 1 and models.stats["over_budget"] == 0


def test_an_8_gb_budget_unloads_the_text_encoders_before_sampling_and_says_why():
    models = ModelManager(Memory(), budgets={"cpu": 8 * GiB})
    run_txt2img(models, sdxl_handles())
    [sampling] = models.decisions("3")
    assert sampling.startswith("dropped CLIP-L + OpenCLIP-G text encoders (1.52 GB): no later node")
    # the decode's working memory (3.18 GB) does not fit beside the UNet: it goes, the VAE stays within budget
    [decode] = models.decisions("8")
    assert decode.startswith("unloaded UNet (4.78 GB) from cpu to make room for VAE")
    assert parts_loaded(models) == ["VAE"] and models.stats["over_budget"] == 0


def test_sdxl_in_fp32_drops_the_text_encoders_before_sampling_and_keeps_the_unet_within_the_budget():
    models = ModelManager(Memory(), budgets={"cpu": 16 * GiB})
    run_txt2img(models, sdxl_handles(FOUR_BYTES))
    [sampling] = models.decisions("3")
    assert sampling.startswith("dropped CLIP-L + OpenCLIP-G text encoders (3.05 GB)")
    # UNet 9.56 + VAE 0.31 + 3.18 GB working = 13.05 GB, above sampling's 11.58 GB but within the 16 GB budget
    [decode] = models.decisions("8")
    assert decode.startswith("kept UNet (9.56 GB)") and "raises the process's peak to 13.05 GB" in decode
    assert parts_loaded(models) == ["UNet", "VAE"]


def test_a_budget_below_the_fp32_unet_loads_it_over_budget_and_says_there_is_nowhere_to_stream_from():
    models = ModelManager(Memory(), budgets={"cpu": 10 * GiB})
    run_txt2img(models, sdxl_handles(FOUR_BYTES))
    dropped, over = models.decisions("3")
    assert dropped.startswith("dropped CLIP-L + OpenCLIP-G text encoders (3.05 GB)")
    assert over.startswith("loaded UNet whole on cpu over budget: it needs 11.58 GB") and "nowhere to stream" in over


def test_an_8_gb_gpu_offloads_the_text_encoders_to_ram_for_the_unet():
    models = ModelManager(Memory(), budgets={"cuda": 8 * GiB})
    handles = sdxl_handles(device="cuda:0")
    run_txt2img(models, handles)
    [sampling] = models.decisions("3")
    assert sampling.startswith("offloaded CLIP-L + OpenCLIP-G text encoders (1.52 GB) from cuda:0 to cpu to make "
                               "room for UNet")
    assert models.where(handles["text"]) == "cpu" and models.stats["streamed"] == 0


def test_a_6_gb_gpu_streams_the_sdxl_unet_and_says_why():
    models = ModelManager(Memory(), budgets={"cuda": 6 * GiB})
    handles = sdxl_handles(device="cuda:0")
    run_txt2img(models, handles)
    offloaded, streaming = models.decisions("3")
    assert offloaded.startswith("offloaded CLIP-L + OpenCLIP-G text encoders (1.52 GB) from cuda:0 to cpu")
    assert streaming == ("streaming UNet block by block to cuda:0: it needs 6.80 GB with working memory and only "
                         "6.00 GB free within the 6.00 GB budget; its weights stay on cpu")
    assert models.stats["streamed"] == 1 and models.where(handles["unet"]) == "cpu"
    assert models.where(handles["vae"]) == "cuda:0"  # the VAE (0.31 GB + 3.18 GB working) fits whole
