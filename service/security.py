"""Who may talk to the server: one middleware checks, in order, Host, token, Origin and content type.

- Host allow-list: a page that rebinds its own domain name to 127.0.0.1 (DNS rebinding) still sends its own
  name as Host, so only loopback names and addresses, the addresses the server listens on, and --allowed-hosts
  pass. (A Host that is an IP address cannot be a rebinding, since the page's origin is then that address.)
- Token: when one is set, every route needs `Authorization: Bearer T` or `?token=T` (browsers cannot set
  headers on <img> or websockets), compared in constant time. A non-loopback bind refuses to start without one.
- Origin: state-changing methods and the websocket handshake from a browser page of another origin, or from
  `Origin: null` (sandboxed frames, file: pages), are refused unless --allowed-origins names that origin. A
  browser request without Origin but with `Sec-Fetch-Site: cross-site` or `same-site` (another port or
  subdomain, which the Origin rules refuse too) is refused the same way; `same-origin` and `none` (typed in the
  address bar, a bookmark) pass.
- Content type: a state-changing request with a body must be JSON or multipart (a plain-text form post, which
  browsers send cross-site without asking, is refused before any handler reads it). A JSON body labelled as a
  urlencoded form is read as JSON: that is what Python's urllib sends, and no browser form can produce it.
  The web frontend posts settings and saved workflows as `text/plain` (fetch's label for a string body): that
  is taken only from a page of this very origin (a matching Origin, or `Sec-Fetch-Site: same-origin`), never
  from a request that does not say where it comes from.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from aiohttp import web

from .messages import error_body
from .routing import json_response

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
OTHER_SITES = frozenset({"cross-site", "same-site"})  # Sec-Fetch-Site values of a page of another origin
# application/x-www-form-urlencoded: what urllib labels any body (ComfyUI's own example client posts its JSON so);
# the body must still parse as JSON, which a browser form cannot produce in that encoding ({ and " are escaped).
BODY_TYPES = frozenset({"application/json", "multipart/form-data", "application/x-www-form-urlencoded"})
SAME_ORIGIN_BODY_TYPES = frozenset({"text/plain", "application/octet-stream"})  # only from this origin's pages
WILDCARDS = frozenset({"0.0.0.0", "::", ""})
TOKEN_ENV = "SDGRAPH_TOKEN"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_problem(listen: Iterable[str], token: str | None) -> str | None:
    """Why the server must not start with these addresses, or None."""
    exposed = [host for host in listen if not is_loopback(host)]
    if exposed and not token:
        return (f"refusing to listen on {', '.join(exposed) or 'all interfaces'} without a token: anyone who can "
                f"reach that address could run graphs and read files. Give --token T (or set {TOKEN_ENV}), or "
                "listen on 127.0.0.1 only")
    if token is not None and len(token) < 16:
        return "the token is too short: use at least 16 random characters (e.g. `openssl rand -hex 16`)"
    return None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def host_name(header: str) -> str | None:
    """The name part of a Host header, lower-cased, without port or IPv6 brackets; None when malformed."""
    try:
        parts = urlsplit("//" + header)
        name = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return None
    return name or None


def normalise_origin(origin: str) -> str | None:
    """scheme://host:port with the default port made explicit; None when it is not an http(s) origin."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    port = port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


class Guard:
    def __init__(self, *, listen: Iterable[str], token: str | None, allowed_hosts: Iterable[str] = (),
                 allowed_origins: Iterable[str] = ()):
        self.token = token
        self.listen = tuple(listen)
        self.allowed_hosts = {h.lower().strip("[]") for h in allowed_hosts}
        self.allowed_origins = {o for o in (normalise_origin(x) for x in allowed_origins) if o}
        self.wildcard = any(h in WILDCARDS for h in self.listen)
        if self.wildcard:
            self.allowed_hosts |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        for host in self.listen:
            if host not in WILDCARDS:
                self.allowed_hosts.add(host.lower().strip("[]"))

    def host_ok(self, header: str | None) -> bool:
        name = host_name(header) if header else None
        if name is None:
            return False
        if name == "localhost" or name in self.allowed_hosts:
            return True
        address = _ip(name)
        return address is not None and (address.is_loopback or self.wildcard)

    def origin_ok(self, origin: str, host_header: str, scheme: str) -> bool:
        normal = normalise_origin(origin)
        if normal is None:  # "null", or not an http(s) origin
            return False
        if normal in self.allowed_origins:
            return True
        return normal == normalise_origin(f"{scheme}://{host_header}")

    def token_ok(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        given = ""
        header = request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            given = header[7:].strip()
        elif "token" in request.query:
            given = request.query["token"]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def cors_origin(self, request: web.Request) -> str | None:
        origin = request.headers.get("Origin")
        return origin if origin and normalise_origin(origin) in self.allowed_origins else None


def _refuse(status: int, kind: str, message: str, **headers: str) -> web.Response:
    return json_response(error_body(kind, message), status=status, headers=headers or None)


def middleware(guard: Guard) -> Callable:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if not guard.host_ok(host):
            return _refuse(403, "forbidden_host", f"Host {host!r} is not one this server answers to (DNS "
                           "rebinding protection); use http://127.0.0.1:<port>, or start the server with "
                           "--allowed-hosts NAME")
        origin = request.headers.get("Origin")
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        changes = request.method in STATE_CHANGING or request.method == "OPTIONS" or upgrade
        if changes and origin is not None and not guard.origin_ok(origin, host or "", request.scheme):
            return _refuse(403, "forbidden_origin", f"requests from the page origin {origin!r} may not change "
                           "anything here (cross-site protection); start the server with --allowed-origins "
                           f"{origin if origin != 'null' else 'URL'} to allow a front end served from there")
        site = request.headers.get("Sec-Fetch-Site", "").strip().lower()
        if changes and origin is None and site in OTHER_SITES:
            return _refuse(403, "forbidden_origin", f"a browser page of another origin (Sec-Fetch-Site: {site}) may "
                           "not change anything here (cross-site protection); a front end served from another "
                           "origin must send its Origin and be named with --allowed-origins")
        if request.method == "OPTIONS":
            return _cors(web.Response(status=204), guard.cors_origin(request), preflight=True)
        if not guard.token_ok(request):
            return _refuse(401, "unauthorized", "this server needs its token: send the header 'Authorization: "
                           "Bearer <token>' (or add ?token=<token> to /ws and /view URLs)",
                           **{"WWW-Authenticate": 'Bearer realm="sdgraph"'})
        same_origin = origin is not None or site == "same-origin"  # (another origin was refused above)
        same_origin = same_origin and request.content_type in SAME_ORIGIN_BODY_TYPES
        if request.method in STATE_CHANGING and request.body_exists and request.content_type not in BODY_TYPES \
                and not same_origin:
            return _refuse(415, "unsupported_media_type", f"{request.method} {request.path} takes a JSON body "
                           "(Content-Type: application/json) or a multipart form (uploads), not "
                           f"{request.content_type!r} (text/plain only from this server's own pages)")
        response = await handler(request)
        if not response.prepared:
            response.headers.setdefault("X-Content-Type-Options", "nosniff")
            response.headers.setdefault("Referrer-Policy", "no-referrer")
            _cors(response, guard.cors_origin(request), preflight=False)
        return response

    return check


def _cors(response: web.StreamResponse, origin: str | None, *, preflight: bool) -> web.StreamResponse:
    if origin is None:
        return response
    response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Vary"] = "Origin"
    if preflight:
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Content-Type, Authorization"
        response.headers["Access-Control-Max-Age"] = "600"
    return response
