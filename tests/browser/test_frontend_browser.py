"""Issue #14 in a real browser: the official ComfyUI frontend served by `sdgraph serve`, driven in chromium.
Each step's screenshot is in the server's output/browser-steps/ (two are in docs/images/)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from service.templates import api_to_workflow

REPO = Path(__file__).resolve().parents[2]
RUN = "[data-testid='queue-button']"
TXT2IMG_TYPES = ["CheckpointLoaderSimple", "EmptyLatentImage", "CLIPTextEncode", "CLIPTextEncode", "KSampler",
                 "VAEDecode", "SaveImage"]
RUN_TIMEOUT = 240  # seconds for one demo-model prompt on a busy CI machine


def _history(session) -> dict:
    return session.page.request.get(session.server.url + "/history").json()


def run_and_wait(session) -> tuple[str, dict]:
    """Press Run and wait until the prompt it queued has finished; its id and history entry."""
    before = set(_history(session))
    session.page.locator(RUN).click()
    return wait_for_new_entry(session, before)


def wait_for_new_entry(session, before: set[str]) -> tuple[str, dict]:
    """The first history entry not in `before` (id, entry), once there is one."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        new = {k: v for k, v in _history(session).items() if k not in before}
        if new:
            return next(iter(new.items()))
        time.sleep(0.25)
    raise TimeoutError("the prompt did not finish")


def ran_nodes(entry: dict) -> set[str]:
    """The nodes that ran (not cached) in a finished prompt."""
    cached = next(m[1]["nodes"] for m in entry["status"]["messages"] if m[0] == "execution_cached")
    return set(entry["prompt"][2]) - set(cached)


def test_first_page_shows_the_default_graph_without_console_errors(session):
    session.open()
    assert session.node_types() == TXT2IMG_TYPES
    session.page.wait_for_timeout(1500)  # late requests (templates, settings) have their say
    session.shot("01-first-page")
    assert session.errors == []


def test_queue_shows_the_output_and_a_changed_prompt_reruns_only_what_changed(session):
    session.open()
    session.set_widget("KSampler", "steps", 4)
    with session.page.expect_response(lambda r: "/view?" in r.url and "txt2img" in r.url, timeout=RUN_TIMEOUT * 1000):
        _pid, entry = run_and_wait(session)
    assert entry["status"]["status_str"] == "success"
    image = entry["outputs"]["9"]["images"][0]["filename"]
    session.page.wait_for_timeout(500)
    session.shot("02-output-on-canvas")
    session.page.locator("[data-testid='assets-tab-button']").click()
    session.page.locator(f"img[src*='{image}'], img[alt*='{image}']").first.wait_for(timeout=30_000)
    session.shot("03-output-in-assets-panel")

    prompt = session.page.locator("textarea").first
    prompt.fill("a large green square on the right on a red background")
    _pid, again = run_and_wait(session)
    assert again["prompt"][2]["6"]["inputs"]["text"].startswith("a large green square")
    assert ran_nodes(again) == {"6", "3", "8", "9"}  # the loader, the latent and the negative prompt are cached
    session.page.wait_for_timeout(500)
    session.shot("04-rerun-after-editing-the-prompt")
    assert session.errors == []


def test_a_running_prompt_shows_live_previews_and_is_cancelled(session):
    session.open()
    session.evaluate("""() => { window.previewsSeen = 0;  // the frontend's event for a binary preview frame
        window.comfyAPI.api.api.addEventListener('b_preview', () => { window.previewsSeen += 1; }); }""")
    session.set_widget("KSampler", "steps", 5000)
    session.set_widget("KSampler", "seed", 7)
    try:
        before = set(_history(session))  # taken before Run: the cancelled prompt may be in history at once
        session.page.locator(RUN).click()
        session.page.wait_for_function("() => window.previewsSeen > 0", timeout=RUN_TIMEOUT * 1000)
        session.page.wait_for_timeout(500)
        session.shot("05-running-with-a-live-preview")
        session.page.get_by_role("button", name="Cancel current run").click()
        _pid, entry = wait_for_new_entry(session, before)
        assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
        session.shot("06-cancelled")
    finally:  # never leave a 5000-step prompt in front of the next test's
        session.page.request.post(session.server.url + "/interrupt", data={})


def test_an_invalid_input_outlines_the_node_with_its_error(session):
    session.open()
    session.set_widget("CheckpointLoaderSimple", "ckpt_name", "missing.safetensors")
    with session.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as r:
        session.page.locator(RUN).click()
    assert r.value.status == 400
    session.page.wait_for_function(
        "() => window.app.graph._nodes.find(n => n.type === 'CheckpointLoaderSimple').has_errors === true")
    session.page.wait_for_timeout(500)
    session.shot("07-validation-error")


def test_a_png_made_by_sdgraph_dropped_on_the_canvas_gives_its_graph_back(session):
    prompt = json.loads((REPO / "graphs" / "txt2img.json").read_text())
    prompt["6"]["inputs"]["text"] = "a small yellow circle at the top on a green background"
    prompt["3"]["inputs"]["steps"] = 2
    workflow = api_to_workflow(prompt, session.page.request.get(session.server.url + "/object_info").json())
    answer = session.page.request.post(session.server.url + "/prompt", data={
        "prompt": prompt, "extra_data": {"extra_pnginfo": {"workflow": workflow}}}).json()
    _pid, entry = wait_for(session, answer["prompt_id"])
    image = entry["outputs"]["9"]["images"][0]
    png = (session.server.base / "output" / image["subfolder"] / image["filename"]).read_bytes()
    session.open()
    session.evaluate("""async (bytes) => {
        const file = new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"});
        const data = new DataTransfer();
        data.items.add(file);
        const canvas = document.querySelector("#graph-canvas");
        for (const type of ["dragenter", "dragover", "drop"]) {
            canvas.dispatchEvent(new DragEvent(type, {dataTransfer: data, bubbles: true, cancelable: true,
                                                      clientX: 700, clientY: 400}));
        }
    }""", list(png))
    session.page.wait_for_function("""() => window.app.graph._nodes.some(n => n.type === 'CLIPTextEncode'
        && n.widgets[0].value.startsWith('a small yellow circle'))""")
    session.shot("08-png-dropped")
    assert session.errors == []


def wait_for(session, prompt_id: str) -> tuple[str, dict]:
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        entry = session.page.request.get(f"{session.server.url}/history/{prompt_id}").json()
        if entry:
            return prompt_id, entry[prompt_id]
        time.sleep(0.25)
    raise TimeoutError(f"prompt {prompt_id} did not finish")


def test_an_uploaded_image_runs_img2img(session, tmp_path):
    from PIL import Image
    picture = tmp_path / "upload_me.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(picture)
    session.open()
    workflow = session.page.request.get(session.server.url + "/templates/sdgraph_img2img.json").json()
    session.evaluate("(workflow) => window.app.loadGraphData(workflow)", workflow)
    session.page.wait_for_function("() => window.app.graph._nodes.some(n => n.type === 'LoadImage')")
    with session.page.expect_response(lambda r: "/upload/image" in r.url) as uploaded:
        with session.page.expect_file_chooser() as chooser:  # LoadImage's "choose file to upload" widget
            session.evaluate("""() => {
                const node = window.app.graph._nodes.find(n => n.type === 'LoadImage');
                const button = node.widgets.find(w => w.name === 'upload');
                button.callback(button.value, window.app.canvas, node);
            }""")
        chooser.value.set_files(str(picture))
    assert uploaded.value.status == 200
    assert (session.server.base / "input" / "upload_me.png").is_file()
    session.page.wait_for_function("""() => window.app.graph._nodes.find(n => n.type === 'LoadImage')
        .widgets.find(w => w.name === 'image').value === 'upload_me.png'""")
    session.set_widget("KSampler", "steps", 4)
    _pid, entry = run_and_wait(session)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["prompt"][2]["10"]["inputs"]["image"] == "upload_me.png"
    session.page.wait_for_timeout(500)
    session.shot("09-img2img-from-an-upload")


def test_a_missing_node_type_shows_the_missing_nodes_dialog(session):
    session.open()
    workflow = session.page.request.get(session.server.url + "/api/sdgraph/default_workflow").json()
    workflow["nodes"][0]["type"] = "NodeNobodyHas"
    session.evaluate("(workflow) => window.app.loadGraphData(workflow)", workflow)
    session.page.get_by_text("NodeNobodyHas").first.wait_for()
    session.page.wait_for_timeout(500)
    session.shot("10-missing-node")
    # the frontend asks the internet's node registry which pack has the node; offline, only that fails
    assert all(not url.startswith(session.server.url) for url in session.failed)
    assert [e for e in session.errors if "net::ERR_NAME_NOT_RESOLVED" not in e] == []


def test_the_template_browser_offers_our_graphs_first(session):
    session.open()
    session.page.get_by_role("button", name="Templates").click()
    session.page.get_by_text("img2img", exact=True).first.wait_for()
    session.shot("11-templates")
    session.page.get_by_text("img2img", exact=True).first.click()
    session.page.wait_for_function("() => window.app.graph._nodes.some(n => n.type === 'LoadImage')")
    assert session.errors == [], session.not_found
