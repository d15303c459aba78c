"""Image files: LoadImage and LoadImageMask read input/, SaveImage writes output/, PreviewImage writes temp/.

Every name a graph supplies is resolved inside its folder (symlinks followed); saved files are written whole
under a temporary name and linked into place without ever replacing an existing file.

Where we differ from ComfyUI, on purpose:
- LoadImage gives an image without alpha an all-zero mask of the image's size (ComfyUI: 64x64, which then fails
  or misaligns wherever the mask meets the image).
- 16-bit greyscale files keep their full range (value / 65535); ComfyUI's conversion turns them white.
- A truncated or corrupt file is an error naming it (ComfyUI retries with Pillow's global LOAD_TRUNCATED_IMAGES).
- SaveImage refuses NaN or infinite pixels instead of writing garbage; prefixes may not leave output/ through a
  symlink either; two runs never overwrite each other's file.
- Pixels are saved as ComfyUI saves them: 255 * x clipped and truncated (not rounded), so PNGs match its own.
"""

from __future__ import annotations

import os
import posixpath
import secrets
import string
import time
from pathlib import Path

from engine import COMBO, STRING, Input, Output, Result, node
from engine.files import atomic_write
from engine.sizes import Size
from runtime.hashes import sha256_of

from .folders import UnsafePathError
from .manifest import MANIFEST_CHUNK, build_manifest, manifest_text
from .pixels import image_file_size

MASK_CHANNELS = ("alpha", "red", "green", "blue")
SAVE_COMPRESS_LEVEL = 4  # ComfyUI's levels, so our PNGs are byte for byte what ComfyUI writes
PREVIEW_COMPRESS_LEVEL = 1


def _input_names(resources) -> list[str]:
    return resources.folders.list_inputs() if resources is not None else []


def _folders(ctx, node_name: str):
    if ctx.resources is None or not hasattr(ctx.resources, "folders"):
        raise RuntimeError(f"{node_name} needs the application's folders: run it with a Runtime as resources")
    return ctx.resources.folders


def _file_digest(resources, image):
    """SHA-256 of the file's bytes: the node runs again when the file changes, even under the same name."""
    return sha256_of(resources.folders.input_path(image, what="LoadImage input 'image'"))


def _loaded_size(image, resources):
    """Size rule: the file's size from its header (frames, height, width); unknown without folders."""
    folders = getattr(resources, "folders", None)
    if folders is None:
        return None
    try:
        path = folders.input_path(image)
    except Exception:  # a name the folders refuse: its own error says why when the node runs
        return None
    return image_file_size(path)


def _loaded_mask_size(image, resources):
    size = _loaded_size(image, resources)
    return None if size is None else Size(1, size.height, size.width)


_IMAGE_INPUT = Input("image", COMBO, options=_input_names, extra={"image_upload": True},
                     tooltip="an image file in input/")


@node("LoadImage", category="image", display_name="Load Image", fingerprint=_file_digest, size_rule=_loaded_size,
      inputs=[_IMAGE_INPUT], outputs=[Output("IMAGE", "IMAGE"), Output("MASK", "MASK")])
def load_image(ctx, image):
    """Load an image from input/, upright by its EXIF orientation. Animated files give one batch item per frame
    of the first frame's size. MASK is 1 - alpha (1 where transparent); without alpha it is all zero, of the
    image's size (ComfyUI gives a 64x64 zero mask there)."""
    from . import imaging

    path = _folders(ctx, "LoadImage").input_path(image, what="LoadImage input 'image'")
    return imaging.read_image(path, image, imaging.load_frames)


@node("LoadImageMask", category="mask", display_name="Load Image (as Mask)", fingerprint=_file_digest,
      size_rule=_loaded_mask_size,
      inputs=[_IMAGE_INPUT, Input("channel", COMBO, options=MASK_CHANNELS, default="alpha")],
      outputs=[Output("MASK", "MASK")])
def load_image_mask(ctx, image, channel):
    """One channel of an image in input/ as a mask; alpha is inverted (1 where transparent) as ComfyUI does,
    and an image without alpha gives an all-zero mask for it."""
    from . import imaging

    path = _folders(ctx, "LoadImageMask").input_path(image, what="LoadImageMask input 'image'")
    return imaging.read_image(path, image, lambda picture: imaging.load_channel(picture, channel))


# --- saving --------------------------------------------------------------------------------------------------

def split_prefix(prefix: str) -> tuple[str, str]:
    """(subfolder, file name start) of a filename_prefix such as "portraits/img"; backslashes count as "/".
    Raises UnsafePathError for an empty prefix, a NUL, an absolute path or one climbing out with "..";
    symlinks are checked against the real folder when saving."""
    if not isinstance(prefix, str) or not prefix.strip():
        raise UnsafePathError("filename_prefix is empty; give a name such as 'ComfyUI' or 'portraits/img'")
    if "\0" in prefix:
        raise UnsafePathError(f"filename_prefix {prefix!r} contains a NUL byte")
    text = prefix.replace("\\", "/")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise UnsafePathError(f"filename_prefix {prefix!r} is an absolute path; use a name relative to the "
                              "output folder, such as 'portraits/img'")
    normal = posixpath.normpath(text)
    subfolder, filename = posixpath.split(normal)
    if normal == ".." or normal.startswith("../") or filename in ("", ".", ".."):
        raise UnsafePathError(f"filename_prefix {prefix!r} points outside the output folder or names no file; "
                              "use a name inside it, such as 'portraits/img'")
    return subfolder, filename


def _check_prefix(filename_prefix=None, resources=None):
    """At validation: the prefix's form and, given the application's folders, where its subfolder really leads
    (a symlinked folder pointing out of output/ is refused unless the folders are trusted)."""
    if filename_prefix is None:  # linked from another node: checked when it runs
        return True
    try:
        subfolder, _ = split_prefix(filename_prefix)
        if subfolder and hasattr(resources, "folders"):
            resources.folders.inside("output", subfolder, what="filename_prefix folder")
    except UnsafePathError as exc:
        return str(exc)
    return True


def expand_variables(prefix: str, width: int, height: int) -> str:
    """ComfyUI's file-name variables: %width%, %height%, %year%, %month%, %day%, %hour%, %minute%, %second%."""
    if "%" not in prefix:
        return prefix
    now = time.localtime()
    values = {"width": width, "height": height, "year": now.tm_year, "month": f"{now.tm_mon:02}",
              "day": f"{now.tm_mday:02}", "hour": f"{now.tm_hour:02}", "minute": f"{now.tm_min:02}",
              "second": f"{now.tm_sec:02}"}
    for name, value in values.items():
        prefix = prefix.replace(f"%{name}%", str(value))
    return prefix


def next_counter(folder: Path, filename: str) -> int:
    """One more than the highest counter among files named `<filename>_<counter>...` in `folder` (ComfyUI's
    rule: the counter is the text between the first two underscores after the name; 1 when there is none)."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return 1
    start = len(filename) + 1
    highest = 0
    for name in names:
        if name[:start] != filename + "_":
            continue
        try:
            highest = max(highest, int(name[start:].split("_")[0]))
        except ValueError:
            continue
    return highest + 1


def _refuse_non_finite(images, node_name: str) -> None:
    import torch

    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise ValueError(f"{node_name}: {bad} of {images.numel()} pixel values are NaN or infinite, so nothing was "
                         "saved. If a VAE Decode made these images it overflowed in half precision: run it in fp32 "
                         "(--dtype fp32); otherwise check the nodes that made them")


def save_images(ctx, images, prefix: str, *, kind: str, compress_level: int, node_name: str) -> Result:
    """Write each image as `<prefix>_<counter:05>_.png` in the `kind` folder (output or temp), with the graph in
    its text chunks (ComfyUI's `prompt` and `workflow`) and the reproducibility manifest (`sdgraph`, see
    nodes/manifest.py); returns the UI entries ComfyUI's front end expects."""
    from . import imaging

    root = _folders(ctx, node_name).root(kind)
    images = imaging.image_batch(images, "images")
    _refuse_non_finite(images, node_name)
    prefix = expand_variables(prefix, images.shape[2], images.shape[1])
    subfolder, filename = split_prefix(prefix)
    folder = _folders(ctx, node_name).inside(kind, subfolder or ".",
                                             what=f"{node_name} input 'filename_prefix' folder")
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{node_name}: filename_prefix {prefix!r} needs the folder {subfolder!r} in "
                                 f"{root}, but a file has that name; choose another prefix")
    texts = imaging.metadata_texts(ctx.prompt, ctx.extra.get("extra_pnginfo"))
    manifest = build_manifest(ctx) if ctx.prompt else None  # no graph, no metadata at all (as ComfyUI)
    counter = next_counter(folder, filename)
    results = []
    for batch_number, image in enumerate(images):
        output = {"node": ctx.node_id, "batch_index": batch_number, "batch_size": len(images)}
        chunks = texts if manifest is None else {**texts, MANIFEST_CHUNK: manifest_text({**manifest, "output": output})}
        data = imaging.png_bytes(imaging.to_uint8(image), chunks, compress_level)
        stem = filename.replace("%batch_num%", str(batch_number))
        while True:  # another run may take a name between our listing and our write: take the next one
            file = f"{stem}_{counter:05}_.png"
            try:
                atomic_write(folder / file, data, exclusive=True)
                break
            except FileExistsError:
                if not os.path.lexists(folder / file):  # not a name clash: a real error
                    raise
                counter = max(counter + 1, next_counter(folder, stem))
        results.append({"filename": file, "subfolder": subfolder, "type": kind})
        counter += 1
    return Result((), {"images": results})


@node("SaveImage", category="image", display_name="Save Image", output_node=True, validate=_check_prefix,
      inputs=[Input("images", "IMAGE", tooltip="the images to save"),
              Input("filename_prefix", STRING, default="ComfyUI",
                    tooltip="file name start, may include a subfolder ('portraits/img') and %width%, %height%, "
                            "%year%, %month%, %day%, %hour%, %minute%, %second%, %batch_num%")],
      outputs=[])
def save_image(ctx, images, filename_prefix):
    """Save images as PNG in output/, carrying the graph (prompt and workflow) so `sdgraph run file.png` redoes it,
    and the manifest (versions, device, dtypes, model hashes, seeds) so `sdgraph replay file.png` checks it."""
    return save_images(ctx, images, filename_prefix, kind="output", compress_level=SAVE_COMPRESS_LEVEL,
                       node_name="SaveImage")


@node("PreviewImage", category="image", display_name="Preview Image", output_node=True,
      inputs=[Input("images", "IMAGE", tooltip="the images to show")], outputs=[])
def preview_image(ctx, images):
    """Save images as PNG in temp/ (fast compression) for a front end to show."""
    suffix = "".join(secrets.choice(string.ascii_lowercase) for _ in range(5))
    return save_images(ctx, images, f"ComfyUI_temp_{suffix}", kind="temp", compress_level=PREVIEW_COMPRESS_LEVEL,
                       node_name="PreviewImage")


NODES = [load_image, load_image_mask, save_image, preview_image]
