"""Helpers of the server tests: a real server in a subprocess (`sdgraph serve --port 0`) on a temporary base dir
whose custom_nodes/ holds the toy nodes; an aiohttp client for HTTP and websockets; small graphs."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import aiohttp
from PIL import Image, PngImagePlugin

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOKEN = "test-token-0123456789abcdef"
SENTINEL = "SENTINEL-d41d8cd98f00b204e980-outside-every-root"
READY = re.compile(r"listening on (http://\S+)")
# The options of the shared server: small limits so the limit tests need not send megabytes.
SHARED_ARGS = ("--max-batch-megapixels", "1", "--max-upload-size", "1", "--max-body-mb", "1",
               "--max-image-pixels", "4000000")


def make_base(root: Path) -> Path:
    """A base dir with the toy node packs, the usual folders, and a sentinel file outside all of them."""
    base = root / "base"
    for folder in ("custom_nodes", "input", "output", "temp", "models/checkpoints", "models/embeddings"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "tests" / "engine" / "toy_nodes.py", base / "custom_nodes" / "toy_nodes.py")
    shutil.copy(HERE / "toy_server_nodes.py", base / "custom_nodes" / "toy_server_nodes.py")
    (base / "custom_nodes" / "broken_pack.py").write_text("RESULT = 1 / 0\n")  # a pack that fails to load
    (root / "secret.txt").write_text(SENTINEL)
    (base / "models" / "embeddings" / "style.pt").write_bytes(b"x")
    return base


class ServerProcess:
    """`sdgraph serve` in a subprocess; `url` once it has printed the address it listens on."""

    def __init__(self, base: Path, *args: str, env: dict[str, str] | None = None, port: int = 0):
        self.base = base
        self.log_path = base.parent / f"server-{time.monotonic_ns()}.log"
        self.out_path = self.log_path.with_suffix(".out")
        environ = {k: v for k, v in os.environ.items() if k != "SDGRAPH_TOKEN"}
        environ.update({**(env or {}), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
        command = [sys.executable, "-c", "import sys, cli; sys.exit(cli.main(['serve', *sys.argv[1:]]))",
                   "--base-dir", str(base), "--port", str(port), *args]
        with open(self.out_path, "wb") as out, open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen(command, cwd=base, env=environ, stdout=out, stderr=err)
        self.url = ""

    def wait_ready(self, timeout: float = 60) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = READY.search(self.out_path.read_text())
            if found:
                self.url = found.group(1)
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"the server did not start in {timeout} s:\n{self.log()}")

    @property
    def host(self) -> str:
        return self.url.split("//", 1)[1]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def start(base: Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    return ServerProcess(base, *args, env=env).wait_ready()


class Api:
    """Thin aiohttp client: JSON in, (status, parsed JSON or bytes) out."""

    def __init__(self, session: aiohttp.ClientSession, url: str, *, token: str | None = None,
                 headers: dict[str, str] | None = None):
        self.session, self.url = session, url
        self.headers = dict(headers or {})
        if token:
            self.headers["Authorization"] = f"Bearer {token}"

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        async with self.session.request(method, self.url + path, headers=headers, **kwargs) as response:
            body = await response.read()
            if response.content_type == "application/json":
                return response.status, json.loads(body)
            return response.status, body

    async def get(self, path: str, **kwargs: Any) -> tuple[int, Any]:
        return await self.request("GET", path, **kwargs)

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        if body is not None:
            kwargs["json"] = body
        return await self.request("POST", path, **kwargs)

    async def queue(self, prompt: dict, **fields: Any) -> str:
        status, answer = await self.post("/prompt", {"prompt": prompt, **fields})
        assert status == 200, answer
        return answer["prompt_id"]

    async def ws(self, client_id: str, **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
        headers = {**self.headers, **kwargs.pop("headers", {})}
        return await self.session.ws_connect(f"{self.url}/ws?clientId={client_id}", headers=headers, **kwargs)

    async def history(self, prompt_id: str, timeout: float = 30) -> dict:
        """Poll /history/{id} until the prompt has finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, answer = await self.get(f"/history/{prompt_id}")
            assert status == 200
            if answer:
                return answer[prompt_id]
            await asyncio.sleep(0.05)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")


async def messages_until_done(ws: aiohttp.ClientWebSocketResponse, prompt_id: str, timeout: float = 30,
                              ) -> list[dict | bytes]:
    """Read the websocket until `executing` with node null for `prompt_id` (the end of that prompt)."""
    seen: list[dict | bytes] = []
    deadline = time.monotonic() + timeout
    while True:
        message = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        if message.type == aiohttp.WSMsgType.BINARY:
            seen.append(message.data)
            continue
        assert message.type == aiohttp.WSMsgType.TEXT, message
        data = json.loads(message.data)
        seen.append(data)
        if data["type"] == "executing" and data["data"]["node"] is None and data["data"]["prompt_id"] == prompt_id:
            return seen


def chain(value: int = 1, *, prefix: str = "toy") -> dict:
    """Const -> Add -> ToySaveImage, and a Show of the sum."""
    return {
        "1": {"class_type": "Const", "inputs": {"value": value}},
        "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": 10}},
        "3": {"class_type": "ToySaveImage", "inputs": {"value": ["2", 0], "filename_prefix": prefix}},
        "4": {"class_type": "Show", "inputs": {"value": ["2", 0]}},
    }


def slow(value: int = 0, *, steps: int = 20, delay: float = 0.05) -> dict:
    return {"1": {"class_type": "Slow", "inputs": {"value": value, "steps": steps, "delay": delay}},
            "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}


def run(coro):
    return asyncio.run(coro)


def png(color=(255, 0, 0, 255), size=(4, 4), mode="RGBA", **text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid-looking PNG header claiming width x height pixels, with almost no data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


async def upload(api: Api, data: bytes, filename: str, route: str = "/upload/image", **fields: str):
    """A multipart upload written byte for byte (aiohttp's FormData would percent-encode a hostile file name,
    which then never reaches the server as such)."""
    boundary = f"----sdgraph{time.monotonic_ns()}"
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() +
                     value.encode() + b"\r\n")
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return await api.post(route, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
