"""The runtime package imports torch only when a model is used: checked in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import runtime
from runtime import ModelManager, TorchMemory
ModelManager(TorchMemory()).room("cpu")
print("torch" in sys.modules)
"""


def test_importing_runtime_and_making_a_manager_does_not_import_torch():
    root = str(Path(__file__).parents[2])
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(root=root)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
