"""`server`: `PromptServer.instance` as packs use it. Routes a pack declares (`routes.get(...)`,
`app.add_routes(...)`) are collected on the environment (`env.routes`, each with its pack) for sdgraph's server
to mount under its own security rules; `send_sync`/`send` go to the environment's message listeners (the
server's websocket hub)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from . import ShimModule


class BinaryEventTypes:
    PREVIEW_IMAGE = 1
    UNENCODED_PREVIEW_IMAGE = 2
    TEXT = 3
    PREVIEW_IMAGE_WITH_METADATA = 4


def build(env: Any, name: str) -> ShimModule:
    from ..environment import PackRoute

    class RouteTable:
        """aiohttp's RouteTableDef, recording each route with the pack that declared it."""

        def route(self, method: str, path: str, **options: Any) -> Callable[[Callable], Callable]:
            def record(handler: Callable) -> Callable:
                env.routes.append(PackRoute(env.current_pack, method.upper(), path, handler,
                                            tuple(sorted(options.items()))))
                return handler
            return record

        def get(self, path: str, **options: Any) -> Callable[[Callable], Callable]:
            return self.route("GET", path, **options)

        def post(self, path: str, **options: Any) -> Callable[[Callable], Callable]:
            return self.route("POST", path, **options)

        def put(self, path: str, **options: Any) -> Callable[[Callable], Callable]:
            return self.route("PUT", path, **options)

        def patch(self, path: str, **options: Any) -> Callable[[Callable], Callable]:
            return self.route("PATCH", path, **options)

        def delete(self, path: str, **options: Any) -> Callable[[Callable], Callable]:
            return self.route("DELETE", path, **options)

        def static(self, prefix: str, path: Any, **options: Any) -> None:
            env.routes.append(PackRoute(env.current_pack, "STATIC", prefix, None, (("directory", str(path)),)))

    class Router:
        frozen = False

    class App:
        """`app.add_routes([...])` with aiohttp route definitions: recorded like `routes`."""

        router = Router()

        def add_routes(self, definitions: Iterable[Any]) -> None:
            for definition in definitions:
                directory = getattr(definition, "path", None)
                if getattr(definition, "prefix", None) is not None and directory is not None:
                    env.routes.append(PackRoute(env.current_pack, "STATIC", definition.prefix, None,
                                                (("directory", str(directory)),)))
                elif getattr(definition, "handler", None) is not None:
                    env.routes.append(PackRoute(env.current_pack, definition.method.upper(), definition.path,
                                                definition.handler))

    class PromptServer:
        instance: PromptServer

        def __init__(self) -> None:
            self.routes = RouteTable()
            self.app = App()
            self.client_id: str | None = None
            self.last_node_id: str | None = None
            self.last_prompt_id: str | None = None
            self.supports: set[str] = {"custom_nodes_from_web"}

        def send_sync(self, event: Any, data: Any, sid: str | None = None) -> None:
            env.send(event, data, sid)

        async def send(self, event: Any, data: Any, sid: str | None = None) -> None:
            env.send(event, data, sid)

        def send_progress_text(self, text: str, node_id: str | None, sid: str | None = None) -> None:
            env.send("progress_text", {"text": text, "node_id": node_id}, sid)

    PromptServer.instance = PromptServer()
    PromptServer.__module__ = name
    # Packs locate "ComfyUI's folder" from this module's file (inspect.getfile(PromptServer)) and may make folders
    # there (web/extensions/...): point it inside the user's base folder, never into sdgraph's sources.
    home = env.run_folders().base / "user" / "comfy_compat"
    return ShimModule(name, {"PromptServer": PromptServer, "BinaryEventTypes": BinaryEventTypes,
                             "__file__": str(home / "server.py")})
