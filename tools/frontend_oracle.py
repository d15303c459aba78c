"""The oracle for workflow conversion: ComfyUI's own front end, in a real browser, turns workflows into API prompts.

It serves the `comfyui-frontend-package` static files with the few JSON routes the page needs (`/object_info` from
OUR registry, everything else answered empty), opens the page in Chromium through Playwright, loads each workflow
with `app.loadGraphData` and saves what `app.graphToPrompt()` gives (`output`, the API prompt) next to it.

    pip install "comfyui-frontend-package==1.58.1" comfyui-workflow-templates playwright torch==2.13.0
    PYTHONPATH=$PWD python tools/frontend_oracle.py --out tests/fixtures/templates WORKFLOW.json ...
    PYTHONPATH=$PWD python tools/frontend_oracle.py --out DIR --templates   # every template whose nodes we have

Each WORKFLOW.json gives DIR/NAME.workflow.json (a copy) and DIR/NAME.prompt.json (the front end's prompt).
`--loaded` also saves DIR/NAME.loaded.json, the workflow as the page holds it after loading (group nodes turned
into subgraphs, with the ids it gave).
`--make-subgraphs` also makes workflows in the page: the front end's own "convert to subgraph" applied to parts of
each loaded workflow (nested, and with a bypassed and a muted node inside), saved as NAME-sub*.workflow.json with
their prompts. Needs /usr/bin/chromium (or --chromium PATH); no GPU, no network.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def frontend_static() -> Path:
    import comfyui_frontend_package
    return Path(comfyui_frontend_package.__file__).parent / "static"


def template_files() -> list[Path]:
    """Every workflow template of the installed `comfyui-workflow-templates` packages."""
    import comfyui_workflow_templates_json  # the package that holds the JSON files
    folder = Path(comfyui_workflow_templates_json.__file__).parent / "templates"
    return sorted(p for p in folder.glob("*.json") if not p.name.startswith("index"))


def workflow_types(workflow: dict[str, Any]) -> set[str]:
    """The node types a workflow uses, inside its subgraphs too (subgraph instances and front-end-only nodes are
    not node types of the server)."""
    subgraphs = (workflow.get("definitions") or {}).get("subgraphs") or []
    ids = {s.get("id") for s in subgraphs}
    types = {n.get("type") for n in workflow.get("nodes", [])}
    for sub in subgraphs:
        types |= {n.get("type") for n in sub.get("nodes", [])}
    return {t for t in types if t not in ids and t not in FRONTEND_ONLY}


def is_workflow(path: Path) -> bool:
    data = json.loads(path.read_text())
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and bool(data["nodes"])


def make_app(object_info: dict[str, Any]) -> web.Application:
    static = frontend_static()
    answers: dict[str, Any] = {
        "object_info": object_info, "extensions": [], "settings": {"Comfy.TutorialCompleted": True},
        "users": {"storage": "server", "migrated": True}, "embeddings": [], "features": {},
        "system_stats": {"system": {"os": "posix", "python_version": sys.version, "comfyui_version": "0.0.0",
                                    "embedded_python": False, "pytorch_version": "", "argv": [],
                                    "ram_total": 0, "ram_free": 0}, "devices": []},
        "workflow_templates": {}, "global_subgraphs": {}, "node_replacements": {}, "i18n": {},
        "queue": {"queue_running": [], "queue_pending": []}, "history": {}, "userdata": [],
        "experiment/models": [],
    }

    async def api(request: web.Request) -> web.Response:
        path = request.match_info["path"].strip("/")
        if path in answers:
            return web.json_response(answers[path])
        if path.startswith("settings/"):
            return web.json_response(None)
        return web.json_response({}, status=404)

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(static / "index.html")

    app = web.Application()
    app.router.add_route("*", "/api/{path:.*}", api)
    app.router.add_get("/", index)
    app.router.add_static("/", static)
    return app


OPEN_PAGE = """async () => {
  for (let i = 0; i < 600 && !(window.app && window.app.graph && window.LiteGraph); i++)
    await new Promise(r => setTimeout(r, 100));
  return !!(window.app && window.app.graph);
}"""

TO_PROMPT = """async (workflow) => {
  await window.app.loadGraphData(workflow, true, true, null);
  const result = await window.app.graphToPrompt();
  return result.output;
}"""

# The workflow as the page holds it after loading (group nodes already turned into subgraphs), with its prompt.
TO_LOADED = """async (workflow) => {
  await window.app.loadGraphData(workflow, true, true, null);
  await new Promise(r => setTimeout(r, 50));
  const result = await window.app.graphToPrompt();
  return [result.workflow, result.output];
}"""

# The front end's own "convert to subgraph": the nodes at the given positions of the root graph (nested: the
# first call's subgraph node is included in the second). Modes are set on the chosen nodes first.
MAKE_SUBGRAPH = """async ([workflow, groups, modes]) => {
  await window.app.loadGraphData(workflow, true, true, null);
  const graph = window.app.graph;
  for (const [id, mode] of Object.entries(modes)) graph.getNodeById(Number(id)).mode = mode;
  let made = null;
  for (const ids of groups) {
    const items = new Set(ids.map(id => graph.getNodeById(Number(id))));
    if (made) items.add(made);
    made = graph.convertToSubgraph(items).node;
  }
  return (await window.app.graphToPrompt()).workflow;
}"""


async def run_oracle(workflows: list[Path], out: Path, object_info: dict[str, Any], *, chromium: str,
                     make_subgraphs: bool, loaded: bool = False) -> int:
    from playwright.async_api import async_playwright

    runner = web.AppRunner(make_app(object_info))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001 - the port the OS chose
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = await browser.new_page()
            page.on("pageerror", lambda exc: print(f"  page error: {exc}", file=sys.stderr))
            await page.goto(f"http://127.0.0.1:{port}/")
            if not await page.evaluate(OPEN_PAGE):
                raise SystemExit("the front end did not start (no window.app.graph after 60 s)")
            for path in workflows:
                workflow = json.loads(path.read_text())
                try:
                    prompt = await page.evaluate(TO_PROMPT, workflow)
                except Exception as exc:  # noqa: BLE001 - report and go on with the next file
                    failures += 1
                    print(f"{path.name}: the front end failed: {exc}", file=sys.stderr)
                    continue
                save(out, path.stem, workflow, prompt)
                if loaded:
                    as_loaded, _ = await page.evaluate(TO_LOADED, workflow)
                    (out / f"{path.stem}.loaded.json").write_text(json.dumps(as_loaded, indent=1) + "\n")
                if make_subgraphs:
                    for suffix, (groups, modes) in subgraph_plans(workflow).items():
                        made = without_null_lists(await page.evaluate(MAKE_SUBGRAPH, [workflow, groups, modes]))
                        # the prompt of the saved file, loaded afresh: what a user queueing that file gets
                        save(out, f"{path.stem}-{suffix}", made, await page.evaluate(TO_PROMPT, made))
            await browser.close()
    finally:
        await runner.cleanup()
    return failures


def subgraph_plans(workflow: dict[str, Any]) -> dict[str, tuple[list[list[int]], dict[str, int]]]:
    """Which nodes to turn into subgraphs: the middle of the graph (one level), then that and its neighbours
    (nested), and the same with one inner node bypassed and one muted."""
    ids = sorted(n["id"] for n in workflow["nodes"] if n["type"] not in FRONTEND_ONLY)
    if len(ids) < 4:
        return {}
    middle, wider = ids[1:-1], [ids[0], ids[-1]]
    return {"sub": ([middle], {}), "nested": ([middle[: len(middle) // 2 + 1], wider], {}),
            "sub-modes": ([middle], {str(middle[0]): 4, str(middle[-1]): 2})}


def without_null_lists(workflow: dict[str, Any]) -> dict[str, Any]:
    """The front end serializes absent `floatingLinks`/`reroutes` as null but cannot load its own null back: leave
    them out (as a saved file does)."""
    def clean(graph: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in graph.items() if not (k in ("floatingLinks", "reroutes") and v is None)}
    result = clean(workflow)
    subgraphs = (result.get("definitions") or {}).get("subgraphs")
    if subgraphs:
        result["definitions"] = {**result["definitions"], "subgraphs": [clean(s) for s in subgraphs]}
    return result


def save(out: Path, stem: str, workflow: dict[str, Any], prompt: dict[str, Any]) -> None:
    (out / f"{stem}.workflow.json").write_text(json.dumps(workflow, indent=1) + "\n")
    (out / f"{stem}.prompt.json").write_text(json.dumps(prompt, indent=1, sort_keys=True) + "\n")
    print(f"{stem}: {len(prompt)} nodes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workflows", nargs="*", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--templates", action="store_true", help="every template whose nodes we have")
    parser.add_argument("--make-subgraphs", action="store_true", help="also convert parts into subgraphs")
    parser.add_argument("--loaded", action="store_true",
                        help="also save NAME.loaded.json, the workflow as the page holds it after loading")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--registry", metavar="MODULE:FUNCTION",
                        help="the node registry to describe (default: ours, nodes.build_registry); e.g. "
                             "toy_nodes:toy_registry with tests/engine on PYTHONPATH")
    args = parser.parse_args(argv)

    import importlib

    from engine.schema import object_info
    if args.registry:
        module, _, function = args.registry.partition(":")
        registry = getattr(importlib.import_module(module), function)()
    else:
        from nodes import build_registry
        registry = build_registry(pack_dirs=[])
    info = object_info(registry)
    workflows = list(args.workflows)
    if args.templates:
        workflows += [p for p in template_files() if is_workflow(p) and workflow_types(json.loads(p.read_text()))
                      <= set(info)]
    return 1 if asyncio.run(run_oracle(workflows, args.out, info, chromium=args.chromium,
                                       make_subgraphs=args.make_subgraphs, loaded=args.loaded)) else 0


if __name__ == "__main__":
    sys.exit(main())
