"""Toy nodes for engine tests: no torch, just numbers and strings."""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from engine import BOOLEAN, COMBO, FLOAT, INT, STRING, Input, NodeRegistry, Output, Result, node
from engine.files import atomic_write

TYPES = {"BOX": "a toy object that can be weakly referenced (to watch values being released)"}


@dataclass
class CallCounter:
    """Resources handed to the executor: counts calls per node type (owned by the test, not the module).
    `boxes` collects weak references to the Box objects MakeBox creates; `output_dir` is where SaveText writes."""

    calls: dict[str, int] = field(default_factory=dict)
    boxes: list = field(default_factory=list)
    output_dir: Path | None = None

    def hit(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1


class Box:
    def __init__(self, value: int):
        self.value = value


def _count(ctx, name: str) -> None:
    if isinstance(ctx.resources, CallCounter):
        ctx.resources.hit(name)


@node("Const", category="toy", inputs=[Input("value", INT, default=0, min=-1000, max=1000)],
      outputs=[Output("value", INT)])
def const(ctx, value):
    _count(ctx, "Const")
    return value


@node("FloatConst", category="toy", inputs=[Input("value", FLOAT, default=0.0, min=-10.0, max=10.0)],
      outputs=[Output("value", FLOAT)])
def float_const(ctx, value):
    return value


@node("Add", category="toy", inputs=[Input("a", INT, default=0), Input("b", INT, default=0)],
      outputs=[Output("sum", INT)])
def add(ctx, a, b):
    _count(ctx, "Add")
    return a + b


@node("Mul", category="toy", inputs=[Input("a", INT, default=1), Input("b", INT, default=1)],
      outputs=[Output("product", INT)])
def mul(ctx, a, b):
    _count(ctx, "Mul")
    return a * b


@node("DivMod", category="toy", inputs=[Input("a", INT), Input("b", INT, default=1, min=1)],
      outputs=[Output("quotient", INT), Output("remainder", INT)])
def divmod_node(ctx, a, b):
    return divmod(a, b)


@node("Concat", category="toy",
      inputs=[Input("left", STRING, default=""), Input("right", STRING, default="", multiline=True),
              Input("upper", BOOLEAN, default=False)],
      outputs=[Output("text", STRING)])
def concat(ctx, left, right, upper):
    _count(ctx, "Concat")
    text = left + right
    return text.upper() if upper else text


@node("Format", category="toy", inputs=[Input("number", INT), Input("style", COMBO, options=("plain", "hex"),
                                                                      default="plain")],
      outputs=[Output("text", STRING)])
def format_node(ctx, number, style):
    return hex(number) if style == "hex" else str(number)


@node("Fail", category="toy", inputs=[Input("value", INT, default=0)], outputs=[Output("value", INT)])
def fail(ctx, value):
    raise ValueError(f"toy failure on {value}")


@node("Slow", category="toy", inputs=[Input("value", INT, default=0), Input("steps", INT, default=5, min=1),
                                      Input("delay", FLOAT, default=0.0, min=0.0)],
      outputs=[Output("value", INT)])
def slow(ctx, value, steps, delay):
    for i in range(steps):
        time.sleep(delay)
        ctx.progress(i + 1, steps)
    return value


@node("Show", category="toy", output_node=True, inputs=[Input("value", "*")], outputs=[])
def show(ctx, value):
    _count(ctx, "Show")
    return Result((), {"text": [str(value)]})


@node("Sink", category="toy", output_node=True, cacheable=False, inputs=[Input("value", "*")], outputs=[])
def sink(ctx, value):
    _count(ctx, "Sink")
    return Result((), {"text": [str(value)]})


def _pick_lazy(choose_a, a=None, b=None):
    return ["a"] if choose_a else ["b"]


@node("Switch", category="toy", check_lazy=_pick_lazy,
      inputs=[Input("choose_a", BOOLEAN, default=True), Input("a", INT, lazy=True), Input("b", INT, lazy=True)],
      outputs=[Output("value", INT)])
def switch(ctx, choose_a, a, b):
    return a if choose_a else b


@node("Range", category="toy", inputs=[Input("count", INT, default=3, min=0)],
      outputs=[Output("values", INT, is_list=True)])
def range_node(ctx, count):
    return list(range(count))


@node("Sum", category="toy", input_is_list=True, inputs=[Input("values", INT)], outputs=[Output("total", INT)])
def sum_node(ctx, values):
    return sum(values)


def _file_stamp(resources, path):
    import os
    return os.stat(path).st_mtime_ns if os.path.exists(path) else None


@node("ReadText", category="toy", fingerprint=_file_stamp, inputs=[Input("path", STRING)],
      outputs=[Output("text", STRING)])
def read_text(ctx, path):
    _count(ctx, "ReadText")
    with open(path) as f:
        return f.read()


@node("MakeBox", category="toy", inputs=[Input("value", INT, default=0)], outputs=[Output("box", "BOX")])
def make_box(ctx, value):
    box = Box(value)
    if isinstance(ctx.resources, CallCounter):
        ctx.resources.boxes.append(weakref.ref(box))
    return box


@node("Unbox", category="toy", inputs=[Input("box", "BOX")], outputs=[Output("value", INT)])
def unbox(ctx, box):
    return box.value


def _output_dir(ctx) -> Path:
    folders = getattr(ctx.resources, "folders", None)  # the CLI's Runtime
    if folders is not None:
        return folders.output
    if isinstance(ctx.resources, CallCounter) and ctx.resources.output_dir is not None:
        return ctx.resources.output_dir
    raise RuntimeError("SaveText needs resources with an output folder")


@node("SaveText", category="toy", output_node=True,
      inputs=[Input("text", "*"), Input("filename_prefix", STRING, default="toy")], outputs=[])
def save_text(ctx, text, filename_prefix):
    """Write the text to OUTPUT/<prefix>_00001.txt (never a partial file), like SaveImage does for images."""
    _count(ctx, "SaveText")
    folder = _output_dir(ctx)
    for number in range(1, 100000):
        name = f"{filename_prefix}_{number:05d}.txt"
        try:
            atomic_write(folder / name, str(text).encode(), exclusive=True)
            break
        except FileExistsError:
            continue
    return Result((), {"files": [{"filename": name, "subfolder": "", "type": "output"}]})


TOY_NODES = [const, float_const, add, mul, divmod_node, concat, format_node, fail, slow, show, sink, switch,
             range_node, sum_node, read_text, make_box, unbox, save_text]


def toy_registry() -> NodeRegistry:
    registry = NodeRegistry()
    for name, description in TYPES.items():
        registry.register_type(name, description=description)
    for definition in TOY_NODES:
        registry.register(definition)
    return registry


def two_branches(left: int = 1, right: int = 2) -> dict:
    """An API graph: (left + 10) + (right * 10), shown. Changing `left` leaves the right branch cached."""
    return {"1": {"class_type": "Const", "inputs": {"value": left}},
            "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 10}},
            "3": {"class_type": "Const", "inputs": {"value": right}},
            "4": {"class_type": "Mul", "inputs": {"a": ["3", 0], "b": 10}},
            "5": {"class_type": "Add", "inputs": {"a": ["2", 0], "b": ["4", 0]}},
            "6": {"class_type": "Show", "inputs": {"value": ["5", 0]}}}
