"""The OpenAPI 3.1 document, derived from the route table: paths, query parameters, JSON bodies (from their
pydantic models), multipart forms and responses. Served at /openapi.json."""

from __future__ import annotations

import re
from typing import Any

from .routing import Route

_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "object", "properties": {
        "type": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "string"},
        "extra_info": {"type": "object"}}, "required": ["type", "message", "details", "extra_info"]},
        "node_errors": {"type": "object", "description": "POST /prompt only: node id -> {errors, "
                        "dependent_outputs, class_type}"}},
    "required": ["error"],
}


def build(routes: list[Route], *, version: str, token: bool) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    schemas: dict[str, Any] = {"Error": _ERROR}
    for route in routes:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": f"{route.method.lower()}_{route.handler.__name__.strip('_')}",
            "tags": [route.tag],
            "parameters": _parameters(route),
            "responses": _responses(route),
        }
        if route.body is not None:
            schema = route.body.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[route.body.__name__] = schema
            operation["requestBody"] = {"required": False, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{route.body.__name__}"}}}}
        if route.form:
            properties = {name: ({"type": "string", "format": "binary", "description": text} if name == "image"
                                 else {"type": "string", "description": text}) for name, text in route.form.items()}
            operation["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "properties": properties, "required": ["image"]}}}}
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "sdgraph server", "version": version, "description": (
            "ComfyUI-compatible HTTP API of sdgraph. Every path is also served under /api (e.g. /api/prompt). "
            "Websocket: GET /ws?clientId=ID streams status and the events of the prompts queued with that "
            "client_id.")},
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if token:
        document["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "query": {"type": "apiKey", "in": "query", "name": "token"}}
        document["security"] = [{"bearer": []}, {"query": []}]
    return document


def _parameters(route: Route) -> list[dict[str, Any]]:
    params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
              for name in re.findall(r"{(\w+)}", route.path)]
    params += [{"name": p.name, "in": "query", "required": p.required, "description": p.description,
                "schema": {"type": p.type}} for p in route.query]
    return params


def _responses(route: Route) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    for status, text in route.responses.items():
        entry: dict[str, Any] = {"description": text}
        if status >= 400:
            entry["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        elif status == 200:
            entry["content"] = {route.answer_type: {"schema": dict(route.answer or {})}}
        responses[str(status)] = entry
    for status, text in _implied_errors(route):
        responses.setdefault(str(status), {"description": text, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}})
    return responses


def _implied_errors(route: Route) -> list[tuple[int, str]]:
    """The errors the middleware and the request readers give on any route of this kind."""
    implied = [(403, "refused by the Host or Origin check"), (401, "token missing or wrong")]
    if route.body is not None or route.form:
        implied += [(400, "invalid body (the error names the field)"), (413, "body too large"),
                    (415, "not JSON (or, for uploads, not a multipart form)")]
    if route.query or "{" in route.path:
        implied.append((400, "invalid query or path parameter"))
    return implied
