"""What the server was told: addresses, the token, the folders, and every bound it enforces."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from engine.diskcache import DiskCache
from engine.sizes import DEFAULT_SIZE_LIMITS, SizeLimits

from .scale_options import ScaleOut

MIB = 1 << 20
PREVIEW_METHODS = ("latent2rgb", "taesd", "none")


@dataclass(frozen=True)
class Limits:
    """Bounds on what clients can make the server hold or compute. Each is a flag of `sdgraph serve`."""

    max_queue: int = 1000  # pending prompts; POST /prompt answers 429 beyond
    max_history: int = 10000  # finished prompts kept (oldest dropped first)
    max_attempts: int = 3  # starts of one prompt before a crash-looping prompt is marked failed
    max_body_bytes: int = 16 * MIB  # JSON request bodies (a prompt with its workflow)
    max_nodes: int = 10000  # nodes in one prompt
    max_upload_bytes: int = 100 * MIB  # one uploaded image
    max_image_pixels: int = 8192 * 8192  # width x height x frames of an uploaded or viewed image
    sizes: SizeLimits = DEFAULT_SIZE_LIMITS  # every image/latent/mask a graph makes (--max-image-megapixels, ...)
    max_ws_clients: int = 512  # websocket connections at once
    ws_outbox: int = 4096  # messages waiting for one websocket client before it is dropped as too slow


@dataclass(frozen=True)
class ServerConfig:
    base_dir: Path
    database: Path
    listen: tuple[str, ...] = ("127.0.0.1",)
    port: int = 8188
    token: str | None = None
    allowed_origins: frozenset[str] = frozenset()
    allowed_hosts: frozenset[str] = frozenset()
    nodes_dirs: tuple[Path, ...] = ()
    device: str | None = None
    dtype: str | None = None
    allow_pickle: bool = False
    shutdown_timeout: float = 30.0
    prompt_timeout: float | None = 3600.0  # seconds one prompt may run; None: no limit
    stuck_grace: float = 60.0  # after the limit, how long a node that ignores interruption has before the exit
    limits: Limits = field(default_factory=Limits)
    front_end_root: Path | None = None  # the web frontend's build (None: not installed; / answers JSON)
    preview_method: str = "latent2rgb"  # live previews while sampling: none, latent2rgb or taesd
    disk_cache: DiskCache | None = None  # node outputs kept across runs, shared with `sdgraph run` (--cache-dir)
    scale_out: ScaleOut | None = None  # --ray: prompts run on Ray worker actors (service/ray_pool.py)

    @property
    def pack_dirs(self) -> list[Path]:
        return [self.base_dir / "custom_nodes", *self.nodes_dirs]
