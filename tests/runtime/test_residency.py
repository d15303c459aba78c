"""Issue #17 (3 GB by default): inside a run, an idle model that no later node uses and that is cheap to reload is
dropped rather than raise the process's peak; models that are expensive to reload stay, and each says why. The
rule alone (runtime/residency.py) and through the manager with fake accounting; no torch."""

from __future__ import annotations

from runtime.memory import GiB, MiB
from runtime.models import ModelHandle, ModelManager
from runtime.residency import Resident, hold_peak

from .test_models import FakeMemory, Weights


def resident(name: str, gb: float, *, later: bool = False, cheap: bool = True) -> Resident:
    return Resident(name, name, int(gb * GiB), later, cheap)


def test_nothing_is_dropped_while_the_request_stays_under_the_peak():
    verdict = hold_peak([resident("clip", 0.5)], footprint=2 * GiB, peak=2 * GiB, who="UNet takes 1 GB")
    assert verdict.drop == () and verdict.keep == ()


def test_cheap_models_unused_later_go_largest_first_until_the_peak_holds():
    idle = [resident("small", 0.2), resident("big", 0.5), resident("third", 0.3)]
    verdict = hold_peak(idle, footprint=int(2.6 * GiB), peak=2 * GiB, who="VAE takes 0.7 GB")
    assert [r.name for r, _ in verdict.drop] == ["big", "third"]
    assert verdict.drop[0][1].startswith("dropped big (512 MB): no later node of this run uses it")


def test_models_a_later_node_uses_or_expensive_to_reload_are_not_dropped_and_the_expensive_one_says_why():
    idle = [resident("clip", 0.5, later=True), resident("unet", 1.7, cheap=False)]
    verdict = hold_peak(idle, footprint=3 * GiB, peak=2 * GiB, who="VAE takes 0.7 GB")
    assert verdict.drop == ()
    [(kept, why)] = verdict.keep
    assert kept.name == "unet" and "reloading it is expensive" in why and "peak to 3.00 GB" in why


class Ctx:
    def __init__(self, node_id: str, upcoming: list):
        self.node_id, self.node_type, self._upcoming = node_id, "Node", upcoming

    def upcoming(self) -> list:
        return self._upcoming


def handle(name: str, nbytes: int, *, cheap: bool = False, device: str = "cpu") -> ModelHandle:
    return ModelHandle(origin=name, weight_bytes=nbytes, device=device, load=lambda _d: Weights(name), label=name,
                       cheap_reload=cheap)


def run(models: ModelManager, node_id: str, h: ModelHandle, working: int, upcoming: list) -> None:
    def call():
        with models.use(h, working=working):
            pass
    models.run_node(call, ctx=Ctx(node_id, upcoming))


def txt2img(models: ModelManager, device: str = "cpu") -> dict[str, ModelHandle]:
    """The SD1.5 default's accounted sizes: text encoder 0.49 GB, UNet 1.77 GB + 0.59 GB working, VAE 0.16 GB +
    0.66 GB working (diffusion/components.py's estimates at 512x512)."""
    h = {"clip": handle("clip", 490 * MiB, cheap=True, device=device), "unet": handle("unet", 1770 * MiB),
         "vae": handle("vae", 160 * MiB)}
    run(models, "6", h["clip"], 0, [h["clip"], h["unet"], h["vae"]])
    run(models, "7", h["clip"], 0, [h["unet"], h["vae"]])
    run(models, "3", h["unet"], 590 * MiB, [h["vae"]])
    run(models, "8", h["vae"], 660 * MiB, [])
    return h


def test_a_txt2img_drops_the_text_encoder_before_sampling_and_keeps_the_unet_for_the_next_prompt():
    models = ModelManager(FakeMemory(), reserves={"cpu": 0})
    h = txt2img(models)
    assert models.where(h["clip"]) is None and models.where(h["unet"]) == "cpu" == models.where(h["vae"])
    [dropped] = models.decisions("3")
    assert dropped.startswith("dropped clip (490 MB): no later node of this run uses it, it is cheap to read again")
    [kept] = models.decisions("8")
    assert kept.startswith("kept unet (1.73 GB) although no later node of this run uses it")
    # the decode (UNet + VAE + working = 2.54 GB) is the new peak; 3.03 GB with the text encoder kept
    assert models.held("cpu") == (1770 + 160) * MiB


def test_outside_a_run_nothing_is_dropped_for_the_peak():
    """Loading parts by hand (bench/sd15_step.py's timed load, the server's warm-up) has no plan to go by."""
    models = ModelManager(FakeMemory(), reserves={"cpu": 0})
    clip, unet = handle("clip", 490 * MiB, cheap=True), handle("unet", 1770 * MiB)
    for h in (clip, unet):
        with models.use(h, working=600 * MiB):
            pass
    assert models.where(clip) == "cpu" and models.decisions("") == []


def test_on_a_gpu_the_text_encoder_stays_where_it_fits():
    """VRAM is not the process's RSS: on an accelerator only its budget moves models (offloading to RAM)."""
    models = ModelManager(FakeMemory(), reserves={"cpu": 0, "cuda": 0})
    h = {"clip": handle("clip", 490 * MiB, cheap=True, device="cuda:0"),
         "unet": handle("unet", 1770 * MiB, device="cuda:0")}
    run(models, "6", h["clip"], 0, [h["unet"]])
    run(models, "3", h["unet"], 590 * MiB, [])
    assert models.where(h["clip"]) == "cuda:0" and models.decisions("3") == []


def test_a_model_too_small_to_matter_is_kept():
    verdict = hold_peak([resident("tiny", 0.01)], footprint=3 * GiB, peak=2 * GiB, who="VAE takes 0.7 GB")
    assert verdict.drop == ()


def test_with_no_next_prompt_an_expensive_model_unused_later_goes_after_the_cheap_ones():
    idle = [resident("clip", 0.5), resident("unet", 1.7, cheap=False), resident("vae", 0.2, later=True)]
    verdict = hold_peak(idle, footprint=int(3.5 * GiB), peak=2 * GiB, who="VAE takes 0.7 GB", next_prompt=False)
    assert [r.name for r, _ in verdict.drop] == ["clip", "unet"] and verdict.keep == ()
    assert "this process runs no other prompt to keep it for" in verdict.drop[1][1]
    # ...but only while the peak needs it: with room under the peak the UNet stays
    verdict = hold_peak(idle, footprint=int(2.4 * GiB), peak=2 * GiB, who="VAE takes 0.7 GB", next_prompt=False)
    assert [r.name for r, _ in verdict.drop] == ["clip"]
    # a model too small to be worth dropping is not reported as kept "for the next prompt": there is none
    small = [resident("unet", 1.7, cheap=False), resident("hint", 0.01, cheap=False)]
    verdict = hold_peak(small, footprint=int(3.5 * GiB), peak=1 * GiB, who="VAE takes 0.7 GB", next_prompt=False)
    assert [r.name for r, _ in verdict.drop] == ["unet"] and verdict.keep == ()


def test_a_single_prompt_txt2img_decodes_without_the_unet_beside_it():
    """`sdgraph run` of one graph: the UNet has no next prompt to stay for, so the decode does not add its working
    memory on top of it (the peak is the sampling's: UNet + its working memory)."""
    models = ModelManager(FakeMemory(), reserves={"cpu": 0}, next_prompt=False)
    h = txt2img(models)
    assert models.where(h["unet"]) is None and models.where(h["vae"]) == "cpu"
    [dropped] = models.decisions("8")
    assert dropped.startswith("dropped unet (1.73 GB): no later node of this run uses it, this process runs no "
                              "other prompt")
    assert models.held("cpu") == 160 * MiB
