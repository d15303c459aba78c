"""The engine never imports torch: checked in a fresh interpreter that imports it and runs a toy graph."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
sys.path.insert(0, {here!r})
import engine
from engine import Executor, validate
from engine.schema import object_info
from toy_nodes import toy_registry
registry = toy_registry()
api = {{"1": {{"class_type": "Const", "inputs": {{"value": 2}}}},
       "2": {{"class_type": "Slow", "inputs": {{"value": ["1", 0], "steps": 2}}}},
       "3": {{"class_type": "Show", "inputs": {{"value": ["2", 0]}}}}}}
result = validate(api, registry)
report = Executor(registry).run(result.graph)
object_info(registry)
assert report.ui == {{"3": {{"text": ["2"]}}}}, report
print("torch" in sys.modules, sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "PIL")))
"""


def test_engine_runs_without_importing_torch():
    here = str(Path(__file__).parent)
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(here=here)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False []"
