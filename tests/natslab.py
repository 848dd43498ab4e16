"""Real nats-server processes with JetStream on loopback, for the tests of the NATS transport.

A ``NatsServer`` is one ``nats-server`` (Debian's package, ``make setup`` installs it) run from a
config file written into its own temporary directory, which also holds its JetStream store and
its log (stdout and stderr of every run, appended). Its ports are picked once, on 127.0.0.1, and
kept by ``restart()`` with the store, as a restarted member of a real deployment keeps them.

A ``NatsCluster`` is three such servers routed to each other: one JetStream cluster (JetStream
clustering needs a ``cluster`` block and a distinct ``server_name`` per member).

Readiness is read from the monitoring port, never guessed from a sleep:

- ``NatsServer.start()`` returns once ``/healthz?js-enabled-only=true`` answers 200: the server
  listens for clients (and routes) and JetStream is enabled. A clustered member passes this
  alone, before it has met its peers (the plain ``/healthz`` would answer 503 "JetStream has not
  established contact with a meta leader" until then).
- ``NatsCluster.wait_formed()`` returns once every running member names the same meta leader in
  ``/jsz``'s ``meta_cluster`` (2.9 reports ``leader`` and ``cluster_size`` there, and the leader
  alone lists its ``replicas`` with ``current``/``offline``), the leader sees every other
  running member as current, and each running member's plain ``/healthz`` answers 200 (it is in
  contact with the meta leader and its streams and consumers have caught up).

Every wait is bounded; a server that does not come up is killed and the error carries the tail
of its log. ``close()`` (and the context managers and fixtures) stop the processes, SIGKILL after
``STOP_TIMEOUT``, and remove the directories, also when a test fails.

The calls block (subprocess, HTTP polls): from a coroutine, call the slow ones (``start``,
``restart``, ``wait_formed``) through ``asyncio.to_thread`` so the client's loop keeps running.

Importable from every test directory as ``natslab`` (tests/ holds a conftest.py and no
``__init__.py``, so pytest puts it on ``sys.path``). The fixtures ``nats_server`` and
``nats_cluster`` reach a directory's tests through its conftest.py, which imports them (as
tests/transport/conftest.py does); a test module importing them itself would shadow them with its
parameters.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeAlias

import pytest

from bpfsync.demo.cluster import free_port, stop_process

__all__ = [
    "NATS_SERVER",
    "START_TIMEOUT",
    "STOP_TIMEOUT",
    "Auth",
    "ClusterSpec",
    "NatsCluster",
    "NatsLabError",
    "NatsServer",
    "Token",
    "UserPassword",
    "Users",
    "nats_cluster",
    "nats_server",
]

# Debian installs it in /usr/sbin, which a non-root PATH may lack
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
HOST = "127.0.0.1"  # every listener, and every route, on loopback only
START_TIMEOUT = 20.0  # seconds: generous, the tests must pass on a loaded 2-core box (as aio.WAIT)
STOP_TIMEOUT = 10.0  # seconds for a graceful exit before SIGKILL
POLL = 0.05  # seconds between two looks at the monitoring port
LOG_TAIL = 4000  # characters of a server's log shown with an error or a failed test
MiB = 1 << 20


class NatsLabError(RuntimeError):
    """The harness could not bring a server or a cluster to the state asked for."""


@dataclass(frozen=True)
class UserPassword:
    user: str
    password: str


@dataclass(frozen=True)
class Token:
    token: str


@dataclass(frozen=True)
class Users:
    """An ``authorization`` block given whole (``bpfsync nats-users`` prints one): the
    harness itself connects as no one, so each test logs in as one of its users."""

    block: str


Auth: TypeAlias = UserPassword | Token | Users


@dataclass(frozen=True)
class ClusterSpec:
    """Membership of one JetStream cluster: its name and the route URLs of the other members
    (``nats-route://127.0.0.1:PORT``); the server's own route port is ``cluster_port``."""

    name: str
    routes: tuple[str, ...]


# One opener that ignores http_proxy and friends: the monitoring port is on loopback.
_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _quote(value: str) -> str:
    """A string in nats-server's config syntax: its double-quoted strings take JSON's escapes."""
    return json.dumps(value)


def _tail(path: Path, chars: int = LOG_TAIL) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


class NatsServer:
    """One nats-server with JetStream; ports picked at construction and kept for its life."""

    def __init__(
        self,
        server_name: str | None = None,
        *,
        auth: Auth | None = None,
        cluster: ClusterSpec | None = None,
        port: int | None = None,
        http_port: int | None = None,
        cluster_port: int | None = None,
        max_memory_store: int = 256 * MiB,
        max_file_store: int = 2048 * MiB,
    ) -> None:
        self.server_name = server_name or f"nats-{uuid.uuid4().hex[:8]}"
        self.auth = auth
        self.cluster = cluster
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.cluster_port = (cluster_port or free_port()) if cluster else None
        self.max_memory_store = max_memory_store
        self.max_file_store = max_file_store
        self.dir = Path(tempfile.mkdtemp(prefix=f"natslab-{self.server_name}-"))
        self.config_path = self.dir / "nats.conf"
        self.store_dir = self.dir / "store"  # nats-server keeps its files in store/jetstream/
        self.log_path = self.dir / "nats.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path.write_text(self.config_text())

    # -- what it is

    @property
    def url(self) -> str:
        """The client URL, ``nats://127.0.0.1:PORT`` (credentials are not in it)."""
        return f"nats://{HOST}:{self.port}"

    @property
    def route_url(self) -> str:
        """The URL other members route to; only for a clustered server."""
        if self.cluster_port is None:
            raise NatsLabError(f"{self.server_name} is not clustered: it has no route URL")
        return f"nats-route://{HOST}:{self.cluster_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running and self.proc else None

    def auth_options(self) -> dict[str, str]:
        """The ``nats.connect`` keyword arguments that authenticate to this server."""
        match self.auth:
            case UserPassword(user, password):
                return {"user": user, "password": password}
            case Token(token):
                return {"token": token}
        return {}

    def config_text(self) -> str:
        """The config file, in nats-server's syntax (``nats-server -c FILE -t`` checks it)."""
        lines = [
            "# written by tests/natslab.py",
            f"server_name: {_quote(self.server_name)}",
            f"listen: {_quote(f'{HOST}:{self.port}')}",
            f"http: {_quote(f'{HOST}:{self.http_port}')}",
            "jetstream {",
            f"  store_dir: {_quote(str(self.store_dir))}",
            f"  max_memory_store: {self.max_memory_store}",
            f"  max_file_store: {self.max_file_store}",
            "}",
        ]
        match self.auth:
            case UserPassword(user, password):
                lines += ["authorization {", f"  user: {_quote(user)}",
                          f"  password: {_quote(password)}", "}"]
            case Token(token):
                lines += ["authorization {", f"  token: {_quote(token)}", "}"]
            case Users(block):
                lines += [block]
        if self.cluster is not None:
            lines += ["cluster {", f"  name: {_quote(self.cluster.name)}",
                      f"  listen: {_quote(f'{HOST}:{self.cluster_port}')}", "  routes: ["]
            lines += [f"    {_quote(route)}" for route in self.cluster.routes]
            lines += ["  ]", "}"]
        return "\n".join(lines) + "\n"

    # -- its process

    def spawn(self) -> None:
        """Start the process without waiting for it to serve (``wait_serving`` does)."""
        if self.running:
            raise NatsLabError(f"{self.server_name} is already running")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [NATS_SERVER, "-c", str(self.config_path)],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            )

    def wait_serving(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until ``/healthz?js-enabled-only=true`` answers 200 (it answers 503 "failed to be
        ready for connections" until the client and route listeners are up); if the process
        exits or the time runs out, kill it and raise NatsLabError with the tail of its log."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                code = self.proc.returncode if self.proc else None
                self.proc = None
                raise NatsLabError(
                    f"nats-server {self.server_name} exited with {code} while starting; "
                    f"log tail:\n{self.log_tail()}")
            if self.healthz(js_enabled_only=True):
                return
            if time.monotonic() > deadline:
                self.stop(signal.SIGKILL)
                raise NatsLabError(
                    f"nats-server {self.server_name} did not serve within {timeout} s "
                    f"(client port {self.port}, monitoring port {self.http_port}); "
                    f"log tail:\n{self.log_tail()}")
            time.sleep(POLL)

    def start(self, timeout: float = START_TIMEOUT) -> NatsServer:
        """Start the server and wait until it serves clients with JetStream enabled."""
        self.spawn()
        self.wait_serving(timeout)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int | None:
        """Signal the server, wait up to ``timeout`` s, then SIGKILL it; its exit code (None if
        it was not running). The store and the ports stay for a later ``start``."""
        proc, self.proc = self.proc, None
        return None if proc is None else stop_process(proc, sig, timeout)

    def kill(self) -> int | None:
        """SIGKILL: a crash, no graceful shutdown."""
        return self.stop(signal.SIGKILL)

    def restart(self, sig: int = signal.SIGTERM, timeout: float = START_TIMEOUT) -> NatsServer:
        """Stop (with ``sig``) and start again on the same ports and store."""
        self.stop(sig)
        return self.start(timeout)

    def close(self) -> None:
        """Stop the server and remove its directory (config, store, log)."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- what it says

    def log_tail(self, chars: int = LOG_TAIL) -> str:
        return _tail(self.log_path, chars)

    def monitor(self, path: str) -> tuple[int, Any] | None:
        """GET ``path`` on the monitoring port: (status, parsed JSON body), or None if nothing
        answers."""
        url = f"http://{HOST}:{self.http_port}{path}"
        try:
            with _http.open(url, timeout=2) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as err:  # 503 and the like still carry a JSON body
            with err:
                try:
                    return err.code, json.load(err)
                except ValueError:
                    return err.code, None
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def healthz(self, js_enabled_only: bool = False) -> bool:
        """``/healthz`` answers 200. With ``js_enabled_only``: the server serves and JetStream
        is enabled; without it also (when clustered) in contact with a meta leader and its
        streams and consumers current."""
        answer = self.monitor("/healthz?js-enabled-only=true" if js_enabled_only else "/healthz")
        return answer is not None and answer[0] == 200

    def jsz(self) -> dict[str, Any] | None:
        """``/jsz``: the server's JetStream report (None if it does not answer)."""
        answer = self.monitor("/jsz")
        if answer is None or answer[0] != 200 or not isinstance(answer[1], dict):
            return None
        return answer[1]

    def meta_leader(self) -> str | None:
        """The server_name this server sees as JetStream meta leader, if any."""
        meta = (self.jsz() or {}).get("meta_cluster") or {}
        return meta.get("leader") or None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"NatsServer({self.server_name!r}, {self.url}, {state})"


class NatsCluster:
    """``size`` NatsServers routed to each other on loopback: one JetStream cluster.

    Members are named ``n0``, ``n1``, ...; ``servers[i]`` is member i. A context manager:
    entering starts every member and waits until the cluster is formed; leaving stops them all
    and removes their directories."""

    def __init__(self, size: int = 3, name: str = "natslab", auth: Auth | None = None) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one member, not {size}")
        self.name = name
        cluster_ports = [free_port() for _ in range(size)]
        routes = [f"nats-route://{HOST}:{p}" for p in cluster_ports]
        self.servers: list[NatsServer] = []
        try:
            for i, own in enumerate(cluster_ports):
                others = tuple(r for j, r in enumerate(routes) if j != i)
                self.servers.append(NatsServer(
                    f"n{i}", auth=auth, cluster=ClusterSpec(name, others), cluster_port=own))
        except BaseException:
            self.close()
            raise

    @property
    def urls(self) -> list[str]:
        """Every member's client URL, to hand to ``nats.connect(servers=...)``."""
        return [s.url for s in self.servers]

    def __len__(self) -> int:
        return len(self.servers)

    def __getitem__(self, i: int) -> NatsServer:
        return self.servers[i]

    def __iter__(self) -> Iterator[NatsServer]:
        return iter(self.servers)

    def auth_options(self) -> dict[str, str]:
        return self.servers[0].auth_options()

    def start_all(self, timeout: float = START_TIMEOUT, current: bool = True) -> None:
        """Start every stopped member (all spawned first, then waited for) and wait until the
        cluster is formed (``wait_formed(current)``: with False, not for its streams and
        consumers to be current, which may take their clients)."""
        stopped = [s for s in self.servers if not s.running]
        for s in stopped:
            s.spawn()
        for s in stopped:
            s.wait_serving(timeout)
        self.wait_formed(timeout, current)

    def start(self, i: int, timeout: float = START_TIMEOUT) -> NatsServer:
        """Start member ``i`` (it keeps its store and ports) and wait until it serves; call
        ``wait_formed`` to wait until it has rejoined."""
        return self.servers[i].start(timeout)

    def kill(self, i: int) -> int | None:
        """SIGKILL member ``i``."""
        return self.servers[i].kill()

    def stop(self, i: int, sig: int = signal.SIGTERM) -> int | None:
        return self.servers[i].stop(sig)

    def running(self) -> list[NatsServer]:
        return [s for s in self.servers if s.running]

    def index(self, server_name: str) -> int:
        """The member index of ``server_name`` (as ``meta_leader`` names it)."""
        for i, s in enumerate(self.servers):
            if s.server_name == server_name:
                return i
        raise KeyError(server_name)

    def meta_leader(self) -> str | None:
        """The meta leader every running member agrees on; None while they do not agree."""
        seen = {s.meta_leader() for s in self.running()}
        return seen.pop() if len(seen) == 1 else None

    def formed(self, current: bool = True) -> bool:
        """Every running member names one meta leader, that leader reports every other running
        member current and the configured size, and each running member is healthy: with
        ``current``, also every stream and consumer replica it holds is current (a consumer
        whose client is busy catching up may stay behind for a while)."""
        running = self.running()
        leader = self.meta_leader()
        if not running or leader is None:
            return False
        try:
            meta = (self.servers[self.index(leader)].jsz() or {}).get("meta_cluster") or {}
        except KeyError:
            return False
        if meta.get("cluster_size") != len(self.servers):
            return False
        current = {r.get("name") for r in meta.get("replicas") or ()
                   if r.get("current") and not r.get("offline")}
        if not {s.server_name for s in running} - {leader} <= current:
            return False
        return all(s.healthz(js_enabled_only=not current) for s in running)

    def wait_formed(self, timeout: float = START_TIMEOUT, current: bool = True) -> str:
        """Wait until ``formed(current)``; returns the meta leader's server_name. On timeout raises
        NatsLabError with what each member reports and the tail of each log."""
        deadline = time.monotonic() + timeout
        while not self.formed(current):
            if time.monotonic() > deadline:
                reports = "\n".join(
                    f"--- {s.server_name} ({'running' if s.running else 'stopped'}): "
                    f"meta_cluster={(s.jsz() or {}).get('meta_cluster')} "
                    f"healthz={s.monitor('/healthz')}\n{s.log_tail(LOG_TAIL // 2)}"
                    for s in self.servers)
                raise NatsLabError(
                    f"JetStream cluster {self.name} not formed within {timeout} s:\n{reports}")
            time.sleep(POLL)
        leader = self.meta_leader()
        assert leader is not None
        return leader

    def close(self) -> None:
        """Stop every member and remove every directory (each attempted even if one fails)."""
        with contextlib.ExitStack() as stack:
            for s in self.servers:
                stack.callback(s.close)

    def __enter__(self) -> NatsCluster:
        try:
            self.start_all()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _print_logs(servers: Sequence[NatsServer]) -> None:
    # Printed at every teardown: pytest shows a test's captured output only when it fails.
    for s in servers:
        print(f"--- nats-server {s.server_name} log (last {LOG_TAIL} chars) ---")
        print(s.log_tail())


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """One started nats-server with JetStream, no auth; stopped and removed at teardown."""
    with NatsServer() as server:
        yield server
        _print_logs([server])


@pytest.fixture
def nats_cluster() -> Iterator[NatsCluster]:
    """A formed three-member JetStream cluster; stopped and removed at teardown."""
    with NatsCluster(3) as cluster:
        yield cluster
        _print_logs(cluster.servers)
