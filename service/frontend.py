"""Where the web frontend's files come from: the installed `comfyui-frontend-package` (or `--front-end-root DIR`),
sdgraph's own extension (service/web/: the default workflow), and each custom node pack's WEB_DIRECTORY, served
under `/extensions/<pack>/` as ComfyUI does."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

OWN_EXTENSION = "sdgraph"  # our extension's name under /extensions/
OWN_WEB = Path(__file__).resolve().parent / "web"


def installed_root() -> Path | None:
    """The static folder of the installed comfyui-frontend-package, or None when it is not installed."""
    try:
        import comfyui_frontend_package
    except ImportError:
        return None
    root = Path(next(iter(comfyui_frontend_package.__path__))) / "static"
    return root if (root / "index.html").is_file() else None


def installed_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("comfyui-frontend-package")
    except Exception:
        return None


def check_root(root: Path) -> Path:
    """A --front-end-root folder must hold the frontend's index.html; ValueError naming the flag otherwise."""
    if not (root / "index.html").is_file():
        raise ValueError(f"--front-end-root {root}: there is no index.html in that folder; give the folder of a "
                         "frontend build (its dist/), or leave the flag out to serve the installed "
                         "comfyui-frontend-package")
    return root.absolute()


@dataclass(frozen=True)
class FrontEnd:
    """The frontend build (None: not installed, `/` answers JSON) and the extension folders by name."""

    root: Path | None
    web_directories: Mapping[str, Path] = field(default_factory=dict)

    def extension_dirs(self) -> dict[str, Path]:
        return {OWN_EXTENSION: OWN_WEB, **{name: Path(p) for name, p in self.web_directories.items()
                                           if name != OWN_EXTENSION and Path(p).is_dir()}}

    def extension_urls(self) -> list[str]:
        """GET /extensions: the URL of every extension script, as ComfyUI lists them (core ones of the build,
        then each pack's .js files)."""
        urls = []
        if self.root is not None and (self.root / "extensions").is_dir():
            core = sorted((self.root / "extensions").rglob("*.js"))
            urls += ["/" + p.relative_to(self.root).as_posix() for p in core]
        for name, folder in self.extension_dirs().items():
            urls += [f"/extensions/{name}/{p.relative_to(folder).as_posix()}" for p in sorted(folder.rglob("*.js"))]
        return urls
