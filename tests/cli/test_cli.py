"""The command line, run as a user would: real processes, real maps, bpftool as the writer."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from bpfsync.demo.cluster import (
    KEY,
    VALUE,
    Cluster,
    Node,
    free_port,
    session,
    stop_process,
    wait_for,
)
from bpfsync.kernel.maps import Map
from bpfsync.layout import prefix_bytes

BPFSYNC = [sys.executable, "-m", "bpfsync.cli.main"]
MakeMap = Callable[..., Map]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def node() -> Iterator[Node]:
    with Cluster(("solo",), tag="cli") as c:
        yield c["solo"]


def _hex_words(data: bytes) -> list[str]:
    return [f"0x{b:02x}" for b in data]


def test_version_is_pyproject_s_through_the_package_metadata() -> None:
    import bpfsync

    written = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert metadata.version("bpfsync") == written, (
        "the installed metadata is older than pyproject.toml: reinstall (make venv)")
    assert bpfsync.__version__ == written
    # pyproject.toml is the only place the version is written
    assert f'"{written}"' not in (ROOT / "src" / "bpfsync" / "__init__.py").read_text()
    res = subprocess.run([*BPFSYNC, "--version"], capture_output=True, text=True, check=True)
    assert res.stdout == f"bpfsync {written}\n"


def test_watch_json_shows_bpftool_writes(node: Node) -> None:
    proc = subprocess.Popen(
        [*BPFSYNC, "watch", str(node.pin), "--json", "--interval", "0.1", "--count", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(1.5)  # let it take its baseline scan
        key, v1, v2 = KEY.pack(42), session(1), session(2)
        bpftool = ["bpftool", "map", "update", "pinned", str(node.pin), "key", *_hex_words(key)]
        subprocess.run([*bpftool, "value", *_hex_words(v1)], check=True)
        time.sleep(0.5)
        subprocess.run([*bpftool, "value", *_hex_words(v2)], check=True)
        time.sleep(0.5)
        subprocess.run(["bpftool", "map", "delete", "pinned", str(node.pin), "key",
                        *_hex_words(key)], check=True)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [x["op"] for x in lines] == ["update", "update", "delete"]
    assert all(x["key"] == key.hex() for x in lines)
    assert lines[0]["value"] == v1.hex() and lines[1]["value"] == v2.hex()
    assert lines[2]["value"] is None
    fields = lines[1]["value_fields"]  # decoded by the map's BTF
    assert fields["bytes"] == VALUE.unpack(v2)[0] and fields["port"] == VALUE.unpack(v2)[2]


def test_dump_decodes_fields(node: Node) -> None:
    node.put(7, session(7))
    out = subprocess.run([*BPFSYNC, "dump", str(node.pin), "--json"], capture_output=True,
                         text=True, check=True).stdout
    (entry,) = [json.loads(line) for line in out.splitlines()]
    assert entry["key_fields"] == {"value": 7} or entry["key"] == KEY.pack(7).hex()
    assert entry["value_fields"]["backend"] == 7 % 7


def test_dump_shows_lpm_keys_as_prefixes_without_btf(make_map: MakeMap, pin_dir: str) -> None:
    """A trie made like bpftool makes it (no BTF): its keys are prefixes by the map type."""
    v4, v6 = make_map("lpm_trie", 8, 8, 16), make_map("lpm_trie", 20, 8, 16)
    v4.update(prefix_bytes("198.51.100.0/24", 8), struct.pack("<Q", 7))
    v6.update(prefix_bytes("2001:db8::/32", 20), struct.pack("<Q", 8))
    pin4, pin6 = (os.path.join(pin_dir, f"bst_map-{i}") for i in range(2))
    out = subprocess.run([*BPFSYNC, "dump", pin4], capture_output=True, text=True,
                         check=True).stdout
    assert "198.51.100.0/24 = 0700000000000000" in out.splitlines()
    out = subprocess.run([*BPFSYNC, "dump", pin6, "--json"], capture_output=True, text=True,
                         check=True).stdout
    (entry,) = [json.loads(line) for line in out.splitlines()]
    assert entry["key_fields"] == "2001:db8::/32"
    assert entry["key"] == prefix_bytes("2001:db8::/32", 20).hex()


def test_watch_shows_lpm_keys_as_prefixes(make_map: MakeMap, pin_dir: str) -> None:
    make_map("lpm_trie", 8, 8, 16)
    pin = os.path.join(pin_dir, "bst_map-0")
    proc = subprocess.Popen([*BPFSYNC, "watch", pin, "--count", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        time.sleep(1.5)  # let it take its baseline scan
        key = _hex_words(prefix_bytes("198.51.100.0/24", 8))
        subprocess.run(["bpftool", "map", "update", "pinned", pin, "key", *key, "value",
                        *_hex_words(struct.pack("<Q", 9))], check=True)  # fmt: skip
        subprocess.run(["bpftool", "map", "delete", "pinned", pin, "key", *key], check=True)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    lines = out.splitlines()[-2:]  # after "watching ... (syscall+poll)"
    assert lines == ["update 198.51.100.0/24 = 0900000000000000  (trace)",
                     "delete 198.51.100.0/24  (trace)"], out  # fmt: skip


def test_bad_config_names_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bpfsync.yaml"
    cfg.write_text("node_id: a\nlisten: 127.0.0.1:notaport\nmaps:\n  - path: id:3\nextra: 1\n")
    res = subprocess.run([*BPFSYNC, "run", "--config", str(cfg)], capture_output=True, text=True)
    assert res.returncode == 2
    assert "listen" in res.stderr and "maps.0.path" in res.stderr and "extra" in res.stderr
    assert "Traceback" not in res.stderr


def test_a_map_not_pinned_yet_is_waited_for_and_a_missing_name_is_an_error(
    tmp_path: Path,
) -> None:
    """A pin path with nothing pinned yet (the data plane is not up): the agent runs and says
    so. A name: map the kernel does not know is still a clear start-up error."""
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*BPFSYNC, "run", "--node-id", "a", "--map", "/sys/fs/bpf/bpfsync-no-such-map",
             "--listen", f"127.0.0.1:{free_port()}", "--no-state"], stdout=out, stderr=out)
    try:
        assert wait_for(lambda: "nothing is pinned at /sys/fs/bpf/bpfsync-no-such-map yet"
                        in log.read_text(), 30), log.read_text()  # fmt: skip
        assert proc.poll() is None
    finally:
        stop_process(proc)
    res = subprocess.run(
        [*BPFSYNC, "run", "--node-id", "a", "--map", "name:bpfsync_nosuch", "--no-state"],
        capture_output=True, text=True,
    )
    assert res.returncode == 2
    assert "bpfsync_nosuch" in res.stderr and "Traceback" not in res.stderr


def test_status_shows_peers_and_maps() -> None:
    with Cluster(("a", "b"), tag="status") as c:
        c.start()
        assert c.wait_ready(30)
        res = subprocess.run([*BPFSYNC, "status", "--http", f"127.0.0.1:{c['a'].http_port}"],
                             capture_output=True, text=True, check=True)
        assert "ready" in res.stdout and "sessions" in res.stdout and " b " in res.stdout
        res = subprocess.run([*BPFSYNC, "status", "--http", "127.0.0.1:1"], capture_output=True,
                             text=True)
        assert res.returncode == 2 and "no agent answers" in res.stderr


def test_status_tells_an_error_of_now_from_one_before_the_link_came_up() -> None:
    """a starts alone: its dials of b are refused, and status says so, and how long ago. Once
    b is up the error is still shown (it is the last one), but as from before the link."""
    env = {**os.environ, "COLUMNS": "250"}  # one line per row, however long the error

    def status(a: Node, *flags: str) -> str:
        return subprocess.run([*BPFSYNC, "status", "--http", f"127.0.0.1:{a.http_port}", *flags],
                              capture_output=True, text=True, check=True, env=env).stdout

    with Cluster(("a", "b"), tag="stale") as c:
        a, where = c["a"], c["b"].address  # a knows b by address only, until b answers

        def row_of_b() -> dict[str, Any] | None:
            st = a.status()
            return next((p for p in st["peers"] if p["address"] == where), None) if st else None

        a.start()
        assert wait_for(lambda: bool((row_of_b() or {}).get("last_error")), 30), a.log()
        line = next(ln for ln in status(a).splitlines() if where in ln)
        assert re.search(r"│ \d+s ago: 127.0.0.1:\d+: handshake", line), line

        c["b"].start()
        assert c.wait_linked(30)
        b = next(p for p in json.loads(status(a, "--json"))["peers"] if p["address"] == where)
        assert b["connected"] and b["last_error"]
        assert b["last_error_at"] <= b["connected_since"] <= time.time()
        assert b["lag_records"] == b["queued_records"] + b["unacked_records"]
        line = next(ln for ln in status(a).splitlines() if where in ln)
        assert re.search(r"│ \d+s ago \(before the link came up\): 127.0.0.1:\d+: handshake",
                         line), line


def test_busy_http_port_is_a_clear_error(node: Node) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = subprocess.run(
            [*BPFSYNC, "run", "--node-id", "a", "--map", str(node.pin),
             "--http", f"127.0.0.1:{port}", "--no-state"],
            capture_output=True, text=True, timeout=60,
        )
    assert res.returncode == 2, res.stderr
    assert f"http_listen 127.0.0.1:{port}" in res.stderr and "Traceback" not in res.stderr


def test_nats_users_gives_each_node_its_own_password_and_refuses_bad_names() -> None:
    res = subprocess.run([*BPFSYNC, "nats-users", "a", "b.x", "--cluster", "prod"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stderr
    users = re.findall(r'\{user: "([^"]+)", password: "([^"]+)"', res.stdout)
    assert [u for u, _ in users] == ["a", "b.x"]
    assert len({p for _, p in users}) == 2 and all(len(p) >= 32 for _, p in users)
    # b.x's direct messages are bound by its id in hex: one subject token
    assert '"prod.to.*.622e78"' in res.stdout and '"prod.changes.b.x"' in res.stdout
    for args, said in [(["a", "b c"], "not node ids"), (["a", "a"], "named twice"),
                       (["a", "--cluster", "a.b"], "--cluster: must be 1-32")]:
        res = subprocess.run([*BPFSYNC, "nats-users", *args], capture_output=True, text=True,
                             timeout=60)  # fmt: skip
        assert res.returncode == 2 and said in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr and not res.stdout
