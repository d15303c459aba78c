"""Toy nodes for the server tests (copied into the test server's custom_nodes/, beside tests/engine/toy_nodes.py).

They follow the contracts the SD nodes follow: files are written with `engine.files.atomic_write` under a name
resolved by `nodes.folders.resolve_inside`; inputs are read through `Folders.input_path`; sizes come as
width/height/batch_size inputs.
"""

from __future__ import annotations

import io
import os
import signal
import time

from engine import COMBO, INT, STRING, Input, Output, Result, node
from engine.files import atomic_write
from engine.sizes import Size
from nodes.folders import resolve_inside


def _png(value: int, size: int = 8) -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value % 256, 40, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


@node("ToySaveImage", category="toy/server", output_node=True,
      inputs=[Input("value", INT, default=0, min=-1000000, max=1000000), Input("filename_prefix", STRING,
                                                                              default="toy")], outputs=[])
def toy_save_image(ctx, value, filename_prefix):
    """Writes a small PNG the way SaveImage does: prefix may name a subfolder, which must stay inside output/."""
    root = ctx.resources.folders.output
    subfolder, _, prefix = filename_prefix.replace("\\", "/").rpartition("/")
    resolve_inside(root, f"{subfolder}/{prefix}_x.png" if subfolder else f"{prefix}_x.png", what="filename_prefix")
    data = _png(value)
    for counter in range(1, 100000):
        name = f"{prefix}_{counter:05}_.png"
        path = resolve_inside(root, f"{subfolder}/{name}" if subfolder else name, what="filename_prefix")
        try:
            atomic_write(path, data, exclusive=True)
        except FileExistsError:
            continue
        return Result((), {"images": [{"filename": name, "subfolder": subfolder, "type": "output"}]})
    raise RuntimeError("no free file name")


def _input_names(resources):
    return resources.folders.list_inputs() if resources is not None else []


@node("ToyLoadImage", category="toy/server", inputs=[Input("image", COMBO, options=_input_names)],
      outputs=[Output("width", INT)])
def toy_load_image(ctx, image):
    """Reads an input image the way LoadImage does (the combo lists input/, the path is resolved inside it)."""
    from PIL import Image
    with Image.open(ctx.resources.folders.input_path(image)) as opened:
        return opened.size[0]


def _toy_latent_size(width, height, batch_size):
    """The size the count stands for, declared for its INT output (a one-item tuple: an explicit per-output size)."""
    return (Size(batch_size, height, width),)


@node("ToyLatent", category="toy/server", size_rule=_toy_latent_size,
      inputs=[Input("width", INT, default=64, min=1, max=1 << 20), Input("height", INT, default=64, min=1,
                                                                         max=1 << 20),
              Input("batch_size", INT, default=1, min=1, max=4096)],
      outputs=[Output("pixels", INT)])
def toy_latent(ctx, width, height, batch_size):
    return width * height * batch_size


@node("ToyPreview", category="toy/server",
      inputs=[Input("steps", INT, default=3, min=1, max=100000), Input("size", INT, default=16, min=1, max=512)],
      outputs=[Output("steps", INT)])
def toy_preview(ctx, steps, size):
    """Reports progress with a noisy preview image each step (binary websocket frames)."""
    from PIL import Image
    for step in range(steps):
        ctx.progress(step + 1, steps, Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)))
    return steps


@node("ToyCrash", category="toy/server", inputs=[Input("value", INT, default=0)], outputs=[Output("value", INT)])
def toy_crash(ctx, value):
    """Kills its own process, as a poison prompt (a segfault, the OOM killer) would."""
    os.kill(os.getpid(), signal.SIGKILL)
    return value


@node("ToyRaise", category="toy/server", inputs=[Input("kind", COMBO, options=["SystemExit", "KeyboardInterrupt"]),
                                                Input("value", INT, default=0)], outputs=[Output("value", INT)])
def toy_raise(ctx, kind, value):
    """Raises what no node should (sys.exit() in a node, a stray KeyboardInterrupt): the worker must survive it."""
    if kind == "SystemExit":
        raise SystemExit(3)
    raise KeyboardInterrupt


@node("ToyStuck", category="toy/server", inputs=[Input("seconds", INT, default=60, min=0, max=600)],
      outputs=[Output("value", INT)])
def toy_stuck(ctx, seconds):
    """Never checks for interruption for `seconds` (as a node stuck in C code): only an exit ends it sooner."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return seconds


@node("ToyBreakWorker", category="toy/server", inputs=[Input("value", INT, default=0)],
      outputs=[Output("value", INT)])
def toy_break_worker(ctx, value):
    """Injects a fault into the worker's loop outside any prompt: its next look for memory to free raises."""
    from service import worker

    def broken(self):
        raise RuntimeError("injected fault in the worker loop")
    worker.Worker._apply_free = broken
    return value


@node("ToyFailWithPaths", category="toy/server", inputs=[Input("value", INT, default=0)],
      outputs=[Output("value", INT)])
def toy_fail_with_paths(ctx, value):
    """Fails with a message naming a model file (by its absolute path) and a file outside every root."""
    model = ctx.resources.folders.base / "models" / "checkpoints" / "missing.safetensors"
    raise FileNotFoundError(f"cannot open '{model}' (config in /etc/sdgraph-secret/settings.yaml)")


NODES = [toy_fail_with_paths, toy_save_image, toy_load_image, toy_latent, toy_preview, toy_crash, toy_raise, toy_stuck,
         toy_break_worker]
