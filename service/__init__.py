"""The HTTP + WebSocket service behind `sdgraph serve`: a durable queue, one worker, ComfyUI-compatible messages.

Modules, in the order a request meets them:
  config    - ServerConfig and Limits (what `sdgraph serve` was told)
  security  - token, Host allow-list, Origin check, content types (one aiohttp middleware)
  routing   - a route table whose declarations give the handlers, body parsing and the OpenAPI document
  core      - Service: submission, queue and history operations, system information
  queue     - QueueStore: the SQLite queue and history
  worker    - Worker: the single thread that runs prompts with the shared Executor
  deadline  - the time limit of one run (--prompt-timeout), shared with `sdgraph run`
  scrub     - paths made relative to the roots in what clients are told
  messages  - engine events and validation errors as ComfyUI's JSON payloads
  hub       - websocket clients, each with its own bounded outbox
  uploads   - /upload/image, /upload/mask and /view files
  openapi   - the OpenAPI document; answers - the JSON schemas of the routes' answers
Scale-out (--ray, docs/scale-out.md): scale_options (flags), affinity (routing policies), dispatch (the router
over one queue), ray_pool (worker actors; the only module importing ray), sweep (`sdgraph run --sweep`).
"""
