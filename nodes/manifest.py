"""The reproducibility manifest: what made an output, so `sdgraph replay` can redo it and say why it differs.

Every PNG SaveImage and PreviewImage write carries it as JSON in a text chunk named `sdgraph`, beside ComfyUI's
`prompt` and `workflow` chunks (left exactly as ComfyUI writes them). A node that writes another kind of file
calls `write_manifest_beside(ctx, path)`, which writes `<file name>.sdgraph.json` next to it (docs/custom-nodes.md).

Fields (docs/reproducibility.md): `sdgraph` and `torch` versions, `device`, `dtype` (per model part), `models`
(the model files the graph's loader inputs and `embedding:` references name, with their sha256), `seeds` (every
`seed`/`noise_seed` widget), `nodes` (type and version of each planned node), `keys` (each planned node's content
key) and, for one output file, `output` (the saving node and batch index).

Building a manifest never imports torch itself: the torch version and the resolved device and dtypes are
recorded when torch is already loaded (every node that makes images loads it); otherwise the requested ones.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from engine.files import atomic_write
from engine.formats import PNG_SIGNATURE, png_text_chunks

MANIFEST_CHUNK = "sdgraph"
SIDECAR_SUFFIX = ".sdgraph.json"
FORMAT = 1
MODEL_INPUTS = {"ckpt_name": "checkpoints", "vae_name": "vae", "lora_name": "loras"}
SEED_INPUTS = ("seed", "noise_seed")
_EMBEDDING = re.compile(r"embedding:([^\s,()]+)")


def sdgraph_version() -> str:
    try:
        return metadata.version("sdgraph")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_manifest(ctx, /, **more: Any) -> dict[str, Any]:
    """The manifest of what the running node `ctx` saves; `more` adds fields (e.g. `output`)."""
    return manifest_of(ctx.prompt, ctx.resources, keys=ctx.node_keys, versions=ctx.node_versions,
                       types={nid: _class_type(ctx.prompt, nid) for nid in ctx.node_versions}, **more)


def manifest_of(prompt: Mapping[str, Any], resources: Any, /, *, keys: Mapping[str, str],
                versions: Mapping[str, str], types: Mapping[str, str], **more: Any) -> dict[str, Any]:
    """The manifest of a run of `prompt` with `resources` (a Runtime, or anything with what it has)."""
    torch = sys.modules.get("torch")
    return {"format": FORMAT, "sdgraph": sdgraph_version(), "torch": getattr(torch, "__version__", None),
            **placement_of(resources), "models": model_files(prompt, resources), "seeds": seeds_of(prompt),
            "nodes": {nid: {"type": types.get(nid, ""), "version": str(versions[nid])} for nid in versions},
            "keys": dict(keys), **more}


def placement_of(resources: Any) -> dict[str, Any]:
    """`device` and `dtype` ({unet, text, vae, unet_output_fp32}) as the runtime resolves them once torch is
    loaded; before, what was asked for ("auto" when nothing was)."""
    requested = {"device": getattr(resources, "device", None) or "auto",
                 "dtype": getattr(resources, "dtype", None) or "auto"}
    if "torch" not in sys.modules or not hasattr(resources, "placement"):
        return {**requested, "requested": requested}
    try:
        device, precision = resources.placement()
    except (ValueError, RuntimeError):  # e.g. CUDA asked for but absent, in a graph that loads no model
        return {**requested, "requested": requested}
    unet, text, vae = precision.names
    return {"device": str(device), "requested": requested,
            "dtype": {"unet": unet, "text": text, "vae": vae, "unet_output_fp32": precision.unet_output_fp32}}


def seeds_of(prompt: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every integer `seed` / `noise_seed` widget of the graph: [{node, input, value}], in node order."""
    return [{"node": nid, "input": name, "value": value}
            for nid, name, value in _widgets(prompt) if name in SEED_INPUTS and isinstance(value, int)
            and not isinstance(value, bool)]


def model_files(prompt: Mapping[str, Any], resources: Any) -> list[dict[str, Any]]:
    """The model files the graph names (loader inputs, `embedding:` words) with their sha256 from the runtime's
    hash cache: [{node, input, kind, name, sha256}]. A file that cannot be found has sha256 None."""
    folders = getattr(resources, "folders", None)
    if folders is None:
        return []
    found = []
    for nid, name, value in _widgets(prompt):
        if name in MODEL_INPUTS and isinstance(value, str):
            path = _model_path(folders, MODEL_INPUTS[name], value)
            found.append(_entry(resources, nid, name, MODEL_INPUTS[name], value, path))
        elif isinstance(value, str) and "embedding:" in value:
            for reference in _EMBEDDING.findall(value):
                path = _embedding_path(folders, reference)
                found.append(_entry(resources, nid, name, "embeddings", reference, path))
    return found


def _entry(resources, nid: str, name: str, kind: str, value: str, path: Path | None) -> dict[str, Any]:
    hashes = getattr(resources, "hashes", None)
    digest = hashes.sha256(path) if path is not None and hashes is not None else None
    return {"node": nid, "input": name, "kind": kind, "name": value, "sha256": digest}


def _model_path(folders, kind: str, name: str) -> Path | None:
    try:
        path = folders.inside(kind, name, what=f"{kind} model")
    except ValueError:
        return None
    return path if path.is_file() else None


def _embedding_path(folders, reference: str) -> Path | None:
    root = folders.models("embeddings")
    if not root.is_dir() or "torch" not in sys.modules:  # its finder lives beside the torch loader
        return None
    from diffusion.embeddings import find_embedding_file

    return find_embedding_file(reference, root) or find_embedding_file(reference.rstrip(","), root)


def _widgets(prompt: Mapping[str, Any]):
    """(node id, input name, value) of every constant input of an API-format graph."""
    for nid, entry in prompt.items():
        inputs = entry.get("inputs") if isinstance(entry, Mapping) else None
        for name, value in (inputs or {}).items():
            if not isinstance(value, list):  # [source, output] is a link
                yield str(nid), name, value


def _class_type(prompt: Mapping[str, Any], nid: str) -> str:
    entry = prompt.get(nid)
    return entry.get("class_type", "") if isinstance(entry, Mapping) else ""


def manifest_text(manifest: Mapping[str, Any]) -> str:
    return json.dumps(manifest, sort_keys=True, default=str)


def sidecar_path(path: str | Path) -> Path:
    """Where the manifest of a non-PNG output file lives: `<file name>.sdgraph.json` beside it."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_manifest_beside(ctx, path: str | Path, **more: Any) -> Path:
    """For a node that writes a file other than a PNG: write the run's manifest (with `output`: this node and
    the file's name; and `prompt`, the graph, which a PNG keeps in its own chunk) atomically to
    `<file name>.sdgraph.json` beside `path`; returns that path."""
    manifest = build_manifest(ctx, output={"node": ctx.node_id, "file": Path(path).name, **more},
                              prompt=dict(ctx.prompt))
    return atomic_write(sidecar_path(path), manifest_text(manifest).encode())


class ManifestError(ValueError):
    """A file that carries no usable graph or manifest; the message names the file."""


def read_png(path: str | Path) -> tuple[dict, dict, dict]:
    """(prompt, manifest, the other text chunks) of a PNG that SaveImage wrote; ManifestError naming the file
    when it is missing, not a PNG, or lacks the `prompt` or `sdgraph` chunk."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such file; give the path of a PNG that SaveImage wrote")
    texts = _png_texts(path)
    prompt_json, manifest_json = texts.pop("prompt", None), texts.pop(MANIFEST_CHUNK, None)
    missing = [name for name, value in (("prompt", prompt_json), (MANIFEST_CHUNK, manifest_json)) if value is None]
    if missing:
        raise ManifestError(f"{path}: the PNG has no {' and no '.join(repr(m) for m in missing)} text chunk, so it "
                            "cannot be replayed; replay an image saved by sdgraph's SaveImage (images from ComfyUI "
                            "or older sdgraph versions carry no manifest)")
    try:
        prompt, manifest = json.loads(prompt_json), json.loads(manifest_json)
    except ValueError as exc:
        raise ManifestError(f"{path}: its embedded graph or manifest is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(prompt, dict):
        raise ManifestError(f"{path}: its embedded graph or manifest is not a JSON object")
    return prompt, manifest, texts


def _png_texts(path: Path) -> dict[str, str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    if not data.startswith(PNG_SIGNATURE):
        raise ManifestError(f"{path}: not a PNG; replay takes a PNG that SaveImage wrote")
    return png_text_chunks(data)
