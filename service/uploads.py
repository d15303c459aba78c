"""Files clients send and fetch: /upload/image, /upload/mask and /view.

Every name a client gives is resolved with symlinks followed and must stay inside its folder, by the one
resolver every node uses too (`nodes.folders.Folders.inside`); refusals never echo the server's own paths.
Uploads are size-limited, must decode as an image of a known format, and are checked against a pixel budget
before they are decoded (so a small file that claims 100,000 x 100,000 pixels is refused unread). They are
written under a temporary name, fsynced and renamed (`engine.files.atomic_write`), so a file under its final
name is always complete; the same name with other content becomes `name (1).png`, identical content reuses the
existing file.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from PIL import Image, PngImagePlugin

from engine.files import atomic_write
from nodes.folders import IMAGE_EXTENSIONS, Folders, UnsafePathError

from .routing import RequestError

IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
UPLOAD_TYPES = ("input", "temp")
VIEW_TYPES = ("output", "input", "temp")
MAX_FIELD_BYTES = 64 << 10
MAX_PARTS = 16
PREVIEW_MAX_SIDE = 2048  # ?preview=webp|jpeg images are scaled to fit (a preview of 8000x8000 took 743 MB)
INLINE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
                ".gif": "image/gif", ".bmp": "image/bmp", ".mp4": "video/mp4", ".webm": "video/webm",
                ".txt": "text/plain; charset=utf-8", ".json": "application/json"}


@dataclass(frozen=True)
class UploadForm:
    fields: dict[str, str]
    filename: str
    data: bytes


async def read_form(request: web.Request, *, max_file_bytes: int) -> UploadForm:
    """The multipart form of an upload: text fields and the one file under `image`, each size-limited."""
    if request.content_type != "multipart/form-data":
        raise RequestError(415, "unsupported_media_type", "uploads are multipart/form-data with the file in a field "
                           "named 'image'")
    fields: dict[str, str] = {}
    upload: tuple[str, bytes] | None = None
    try:
        reader = await request.multipart()
        for _ in range(MAX_PARTS + 1):
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise RequestError(400, "invalid_form", "nested multipart bodies are not accepted")
            if part.name == "image" and part.filename is not None:
                upload = (part.filename, await _read_part(part, max_file_bytes, "the image"))
            elif part.name:
                fields[part.name] = (await _read_part(part, MAX_FIELD_BYTES, f"field {part.name!r}")).decode(
                    "utf-8", errors="replace")
        else:
            raise RequestError(400, "invalid_form", f"the form has more than {MAX_PARTS} parts")
    except (HttpProcessingError, ValueError, AssertionError) as exc:  # aiohttp's parser on a malformed body
        raise RequestError(400, "invalid_form", f"the multipart body is malformed: {str(exc)[:120]}") from None
    if upload is None:
        raise RequestError(400, "invalid_form", "the form has no file in a field named 'image'")
    return UploadForm(fields, *upload)


async def _read_part(part: BodyPartReader, limit: int, what: str) -> bytes:
    data = bytearray()
    while chunk := await part.read_chunk(1 << 16):
        data += chunk
        if len(data) > limit:
            raise RequestError(413, "upload_too_large", f"{what} is larger than {limit} bytes, the most this server "
                               "takes (--max-upload-size, in MB)")
    return bytes(data)


def plain_filename(name: str) -> str:
    """An upload's name: one file name with an image extension, no folders (those go in `subfolder`)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # aiohttp keeps undecodable header bytes as surrogates
        raise RequestError(400, "invalid_filename", "the upload's file name is not valid UTF-8; rename the file "
                           "(or have the client send its name in UTF-8)") from None
    if not name or "\0" in name or "/" in name or "\\" in name or name.startswith(".") or len(name.encode()) > 200:
        raise RequestError(400, "invalid_filename", f"upload name {name[:80]!r} must be a plain file name (no "
                           "folders, NUL or leading dot, at most 200 bytes); put folders in the 'subfolder' field")
    if PurePosixPath(name).suffix.lower() not in IMAGE_EXTENSIONS:
        raise RequestError(400, "invalid_filename", f"upload name {name!r} must end in an image extension "
                           f"({', '.join(IMAGE_EXTENSIONS)})")
    return name


def open_image(data: bytes | BinaryIO, max_pixels: int, *, what: str = "the upload",
               fit: int | None = None) -> Image.Image:
    """Decode `data` (bytes, or an open file read as it decodes) as an image of an accepted format within the
    pixel budget (checked before decoding). With `fit`, the image comes scaled down to at most `fit` pixels a
    side; a JPEG is then decoded at a reduced size already (Pillow's draft), so it never takes full-size memory."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
            if image.format not in IMAGE_FORMATS:
                raise RequestError(400, "invalid_image", f"{what} is {image.format or 'an unknown'} image; this "
                                   f"server takes {', '.join(sorted(IMAGE_FORMATS))}")
            width, height = image.size
            frames = getattr(image, "n_frames", 1)
            if width * height * frames > max_pixels:
                raise RequestError(400, "image_too_large", f"{what} is {width}x{height} pixels x {frames} frame(s), "
                                   f"more than this server's budget of {max_pixels} pixels (--max-image-pixels)")
            if fit and image.format == "JPEG":
                image.draft(image.mode, _fitted(image.size, fit))
            image.load()
            if fit:
                image = _scaled_to_fit(image, fit)
    except RequestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RequestError(400, "image_too_large", f"{what} is too large to decode safely: {exc}") from None
    except Exception as exc:  # PIL raises many kinds for broken or hostile files
        raise RequestError(400, "invalid_image", f"{what} does not decode as an image ({type(exc).__name__}: "
                           f"{str(exc)[:120]})") from None
    return image


def _fitted(size: tuple[int, int], fit: int) -> tuple[int, int]:
    scale = min(1.0, fit / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _scaled_to_fit(image: Image.Image, fit: int) -> Image.Image:
    """`image` reduced by a whole factor (box filter) to at most `fit` pixels a side, a band of rows at a time:
    Pillow's reduce of an image with alpha would first make a premultiplied full-size copy."""
    factor = -(-max(image.size) // fit)
    if factor <= 1:
        return image
    mode = image.mode if image.mode in ("L", "LA", "RGB", "RGBA", "I", "F") else \
        "RGBA" if "transparency" in image.info or "A" in image.getbands() else "RGB"
    width, height = image.size
    scaled = Image.new(mode, (-(-width // factor), -(-height // factor)))
    rows = factor * max(1, (1 << 22) // (width * factor))  # about 4 M pixels a band, a whole number of blocks
    for top in range(0, height, rows):
        band = image.crop((0, top, width, min(height, top + rows)))
        scaled.paste((band if band.mode == mode else band.convert(mode)).reduce(factor), (0, top // factor))
    return scaled


def _inside(folders: Folders, kind: str, name: str, what: str) -> Path:
    try:
        return folders.inside(kind, name, what=what)
    except UnsafePathError:
        raise RequestError(400, "unsafe_path", f"{what} {name[:120]!r} is not a path inside the {kind} folder "
                           "(absolute paths, '..', NUL bytes and symlinks pointing out are refused)") from None


def _check_type(kind: str, allowed: tuple[str, ...]) -> None:
    if kind not in allowed:
        raise RequestError(400, "invalid_type", f"type {kind[:40]!r} is not one of {', '.join(allowed)}")


def _target(folders: Folders, subfolder: str, name: str, kind: str) -> Path:
    if subfolder:
        _inside(folders, kind, subfolder, "subfolder")
        return _inside(folders, kind, f"{subfolder.rstrip('/')}/{name}", "file")
    return _inside(folders, kind, name, "file")


def store_upload(folders: Folders, data: bytes, *, filename: str, subfolder: str, kind: str,
                 overwrite: bool) -> dict[str, str]:
    """Write an upload; answer ComfyUI's {name, subfolder, type}."""
    _check_type(kind, UPLOAD_TYPES)
    name = plain_filename(filename)
    stem, ext = os.path.splitext(name)
    for index in range(10000):
        candidate = name if index == 0 else f"{stem} ({index}){ext}"
        path = _target(folders, subfolder, candidate, kind)
        if overwrite and index == 0:
            atomic_write(path, data)
            return {"name": candidate, "subfolder": subfolder, "type": kind}
        if path.exists():
            if path.is_file() and _same_content(path, data):
                return {"name": candidate, "subfolder": subfolder, "type": kind}
            continue
        try:
            atomic_write(path, data, exclusive=True)
        except FileExistsError:  # another upload took this name in the meantime: look at it again
            if _same_content(path, data):
                return {"name": candidate, "subfolder": subfolder, "type": kind}
            continue
        return {"name": candidate, "subfolder": subfolder, "type": kind}
    raise RequestError(409, "name_exhausted", f"{name!r} and 10000 numbered variants exist; choose another name")


def _same_content(path: Path, data: bytes) -> bool:
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def apply_mask(folders: Folders, original_ref: str, mask: bytes, max_pixels: int) -> bytes:
    """ComfyUI's mask upload: the referenced image with the uploaded image's alpha channel, as PNG (text chunks
    such as the embedded workflow are kept)."""
    try:
        ref = json.loads(original_ref)
    except ValueError:
        ref = None
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str):
        raise RequestError(400, "invalid_form", "original_ref must be JSON like {\"filename\": \"x.png\", "
                           "\"subfolder\": \"\", \"type\": \"input\"}")
    path = resolve_view(folders, ref["filename"], str(ref.get("subfolder") or ""), str(ref.get("type") or "input"))
    original = open_image(path.read_bytes(), max_pixels, what="the original image")
    alpha_source = open_image(mask, max_pixels, what="the mask").convert("RGBA")
    if alpha_source.size != original.size:
        raise RequestError(400, "invalid_image", f"the mask is {alpha_source.size[0]}x{alpha_source.size[1]} but "
                           f"the image is {original.size[0]}x{original.size[1]}; they must match")
    info = PngImagePlugin.PngInfo()
    for key, value in (getattr(original, "text", None) or {}).items():
        info.add_text(key, value)
    combined = original.convert("RGBA")
    combined.putalpha(alpha_source.getchannel("A"))
    buffer = io.BytesIO()
    combined.save(buffer, format="PNG", pnginfo=info, compress_level=4)
    return buffer.getvalue()


def resolve_view(folders: Folders, filename: str, subfolder: str, kind: str) -> Path:
    """The file /view serves. `filename` may carry ComfyUI's annotation, `name.png [output]`."""
    for annotated in VIEW_TYPES:
        if filename.endswith(f" [{annotated}]"):
            filename, kind = filename[: -len(annotated) - 3], annotated
    _check_type(kind, VIEW_TYPES)
    path = _target(folders, subfolder, filename, kind)
    if not path.is_file():
        raise RequestError(404, "not_found", f"there is no file {filename[:120]!r} in {kind}/{subfolder[:120]}")
    return path


def view_variant(path: Path, *, channel: str | None, preview: str | None, max_pixels: int) -> tuple[bytes, str]:
    """ComfyUI's /view options: channel=rgb|a (drop or keep only alpha), preview=webp;90 or jpeg;90. Previews are
    scaled down to at most PREVIEW_MAX_SIDE pixels a side (ComfyUI sends them at full size)."""
    with open(path, "rb") as file:
        image = open_image(file, max_pixels, what="the file", fit=PREVIEW_MAX_SIDE if preview else None)
    buffer = io.BytesIO()
    if preview:
        fmt, _, quality = preview.partition(";")
        fmt = fmt.lower() if fmt.lower() in ("webp", "jpeg") and channel != "a" else "webp"
        if fmt == "jpeg" or channel == "rgb":
            image = image.convert("RGB")
        image.save(buffer, format=fmt.upper(), quality=int(quality) if quality.isdigit() else 90)
        return buffer.getvalue(), f"image/{fmt}"
    if channel == "rgb":
        image.convert("RGB").save(buffer, format="PNG")
    elif channel == "a":
        alpha = image.getchannel("A") if "A" in image.getbands() else Image.new("L", image.size, 255)
        shown = Image.new("RGBA", image.size)
        shown.putalpha(alpha)
        shown.save(buffer, format="PNG")
    else:
        raise RequestError(400, "invalid_query", f"channel={channel!r}: use rgba, rgb or a")
    return buffer.getvalue(), "image/png"


def file_headers(path: Path) -> dict[str, Any]:
    """Content type from a short list (anything else downloads as bytes), never sniffed, never run as a page."""
    content_type = INLINE_TYPES.get(path.suffix.lower())
    safe_name = "".join(c if c.isprintable() and c not in '"\\' else "_" for c in path.name)
    disposition = "inline" if content_type else "attachment"
    return {"Content-Type": content_type or "application/octet-stream",
            "Content-Disposition": f'{disposition}; filename="{safe_name}"',
            "Content-Security-Policy": "default-src 'none'; sandbox", "X-Content-Type-Options": "nosniff"}
