"""SQLite store for the Responses API: stored responses survive a server restart.

One table, one row per response: the response object returned to the client (JSON) and the full
conversation that produced it plus the assistant's output (`messages`, JSON), so that
`previous_response_id` rebuilds the history without walking a chain. The file defaults to
`llmkit.hub.cache_dir()/responses.sqlite`. Each call opens its own short-lived connection (SQLite is
safe across threads that way, and WAL mode lets readers run during a write).
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any


def default_store_path() -> Path:
    from llmkit.hub import cache_dir

    return cache_dir() / "responses.sqlite"


class ResponseStore:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_store_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db, db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, "
                "response TEXT NOT NULL, messages TEXT NOT NULL)"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    def put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT OR REPLACE INTO responses (id, created_at, response, messages) VALUES (?, ?, ?, ?)",
                (response["id"], int(response.get("created_at") or time.time()), json.dumps(response),
                 json.dumps(messages)),
            )

    def get(self, response_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """(response object, conversation including the response's output) or None."""
        with closing(self._connect()) as db:
            sql = "SELECT response, messages FROM responses WHERE id = ?"
            row = db.execute(sql, (response_id,)).fetchone()
        return (json.loads(row[0]), json.loads(row[1])) if row else None

    def delete(self, response_id: str) -> bool:
        with closing(self._connect()) as db, db:
            return db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0
