"""The agent's HTTP endpoint: /metrics (Prometheus), /healthz, /readyz, /status and /slots/MAP
(every node's register per key, JSON; what `bpfsync dump --agent` shows).

Served by the standard library's WSGI server in a daemon thread: a few requests a second from a
scraper and a CLI do not justify another web framework.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from bpfsync.errors import ConfigError

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class StatusServer:
    """Serves the agent's state; ``status`` is called per request from the server thread."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        status: Callable[[], dict[str, Any]],
        slots: Callable[[str], dict[str, Any]] | None = None,
    ) -> None:
        self._metrics = make_wsgi_app(registry)
        self._status = status
        self._slots = slots
        try:
            self._server = make_server(host, port, self._app, _Server,
                                       handler_class=_QuietHandler)
        except OSError as err:
            raise ConfigError(f"http_listen {host}:{port}: {err.strerror}") from err
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="bpfsync-http")

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _app(self, environ: dict[str, Any], start: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return self._metrics(environ, start)  # type: ignore[no-any-return]
        if path == "/healthz":
            return _reply(start, "200 OK", {"ok": True})
        state = self._status()
        if path == "/readyz":
            ready = bool(state.get("ready"))
            return _reply(start, "200 OK" if ready else "503 Service Unavailable", {"ready": ready})
        if path == "/status":
            return _reply(start, "200 OK", state)
        if path.startswith("/slots/") and self._slots is not None:
            try:
                return _reply(start, "200 OK", self._slots(path.removeprefix("/slots/")))
            except KeyError as err:
                return _reply(start, "404 Not Found", {"error": f"no synced map {err.args[0]!r}"})
        return _reply(start, "404 Not Found", {"error": f"no such endpoint {path}"})


def _reply(start: StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body, indent=1).encode()
    start(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]
