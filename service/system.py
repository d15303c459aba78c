"""What /system_stats, /features, /models and /embeddings report. Nothing here imports torch: device details
are read from torch only when a node has already loaded it."""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import PurePosixPath
from typing import Any

from nodes.folders import MODEL_KINDS, Folders

from .config import ServerConfig


def version() -> str:
    try:
        return importlib.metadata.version("sdgraph")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _memory() -> tuple[int, int]:
    """(total, available) bytes of RAM."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = os.sysconf("SC_PHYS_PAGES") * page
    free = os.sysconf("SC_AVPHYS_PAGES") * page
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return total, free


def _devices(configured: str | None) -> list[dict[str, Any]]:
    torch = sys.modules.get("torch")  # only if a node has loaded it already
    if torch is not None and torch.cuda.is_available():
        devices = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            devices.append({"name": torch.cuda.get_device_name(index), "type": "cuda", "index": index,
                            "vram_total": total, "vram_free": free, "torch_vram_total": total,
                            "torch_vram_free": free})
        return devices
    total, free = _memory()
    name = configured or "cpu"
    return [{"name": name, "type": name.split(":")[0], "index": None, "vram_total": total, "vram_free": free,
             "torch_vram_total": 0, "torch_vram_free": 0}]


def redact(argv: list[str], secret: str | None) -> list[str]:
    """argv without the token (`--token T`, `--token=T`)."""
    if not secret:
        return list(argv)
    return [arg.replace(secret, "<token>") for arg in argv]


def system_stats(config: ServerConfig, server: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's {system, devices}, and under "sdgraph" this server's own counters (`server`)."""
    total, free = _memory()
    return {
        "system": {"os": os.name, "ram_total": total, "ram_free": free, "comfyui_version": f"sdgraph {version()}",
                   "python_version": sys.version, "pytorch_version": _torch_version(), "embedded_python": False,
                   "argv": redact(sys.argv, config.token)},
        "devices": _devices(config.device),
        "sdgraph": server,
    }


def features(config: ServerConfig) -> dict[str, Any]:
    limits = config.limits
    return {"supports_preview_metadata": True, "max_upload_size": limits.max_upload_bytes,
            "sdgraph": {"version": version(), "max_queue": limits.max_queue,
                        "max_image_megapixels": limits.sizes.image_pixels / (1 << 20),
                        "max_batch_megapixels": limits.sizes.batch_pixels / (1 << 20),
                        "max_image_pixels": limits.max_image_pixels, "max_nodes": limits.max_nodes,
                        "max_body_bytes": limits.max_body_bytes, "token_required": config.token is not None,
                        "versioned_routes": ["/v1/history/{prompt_id}", "/v1/prompts/{prompt_id}",
                                             "/v1/node_load_errors"]}}


def model_folders() -> list[str]:
    return list(MODEL_KINDS)


def models_in(folders: Folders, kind: str) -> list[str] | None:
    return folders.list_models(kind) if kind in MODEL_KINDS else None


def embeddings(folders: Folders) -> list[str]:
    return [str(PurePosixPath(name).with_suffix("")) for name in folders.list_models("embeddings")]
