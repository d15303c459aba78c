"""Issue #14, live previews: KSampler's progress events carry each step's denoised latent (the server draws it
with --preview-method), on the tiny generated checkpoint."""

from __future__ import annotations

from diffusion.previews import LatentPreview, Previewer
from engine import Executor, Progress, validate
from nodes import build_registry
from nodes.folders import Folders
from nodes.runtime import Runtime

from .test_sd_nodes import txt2img


def test_every_sampling_step_carries_a_latent_preview(tiny_base):
    events = []
    registry = build_registry(entry_points=False)
    runtime = Runtime(Folders.at(tiny_base))
    result = validate(txt2img(width=64, height=48, steps=3), registry, resources=runtime)
    report = Executor(registry, resources=runtime).run(result.graph, listeners=[events.append])
    assert report.ok, report.error
    previews = [e.preview for e in events if isinstance(e, Progress) and e.node_id == "5"]
    assert len(previews) == 3 and all(isinstance(p, LatentPreview) for p in previews)
    assert previews[0].latent.shape == (4, 6, 8)
    assert Previewer("latent2rgb")(previews[-1]).size == (64, 48)
