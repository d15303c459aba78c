"""`sdgraph serve`: the ComfyUI-compatible HTTP + WebSocket server. The routes are here; the substance is in
service/ (queue, worker, messages, security, uploads).

Exit codes: 0 after a clean stop (SIGTERM/SIGINT); 2 when it cannot start (a non-loopback address without a
token, a database another server holds, a bad flag); 3 when the worker thread died and 4 when a prompt overran
--prompt-timeout and its node would not stop (it is marked failed): a supervisor should restart the server, whose
queue is kept.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Sequence

from aiohttp import web

from engine.schema import node_info, object_info
from service import answers, openapi, routing, security, system, uploads, webui
from service.bodies import FreeRequest, HistoryRequest, InterruptRequest, PromptRequest, QueueRequest
from service.config import MIB, ServerConfig
from service.core import Service
from service.frontend import FrontEnd
from service.messages import client_flags, status_text, ws_text
from service.options import build_parser, config_from_args
from service.queue import DatabaseInUse, json_text
from service.routing import Param, RequestError, RouteTable, json_errors, json_response, query_int, raw_json

SERVICE = web.AppKey("service", Service)
ROUTES = web.AppKey("routes", RouteTable)
log = logging.getLogger("sdgraph.server")


def _svc(request: web.Request) -> Service:
    return request.app[SERVICE]


# -- prompts and queue ------------------------------------------------------------------------------------------
async def post_prompt(request: web.Request, body: PromptRequest) -> web.Response:
    status, answer = await _svc(request).submit(body)
    return json_response(answer, status=status)


async def get_prompt(request: web.Request) -> web.Response:
    svc = _svc(request)
    return json_response({"exec_info": {"queue_remaining": await svc.call(svc.store.remaining)}})


async def get_queue(request: web.Request) -> web.Response:
    svc = _svc(request)
    queue = await svc.call(svc.store.queue_json)  # '{"queue_running":[...],"queue_pending":[...]}'
    return raw_json(queue[:-1] + "," + json_text(svc.worker_state())[1:])


async def post_queue(request: web.Request, body: QueueRequest) -> web.Response:
    return json_response({"removed": await _svc(request).change_queue(clear=body.clear, delete=body.delete)})


async def post_interrupt(request: web.Request, body: InterruptRequest) -> web.Response:
    return json_response({"interrupted": _svc(request).worker.interrupt(body.prompt_id)})


async def get_prompt_state(request: web.Request) -> web.Response:
    prompt_id = request.match_info["prompt_id"]
    described = await _svc(request).describe(prompt_id)
    if described is None:
        raise RequestError(404, "not_found", f"no prompt {prompt_id[:128]!r} is queued, running or in the history")
    return json_response(described)


# -- history ----------------------------------------------------------------------------------------------------
async def get_history(request: web.Request) -> web.Response:
    svc = _svc(request)
    max_items, offset = query_int(request, "max_items"), query_int(request, "offset", minimum=-1)
    return raw_json(await svc.call(svc.store.history_json, max_items=max_items, offset=offset))


async def get_history_item(request: web.Request) -> web.Response:
    svc, prompt_id = _svc(request), request.match_info["prompt_id"]
    entry = await svc.call(svc.store.history_entry_json, prompt_id)
    return raw_json("{}" if entry is None else f"{{{json_text(prompt_id)}:{entry}}}")


async def get_history_item_v1(request: web.Request) -> web.Response:
    svc, prompt_id = _svc(request), request.match_info["prompt_id"]
    entry = await svc.call(svc.store.history_entry_json, prompt_id)
    if entry is None:
        raise RequestError(404, "not_found", f"prompt {prompt_id[:128]!r} has not finished (or was never queued, "
                           "or was removed from the history); GET /v1/prompts/{id} says where it is")
    return raw_json(f"{{{json_text(prompt_id)}:{entry}}}")


async def post_history(request: web.Request, body: HistoryRequest) -> web.Response:
    return json_response({"removed": await _svc(request).change_history(clear=body.clear, delete=body.delete)})


# -- nodes, models, system ------------------------------------------------------------------------------------
async def get_object_info(request: web.Request) -> web.Response:
    svc = _svc(request)
    info = await svc.call(object_info, svc.registry, svc.runtime)
    return json_response(info, headers={"X-Sdgraph-Load-Errors": str(len(svc.registry.load_errors))})


async def get_object_info_node(request: web.Request) -> web.Response:
    svc, name = _svc(request), request.match_info["node_class"]
    definition = svc.registry.get(name)
    return json_response({} if definition is None else {name: await svc.call(node_info, definition, svc.runtime)})


async def get_load_errors(request: web.Request) -> web.Response:
    return json_response([problem.as_dict() for problem in _svc(request).registry.load_errors])


async def get_models(request: web.Request) -> web.Response:
    return json_response(system.model_folders())


async def get_models_in(request: web.Request) -> web.Response:
    svc, folder = _svc(request), request.match_info["folder"]
    found = await svc.call(system.models_in, svc.folders, folder)
    if found is None:
        raise RequestError(404, "not_found", f"there is no model folder {folder[:60]!r}; GET /models lists them")
    return json_response(found)


async def get_embeddings(request: web.Request) -> web.Response:
    svc = _svc(request)
    return json_response(await svc.call(system.embeddings, svc.folders))


async def get_system_stats(request: web.Request) -> web.Response:
    svc = _svc(request)
    return json_response(await svc.call(lambda: system.system_stats(svc.config, svc.counters())))


async def get_features(request: web.Request) -> web.Response:
    return json_response(system.features(_svc(request).config))


async def post_free(request: web.Request, body: FreeRequest) -> web.Response:
    _svc(request).worker.request_free(unload_models=body.unload_models, free_memory=body.free_memory)
    return json_response({"unload_models": body.unload_models, "free_memory": body.free_memory})


async def get_openapi(request: web.Request) -> web.Response:
    return json_response(openapi.build(request.app[ROUTES].routes, version=system.version(),
                                       token=_svc(request).config.token is not None))


async def get_root(request: web.Request) -> web.StreamResponse:
    if webui.wants_page(request):
        return await webui.get_index(request)
    return json_response({"name": "sdgraph", "version": system.version(), "openapi": "/openapi.json",
                          "websocket": "/ws?clientId=ID"})


# -- files -----------------------------------------------------------------------------------------------------
async def get_view(request: web.Request) -> web.StreamResponse:
    svc, query = _svc(request), request.query
    if "filename" not in query:
        raise RequestError(400, "invalid_query", "/view needs ?filename=NAME (and subfolder, type if not output)")
    path = await svc.call(uploads.resolve_view, svc.folders, query["filename"], query.get("subfolder", ""),
                          query.get("type", "output"))
    headers = uploads.file_headers(path)
    channel, preview = query.get("channel") or None, query.get("preview") or None
    if preview is None and channel in (None, "rgba"):
        return web.FileResponse(path, headers=headers)
    data, headers["Content-Type"] = await svc.call(uploads.view_variant, path, channel=channel, preview=preview,
                                                   max_pixels=svc.limits.max_image_pixels)
    return web.Response(body=data, headers=headers)


async def post_upload_image(request: web.Request) -> web.Response:
    svc = _svc(request)
    form = await uploads.read_form(request, max_file_bytes=svc.limits.max_upload_bytes)
    await svc.call(uploads.open_image, form.data, svc.limits.max_image_pixels)
    return json_response(await svc.call(_store, svc, form, form.data))


async def post_upload_mask(request: web.Request) -> web.Response:
    svc = _svc(request)
    form = await uploads.read_form(request, max_file_bytes=svc.limits.max_upload_bytes)
    if "original_ref" not in form.fields:
        raise RequestError(400, "invalid_form", "a mask upload needs the field original_ref (JSON naming the image "
                           "the mask belongs to)")
    data = await svc.call(uploads.apply_mask, svc.folders, form.fields["original_ref"], form.data,
                          svc.limits.max_image_pixels)
    return json_response(await svc.call(_store, svc, form, data))


def _store(svc: Service, form: uploads.UploadForm, data: bytes) -> dict[str, str]:
    return uploads.store_upload(svc.folders, data, filename=form.filename, subfolder=form.fields.get("subfolder", ""),
                                kind=form.fields.get("type") or "input",
                                overwrite=form.fields.get("overwrite", "").lower() in ("true", "1"))


# -- websocket -----------------------------------------------------------------------------------------------
async def get_ws(request: web.Request) -> web.StreamResponse:
    svc = _svc(request)
    client_id = request.query.get("clientId") or uuid.uuid4().hex
    if len(client_id) > 128 or not client_id.isprintable():
        raise RequestError(400, "invalid_query", "clientId must be printable and at most 128 characters")
    if svc.hub.count >= svc.limits.max_ws_clients:
        raise RequestError(503, "too_many_clients", f"{svc.hub.count} websocket clients are connected, the most "
                           "this server takes (--max-ws-clients); retry later")
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=64 << 10)
    await ws.prepare(request)
    transport = request.transport
    conn = svc.hub.attach(client_id, ws, abort=lambda: transport.abort() if transport is not None else None)
    try:
        conn.outbox.put_nowait(status_text(await svc.call(svc.store.remaining), sid=client_id))
        for running in svc.worker.running_all():
            if running[1] == client_id and running[2] is not None:
                conn.outbox.put_nowait(ws_text("executing", {"node": running[2], "display_node": running[2],
                                                             "prompt_id": running[0]}))
        async for message in ws:  # the frontend sends its feature flags first; ComfyUI answers with its own
            if message.type == web.WSMsgType.TEXT and '"feature_flags"' in message.data[:64]:
                conn.flags = client_flags(message.data)
                conn.outbox.put_nowait(ws_text("feature_flags", system.features(svc.config)))
    finally:
        svc.hub.detach(conn)
    return ws


def route_table() -> RouteTable:
    table = RouteTable(body_limit=lambda request: request.app[SERVICE].limits.max_body_bytes)
    r, bad = table.route, {200: "OK", 400: "invalid request (the error names the field)"}
    r("GET", "/", summary="what this server is", tag="system", answer=answers.ROOT)(get_root)
    r("GET", "/ws", summary="websocket: status, and the events of the prompts queued with this clientId",
      tag="events", query=(Param("clientId", description="the client_id you queue prompts with"),
                           Param("token", description="the token, when the server needs one")),
      responses={101: "switching protocols", 400: "not a websocket handshake, or a bad clientId",
                 503: "too many websocket clients"})(get_ws)
    r("POST", "/prompt", summary="validate and queue a prompt", tag="prompts", body=PromptRequest,
      responses={200: "queued: {prompt_id, number, node_errors}", 400: "invalid: {error, node_errors}",
                 409: "prompt_id already used", 413: "body too large", 429: "queue full",
                 503: "shutting down (or the worker is out of action)"},
      error_extra={"node_errors": {}}, answer=answers.PROMPT_ACCEPTED)(post_prompt)
    r("GET", "/prompt", summary="queue length: {exec_info: {queue_remaining}}", tag="prompts",
      answer=answers.QUEUE_REMAINING)(get_prompt)
    r("GET", "/queue", summary="running and pending prompts, and whether the worker is alive", tag="prompts",
      answer=answers.QUEUE)(get_queue)
    r("POST", "/queue", summary="remove pending prompts", tag="prompts", body=QueueRequest, responses=bad,
      answer=answers.REMOVED)(post_queue)
    r("POST", "/interrupt", summary="stop the running prompt (only that one, given its id)", tag="prompts",
      body=InterruptRequest, responses=bad, answer=answers.INTERRUPTED)(post_interrupt)
    r("GET", "/v1/prompts/{prompt_id}", summary="where a prompt is (pending with position, running, success, "
      "failed, interrupted) and its attempts", tag="prompts", responses={200: "OK", 404: "unknown"},
      answer=answers.PROMPT_STATE)(get_prompt_state)
    r("GET", "/history", summary="finished prompts, oldest first", tag="history",
      query=(Param("max_items", "integer", "at most this many (the newest, unless offset is given)"),
             Param("offset", "integer", "skip this many of the oldest")), responses=bad,
      answer=answers.HISTORY)(get_history)
    r("GET", "/history/{prompt_id}", summary="one finished prompt ({} when unknown, as ComfyUI)",
      tag="history", answer=answers.HISTORY)(get_history_item)
    r("GET", "/v1/history/{prompt_id}", summary="one finished prompt (404 when unknown)", tag="history",
      responses={200: "OK", 404: "not finished or unknown"}, answer=answers.HISTORY)(get_history_item_v1)
    r("POST", "/history", summary="forget finished prompts", tag="history", body=HistoryRequest,
      responses=bad, answer=answers.REMOVED)(post_history)
    r("GET", "/object_info", summary="every node type", tag="nodes", answer=answers.NODE_TYPES)(get_object_info)
    r("GET", "/object_info/{node_class}", summary="one node type ({} when unknown)", tag="nodes",
      answer=answers.NODE_TYPES)(get_object_info_node)
    r("GET", "/v1/node_load_errors", summary="node packs that failed to load", tag="nodes",
      answer=answers.LOAD_ERRORS)(get_load_errors)
    r("GET", "/view", summary="an output, input or temp file", tag="files",
      query=(Param("filename", required=True), Param("subfolder"), Param("type", description="output, input, temp"),
             Param("channel", description="rgba, rgb or a"), Param("preview", description="webp;90 or jpeg;90")),
      responses={200: "the file", 400: "unsafe or invalid name", 404: "no such file"}, answer_type="*/*")(get_view)
    form = {"image": "the image file", "subfolder": "folder inside the type's folder", "type": "input or temp",
            "overwrite": "true to replace a file of the same name"}
    r("POST", "/upload/image", summary="upload an image", tag="files", form=form,
      responses={200: "{name, subfolder, type}", 400: "not an image, unsafe name", 413: "too large"},
      answer=answers.UPLOADED)(post_upload_image)
    r("POST", "/upload/mask", summary="upload a mask: its alpha applied to original_ref's image", tag="files",
      form={**form, "original_ref": "JSON {filename, subfolder, type} of the masked image"},
      responses={200: "{name, subfolder, type}", 400: "invalid", 404: "original not found"},
      answer=answers.UPLOADED)(post_upload_mask)
    r("GET", "/system_stats", summary="memory, versions, devices, and this server's counters (worker_alive)",
      tag="system", answer=answers.SYSTEM_STATS)(get_system_stats)
    r("POST", "/free", summary="unload models / free memory (between prompts)", tag="system", body=FreeRequest,
      responses=bad, answer=answers.FREED)(post_free)
    r("GET", "/models", summary="model folder names", tag="models", answer=answers.STRINGS)(get_models)
    r("GET", "/models/{folder}", summary="model files in a folder", tag="models",
      responses={200: "OK", 404: "unknown folder"}, answer=answers.STRINGS)(get_models_in)
    r("GET", "/embeddings", summary="textual inversion embeddings", tag="models", answer=answers.STRINGS)(
        get_embeddings)
    r("GET", "/features", summary="what this server supports and its limits", tag="system",
      answer=answers.FEATURES)(get_features)
    r("GET", "/openapi.json", summary="this document", tag="system", answer=answers.OBJECT)(get_openapi)
    return table


def create_app(service: Service) -> web.Application:
    config = service.config
    guard = security.Guard(listen=config.listen, token=config.token, allowed_hosts=config.allowed_hosts,
                           allowed_origins=config.allowed_origins)
    limit = max(config.limits.max_body_bytes, config.limits.max_upload_bytes) + MIB
    app = web.Application(middlewares=[json_errors, security.middleware(guard)], client_max_size=limit)
    app[SERVICE] = service
    app[ROUTES] = table = route_table()
    table.install(app)
    routing.install_pack_routes(app, service.registry.pack_environment)  # custom nodes' routes, behind the same checks
    webui.install(app, service, FrontEnd(config.front_end_root, service.registry.web_directories))
    return app


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problem = security.bind_problem(config.listen, config.token)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        code = asyncio.run(serve(config))
    except (DatabaseInUse, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    others = [t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
    for thread in others:  # idle pool threads end at once; give busy ones a moment
        thread.join(2 / len(others))
    busy = [t.name for t in others if t.is_alive()]
    if busy:  # the queue is committed and closed: do not wait forever for work that never returns
        log.error("exiting although %d thread(s) are still busy (%s)", len(busy), ", ".join(busy))
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)
    return code


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT; then take no more prompts, let the running one finish within
    --shutdown-timeout (a second signal: at once) or put it back in the queue, and close."""
    service = Service.open(config)
    service.folders.remove_stale_temp_files()  # leftovers of writes a crash interrupted (issue #11)
    stop = asyncio.Event()
    service.start(asyncio.get_running_loop(), on_fatal=stop.set)
    runner = web.AppRunner(create_app(service), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        for host in config.listen:
            sock = socket.create_server((host, config.port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
            await web.SockSite(runner, sock, shutdown_timeout=5).start()
            shown = f"[{host}]" if ":" in host else host
            print(f"sdgraph server listening on http://{shown}:{sock.getsockname()[1]}", flush=True)
    except OSError:
        await runner.cleanup()
        await service.stop()
        raise

    def on_signal() -> None:
        if stop.is_set():
            service.worker.stop_now()
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, on_signal)
    await stop.wait()
    if service.exit_code:
        log.critical("exiting with code %d so that a supervisor restarts the server: %s", service.exit_code,
                     service.worker.failure)
    else:
        log.info("stopping: no new prompts; waiting up to %.0f s for the running one", config.shutdown_timeout)
    await service.stop(close_store=False)
    await runner.cleanup()
    service.close()
    log.info("stopped")
    return service.exit_code


if __name__ == "__main__":
    sys.exit(main())
