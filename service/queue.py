"""The durable queue and history: one SQLite file, one process at a time.

A prompt is a row of `queue` (state `pending`, then `running`) until it finishes; then, in the same transaction,
it leaves `queue` and its entry enters `history`. Claiming a prompt counts an attempt and is committed before the
prompt runs, so after a crash the rows still `running` are exactly the prompts that were running, and their
attempt counts say how often they have already been started.

Prompts and history entries are stored as the JSON text they are served as: GET /queue and GET /history splice
that text into their answers instead of parsing and re-serialising it.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queue (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT NOT NULL UNIQUE,
    number REAL NOT NULL,
    client_id TEXT,
    prompt TEXT NOT NULL,
    extra_data TEXT NOT NULL,
    outputs TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'running')),
    attempts INTEGER NOT NULL DEFAULT 0,
    queued_at REAL NOT NULL,
    started_at REAL
);
CREATE INDEX IF NOT EXISTS queue_order ON queue (state, number, seq);
CREATE TABLE IF NOT EXISTS history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt_id TEXT NOT NULL UNIQUE,
    number REAL NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    entry TEXT NOT NULL,
    finished_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StoreError(Exception):
    """A request the store refuses; `kind` names why (queue_full, duplicate_prompt_id)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


class DatabaseInUse(RuntimeError):
    """Another process holds the database (two servers must never share one queue)."""


@dataclass(frozen=True)
class QueueItem:
    prompt_id: str
    number: float
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]
    client_id: str | None
    attempts: int


def number_json(number: float) -> int | float:
    """ComfyUI's numbers are counters (ints) unless a client gave its own."""
    return int(number) if float(number).is_integer() else number


class QueueStore:
    """Thread-safe: the event loop's helper threads and the worker share one connection under one lock."""

    def __init__(self, path: str | os.PathLike, *, max_history: int = 10000):
        self.path = Path(path)
        self.max_history = max_history
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = _exclusive_lock(self.path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a prompt answered with 200 survives a power cut
        self._db.execute("PRAGMA busy_timeout=5000")
        with self._lock:
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} was written by a newer sdgraph (schema {version}); upgrade "
                                   "sdgraph or start with another --database")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._lock_file.close()

    # -- queue -------------------------------------------------------------------------------------------
    def put(self, *, prompt_id: str, prompt: dict, extra_data: dict, outputs: Sequence[str], client_id: str | None,
            number: float | None, front: bool, max_pending: int) -> float:
        """Queue a prompt; returns its number. Raises StoreError when the queue is full or the id is taken."""
        texts = (_dumps(prompt), _dumps(extra_data), _dumps(list(outputs)))
        with self._lock, _transaction(self._db):
            pending = self._db.execute("SELECT COUNT(*) FROM queue WHERE state='pending'").fetchone()[0]
            if pending >= max_pending:
                raise StoreError("queue_full", f"the queue already holds {pending} pending prompts (the limit); "
                                 "retry when some have run, or start the server with a larger --max-queue")
            if self._known(prompt_id):
                raise StoreError("duplicate_prompt_id", f"prompt_id {prompt_id!r} is already queued or in the "
                                 "history; send a new id or leave prompt_id out")
            if number is None:
                counter = int(self._setting("next_number", "0"))
                self._set_setting("next_number", str(counter + 1))
                number = float(-counter if front else counter)
            self._db.execute(
                "INSERT INTO queue (prompt_id, number, client_id, prompt, extra_data, outputs, queued_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", (prompt_id, number, client_id, *texts, time.time()))
        return number

    def claim(self, prompt_id: str | None = None) -> QueueItem | None:
        """The next pending prompt (or the pending prompt `prompt_id`), now marked running with one more attempt
        (committed before it runs)."""
        with self._lock, _transaction(self._db):
            row = self._db.execute(
                "SELECT prompt_id, number, prompt, extra_data, outputs, client_id, attempts FROM queue "
                "WHERE state='pending' AND (? IS NULL OR prompt_id=?) ORDER BY number, seq LIMIT 1",
                (prompt_id, prompt_id)).fetchone()
            if row is None:
                return None
            self._db.execute("UPDATE queue SET state='running', attempts=attempts+1, started_at=? WHERE prompt_id=?",
                             (time.time(), row[0]))
        return _item(row, attempts=row[6] + 1)

    def pending(self, limit: int) -> list[QueueItem]:
        """The first `limit` pending prompts in run order, not claimed (scale-out routing looks ahead)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT prompt_id, number, prompt, extra_data, outputs, client_id, attempts FROM queue "
                "WHERE state='pending' ORDER BY number, seq LIMIT ?", (limit,)).fetchall()
        return [_item(row, attempts=row[6]) for row in rows]

    def running(self) -> list[QueueItem]:
        """Prompts marked running: at start-up, those a previous process was running when it stopped."""
        with self._lock:
            rows = self._db.execute(
                "SELECT prompt_id, number, prompt, extra_data, outputs, client_id, attempts FROM queue "
                "WHERE state='running' ORDER BY number, seq").fetchall()
        return [_item(row, attempts=row[6]) for row in rows]

    def requeue(self, prompt_id: str, *, forget_attempt: bool) -> None:
        """Put a running prompt back in line (after a crash, or, forgetting the attempt, at a clean stop)."""
        with self._lock, _transaction(self._db):
            self._db.execute("UPDATE queue SET state='pending', started_at=NULL, attempts=attempts-? "
                             "WHERE prompt_id=? AND state='running'", (1 if forget_attempt else 0, prompt_id))

    def finish(self, prompt_id: str, *, number: float, status: str, attempts: int, entry: dict) -> None:
        """Move a prompt from the queue to the history (one transaction), keeping at most max_history entries."""
        text = _dumps(entry)
        with self._lock, _transaction(self._db):
            self._db.execute("DELETE FROM queue WHERE prompt_id=?", (prompt_id,))
            self._db.execute("INSERT OR REPLACE INTO history (prompt_id, number, status, attempts, entry, "
                             "finished_at) VALUES (?, ?, ?, ?, ?, ?)",
                             (prompt_id, number, status, attempts, text, time.time()))
            self._db.execute("DELETE FROM history WHERE seq <= (SELECT seq FROM history ORDER BY seq DESC "
                             "LIMIT 1 OFFSET ?)", (self.max_history,))

    def remaining(self) -> int:
        """Pending plus running: ComfyUI's queue_remaining."""
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM queue").fetchone()[0]

    def queue_json(self) -> str:
        """GET /queue: items are [number, prompt_id, prompt, extra_data, outputs_to_execute]."""
        with self._lock:
            rows = self._db.execute("SELECT state, number, prompt_id, prompt, extra_data, outputs FROM queue "
                                    "ORDER BY number, seq").fetchall()
        parts: dict[str, list[str]] = {"running": [], "pending": []}
        for state, number, prompt_id, prompt, extra, outputs in rows:
            parts[state].append(f"[{_dumps(number_json(number))},{_dumps(prompt_id)},{prompt},{extra},{outputs}]")
        return f'{{"queue_running":[{",".join(parts["running"])}],"queue_pending":[{",".join(parts["pending"])}]}}'

    def delete_pending(self, prompt_ids: Iterable[str]) -> int:
        ids = list(prompt_ids)
        with self._lock, _transaction(self._db):
            return sum(self._db.execute("DELETE FROM queue WHERE prompt_id=? AND state='pending'", (pid,)).rowcount
                       for pid in ids)

    def clear_pending(self) -> int:
        with self._lock, _transaction(self._db):
            return self._db.execute("DELETE FROM queue WHERE state='pending'").rowcount

    # -- history -----------------------------------------------------------------------------------------
    def history_json(self, *, max_items: int | None = None, offset: int | None = None) -> str:
        """ComfyUI's paging: oldest first; max_items alone gives the newest max_items; offset counts from the
        oldest."""
        with self._lock:
            if offset is None or offset < 0:
                offset = 0
                if max_items is not None:
                    total = self._db.execute("SELECT COUNT(*) FROM history").fetchone()[0]
                    offset = max(0, total - max_items)
            limit = -1 if max_items is None else max_items
            rows = self._db.execute("SELECT prompt_id, entry FROM history ORDER BY seq LIMIT ? OFFSET ?",
                                    (limit, offset)).fetchall()
        return "{" + ",".join(f"{_dumps(pid)}:{entry}" for pid, entry in rows) + "}"

    def history_entry_json(self, prompt_id: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT entry FROM history WHERE prompt_id=?", (prompt_id,)).fetchone()
        return None if row is None else row[0]

    def delete_history(self, prompt_ids: Iterable[str]) -> int:
        ids = list(prompt_ids)
        with self._lock, _transaction(self._db):
            return sum(self._db.execute("DELETE FROM history WHERE prompt_id=?", (pid,)).rowcount for pid in ids)

    def clear_history(self) -> int:
        with self._lock, _transaction(self._db):
            return self._db.execute("DELETE FROM history").rowcount

    # -- one prompt --------------------------------------------------------------------------------------
    def describe(self, prompt_id: str) -> dict[str, Any] | None:
        """Where a prompt is: pending (with its position), running, or finished (with its status)."""
        with self._lock:
            row = self._db.execute("SELECT state, number, attempts, seq FROM queue WHERE prompt_id=?",
                                   (prompt_id,)).fetchone()
            if row is not None:
                state, number, attempts, seq = row
                ahead = self._db.execute(
                    "SELECT COUNT(*) FROM queue WHERE state='pending' AND (number < ? OR (number = ? AND seq < ?))",
                    (number, number, seq)).fetchone()[0]
                described = {"prompt_id": prompt_id, "state": state, "number": number_json(number),
                             "attempts": attempts}
                if state == "pending":
                    described["position"] = ahead
                return described
            row = self._db.execute("SELECT status, number, attempts FROM history WHERE prompt_id=?",
                                   (prompt_id,)).fetchone()
        if row is None:
            return None
        return {"prompt_id": prompt_id, "state": row[0], "number": number_json(row[1]), "attempts": row[2]}

    # -- helpers -----------------------------------------------------------------------------------------
    def _known(self, prompt_id: str) -> bool:
        return any(self._db.execute(f"SELECT 1 FROM {table} WHERE prompt_id=?", (prompt_id,)).fetchone()
                   for table in ("queue", "history"))

    def _setting(self, key: str, default: str) -> str:
        row = self._db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return default if row is None else row[0]

    def _set_setting(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK when the block raises."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, value, tb) -> None:
        self.db.execute("ROLLBACK" if kind is not None else "COMMIT")


def _exclusive_lock(path: Path):
    lock = open(path.with_name(path.name + ".lock"), "a+")  # noqa: SIM115 - held open for the store's life
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise DatabaseInUse(f"another sdgraph server is using {path}; stop it first, or give this one its own "
                            "--database (or --base-dir)") from None
    return lock


def _item(row: tuple, *, attempts: int) -> QueueItem:
    prompt_id, number, prompt, extra, outputs, client_id, _ = row
    return QueueItem(prompt_id, number, json.loads(prompt), json.loads(extra), json.loads(outputs), client_id,
                     attempts)


def _dumps(value: Any) -> str:
    return json_text(value)


def json_text(value: Any) -> str:
    """Compact JSON that every client can parse: NaN and infinities become null, unknown objects their str().
    ASCII only (other characters as \\u escapes), so no text can fail to encode, in a reply or in SQLite: a
    lone surrogate from a node's output or a file name that is not UTF-8 stays an escape."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=str)
    except ValueError:
        return json.dumps(_finite(value), separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=str)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
