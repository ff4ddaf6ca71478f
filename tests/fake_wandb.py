"""A local stand-in for a wandb server, enough for ``wandb sync`` (wandb-core) to upload runs.

It answers the requests wandb-core's sync makes (GraphQL ``UpsertBucket`` and
``CreateRunFiles``, the file stream, file uploads), records each run's uploaded config, refuses
the runs named in ``refuse`` (as a server refusing a project would: an error wandb reports and
goes on) and can wait ``delay`` seconds per request (a distant server), counting how many runs
had a request in flight at once. The real client talks to it over HTTP; nothing leaves the
machine.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

API_KEY = "a" * 40  # wandb checks the key's shape only; this server accepts any


@dataclass
class Server:
    url: str = ""
    delay: float = 0.0
    refuse: set[str] = field(default_factory=set)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_runs_at_once: int = 0
    _in_flight: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self, run: str) -> None:
        with self._lock:
            self._in_flight[run] = self._in_flight.get(run, 0) + 1
            self.max_runs_at_once = max(self.max_runs_at_once, len(self._in_flight))

    def leave(self, run: str) -> None:
        with self._lock:
            self._in_flight[run] -= 1
            if not self._in_flight[run]:
                del self._in_flight[run]

    def env(self) -> dict[str, str]:
        """Environment for ``wandb sync`` to upload here."""
        return {"WANDB_BASE_URL": self.url, "WANDB_API_KEY": API_KEY, "WANDB_MODE": "online"}


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _answer(self, run: str, code: int, body: dict[str, Any]) -> None:
            server.enter(run)
            try:
                time.sleep(server.delay)
            finally:
                server.leave(run)
            self._reply(code, body)

        def do_POST(self) -> None:
            body = self._body()
            if self.path.startswith("/graphql"):
                self._graphql(json.loads(body))
            elif match := re.match(r"/files/[^/]+/[^/]+/([^/]+)/file_stream", self.path):
                self._answer(match.group(1), 200, {"exitcode": None, "limits": {}})
            else:  # wandb-core's own telemetry
                self._reply(200, {})

        def do_PUT(self) -> None:  # a file upload, to the URL CreateRunFiles gave
            self._body()
            self._answer(self.path.split("/")[2], 200, {})

        def _graphql(self, request: dict[str, Any]) -> None:
            match = re.search(r"(?:query|mutation)\s+(\w+)", request.get("query", ""))
            op, var = match.group(1) if match else "", request.get("variables") or {}
            run = var.get("name") or var.get("run") or ""
            if op == "UpsertBucket":
                if run in server.refuse:
                    self._answer(run, 403, {"errors": [{"message": f"run {run} refused"}]})
                    return
                if var.get("config"):
                    config = json.loads(var["config"])
                    server.configs[run] = {k: v.get("value") for k, v in config.items()}
                project = {
                    "id": "p",
                    "name": var.get("project") or "mq",
                    "entity": {"id": "e", "name": var.get("entity") or "me"},
                }
                bucket = {"id": run, "name": run, "displayName": var.get("displayName")}
                bucket |= {"description": None, "config": "{}", "sweepName": None}
                bucket |= {"historyLineCount": 0, "project": project}
                data = {"upsertBucket": {"bucket": bucket, "inserted": True}}
            elif op == "CreateRunFiles":
                host = self.headers["Host"]
                files = [
                    {"name": f, "uploadUrl": f"http://{host}/upload/{run}/{f}"}
                    for f in var.get("files", [])
                ]
                data = {"createRunFiles": {"runID": run, "uploadHeaders": [], "files": files}}
            else:
                data = {}
            self._answer(run, 200, {"data": data})

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def fake_wandb(delay: float = 0.0, refuse: set[str] | None = None) -> Iterator[Server]:
    server = Server(delay=delay, refuse=set(refuse or ()))
    http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    http.daemon_threads = True
    http.handle_error = lambda request, address: None  # clients closing early: not our concern
    server.url = f"http://127.0.0.1:{http.server_address[1]}"
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        http.shutdown()
        http.server_close()
