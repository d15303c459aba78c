"""`sdgraph nodes --errors` names, per pack, how many nodes registered and each node that did not, with why
(issue #18: "those nodes fail to load with a clear, per-node reason")."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

PACK = '''
from comfy.model_patcher import ModelPatcher
import folder_paths


class Fine:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": ""})}}
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    def run(self, text):
        return (text,)


class Patches:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": ""})}}
    RETURN_TYPES = ("STRING",)
    FUNCTION = "run"
    def run(self, text):
        return (ModelPatcher(text),)


NODE_CLASS_MAPPINGS = {"ToyFine": Fine, "ToyPatches": Patches}
'''


def test_nodes_errors_lists_the_refused_node_and_why(tmp_path):
    (tmp_path / "custom_nodes" / "toy_pack").mkdir(parents=True)
    (tmp_path / "custom_nodes" / "toy_pack" / "__init__.py").write_text(textwrap.dedent(PACK))
    done = subprocess.run([sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "nodes", "--errors",
                           "--base-dir", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "toy_pack: 1 nodes registered, 1 problem"
    assert lines[1].startswith("  __init__.py: node 'ToyPatches' (Patches): uses ComfyUI's model internals "
                               "(comfy.model_patcher.ModelPatcher)")
