"""The ComfyUI compatibility layer (issue #18, "Compatibility layer"): the modules packs import exist only while
packs load and run, never shadow a real module, keep file access inside sdgraph's roots, wire progress and
interruption, refuse pickles, collect routes, and isolate ComfyUI's model internals per node."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from comfy_compat import ComfyInternalsMissing, PackEnvironment
from engine import CancelToken, Executor, NodeRegistry, validate
from engine.context import Interrupted, RunContext
from engine.discovery import load_pack_dir
from nodes.folders import Folders, UnsafePathError

COMPAT_NAMES = ("folder_paths", "comfy", "comfy.utils", "node_helpers", "comfy_api.latest", "latent_preview")

INTERNALS_PACK = '''
from comfy.ldm.flux.math import apply_rope            # ComfyUI internals at the module's top
import comfy.sd
import comfy.utils
import folder_paths
from nodes import MAX_RESOLUTION
from server import PromptServer


@PromptServer.instance.routes.get("/toy/hello")
async def hello(request):
    return None


class UsesRope:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"x": ("FLOAT", {"default": 1.0})}}
    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    def run(self, x):
        return (apply_rope(x),)


class LoadsCheckpoint:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "a"})}}
    RETURN_TYPES = ("FLOAT",)
    FUNCTION = "run"
    def run(self, name):
        return (comfy.sd.load_checkpoint_guess_config(name),)


class Counts:
    """Plain node: reports progress through comfy.utils.ProgressBar, reads MAX_RESOLUTION."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"steps": ("INT", {"default": 3, "min": 1, "max": MAX_RESOLUTION})}}
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"
    def run(self, steps):
        bar = comfy.utils.ProgressBar(steps)
        for _ in range(steps):
            bar.update(1)
        PromptServer.instance.send_sync("toy.done", {"steps": steps})
        return (steps,)


NODE_CLASS_MAPPINGS = {"ToyUsesRope": UsesRope, "ToyLoadsCheckpoint": LoadsCheckpoint, "ToyCounts": Counts}
WEB_DIRECTORY = "./web"
'''


@pytest.fixture
def folders(tmp_path: Path) -> Folders:
    for name in ("input", "output", "temp", "models/checkpoints"):
        (tmp_path / "base" / name).mkdir(parents=True)
    return Folders.at(tmp_path / "base")


@pytest.fixture
def env(folders: Folders) -> PackEnvironment:
    return PackEnvironment(folders)


@pytest.fixture
def loaded(tmp_path: Path, env: PackEnvironment) -> NodeRegistry:
    pack = tmp_path / "packs" / "toy_internals"
    (pack / "web").mkdir(parents=True)
    (pack / "__init__.py").write_text(textwrap.dedent(INTERNALS_PACK))
    registry = NodeRegistry()
    assert load_pack_dir(registry, tmp_path / "packs", environment=env) == ["toy_internals"]
    return registry


def test_modules_exist_only_while_active(env):
    for name in COMPAT_NAMES:
        assert name not in sys.modules
    own_server = sys.modules.get("server")
    with env.active():
        import folder_paths  # noqa: F401

        import server
        assert hasattr(server, "PromptServer")
        assert "folder_paths" in sys.modules
    for name in COMPAT_NAMES:
        assert name not in sys.modules, name
    assert sys.modules.get("server") is own_server  # sdgraph's own server module is back (or still absent)
    with pytest.raises(ImportError):
        import folder_paths  # noqa: F401, F811


def test_a_real_module_is_never_shadowed(tmp_path, env, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "folder_paths.py").write_text("REAL = True\n")
    monkeypatch.syspath_prepend(str(tmp_path / "real"))
    try:
        with env.active():
            import folder_paths
            assert getattr(folder_paths, "REAL", False)
    finally:
        sys.modules.pop("folder_paths", None)


def test_internals_refuse_only_the_nodes_using_them(loaded):
    """A module importing comfy.ldm/comfy.sd at its top still loads; the nodes whose code uses them are refused
    with a reason naming what they need, and the node that does not use them registers."""
    assert loaded.get("ToyCounts") is not None
    assert loaded.get("ToyUsesRope") is None and loaded.get("ToyLoadsCheckpoint") is None
    reasons = {e.reason.split("'")[1]: e.reason for e in loaded.load_errors}
    assert "comfy.ldm.flux.math.apply_rope" in reasons["ToyUsesRope"]
    assert "comfy.sd" in reasons["ToyLoadsCheckpoint"]
    assert "model internals" in reasons["ToyUsesRope"]


def test_placeholder_raises_a_clear_error_when_used(env):
    with env.active():
        from comfy.sd import VAE
        with pytest.raises(ComfyInternalsMissing, match="comfy.sd.VAE is one of ComfyUI's model internals"):
            VAE()


def test_progress_bar_reports_and_stops_a_cancelled_run(loaded, env, folders):
    events: list = []
    report = Executor(loaded).run(validate({"1": {"class_type": "ToyCounts", "inputs": {"steps": 3}}}, loaded,
                                           targets=["1"]).graph, listeners=[events.append])
    assert report.outputs["1"] == ([3],)
    assert [(e.value, e.max) for e in events if e.kind == "progress"] == [(1, 3), (2, 3), (3, 3)]
    token = CancelToken()
    token.cancel()
    ctx = RunContext("r", "1", "ToyCounts", None, token, lambda e: None)
    with pytest.raises(Interrupted):
        loaded.get("ToyCounts").fn(ctx, steps=2)


def test_routes_messages_and_web_directory(loaded, env, tmp_path):
    assert [(r.pack, r.method, r.path) for r in env.routes] == [("toy_internals", "GET", "/toy/hello")]
    assert loaded.web_directories == {"toy_internals": (tmp_path / "packs" / "toy_internals" / "web").resolve()}
    heard: list = []
    env.message_listeners.append(lambda event, data, sid: heard.append((event, data)))
    Executor(loaded).run(validate({"1": {"class_type": "ToyCounts", "inputs": {"steps": 1}}}, loaded,
                                  targets=["1"]).graph)
    assert heard == [("toy.done", {"steps": 1})]


def test_folder_paths_keeps_names_inside_the_roots(env, folders):
    (folders.models("checkpoints") / "a.safetensors").write_bytes(b"x")
    with env.active():
        import folder_paths
        assert folder_paths.get_filename_list("checkpoints") == ["a.safetensors"]
        assert folder_paths.get_full_path("checkpoints", "a.safetensors") == str(folders.models("checkpoints") /
                                                                                 "a.safetensors")
        assert folder_paths.get_full_path("checkpoints", "missing.safetensors") is None
        with pytest.raises(UnsafePathError):
            folder_paths.get_full_path("checkpoints", "../../secret.txt")
        with pytest.raises(UnsafePathError):
            folder_paths.get_annotated_filepath("../secret.txt [output]")
        with pytest.raises(UnsafePathError):
            folder_paths.get_save_image_path("../../escape", folder_paths.get_output_directory())
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path("shots/cat", str(folders.output))
        assert (Path(folder), name, counter, subfolder) == (folders.output / "shots", "cat", 1, "shots")
        assert folder_paths.get_annotated_filepath("x.png [temp]") == str(folders.temp / "x.png")


def test_add_model_folder_path_only_inside_pack_or_models(env, folders, tmp_path):
    with env.loading("p", tmp_path / "packdir"):
        import folder_paths
        folder_paths.add_model_folder_path("luts", str(tmp_path / "packdir" / "luts"))
        folder_paths.add_model_folder_path("luts", "/etc")
        assert folder_paths.get_folder_paths("luts") == [str(folders.models("luts")),
                                                         str((tmp_path / "packdir" / "luts").resolve())]


def test_load_torch_file_never_unpickles(env, tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "ok.safetensors"))
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    torch.save({"w": Path("x")}, tmp_path / "pickled.pt")  # an arbitrary object: needs pickle
    with env.active():
        import comfy.utils
        assert torch.equal(comfy.utils.load_torch_file(str(tmp_path / "ok.safetensors"))["w"], torch.ones(2))
        assert torch.equal(comfy.utils.load_torch_file(str(tmp_path / "plain.pt"))["w"], torch.zeros(2))
        with pytest.raises(ValueError, match="never unpickles"):
            comfy.utils.load_torch_file(str(tmp_path / "pickled.pt"), safe_load=False)


def test_common_upscale_and_interruption_helpers(env):
    with env.active():
        import comfy.model_management as mm
        import comfy.utils
        out = comfy.utils.common_upscale(torch.rand(1, 3, 8, 12), 6, 4, "bilinear", "disabled")
        assert out.shape == (1, 3, 4, 6)
        mm.throw_exception_if_processing_interrupted()  # no node running: nothing to stop
        token = CancelToken()
        token.cancel()
        with env.running(RunContext("r", "1", "X", None, token, lambda e: None)):
            with pytest.raises(Interrupted):
                mm.throw_exception_if_processing_interrupted()


def test_built_in_classes_under_comfy_names():
    """`from nodes import ...` in a pack: constants, SaveImage to subclass, sdgraph's nodes as V1 classes."""
    from nodes import MAX_RESOLUTION, ConditioningCombine, SaveImage
    assert MAX_RESOLUTION == 16384
    assert SaveImage.FUNCTION == "save_images"
    assert ConditioningCombine.FUNCTION == "combine" and ConditioningCombine.RETURN_TYPES == ("CONDITIONING",)
    import nodes
    with pytest.raises(AttributeError):
        nodes.not_a_comfy_name  # noqa: B018 - lower-case names stay sdgraph's (its submodules import)
    assert getattr(nodes, "NODE_CLASS_MAPPINGS", None) is None  # the package is not mistaken for a V1 pack


def test_model_object_misuse_is_explained(env):
    class FakeUnet:
        pass

    FakeUnet.__module__ = "diffusion.unet"
    with pytest.raises(ComfyInternalsMissing, match="expects ComfyUI's model object"):
        with env.running(RunContext("r", "1", "X", None, CancelToken(), lambda e: None)):
            FakeUnet().clone()


LAZY_IMPORTS_PACK = '''
class Stamps:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": ("STRING", {"default": "a.txt"})}}
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"

    @classmethod
    def IS_CHANGED(cls, name):
        import folder_paths  # imported when asked, as many packs do
        return folder_paths.get_annotated_filepath(name)

    @classmethod
    def VALIDATE_INPUTS(cls, name):
        import folder_paths
        return True if folder_paths.exists_annotated_filepath(name) else f"no file {name}"

    def run(self, name):
        import comfy.model_management
        comfy.model_management.throw_exception_if_processing_interrupted()
        return (name,)


NODE_CLASS_MAPPINGS = {"ToyStamps": Stamps}
'''


def test_checks_that_import_comfy_modules_when_called(tmp_path, env, folders):
    """IS_CHANGED and VALIDATE_INPUTS run in the environment too (a lazy `import folder_paths` works)."""
    (tmp_path / "lazy").mkdir()
    (tmp_path / "lazy" / "lazy_pack.py").write_text(textwrap.dedent(LAZY_IMPORTS_PACK))
    registry = NodeRegistry()
    load_pack_dir(registry, tmp_path / "lazy", environment=env)
    stamps = registry.get("ToyStamps")
    assert stamps.fingerprint(None, name="a.txt") == str(folders.input / "a.txt")
    assert stamps.validate(name="a.txt") == "no file a.txt"
    (folders.input / "a.txt").write_text("x")
    result = validate({"1": {"class_type": "ToyStamps", "inputs": {"name": "a.txt"}}}, registry, targets=["1"])
    assert result.ok, result.errors
    assert Executor(registry).run(result.graph).outputs["1"] == (["a.txt"],)


def test_send_sync_reaches_the_websocket_hub():
    from service.routing import pack_message_sender

    class Hub:
        def __init__(self):
            self.sent = []

        def publish_all(self, message):
            self.sent.append(("*", message))

        def publish(self, client_id, message):
            self.sent.append((client_id, message))

    hub = Hub()
    send = pack_message_sender(hub)
    send("pysssss.update", {"n": 1}, None)
    send("to.one", {"n": 2}, "client-7")
    send(1, b"binary preview", None)  # ComfyUI's binary events are not sent as JSON
    assert [(who, json.loads(text)) for who, text in hub.sent] == [
        ("*", {"type": "pysssss.update", "data": {"n": 1}}), ("client-7", {"type": "to.one", "data": {"n": 2}})]


def test_the_disk_cache_code_identity_covers_the_compat_layer(monkeypatch):
    """A change in comfy_compat changes what pack nodes compute: their persistent cache entries must not survive
    it (nodes.code_identity digests comfy_compat/ too)."""
    import engine.diskcache
    import nodes

    monkeypatch.setattr(engine.diskcache, "source_digest", lambda paths: [Path(p).name for p in paths])
    assert "comfy_compat" in nodes.code_identity()


V3_PREVIEW_PACK = '''
from comfy_api.latest import io, ui


class Preview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="ToyV3Preview", inputs=[io.Image.Input("image")], outputs=[io.Image.Output()],
                         is_output_node=True, hidden=[io.Hidden.prompt])

    @classmethod
    def execute(cls, image):
        assert cls.hidden.auth_token_comfy_org is None and cls.hidden.anything_else is None
        return io.NodeOutput(image.flip(2), ui=ui.PreviewImage(image))


NODE_CLASS_MAPPINGS = {"ToyV3Preview": Preview}
'''


def test_v3_node_with_a_preview_runs_on_tensors(tmp_path, env, folders):
    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "v3_preview.py").write_text(textwrap.dedent(V3_PREVIEW_PACK))
    registry = NodeRegistry()
    import nodes
    nodes.register_types(registry)
    load_pack_dir(registry, tmp_path / "v3", environment=env)
    image = torch.rand(2, 8, 12, 3)
    ctx = RunContext("r", "1", "ToyV3Preview", None, CancelToken(), lambda e: None)
    result = registry.get("ToyV3Preview").fn(ctx, image=image)
    assert torch.equal(result.outputs[0], image.flip(2))
    shown = result.ui["images"]
    assert len(shown) == 2 and all((folders.temp / entry["filename"]).is_file() for entry in shown)
    assert {entry["type"] for entry in shown} == {"temp"}


def test_built_in_class_runs_sdgraphs_node_on_comfy_values(env):
    """`nodes.ConditioningCombine().combine(a, b)` in a pack: sdgraph's node, given ComfyUI's plain values."""
    from nodes import ConditioningCombine

    first, second = [[torch.ones(1, 77, 768), {}]], [[torch.zeros(1, 77, 768), {"strength": 0.5}]]
    with env.running(RunContext("r", "1", "X", None, CancelToken(), lambda e: None)):
        (combined,) = ConditioningCombine().combine(conditioning_1=first, conditioning_2=second)
    assert len(combined) == 2
    assert torch.equal(combined.to_comfy()[1][0], torch.zeros(1, 77, 768))
    with pytest.raises(RuntimeError, match="only be called while a node runs"):
        ConditioningCombine().combine(conditioning_1=first, conditioning_2=second)


CONDITIONING_PACK = '''
class CountEntries:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",)}}
    RETURN_TYPES = ("INT", "CONDITIONING")
    FUNCTION = "run"
    def run(self, conditioning):
        tokens = [t.shape[1] for t, options in conditioning]   # ComfyUI's [[tensor, {...}], ...]
        return (sum(tokens), [[conditioning[0][0] * 2, dict(conditioning[0][1])]])


NODE_CLASS_MAPPINGS = {"ToyCountEntries": CountEntries}
'''


def test_pack_nodes_get_comfyuis_conditioning_lists(tmp_path, env):
    """sdgraph's CONDITIONING reaches a pack node as ComfyUI's list of [tensor, options], and what it returns
    becomes sdgraph's again."""
    import nodes
    from diffusion.latent import Conditioning
    (tmp_path / "cond").mkdir()
    (tmp_path / "cond" / "cond_pack.py").write_text(textwrap.dedent(CONDITIONING_PACK))
    registry = NodeRegistry()
    nodes.register_types(registry)
    load_pack_dir(registry, tmp_path / "cond", environment=env)
    ours = Conditioning.from_value([[torch.ones(1, 77, 8), {}], [torch.ones(1, 154, 8), {}]])
    ctx = RunContext("r", "1", "ToyCountEntries", None, CancelToken(), lambda e: None)
    count, doubled = registry.get("ToyCountEntries").fn(ctx, conditioning=ours).outputs
    assert count == 77 + 154
    assert torch.equal(Conditioning.from_value(doubled).to_comfy()[0][0], torch.full((1, 77, 8), 2.0))
