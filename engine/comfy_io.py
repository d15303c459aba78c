"""ComfyUI's V3 node API (`comfy_api.latest.io`), as data sdgraph reads: typed inputs and outputs, `Schema`,
`ComfyNode`, `NodeOutput`, `ComfyExtension`. `comfy_v3.py` turns a `ComfyNode` class into a `NodeDef`.

Written from ComfyUI's documented behaviour, not its code. Torch-free. Dynamic inputs (`DynamicCombo`,
`Autogrow`) are declared but not supported: a node using them is refused with that reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import Enum, StrEnum
from typing import Any


class Unsupported(Exception):
    """A V3 feature sdgraph does not run (dynamic inputs)."""


class NumberDisplay(StrEnum):
    number = "number"
    slider = "slider"


class FolderType(StrEnum):
    input = "input"
    output = "output"
    temp = "temp"


class Hidden(StrEnum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"
    auth_token_comfy_org = "AUTH_TOKEN_COMFY_ORG"
    api_key_comfy_org = "API_KEY_COMFY_ORG"


class HiddenHolder:
    """`cls.hidden` while a V3 node runs: `unique_id`, `prompt`, `extra_pnginfo`, ... (None when not given)."""

    def __init__(self, **values: Any):
        self.unique_id = values.get("unique_id")
        self.prompt = values.get("prompt")
        self.extra_pnginfo = values.get("extra_pnginfo")
        self.dynprompt = values.get("dynprompt")
        self.auth_token_comfy_org = None
        self.api_key_comfy_org = None

    def __getattr__(self, name: str) -> Any:  # any other hidden value a node asks for: not given
        if name.startswith("__"):
            raise AttributeError(name)
        return None


class InputSpec:
    """One declared input. `io_type` is the link type; options follow ComfyUI's keyword names."""

    io_type = "*"
    unsupported = ""

    def __init__(self, id: str, display_name: str | None = None, optional: bool = False, tooltip: str | None = None,
                 lazy: bool | None = None, default: Any = None, min: Any = None, max: Any = None,
                 step: Any = None, multiline: bool = False, options: Sequence[Any] | None = None,
                 force_input: bool = False, control_after_generate: Any = None, **extra: Any):
        self.id, self.display_name, self.optional, self.tooltip = id, display_name, optional, tooltip
        self.lazy, self.default, self.min, self.max, self.step = bool(lazy), default, min, max, step
        self.multiline, self.force_input, self.control_after_generate = multiline, force_input, control_after_generate
        self.options = [o.value if isinstance(o, Enum) else o for o in options] if options is not None else None
        self.extra = extra


class OutputSpec:
    io_type = "*"

    def __init__(self, id: str | None = None, display_name: str | None = None, tooltip: str | None = None,
                 is_output_list: bool = False, **extra: Any):
        self.id, self.display_name, self.tooltip, self.is_output_list = id, display_name, tooltip, is_output_list
        self.extra = extra


class ComfyType:
    """A V3 type: `Image.Input("image")`, `Image.Output()`; `io_type` is the name links carry."""

    io_type = "*"
    Input: type[InputSpec] = InputSpec
    Output: type[OutputSpec] = OutputSpec


def comfy_type(io_type: str, name: str | None = None) -> type[ComfyType]:
    """A ComfyType class for `io_type` (`Custom("MY_TYPE")` in ComfyUI)."""
    attributes = {"io_type": io_type}
    return type(name or io_type.title().replace("_", ""), (ComfyType,), {
        "io_type": io_type,
        "Input": type("Input", (InputSpec,), attributes),
        "Output": type("Output", (OutputSpec,), attributes),
    })


def io_type_of(name: str) -> str:
    """ComfyUI's link type for a V3 type name: CamelCase to UPPER_SNAKE (`LatentUpscaleModel` ->
    LATENT_UPSCALE_MODEL), `AnyType` -> `*`."""
    if name in ("AnyType", "Any"):
        return "*"
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


Int, Float, String, Boolean = comfy_type("INT", "Int"), comfy_type("FLOAT", "Float"), comfy_type("STRING", "String"), \
    comfy_type("BOOLEAN", "Boolean")
Combo = comfy_type("COMBO", "Combo")
Image, Mask, Latent = comfy_type("IMAGE", "Image"), comfy_type("MASK", "Mask"), comfy_type("LATENT", "Latent")
Model, Clip, Vae = comfy_type("MODEL", "Model"), comfy_type("CLIP", "Clip"), comfy_type("VAE", "Vae")
Conditioning = comfy_type("CONDITIONING", "Conditioning")
AnyType = comfy_type("*", "AnyType")
BASIC_TYPES = {t.__name__: t for t in (Int, Float, String, Boolean, Combo, Image, Mask, Latent, Model, Clip, Vae,
                                       Conditioning, AnyType)}


def Custom(io_type: str) -> type[ComfyType]:  # noqa: N802 - ComfyUI's name
    return comfy_type(io_type)


class MultiType:
    """An input accepting several types: the link type is their comma-joined names (`IMAGE,MASK`)."""

    class Input(InputSpec):
        def __init__(self, id: Any, types: Sequence[Any] = (), **options: Any):
            if isinstance(id, InputSpec):  # MultiType.Input(Image.Input("x"), types=[...])
                options = {"optional": id.optional, "tooltip": id.tooltip, "display_name": id.display_name, **options}
                first, id = id.io_type, id.id
            else:
                first = None
            names = ([first] if first else []) + [getattr(t, "io_type", str(t)) for t in types]
            super().__init__(id, **options)
            self.io_type = ",".join(dict.fromkeys(names)) or "*"


class MatchType:
    """Inputs and outputs of one type chosen by the link: accepted as any type (`*`)."""

    class Template:
        def __init__(self, template_id: str, allowed_types: Any = None):
            self.template_id, self.allowed_types = template_id, allowed_types

    class Input(InputSpec):
        def __init__(self, id: str, template: Any = None, **options: Any):
            super().__init__(id, **options)

    class Output(OutputSpec):
        def __init__(self, template: Any = None, id: str | None = None, **options: Any):
            super().__init__(id, **options)


class _DynamicInput(InputSpec):
    unsupported = "dynamic inputs"

    def __init__(self, id: str, *args: Any, **options: Any):
        super().__init__(id, **{k: v for k, v in options.items() if k in ("optional", "tooltip", "display_name")})


class DynamicCombo:
    class Option:
        def __init__(self, key: str, inputs: Sequence[Any] = ()):
            self.key, self.inputs = key, list(inputs)

    class Input(_DynamicInput):
        unsupported = "io.DynamicCombo (inputs that change with a combo's value)"


class Autogrow:
    class TemplateNames:
        def __init__(self, *args: Any, **kwargs: Any):
            self.args, self.kwargs = args, kwargs

    class TemplatePrefix(TemplateNames):
        pass

    class Input(_DynamicInput):
        unsupported = "io.Autogrow (a growing list of inputs)"


class Schema:
    """What a V3 node declares (`define_schema`)."""

    def __init__(self, node_id: str, display_name: str | None = None, category: str = "sd",
                 inputs: Sequence[InputSpec] | None = None, outputs: Sequence[OutputSpec] | None = None,
                 hidden: Sequence[Hidden] | None = None, description: str = "", is_output_node: bool = False,
                 is_input_list: bool = False, not_idempotent: bool = False, is_deprecated: bool = False,
                 is_experimental: bool = False, **extra: Any):
        self.node_id, self.display_name, self.category, self.description = node_id, display_name, category, description
        self.inputs, self.outputs, self.hidden = list(inputs or ()), list(outputs or ()), list(hidden or ())
        self.is_output_node, self.is_input_list, self.not_idempotent = is_output_node, is_input_list, not_idempotent
        self.is_deprecated, self.is_experimental, self.extra = is_deprecated, is_experimental, extra


class NodeOutput:
    """What `execute` returns: the output values in order, an optional UI payload (a dict, or an object with
    `as_dict()`), and `expand` (a subgraph to run instead; not supported here)."""

    def __init__(self, *args: Any, ui: Any = None, expand: Any = None, block_execution: Any = None):
        self.args, self.ui, self.expand, self.block_execution = args, ui, expand, block_execution

    @property
    def result(self) -> tuple[Any, ...]:
        return self.args


class ComfyNode:
    """The base of V3 nodes: class methods only (`define_schema`, `execute`, optionally `fingerprint_inputs`,
    `validate_inputs`, `check_lazy_status`); `cls.hidden` holds the hidden values while `execute` runs."""

    hidden: HiddenHolder = HiddenHolder()

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError(f"{cls.__name__} must define define_schema()")

    @classmethod
    def execute(cls, **kwargs: Any) -> NodeOutput:
        raise NotImplementedError(f"{cls.__name__} must define execute()")


class ComfyExtension:
    """A pack's V3 entry point (`async def comfy_entrypoint() -> ComfyExtension`)."""

    async def on_load(self) -> None:
        return None

    async def get_node_list(self) -> list[type[ComfyNode]]:
        return []
