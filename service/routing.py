"""One declaration per route: the handler, its body model, its query parameters and its documentation.

`RouteTable.route(...)` registers a handler; `install` serves it at its path and under `/api` (as ComfyUI does),
reading and validating a declared JSON body into its pydantic model before the handler runs; the OpenAPI
document (`openapi.py`) is derived from the same declarations. Every error leaves as ComfyUI's JSON error object.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from .messages import error_body
from .queue import json_text

log = logging.getLogger("sdgraph.server")


class RequestError(Exception):
    """A client error: becomes a JSON error response with `status`."""

    def __init__(self, status: int, kind: str, message: str, *, details: str = "", **more: Any):
        super().__init__(message)
        self.status, self.kind, self.message, self.details, self.more = status, kind, message, details, more

    def response(self) -> web.Response:
        return json_response(error_body(self.kind, self.message, self.details, **self.more), status=self.status)


@dataclass(frozen=True)
class Param:
    """A query parameter (for the documentation; handlers read and check it with `query_int` etc.)."""

    name: str
    type: str = "string"
    description: str = ""
    required: bool = False


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Callable[..., Awaitable[web.StreamResponse]]
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    form: Mapping[str, str] = field(default_factory=dict)  # multipart fields -> description
    query: tuple[Param, ...] = ()
    responses: Mapping[int, str] = field(default_factory=dict)
    error_extra: Mapping[str, Any] = field(default_factory=dict)  # added to every error body (node_errors)
    answer: Mapping[str, Any] | None = None  # JSON schema of the 200 answer (service/answers.py)
    answer_type: str = "application/json"  # media type of the 200 answer


class RouteTable:
    def __init__(self, body_limit: Callable[[web.Request], int]):
        self.routes: list[Route] = []
        self._body_limit = body_limit

    def route(self, method: str, path: str, *, summary: str, tag: str, body: type[BaseModel] | None = None,
              form: Mapping[str, str] | None = None, query: tuple[Param, ...] = (),
              responses: Mapping[int, str] | None = None, error_extra: Mapping[str, Any] | None = None,
              answer: Mapping[str, Any] | None = None, answer_type: str = "application/json"):
        def register(handler):
            self.routes.append(Route(method, path, handler, summary, tag, body, form or {}, query,
                                     responses or {200: "OK"}, error_extra or {}, answer, answer_type))
            return handler
        return register

    def install(self, app: web.Application) -> None:
        for route in self.routes:
            handler = self._wrap(route)
            for prefix in ("", "/api"):
                app.router.add_route(route.method, prefix + route.path, handler, name=None)

    def _wrap(self, route: Route):
        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                if route.body is None:
                    return await route.handler(request)
                raw = await read_json(request, self._body_limit(request))
                return await route.handler(request, parse_body(route.body, raw))
            except RequestError as error:
                if route.error_extra:
                    error.more = {**route.error_extra, **error.more}
                return error.response()
        handle.__name__ = route.handler.__name__
        return handle


async def read_json(request: web.Request, limit: int, *, also: tuple[str, ...] = ()) -> Any:
    """The request's JSON body (an empty body reads as {}), refusing more than `limit` bytes before reading them
    all, NaN/Infinity (not JSON) and nesting too deep to parse. `also`: other content types the body may be
    labelled with (the frontend's settings come as text/plain)."""
    if request.content_length is not None and request.content_length > limit:
        raise RequestError(413, "request_too_large", f"the body is {request.content_length} bytes; this server "
                           f"takes at most {limit} (--max-body-mb)")
    data = bytearray()
    async for chunk in request.content.iter_any():
        data += chunk
        if len(data) > limit:
            raise RequestError(413, "request_too_large", f"the body is more than {limit} bytes, the most this "
                               "server takes (--max-body-mb)")
    if not data.strip():
        return {}
    if request.content_type not in ("application/json", "application/x-www-form-urlencoded", *also):
        raise RequestError(415, "unsupported_media_type", f"{request.path} takes a JSON body; send it with "
                           "Content-Type: application/json")
    try:
        value = json.loads(data, parse_constant=_not_json)
    except RecursionError:
        raise RequestError(400, "invalid_json", "the JSON body is nested too deeply to read") from None
    except ValueError as exc:
        raise RequestError(400, "invalid_json", f"the body is not valid JSON: {exc}") from None
    problem = text_problem(value)
    if problem is not None:
        raise RequestError(400, *problem)
    return value


_SURROGATE = ("holds a lone UTF-16 surrogate (e.g. \\ud800), which is not a Unicode character; send valid UTF-8 "
              "text")
MAX_DEPTH = 100  # JSON nesting a request may have (ComfyUI workflows need about 10)


def text_problem(value: Any, *, max_depth: int = MAX_DEPTH) -> tuple[str, str] | None:
    """Why a parsed JSON value cannot be stored or answered, naming where: a string (or key) holding a lone
    UTF-16 surrogate (JSON's "\\ud800" escape parses into one, and no UTF-8 encoder takes it), or nesting deeper
    than `max_depth`. Walks with its own stack, so any depth json.loads read is safe to check. Returns
    (error type, message) or None."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(value, ())]
    while stack:
        item, where = stack.pop()
        if len(where) > max_depth:
            return "invalid_json", f"{_where(where[:8])}...: the JSON is nested more than {max_depth} levels deep"
        if isinstance(item, str):
            if not _encodable(item):
                return "invalid_text", f"{_where(where)}: the text {_SURROGATE}"
        elif isinstance(item, dict):
            for key, child in item.items():
                if not _encodable(key):
                    return "invalid_text", f"{_where(where)}: a key {_SURROGATE}"
                stack.append((child, (*where, key)))
        elif isinstance(item, list):
            stack.extend((child, (*where, str(index))) for index, child in enumerate(item))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _where(path: tuple[str, ...]) -> str:
    shown = ".".join(path) or "the body"
    return shown if len(shown) <= 200 else shown[:200] + "..."


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value; use a finite number")


def parse_body(model: type[BaseModel], raw: Any) -> BaseModel:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for item in exc.errors()[:20]:
            where = ".".join(str(part) for part in item["loc"]) or "body"
            problems.append(f"{where}: {item['msg']}")
        raise RequestError(400, "invalid_request", "the request body does not fit: " + "; ".join(problems),
                           details="\n".join(problems)) from None


def json_response(value: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(text=json_text(value), status=status, content_type="application/json", headers=headers)


def raw_json(text: str, status: int = 200) -> web.Response:
    """A response from JSON text that is already serialised (queue and history rows)."""
    return web.Response(text=text, status=status, content_type="application/json")


MAX_QUERY_INT = 1 << 62  # SQLite integers are 64-bit


def query_int(request: web.Request, name: str, *, minimum: int = 0) -> int | None:
    text = request.query.get(name)
    if text is None or text == "":
        return None
    try:
        value = int(text[:30])
    except ValueError:
        raise RequestError(400, "invalid_query", f"query parameter {name}={text[:40]!r} must be a whole "
                           "number") from None
    if not minimum <= value <= MAX_QUERY_INT:
        raise RequestError(400, "invalid_query", f"query parameter {name} must be between {minimum} and "
                           f"{MAX_QUERY_INT}, got {text[:40]}")
    return value


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Outermost: aiohttp's own errors (404, 405, 413) and anything unexpected leave as JSON error objects."""
    try:
        return await handler(request)
    except RequestError as error:
        return error.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status, "http_error")
        message = {404: f"there is no route {request.method} {request.path}; see /openapi.json",
                   405: f"{request.path} does not take {request.method}"}.get(exc.status, exc.text or exc.reason)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return json_response(error_body(kind, message), status=exc.status, headers=headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except CONTENT_ERRORS as exc:  # content no check caught: still the client's to fix, and a check to add
        log.exception("a request's content got past the checks in %s %s (answered 400)", request.method,
                      request.path)
        return json_response(error_body("unprocessable_content", f"the server cannot process this request's "
                                        f"content ({type(exc).__name__}); check for text that is not valid "
                                        "Unicode, numbers out of range or very deep nesting"), status=400)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return json_response(error_body("internal_error", "the server failed on this request; its log says why"),
                             status=500)


# What only a request's content (not a bug in the server) raises when it gets past the checks: text that is not
# Unicode, numbers too large for SQLite or floats, nesting too deep for a recursive function.
CONTENT_ERRORS = (UnicodeError, OverflowError, RecursionError)


def install_pack_routes(app: web.Application, environment: Any) -> list[str]:
    """Mount the HTTP routes custom-node packs declared (`PromptServer.instance.routes`, collected by
    comfy_compat) at their path and under `/api`, as ComfyUI does. They sit behind the same middlewares as
    sdgraph's own routes (host, origin and token checks); a route that would take an existing path is left out.
    Returns what was left out, one line each."""
    taken = {(r.method, r.resource.canonical) for r in app.router.routes() if r.resource is not None}
    skipped = []
    for route in getattr(environment, "routes", ()):
        for prefix in ("", "/api"):
            path = prefix + route.path
            if (route.method, path) in taken or (route.method == "STATIC" and ("GET", path) in taken):
                skipped.append(f"{route.pack}: {route.method} {path} is sdgraph's own route; not mounted")
                continue
            try:
                if route.method == "STATIC":
                    app.router.add_static(path, dict(route.options)["directory"], follow_symlinks=False)
                else:
                    app.router.add_route(route.method, path, route.handler)
                taken.add((route.method, path))
            except (ValueError, RuntimeError) as error:
                skipped.append(f"{route.pack}: {route.method} {path}: {error}")
    for line in skipped:
        log.warning("custom node route %s", line)
    return skipped


def pack_message_sender(hub: Any) -> Callable[[Any, Any, str | None], None]:
    """`PromptServer.instance.send_sync(event, data, sid)` of a custom node: a JSON websocket message to that
    client, or to every client when `sid` is None. Binary events (ComfyUI's numbered preview types) are dropped."""
    from .messages import ws_text

    def send(event: Any, data: Any, sid: str | None) -> None:
        if not isinstance(event, str):
            return
        try:
            message = ws_text(event, data)
        except (TypeError, ValueError):  # data that is not JSON
            log.warning("custom node message %r dropped: its data is not JSON", event)
            return
        if sid is None:
            hub.publish_all(message)
        else:
            hub.publish(sid, message)

    return send
