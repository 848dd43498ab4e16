"""`bpfsync check`: a config file checked against real maps and real certificates, every problem
reported with the agent's own message, without starting the agent."""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bpfsync.cli.check import check_file
from bpfsync.demo.cluster import MAP_NAME, VALUE, demo_object, free_port, stop_process, wait_for
from bpfsync.kernel.info import MapType
from bpfsync.kernel.maps import Map
from bpfsync.kernel.objects import BpfObject
from bpfsync.transport.certs import issue_node, make_ca

BPFSYNC = [sys.executable, "-m", "bpfsync.cli.main"]


@pytest.fixture
def pins() -> Iterator[Callable[..., str]]:
    """``pins("btf")``: a pinned copy of the demo's ``sessions`` map (struct value with BTF);
    ``pins(type, key, value)``: a pinned map without BTF. Each returns its pin path."""
    root = Path(f"/sys/fs/bpf/bpfsync-check-{uuid.uuid4().hex[:8]}")
    root.mkdir()
    keep: list[Map | BpfObject] = []

    def make(kind: str, key: int = 4, value: int = VALUE.size) -> str:
        path = root / f"{kind}{len(keep)}"
        if kind == "btf":
            obj = BpfObject.open(demo_object())
            keep.append(obj)
            obj.load()
            m = obj.map(MAP_NAME)
        else:
            m = Map.create(MapType[kind.upper()], key, value, 16)
        keep.append(m)
        m.pin(str(path))
        return str(path)

    try:
        yield make
    finally:
        for k in reversed(keep):
            k.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def tls(tmp_path: Path) -> dict[str, str]:
    """Valid files for node a: a CA of its own and a's certificate and key."""
    make_ca(tmp_path / "ca", days=2)
    issued = issue_node("a", tmp_path / "ca" / "ca.pem", tmp_path / "ca" / "ca.key",
                        tmp_path / "tls", days=2)
    return {"ca": str(tmp_path / "ca" / "ca.pem"), "cert": str(issued.cert),
            "key": str(issued.key)}


def _config(tmp_path: Path, maps: list[dict[str, Any]], **top: Any) -> Path:
    path = tmp_path / "bpfsync.yaml"
    path.write_text(yaml.safe_dump({"node_id": "a", "listen": "127.0.0.1:7001", "maps": maps,
                                    **top}))
    return path


def _check(cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BPFSYNC, "check", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=60)


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_a_good_config_is_ok_with_a_line_per_map(
    tmp_path: Path, pins: Callable[..., str], tls: dict[str, str]
) -> None:
    plain, counted = pins("btf"), pins("btf")
    cfg = _config(tmp_path, [
        {"path": plain, "name": "plain"},
        {"path": counted, "name": "counted", "policy": {"bytes": "counter", "port": "max"},
         "counters": "exact", "companion": pins("hash")},
    ], tls=tls)
    res = _check(cfg)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert any(line.split()[:2] == ["ok", "maps.0"] and "plain" in line and "hash" in line
               and "policy lww" in line for line in lines), res.stdout
    assert any(line.split()[:2] == ["ok", "maps.1"] and "{bytes: counter, port: max}" in line
               and "exact counters" in line for line in lines), res.stdout
    assert any(line.split()[:2] == ["ok", "tls"] and "['a']" in line for line in lines)
    assert "FAIL" not in res.stdout and lines[-1].startswith("no problems found")


def test_every_problem_is_reported_with_the_agent_s_message(
    tmp_path: Path, pins: Callable[..., str], tls: dict[str, str]
) -> None:
    missing = f"/sys/fs/bpf/bpfsync-no-such-map-{uuid.uuid4().hex[:8]}"
    Path(tls["cert"]).write_text("not a certificate\n")
    maps = [
        {"path": missing},
        {"path": pins("btf"), "name": "fields",
         "policy": {"packets": "counter", "bytes": "counter", "drops": "max"}},
    ]
    cfg = _config(tmp_path, maps, tls=tls)
    res = _check(cfg)
    assert res.returncode == 1, res.stdout + res.stderr
    out = _flat(res.stdout)
    assert f"FAIL maps.0 {Path(missing).name} ({missing})" in out
    assert f"open pinned object {missing}: ENOENT" in out
    assert "merge rule for 'packets'" in out and "merge rule for 'drops'" in out
    assert "merge rule for 'bytes'" not in out  # that field exists
    assert f"tls.cert {tls['cert']}: not a PEM certificate" in out
    assert "4 problems" in out and "Traceback" not in res.stderr

    # the agent stops at its first problem (the TLS files are read first): check said the same
    ran = subprocess.run([*BPFSYNC, "run", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 2
    said = _flat(ran.stderr).removeprefix("error: ")
    assert said.startswith("tls.cert") and said in out
    # ... and, with the TLS files fixed, it starts and waits for the map to be pinned
    del maps[1]
    log = tmp_path / "agent.log"
    cfg = _config(tmp_path, maps, listen=f"127.0.0.1:{free_port()}", state={"dir": None})
    with log.open("wb") as out_file:
        proc = subprocess.Popen([*BPFSYNC, "run", "--config", str(cfg)], stdout=out_file,
                                stderr=out_file)  # fmt: skip
    try:
        assert wait_for(lambda: f"nothing is pinned at {missing} yet" in log.read_text(), 30), (
            log.read_text())
        assert proc.poll() is None
    finally:
        stop_process(proc)


def test_maps_the_agent_cannot_sync(pins: Callable[..., str], tmp_path: Path) -> None:
    btf, raw = pins("btf"), pins("hash", value=3)
    cfg = _config(tmp_path, [
        {"path": pins("prog_array", value=4)},
        {"path": raw, "policy": "counter"},  # 3 bytes are no unsigned integer
        {"path": btf, "name": "again"},
        {"path": btf, "name": "twice"},  # the same kernel map as maps.2
        {"path": pins("hash", value=8), "policy": "counter", "counters": "exact",
         "companion": btf},  # a synced map as the companion, and of another size
    ])
    report = check_file(cfg)
    problems = {f.subject: _flat(" | ".join(f.problems)) for f in report.findings}
    assert "prog_array" in problems["maps.0"] and "bpfsync syncs" in problems["maps.0"]
    assert "1, 2, 4 or 8 bytes" in problems["maps.1"]
    assert problems["maps.2"] == ""
    assert "same kernel map" in problems["maps.3"] and "give each map once" in problems["maps.3"]
    assert "same key and value sizes" in problems["maps.4"]
    assert f"companion {btf} is the same kernel map" in problems["maps.4"]
    assert report.problems == 5


def test_an_invalid_file_names_its_fields(tmp_path: Path) -> None:
    cfg = tmp_path / "bpfsync.yaml"
    cfg.write_text("node_id: a\nlisten: 127.0.0.1:notaport\nmaps:\n  - path: id:3\n")
    res = _check(cfg)
    assert res.returncode == 1
    assert "FAIL config" in _flat(res.stdout)
    assert "listen" in res.stdout and "maps.0.path" in res.stdout
    assert "Traceback" not in res.stderr


def test_the_state_dir_is_read_never_written(tmp_path: Path, pins: Callable[..., str]) -> None:
    """state.dir as the agent would find it: missing (made at start), holding this node's
    stored maps, holding a file the agent would set aside, or not a directory."""
    from bpfsync.agent.store import MapIdentity, MapShape, open_store

    pin = pins("btf")
    state = tmp_path / "state"
    cfg = _config(tmp_path, [{"path": pin, "name": "plain"}], state={"dir": str(state)})
    res = _check(cfg)
    assert res.returncode == 0 and "no state yet" in res.stdout, res.stdout + res.stderr
    assert not state.exists()  # check makes nothing
    shape = MapShape("plain", 4, VALUE.size, "lww")
    for node in ("a", "b"):  # this node's file, then another node's
        shutil.rmtree(state, ignore_errors=True)
        opened = open_store(state, node, [shape])
        assert opened.store.put_buckets("plain", [], identity=MapIdentity(1, "boot", 1024))
        opened.store.close()
        before = (state / "bpfsync.db").read_bytes()
        res = _check(cfg)
        assert (state / "bpfsync.db").read_bytes() == before  # read only, nothing set aside
        assert not [p for p in state.iterdir() if ".bad-" in p.name]
        if node == "a":
            assert res.returncode == 0 and "maps stored: plain" in res.stdout, res.stdout
        else:
            assert res.returncode == 1, res.stdout
            assert "would be set aside" in _flat(res.stdout) and "'b'" in res.stdout
    shutil.rmtree(state)
    state.write_text("")
    res = _check(cfg)
    assert res.returncode == 1 and "is not a directory" in res.stdout, res.stdout


def test_bit_ranges_and_filters_are_checked_against_the_map(
    tmp_path: Path, pins: Callable[..., str]
) -> None:
    good = {"path": pins("btf"), "name": "good", "filter": ["value.port >= 1024"],
            "policy": {"bytes[0:8]": "lww", "bytes[8:64]": "local", "port": "max"}}
    res = _check(_config(tmp_path, [good]))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "bytes[0:8]: lww" in res.stdout

    bad = [{"path": pins("btf"), "name": "overlap",
            "policy": {"bytes[0:8]": "lww", "bytes[4:64]": "counter"}},
           {"path": pins("btf"), "name": "filtered", "filter": ["value.nope == 1"]}]
    res = _check(_config(tmp_path, bad))
    assert res.returncode == 1, res.stdout + res.stderr
    out = _flat(res.stdout)
    assert "bit ranges of 'bytes': bits 4-7 are in two ranges" in out
    assert "filter 'value.nope == 1': the value" in out and "has no field 'nope'" in out
