"""Many clients at once: every job runs exactly once, each client sees only its own events, and a client that
stops reading holds up nobody."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import socket
import struct
import time
from collections import Counter

import aiohttp
from PIL import Image
from serverkit import Api, chain, messages_until_done, run


def test_twenty_clients_each_get_their_own_events(shared):
    clients, per_client = 20, 3

    async def one_client(session: aiohttp.ClientSession, index: int) -> tuple[list[str], list[dict]]:
        api = Api(session, shared.url)
        client_id = f"crowd-{index}-{os.urandom(4).hex()}"
        ws = await api.ws(client_id)
        prompts = [chain(500 + index * 10 + k, prefix=f"crowd{index}") for k in range(per_client)]
        prompts[0]["5"] = {"class_type": "Slow", "inputs": {"value": index, "steps": 3}}
        prompts[0]["6"] = {"class_type": "Sink", "inputs": {"value": ["5", 0]}}
        ids = list(await asyncio.gather(*(api.queue(p, client_id=client_id) for p in prompts)))
        seen: list[dict] = []
        for prompt_id in ids:  # the prompts may finish in any order; read until each one's end is seen
            if not any(m.get("type") == "executing" and m["data"]["node"] is None and m["data"]["prompt_id"] ==
                       prompt_id for m in seen):
                seen += [m for m in await messages_until_done(ws, prompt_id, timeout=60) if isinstance(m, dict)]
        await ws.close()
        return ids, seen

    async def scenario():
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(*(one_client(session, i) for i in range(clients)))
            api = Api(session, shared.url)
            histories = {pid: await api.history(pid) for ids, _ in results for pid in ids}
        all_ids = [pid for ids, _ in results for pid in ids]
        assert len(set(all_ids)) == clients * per_client
        for ids, seen in results:
            mine = set(ids)
            with_id = [m for m in seen if "prompt_id" in m.get("data", {})]
            assert {m["data"]["prompt_id"] for m in with_id} == mine  # nothing of anyone else's
            starts = Counter(m["data"]["prompt_id"] for m in with_id if m["type"] == "execution_start")
            successes = Counter(m["data"]["prompt_id"] for m in with_id if m["type"] == "execution_success")
            assert starts == successes == Counter(ids)  # each ran exactly once
            assert any(m["type"] == "progress" for m in with_id)
            assert any(m["type"] == "status" for m in seen)
        for pid, history in histories.items():
            assert history["status"]["completed"], pid
            assert [k for k, _ in history["status"]["messages"]].count("execution_start") == 1
    run(scenario())


def test_previews_arrive_as_comfyui_binary_frames(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            ws = await api.ws("previewer")
            prompt = {"1": {"class_type": "ToyPreview", "inputs": {"steps": 3, "size": 16}},
                      "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
            prompt_id = await api.queue(prompt, client_id="previewer")
            seen = await messages_until_done(ws, prompt_id)
            await ws.close()
        frames = [m for m in seen if isinstance(m, bytes)]
        assert len(frames) == 3
        event, image_type = struct.unpack(">II", frames[0][:8])
        assert (event, image_type) == (1, 1)  # PREVIEW_IMAGE, JPEG
        assert Image.open(io.BytesIO(frames[0][8:])).size == (16, 16)
    run(scenario())


def raw_websocket(host: str, port: int, client_id: str) -> socket.socket:
    """A websocket that completes the handshake and then never reads (with a tiny receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += sock.recv(1)
    assert reply.startswith(b"HTTP/1.1 101"), reply
    return sock


def test_a_client_that_stops_reading_blocks_nobody(shared):
    host, port = shared.host.rsplit(":", 1)
    stuck = raw_websocket(host, int(port), "stuck-reader")

    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            flood = {"1": {"class_type": "ToyPreview", "inputs": {"steps": 3000, "size": 64}},
                     "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
            flood_id = await api.queue(flood, client_id="stuck-reader")
            ws = await api.ws("attentive")
            started = time.monotonic()
            mine = await api.queue(chain(77), client_id="attentive")
            await messages_until_done(ws, mine, timeout=60)
            await ws.close()
            assert time.monotonic() - started < 60
            assert (await api.history(flood_id))["status"]["completed"]
    run(scenario())
    stuck.settimeout(30)  # the server dropped the stuck client: reading now ends (EOF or reset), not hangs
    try:
        while stuck.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    stuck.close()
    assert "reads too slowly" in shared.log()


def test_status_is_broadcast_on_queue_changes(shared):
    async def scenario():
        async with aiohttp.ClientSession() as session:
            api = Api(session, shared.url)
            watcher = await api.ws("watcher")
            await watcher.receive(timeout=10)  # the greeting
            prompt_id = await api.queue(chain(5))  # queued by someone else, without a client_id
            await api.history(prompt_id)
            statuses = []
            while True:
                try:
                    message = json.loads((await watcher.receive(timeout=1)).data)
                except TimeoutError:
                    break
                assert message["type"] == "status", message  # never another client's execution events
                statuses.append(message["data"]["status"]["exec_info"]["queue_remaining"])
            await watcher.close()
            assert statuses and statuses[-1] == 0 and max(statuses) >= 1
    run(scenario())
