"""Websocket clients, each with its own bounded outbox and sender task.

The worker never waits on a client: it hands messages to the event loop (`publish`, thread-safe) and the loop
puts them in the addressed client's outbox without blocking. A client that reads so slowly that its outbox
fills up is disconnected (it can reconnect and read /history); the others are unaffected.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from .messages import PreviewFrames

log = logging.getLogger("sdgraph.server")

Message = str | bytes | PreviewFrames


class Connection:
    """One websocket: `client_id` addresses it; messages wait in `outbox` until its sender writes them."""

    def __init__(self, client_id: str, ws: web.WebSocketResponse, outbox_size: int, abort: Callable[[], None]):
        self.client_id = client_id
        self.ws = ws
        self.outbox: asyncio.Queue[Message] = asyncio.Queue(outbox_size)
        self.abort = abort
        self.dropped = False
        self.sender: asyncio.Task | None = None
        self.flags: dict = {}  # the client's feature flags (its first message, when it sends them)

    async def send_forever(self) -> None:
        while True:
            message = await self.outbox.get()
            if isinstance(message, PreviewFrames):
                message = message.with_metadata if self.flags.get("supports_preview_metadata") else message.plain
            if isinstance(message, bytes):
                await self.ws.send_bytes(message)
            else:
                await self.ws.send_str(message)


class Hub:
    def __init__(self, loop: asyncio.AbstractEventLoop, *, outbox_size: int = 4096, max_clients: int = 512):
        self._loop = loop
        self.outbox_size = outbox_size
        self.max_clients = max_clients
        self._clients: dict[str, set[Connection]] = {}
        self.dropped_slow = 0

    # -- called on the event loop -------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return sum(len(conns) for conns in self._clients.values())

    def attach(self, client_id: str, ws: web.WebSocketResponse, abort: Callable[[], None]) -> Connection:
        conn = Connection(client_id, ws, self.outbox_size, abort)
        self._clients.setdefault(client_id, set()).add(conn)
        conn.sender = self._loop.create_task(self._run_sender(conn))
        return conn

    def detach(self, conn: Connection) -> None:
        conns = self._clients.get(conn.client_id)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self._clients[conn.client_id]
        if conn.sender is not None:
            conn.sender.cancel()

    def send(self, client_id: str, message: Message) -> None:
        for conn in list(self._clients.get(client_id, ())):
            self._offer(conn, message)

    def broadcast(self, message: Message) -> None:
        for conns in list(self._clients.values()):
            for conn in list(conns):
                self._offer(conn, message)

    async def close_all(self, code: int = 1001, reason: bytes = b"server shutting down") -> None:
        conns = [conn for conns in self._clients.values() for conn in conns]
        for conn in conns:
            self.detach(conn)
        await asyncio.gather(*(self._close(conn, code, reason) for conn in conns), return_exceptions=True)

    # -- called from any thread -----------------------------------------------------------------------------
    def publish(self, client_id: str, message: Message) -> None:
        self._threadsafe(self.send, client_id, message)

    def publish_all(self, message: Message) -> None:
        self._threadsafe(self.broadcast, message)

    # -- internals ----------------------------------------------------------------------------------------
    def _threadsafe(self, fn: Callable, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has closed: the server is stopping, nobody is listening
            pass

    def _offer(self, conn: Connection, message: Message) -> None:
        if conn.dropped:
            return
        try:
            conn.outbox.put_nowait(message)
        except asyncio.QueueFull:
            conn.dropped = True
            self.dropped_slow += 1
            log.warning("websocket client %s reads too slowly (%d messages waiting); disconnecting it",
                        conn.client_id, conn.outbox.qsize())
            self.detach(conn)
            conn.abort()

    async def _run_sender(self, conn: Connection) -> None:
        try:
            await conn.send_forever()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection went away while sending
            log.debug("websocket client %s: send failed: %s", conn.client_id, exc)
            self.detach(conn)

    @staticmethod
    async def _close(conn: Connection, code: int, reason: bytes) -> None:
        try:
            await asyncio.wait_for(conn.ws.close(code=code, message=reason), timeout=2)
        except Exception:
            conn.abort()
