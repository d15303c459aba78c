"""Packs importing torchvision load without it (issue #18 follow-up): the pack finder offers sdgraph's subset
only when no real torchvision is importable, `transforms.v2` is the same namespace, and a node using a part of
torchvision the subset lacks is refused at load with that reason while the rest of its pack loads."""

from __future__ import annotations

import sys
import textwrap

import packkit
import pytest
import torch

from comfy_compat import ComfyInternalsMissing, PackEnvironment
from comfy_compat.tv import transforms as subset_transforms
from engine import Executor, NodeRegistry, validate
from engine.discovery import load_pack_dir

PACK_TOP = """
import torchvision.transforms.v2 as T
from torchvision.transforms import functional as TF
from torchvision.models import resnet18            # not in the subset: a placeholder, the module still loads
"""

IMAGE_NODE = """

class {name}:
    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"image": ("IMAGE",)}}}}
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    def run(self, image):
        {body}
"""

BLUR_NODE = """

class Blur:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",), "amount": ("INT", {"default": 3})}}
    RETURN_TYPES = ("MASK",)
    FUNCTION = "run"

    def run(self, mask, amount):
        return (T.functional.gaussian_blur(mask.unsqueeze(1), amount).squeeze(1),)
"""

IMAGE_NODES = {  # class -> the body of its run(image)
    "Turn": "from torchvision.transforms.functional import rotate as tv_rotate\n"
            "        return (tv_rotate(image.movedim(-1, 1), 90, expand=True).movedim(1, -1),)",
    "Gamma": "return (TF.adjust_gamma(image, 2.0),)",
    "Boxes": "import torchvision.ops\n        return (torchvision.ops.nms(image, image, 0.5),)",
    "Classify": "return (resnet18()(image),)",
}
TORCHVISION_PACK = (PACK_TOP + BLUR_NODE + "".join(IMAGE_NODE.format(name=name, body=body)
                                                  for name, body in IMAGE_NODES.items())
                    + "\nNODE_CLASS_MAPPINGS = {" + ", ".join(f"'Tv{n}': {n}" for n in ["Blur", *IMAGE_NODES]) + "}\n")


@pytest.fixture
def env() -> PackEnvironment:
    return PackEnvironment()


def test_the_subset_is_offered_only_while_active_and_v2_is_the_same_namespace(env):
    assert "torchvision" not in sys.modules
    with env.active():
        import torchvision.transforms as transforms
        import torchvision.transforms.v2 as v2
        from torchvision.transforms.v2 import functional as v2_functional
        assert v2.Resize is transforms.Resize is subset_transforms.Resize
        assert v2_functional.rotate is transforms.functional.rotate
        assert v2.InterpolationMode.BICUBIC.value == "bicubic"
        blurred = v2.functional.gaussian_blur(torch.ones(1, 1, 5, 5), 3)
        assert torch.allclose(blurred, torch.ones(1, 1, 5, 5))
    assert not [name for name in sys.modules if name.split(".")[0] == "torchvision"]


def test_a_real_torchvision_is_never_shadowed(tmp_path, env, monkeypatch):
    (tmp_path / "real" / "torchvision").mkdir(parents=True)
    (tmp_path / "real" / "torchvision" / "__init__.py").write_text("REAL = True\n")
    monkeypatch.syspath_prepend(str(tmp_path / "real"))
    try:
        with env.active():
            import torchvision
            assert getattr(torchvision, "REAL", False)
    finally:
        sys.modules.pop("torchvision", None)


def test_a_name_outside_the_subset_fails_clearly_when_used(env):
    with env.active():
        from torchvision.transforms import functional as TF
        with pytest.raises(ComfyInternalsMissing, match="adjust_gamma is not part of sdgraph's torchvision subset"):
            TF.adjust_gamma(torch.ones(1), 2.0)


@pytest.fixture
def tv_registry(tmp_path, env) -> NodeRegistry:
    pack = tmp_path / "packs" / "tv_pack"
    pack.mkdir(parents=True)
    (pack / "__init__.py").write_text(textwrap.dedent(TORCHVISION_PACK))
    registry = NodeRegistry()
    assert load_pack_dir(registry, tmp_path / "packs", environment=env) == ["tv_pack"]
    return registry


def test_nodes_using_torchvision_outside_the_subset_are_refused_and_the_rest_runs(tv_registry):
    registry = tv_registry
    assert registry.get("TvBlur") is not None and registry.get("TvTurn") is not None
    reasons = {e.reason.split("'")[1]: e.reason for e in registry.load_errors}
    assert set(reasons) == {"TvGamma", "TvBoxes", "TvClassify"}
    assert "uses torchvision.transforms.functional.adjust_gamma, which sdgraph's compatibility layer does not " \
           "provide" in reasons["TvGamma"]
    assert "torchvision.ops" in reasons["TvBoxes"] and "torchvision.models.resnet18" in reasons["TvClassify"]
    assert all("the rest of the pack loads" in reason for reason in reasons.values())

    mask = torch.zeros(1, 9, 9)
    mask[0, 4, 4] = 1.0
    registry.register(_constant_node())
    graph = {"1": {"class_type": "ToyMask", "inputs": {}},
             "2": {"class_type": "TvBlur", "inputs": {"mask": ["1", 0], "amount": 3}}}
    result = validate(graph, registry, targets=["2"])
    assert not result.errors, result.errors
    report = Executor(registry).run(result.graph)
    assert report.error is None, report.error
    (blurred,) = report.outputs["2"][0]
    assert blurred.shape == (1, 9, 9) and blurred.sum().item() == pytest.approx(1.0)
    assert 0 < blurred[0, 4, 4].item() < 1.0 and blurred[0, 3, 4].item() > 0
    assert not [name for name in sys.modules if name.split(".")[0] == "torchvision"]


def _constant_node():
    from engine import Output, node
    from engine.sizes import Size

    @node("ToyMask", outputs=[Output("MASK", "MASK")], size_rule=lambda: Size(1, 9, 9))
    def toy_mask(ctx):
        mask = torch.zeros(1, 9, 9)
        mask[0, 4, 4] = 1.0
        return mask
    return toy_mask


def test_a_local_import_inside_a_running_node_gets_the_subset(tv_registry):
    """KJNodes' ImageTransformKJ imports `rotate as tv_rotate` inside its function: it runs on the subset."""
    image = torch.arange(24.0).view(1, 4, 6, 1)
    definition = tv_registry.get("TvTurn")
    returned = definition.fn(packkit.context("TvTurn"), image=image)
    (turned,) = packkit.outputs_of(returned, definition)
    assert torch.equal(turned, torch.rot90(image, 1, dims=(1, 2)))
