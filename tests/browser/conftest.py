"""The browser tests' server (`sdgraph serve` on a temporary base dir holding the bundled demo model) and
browser (Debian's chromium driven by Playwright: it cannot download its own browsers here). Each test gets a new
page in a fresh context (a new user: no stored workflow) whose console errors are collected; screenshots of each
step go into the server's output/browser-steps/ (the test run's output folder)."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "server"))

from serverkit import ServerProcess  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DEMO = REPO / "models" / "checkpoints" / "sdgraph-demo.safetensors"
PAGE_TIMEOUT_MS = 60_000

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install "
                                     "-e '.[dev]')")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/browser" in str(item.fspath):
            item.add_marker(pytest.mark.browser)
            item.add_marker(pytest.mark.slow)  # a few minutes: in CI (make test), not in -m "not slow"


@pytest.fixture(scope="module")
def frontend_server(tmp_path_factory) -> Iterator[ServerProcess]:
    from service.frontend import installed_root
    if installed_root() is None:
        pytest.skip("comfyui-frontend-package is not installed")
    if not DEMO.is_file():
        pytest.skip(f"the demo model {DEMO} is missing")
    base = tmp_path_factory.mktemp("browser") / "base"
    for folder in ("input", "output", "models/checkpoints"):
        (base / folder).mkdir(parents=True)
    os.symlink(DEMO, base / "models" / "checkpoints" / DEMO.name)
    for picture in ("example.png", "example_mask.png"):  # the images graphs/ refer to, as a checkout has them
        shutil.copyfile(REPO / "input" / picture, base / "input" / picture)
    server = ServerProcess(base).wait_ready(timeout=120)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (make test installs it: apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


class Session:
    """One page of the frontend, with its console errors and a screenshot helper."""

    def __init__(self, page, server: ServerProcess):
        self.page, self.server = page, server
        self.errors: list[str] = []
        self.shots = server.base / "output" / "browser-steps"
        self.shots.mkdir(parents=True, exist_ok=True)
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        self.failed: list[str] = []  # URLs of requests that got no answer
        page.on("requestfailed", lambda r: self.failed.append(r.url))
        self.not_found: list[str] = []  # URLs answered 404, to say which resource a console error is about
        page.on("response", lambda r: self.not_found.append(r.url) if r.status == 404 else None)

    def open(self) -> Session:
        self.page.goto(self.server.url + "/")
        self.page.wait_for_function("() => window.app?.graph?._nodes?.length > 0", timeout=PAGE_TIMEOUT_MS)
        return self

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def evaluate(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def node_types(self) -> list[str]:
        return self.evaluate("() => window.app.graph._nodes.map(n => n.type)")

    def set_widget(self, node_type: str, widget: str, value) -> None:
        self.evaluate("""([type, name, value]) => {
            const node = window.app.graph._nodes.find(n => n.type === type);
            node.widgets.find(w => w.name === name).value = value;
            node.setDirtyCanvas(true, true);
        }""", [node_type, widget, value])


@pytest.fixture
def session(browser, frontend_server) -> Iterator[Session]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    yield Session(page, frontend_server)
    context.close()
