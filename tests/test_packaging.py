"""Packaging (issue #11): a non-editable install ships every package and the tokenizer's data file, builds
without setuptools' "absent from the packages configuration" warning, and runs from another directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = ("engine", "runtime", "diffusion", "nodes", "service", "demo_model", "comfy_compat")
DATA_FILES = ("diffusion/data/bpe_simple_vocab_16e6.txt.gz", "service/web/sdgraph.js")


def source_packages() -> set[str]:
    """Every folder of the project's packages that holds Python files (what an install must contain)."""
    files = [path for name in PACKAGE_ROOTS for path in (ROOT / name).rglob("*.py")]
    return {str(path.parent.relative_to(ROOT)) for path in files if "__pycache__" not in path.parts}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """(the wheel, pip's build log), built from a clean copy of the sources (no build/ left in the worktree)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "cli.py", "server.py"):
        shutil.copy(ROOT / name, source / name)
    for name in PACKAGE_ROOTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", str(source),
                           "-w", str(dist)], capture_output=True, text=True, timeout=300, cwd=source)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return next(dist.glob("sdgraph-*.whl")), done.stdout + done.stderr


@pytest.mark.slow
def test_wheel_holds_every_package_and_the_tokenizer_data(built):
    wheel, log = built
    names = set(zipfile.ZipFile(wheel).namelist())
    folders = {name.rsplit("/", 1)[0] for name in names if name.endswith(".py")}
    assert source_packages() - folders == set()
    assert set(DATA_FILES) <= names
    assert {"cli.py", "server.py"} <= names
    assert "absent from the `packages` configuration" not in log


@pytest.mark.slow
def test_installed_wheel_runs_outside_the_source_tree(built, tmp_path):
    wheel, _ = built
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    script = (
        "import sys, diffusion, cli\n"
        f"assert diffusion.__file__.startswith({str(target)!r}), diffusion.__file__\n"
        "from diffusion.tokenizer import ClipTokenizer\n"
        "assert ClipTokenizer().encode('a photograph of an astronaut') == [320, 8853, 539, 550, 18376]\n"
        f"sys.exit(cli.main(['validate', {str(ROOT / 'graphs' / 'txt2img.json')!r}, '--base-dir', {str(ROOT)!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=elsewhere,
                          env=env)
    assert done.returncode == 0, done.stdout + done.stderr
