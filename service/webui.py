"""The routes the web frontend calls besides the API the CLI's clients use (server.py): its files at `/`, the
extension scripts, users, settings, userdata, templates, jobs, model folders. Each answers as ComfyUI's does;
every one is served at its path and under `/api`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from engine.schema import object_info
from nodes.folders import MODEL_EXTENSIONS, MODEL_KINDS

from . import jobs
from .core import Service
from .frontend import FrontEnd
from .routing import RequestError, json_response, query_int, raw_json, read_json
from .templates import DEFAULT_GRAPH, TEMPLATE_PREFIX, Templates
from .userdata import DEFAULT_USER, UserDataError, UserStore

GRAPHS = Path(__file__).resolve().parents[1] / "graphs"


@dataclass
class WebUI:
    service: Service
    frontend: FrontEnd
    templates: Templates
    users: UserStore


WEBUI = web.AppKey("webui", WebUI)


def _ui(request: web.Request) -> WebUI:
    return request.app[WEBUI]


def _flag(request: web.Request, name: str, default: bool) -> bool:
    text = request.query.get(name)
    return default if text is None else text.lower() in ("true", "1", "yes")


async def _call(request: web.Request, fn, *args, **kwargs) -> Any:
    """Run a file operation of the user store off the loop; its refusals become JSON errors."""
    try:
        return await _ui(request).service.call(fn, *args, **kwargs)
    except UserDataError as exc:
        kind = {400: "invalid_path", 404: "not_found", 409: "exists"}.get(exc.status, "invalid_request")
        raise RequestError(exc.status, kind, str(exc)) from None


# -- the page and its extensions ----------------------------------------------------------------------------
async def get_index(request: web.Request) -> web.StreamResponse:
    root = _ui(request).frontend.root
    return web.FileResponse(root / "index.html", headers={"Cache-Control": "no-cache"})


async def get_extensions(request: web.Request) -> web.Response:
    return json_response(_ui(request).frontend.extension_urls())


async def get_i18n(request: web.Request) -> web.Response:
    return json_response({})  # no node pack here ships translations


async def get_default_workflow(request: web.Request) -> web.Response:
    return await _workflow_answer(request, DEFAULT_GRAPH)


async def _workflow_answer(request: web.Request, name: str) -> web.Response:
    ui = _ui(request)
    infos = await ui.service.call(object_info, ui.service.registry, ui.service.runtime)
    workflow = await ui.service.call(ui.templates.workflow, name, infos)
    if workflow is None:
        raise RequestError(404, "not_found", f"there is no graph {name!r} in graphs/")
    return json_response(workflow)


async def get_user_css(request: web.Request) -> web.StreamResponse:
    """The user's own stylesheet (user/default/user.css, empty to start with), which index.html links."""
    path = await _call(request, _ui(request).users.read, "user.css")
    return web.FileResponse(path, headers={"Content-Type": "text/css", "Cache-Control": "no-cache"})


# -- users and settings -------------------------------------------------------------------------------------
async def get_users(request: web.Request) -> web.Response:
    return json_response({"storage": "server", "migrated": True})  # single-user mode, as ComfyUI's default


async def get_settings(request: web.Request) -> web.Response:
    ui = _ui(request)
    return json_response(await _call(request, ui.users.settings))


async def get_setting(request: web.Request) -> web.Response:
    ui = _ui(request)
    settings = await _call(request, ui.users.settings)
    return json_response(settings.get(request.match_info["id"]))


async def post_settings(request: web.Request) -> web.Response:
    body = await _settings_body(request)
    if not isinstance(body, dict):
        raise RequestError(400, "invalid_request", "POST /settings takes a JSON object of setting id -> value")
    await _call(request, _ui(request).users.update_settings, body)
    return web.Response(status=200)


async def post_setting(request: web.Request) -> web.Response:
    body = await _settings_body(request)
    await _call(request, _ui(request).users.update_settings, {request.match_info["id"]: body})
    return web.Response(status=200)


async def _settings_body(request: web.Request) -> Any:
    """The frontend posts settings as JSON labelled text/plain (the security middleware lets that through for
    same-origin pages only)."""
    limit = _ui(request).service.limits.max_body_bytes
    return await read_json(request, limit, also=("text/plain",))


# -- userdata -----------------------------------------------------------------------------------------------
async def get_userdata_list(request: web.Request) -> web.Response:
    directory = request.query.get("dir")
    if not directory:
        raise RequestError(400, "invalid_query", "GET /userdata needs ?dir=FOLDER (e.g. workflows)")
    found = await _call(request, _ui(request).users.listing, directory, recurse=_flag(request, "recurse", False),
                        full_info=_flag(request, "full_info", False), split=_flag(request, "split", False))
    return json_response(found)


async def get_userdata(request: web.Request) -> web.StreamResponse:
    path = await _call(request, _ui(request).users.read, request.match_info["file"])
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


async def post_userdata(request: web.Request) -> web.Response:
    ui, name = _ui(request), request.match_info["file"]
    limit = ui.service.limits.max_upload_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RequestError(413, "request_too_large", f"userdata files may be at most {limit} bytes "
                           "(--max-upload-size)")
    data = await request.content.read(limit + 1)
    if len(data) > limit:
        raise RequestError(413, "request_too_large", f"userdata files may be at most {limit} bytes "
                           "(--max-upload-size)")
    path = await _call(request, ui.users.write, name, data, overwrite=_flag(request, "overwrite", True))
    return _written(request, ui.users, path)


async def delete_userdata(request: web.Request) -> web.Response:
    await _call(request, _ui(request).users.delete, request.match_info["file"])
    return web.Response(status=204)


async def post_userdata_move(request: web.Request) -> web.Response:
    ui = _ui(request)
    path = await _call(request, ui.users.move, request.match_info["file"], request.match_info["dest"],
                       overwrite=_flag(request, "overwrite", True))
    return _written(request, ui.users, path)


def _written(request: web.Request, users: UserStore, path: Path) -> web.Response:
    relative = users.relative(path, DEFAULT_USER)
    if _flag(request, "full_info", False):
        return json_response(users.info(path, relative))
    return json_response(relative)


# -- templates, subgraphs -----------------------------------------------------------------------------------
async def get_workflow_templates(request: web.Request) -> web.Response:
    return json_response({})  # custom node packs' example workflows: none yet; ours are in /templates/index.json


async def get_template_file(request: web.Request) -> web.StreamResponse:
    ui, name = _ui(request), request.match_info["name"]
    if name.startswith("index") and name.endswith(".json"):
        return json_response(await ui.service.call(ui.templates.index, name))
    if name.startswith(TEMPLATE_PREFIX) and name.endswith(".json"):
        return await _workflow_answer(request, name[len(TEMPLATE_PREFIX):-len(".json")])
    picture = await ui.service.call(ui.templates.thumbnail, name)
    if picture is not None:
        return web.Response(body=picture, content_type="image/png")
    path = await ui.service.call(ui.templates.asset, name)
    if path is None:
        raise RequestError(404, "not_found", f"there is no template file {name[:100]!r}")
    return web.FileResponse(path)


async def get_global_subgraphs(request: web.Request) -> web.Response:
    return json_response({})


# -- jobs -----------------------------------------------------------------------------------------------------
async def _queue_and_history(request: web.Request) -> tuple[dict, dict]:
    store = _ui(request).service.store
    svc = _ui(request).service
    return json.loads(await svc.call(store.queue_json)), json.loads(await svc.call(store.history_json))


async def get_jobs(request: web.Request) -> web.Response:
    queue, history = await _queue_and_history(request)
    statuses = [s for s in request.query.get("status", "").split(",") if s]
    try:
        answer = jobs.page(jobs.all_jobs(queue, history), statuses, limit=query_int(request, "limit"),
                           offset=query_int(request, "offset") or 0)
    except ValueError as exc:
        raise RequestError(400, "invalid_query", str(exc)) from None
    return json_response(answer)


async def get_job(request: web.Request) -> web.Response:
    queue, history = await _queue_and_history(request)
    job_id = request.match_info["job_id"]
    job = jobs.find_job(job_id, queue, history)
    if job is None:
        raise RequestError(404, "not_found", f"there is no job {job_id[:128]!r}")
    return json_response(job)


async def post_job_cancel(request: web.Request) -> web.Response:
    return json_response({"cancelled": await _cancel(request, [request.match_info["job_id"]])})


async def post_jobs_cancel(request: web.Request) -> web.Response:
    body = await read_json(request, _ui(request).service.limits.max_body_bytes)
    ids = body.get("job_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise RequestError(400, "invalid_request", "POST /jobs/cancel takes {\"job_ids\": [\"id\", ...]}")
    return json_response({"cancelled": await _cancel(request, ids)})


async def _cancel(request: web.Request, ids: list[str]) -> list[str]:
    """Stop each job: the running one is interrupted, pending ones leave the queue."""
    svc = _ui(request).service
    running = [job_id for job_id in ids if svc.worker.interrupt(job_id)]
    await svc.change_queue(clear=False, delete=[job_id for job_id in ids if job_id not in running])
    return ids


# -- model folders ------------------------------------------------------------------------------------------
async def get_experiment_models(request: web.Request) -> web.Response:
    folders = _ui(request).service.folders
    return json_response([{"name": kind, "folders": [str(folders.models(kind))]} for kind in MODEL_KINDS])


async def get_experiment_models_in(request: web.Request) -> web.Response:
    svc, folder = _ui(request).service, request.match_info["folder"]
    if folder not in MODEL_KINDS:
        raise RequestError(404, "not_found", f"there is no model folder {folder[:60]!r}; GET /models lists them")
    names = await svc.call(svc.folders.list_models, folder)
    return json_response([{"name": name, "pathIndex": 0} for name in names])


async def get_folder_paths(request: web.Request) -> web.Response:
    folders = _ui(request).service.folders
    paths: dict[str, Any] = {kind: [[str(folders.models(kind))], list(MODEL_EXTENSIONS)] for kind in MODEL_KINDS}
    return raw_json(json.dumps(paths))


ROUTES = (
    ("GET", "/extensions", get_extensions), ("GET", "/i18n", get_i18n), ("GET", "/users", get_users),
    ("GET", "/settings", get_settings), ("POST", "/settings", post_settings),
    ("GET", "/settings/{id}", get_setting), ("POST", "/settings/{id}", post_setting),
    ("GET", "/userdata", get_userdata_list), ("GET", "/userdata/{file}", get_userdata),
    ("POST", "/userdata/{file}", post_userdata), ("DELETE", "/userdata/{file}", delete_userdata),
    ("POST", "/userdata/{file}/move/{dest}", post_userdata_move),
    ("GET", "/workflow_templates", get_workflow_templates), ("GET", "/global_subgraphs", get_global_subgraphs),
    ("GET", "/jobs", get_jobs), ("POST", "/jobs/cancel", post_jobs_cancel), ("GET", "/jobs/{job_id}", get_job),
    ("POST", "/jobs/{job_id}/cancel", post_job_cancel),
    ("GET", "/experiment/models", get_experiment_models),
    ("GET", "/experiment/models/{folder}", get_experiment_models_in),
    ("GET", "/internal/folder_paths", get_folder_paths),
    ("GET", "/sdgraph/default_workflow", get_default_workflow),
)


def install(app: web.Application, service: Service, frontend: FrontEnd) -> None:
    """Add the frontend's routes (before the static files, which take every other path)."""
    users = UserStore(service.config.base_dir / "user")
    users.prepare()
    app[WEBUI] = WebUI(service, frontend, Templates(GRAPHS), users)
    for method, path, handler in ROUTES:
        for prefix in ("", "/api"):
            app.router.add_route(method, prefix + path, handler)
    app.router.add_get("/templates/{name}", get_template_file)
    app.router.add_get("/user.css", get_user_css)
    for name, folder in frontend.extension_dirs().items():
        app.router.add_static(f"/extensions/{name}", folder)
    if frontend.root is not None:
        app.router.add_get("/index.html", get_index)
        for entry in sorted(frontend.root.iterdir()):
            if entry.is_dir():
                app.router.add_static(f"/{entry.name}", entry)
            elif entry.name != "index.html":
                app.router.add_get(f"/{entry.name}", _file_handler(entry))


def _file_handler(path: Path):
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(path)
    return handler


def wants_page(request: web.Request) -> bool:
    """A browser asking for `/` gets the frontend; API clients (no text/html in Accept) get the JSON summary."""
    return WEBUI in request.app and request.app[WEBUI].frontend.root is not None \
        and "text/html" in request.headers.get("Accept", "")
