"""An example node pack. Copy this folder to custom_nodes/<your_pack>/ to start your own; docs/custom-nodes.md
walks through it.

A pack is a Python package (or a single .py file) in custom_nodes/. sdgraph imports it at start and registers:
  * every `@node` definition at module level (or the ones listed in `NODES`, if you define it),
  * the data types in `TYPES` ({name: description}) before those nodes,
  * ComfyUI-style classes in `NODE_CLASS_MAPPINGS`, exactly as ComfyUI would load them.
If the pack fails to import, or a definition is inconsistent, `sdgraph nodes --errors` says which and why; the
other packs load regardless.
"""

from __future__ import annotations

import time

from engine import COMBO, INT, STRING, Input, Output, Result, node

# -- 1. The smallest useful node: typed inputs with defaults and limits, one typed output. -----------------------


@node("ExampleRepeatText", category="example/text", display_name="Repeat Text",
      inputs=[Input("text", STRING, default="hello", multiline=True, tooltip="the text to repeat"),
              Input("times", INT, default=2, min=1, max=100, tooltip="how many copies"),
              Input("separator", STRING, default=" ", optional=True, tooltip="put between the copies")],
      outputs=[Output("text", STRING)])
def repeat_text(ctx, text, times, separator=" "):
    """Repeat a text a number of times."""
    return separator.join([text] * times)


# -- 2. Several outputs: return a tuple, in the order the outputs are declared. ----------------------------------


@node("ExampleWordCount", category="example/text", display_name="Word Count",
      inputs=[Input("text", STRING, force_input=True, tooltip="link a text here")],
      outputs=[Output("words", INT), Output("characters", INT)])
def word_count(ctx, text):
    """Count the words and characters of a text."""
    return len(text.split()), len(text)


# -- 3. An output node: it is what a run computes; `Result(outputs, ui)` carries something to show. --------------


@node("ExampleShowText", category="example/text", display_name="Show Text", output_node=True,
      inputs=[Input("text", "*", tooltip="anything; shown as text")], outputs=[])
def show_text(ctx, text):
    """Show a value as text (in the CLI's --json output, or in a front end)."""
    return Result((), {"text": [str(text)]})


# -- 4. A choice (combo), progress and cancellation for a slow node. ---------------------------------------------


@node("ExampleCountdown", category="example/time", display_name="Countdown",
      inputs=[Input("seconds", INT, default=3, min=0, max=60),
              Input("pace", COMBO, options=("normal", "fast"), default="fast")],
      outputs=[Output("seconds", INT)])
def countdown(ctx, seconds, pace):
    """Wait, reporting progress each tick. Ctrl-C (or a cancelled run) stops it at the next tick."""
    tick = 1.0 if pace == "normal" else 0.01
    for done in range(seconds):
        time.sleep(tick)
        ctx.progress(done + 1, seconds)  # also raises if the run was cancelled
    return seconds


# -- 5. Reading a file: options from the input folder, and a fingerprint so an edited file re-runs the node. -------


def _text_files(resources) -> list[str]:
    """The combo's options, read each time they are needed (so new files show up). `resources` is what the
    application gave the executor; for sdgraph it has `folders`."""
    folders = getattr(resources, "folders", None)
    if folders is None or not folders.input.is_dir():
        return []
    return sorted(p.name for p in folders.input.iterdir() if p.suffix == ".txt")


def _file_stamp(resources, name):
    """The cache key includes this: when the file changes, the node runs again (ComfyUI's IS_CHANGED)."""
    stat = resources.folders.inside("input", name, what="ExampleLoadText input 'name'").stat()
    return stat.st_mtime_ns, stat.st_size


@node("ExampleLoadText", category="example/text", display_name="Load Text", fingerprint=_file_stamp,
      inputs=[Input("name", COMBO, options=_text_files, tooltip="a .txt file in input/")],
      outputs=[Output("text", STRING)])
def load_text(ctx, name):
    """Read a text file from the input folder. Every path goes through the application's resolver
    (`folders.inside`), which refuses names that leave the folder, even when a name reaches the node unchecked."""
    path = ctx.resources.folders.inside("input", name, what="ExampleLoadText input 'name'")
    return path.read_text(encoding="utf-8")


# -- 6. A ComfyUI-style class: packs written for ComfyUI load unmodified. ----------------------------------------


class ExampleClamp:
    """Clamp a number into [low, high]."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "forceInput": True}),
                             "low": ("INT", {"default": 0, "min": -1000, "max": 1000}),
                             "high": ("INT", {"default": 10, "min": -1000, "max": 1000})}}

    RETURN_TYPES = ("INT",)
    RETURN_NAMES = ("clamped",)
    FUNCTION = "clamp"
    CATEGORY = "example/math"

    @classmethod
    def VALIDATE_INPUTS(cls, low, high):
        # Runs at validation with the constant inputs. As in ComfyUI, the inputs named here skip the built-in
        # min/max checks, so this check covers them.
        if not -1000 <= low <= 1000 or not -1000 <= high <= 1000:
            return "low and high must lie between -1000 and 1000"
        return True if low <= high else f"low ({low}) is above high ({high}); swap them"

    def clamp(self, value, low, high):
        return (min(max(value, low), high),)


NODE_CLASS_MAPPINGS = {"ExampleClamp": ExampleClamp}
NODE_DISPLAY_NAME_MAPPINGS = {"ExampleClamp": "Clamp (ComfyUI-style)"}
