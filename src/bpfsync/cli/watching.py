"""`bpfsync watch` and `bpfsync dump`: a map's changes and entries, decoded by its BTF (and an
LPM trie's keys by its type)."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from rich.console import Console

from bpfsync.errors import ConfigError
from bpfsync.kernel.btf import map_layouts_or_raw
from bpfsync.kernel.maps import Map
from bpfsync.layout import Layout, prefix_text
from bpfsync.model import Change, Overflow
from bpfsync.watch.auto import AutoWatcher
from bpfsync.watch.trace import Hooks, TraceWatcher

_MODES = ("auto", "trace", "poll")


_ADDR_NAMES = re.compile(r"(^|[._])(s|d)?(addr|ip|ipv4|ipv6|src_ip|dst_ip|saddr|daddr)$")


class Decoder:
    """Keys and values of one map as JSON-ready fields; per-CPU values one list item per CPU.

    IPv4/IPv6 fields (4 or 16 bytes, named like an address or listed in ``addr``) are shown as
    addresses; ``addr`` may name ``key`` for a whole raw key (a map keyed by ``__u32`` saddr).
    An LPM trie's key is one prefix, shown as such (``198.51.100.0/24``), BTF or not.
    """

    def __init__(self, m: Map, addr: Sequence[str] = ()) -> None:
        self.key_layout, self.value_layout = map_layouts_or_raw(m.info)
        self.percpu = m.percpu
        self.ncpus = m.ncpus
        self.stride = m.value_stride // m.ncpus if m.percpu else m.value_size
        self.addr = set(addr)

    def key(self, raw: bytes) -> Any:
        if "key" in self.addr and len(raw) in (4, 16):
            return str(ipaddress.ip_address(raw))
        return self._fields(self.key_layout, raw)

    def value(self, raw: bytes) -> Any:
        if not self.percpu:
            return self._fields(self.value_layout, raw)
        size = self.value_layout.size
        return [
            self._fields(self.value_layout, raw[i * self.stride : i * self.stride + size])
            for i in range(self.ncpus)
        ]

    def _fields(self, layout: Layout, raw: bytes) -> Any:
        if layout.is_raw:
            return raw.hex()
        if layout.is_prefix:  # one value, not fields: as a whole-key address reads
            return prefix_text(raw)
        out = layout.decode(raw)
        for f in layout.fields:
            if f.size in (4, 16) and not f.count and (
                f.name in self.addr or _ADDR_NAMES.search(f.name)
            ):
                # network byte order in the packet, and so in the map
                out[f.name] = str(ipaddress.ip_address(raw[f.offset : f.offset + f.size]))
        return out


def run_watch(spec: str, *, mode: str, interval: float, as_json: bool, count: int) -> None:
    if mode not in _MODES:
        raise ConfigError(f"--mode must be one of {', '.join(_MODES)}, not {mode!r}")
    if interval <= 0:
        raise ConfigError("--interval must be a positive number of seconds")
    out = Console(highlight=False)
    with Map.open(spec) as m:
        dec = Decoder(m)
        name = m.name or spec
        maps = {name: m}
        watcher: AutoWatcher | TraceWatcher
        if mode == "trace":
            watcher = TraceWatcher(maps, agent_tgid=0, hooks=Hooks.FEXIT)
        else:
            watcher = AutoWatcher(maps, poll_interval=interval, tracing=mode == "auto",
                                  agent_tgid=0)
        watcher.start()
        if not as_json:
            how = watcher.mode
            out.print(f"watching {m!r} ({how}); ^C to stop", style="dim")
        seen = 0
        try:
            while count == 0 or seen < count:
                for ev in watcher.read(0.5):
                    if isinstance(ev, Overflow):
                        _print_overflow(ev, as_json, out)
                        continue
                    assert isinstance(ev, Change)
                    _print_change(ev, dec, as_json, out)
                    seen += 1
                    if count and seen >= count:
                        break
        finally:
            watcher.close()


def _print_change(ev: Change, dec: Decoder, as_json: bool, out: Console) -> None:
    rec: dict[str, Any] = {
        "op": ev.op.value, "map": ev.map, "seen": ev.seen.value, "key": ev.key.hex(),
        "value": None if ev.value is None else ev.value.hex(),
    }
    if not dec.key_layout.is_raw:
        rec["key_fields"] = dec.key(ev.key)
    if ev.value is not None and not dec.value_layout.is_raw:
        rec["value_fields"] = dec.value(ev.value)
    if as_json:
        sys.stdout.write(json.dumps(rec) + "\n")
        sys.stdout.flush()
        return
    key = rec.get("key_fields", rec["key"])
    if ev.value is None:
        out.print(f"[red]delete[/] {key}  [dim]({ev.seen.value})[/]")
    else:
        val = rec.get("value_fields", rec["value"])
        out.print(f"[green]update[/] {key} = {val}  [dim]({ev.seen.value})[/]")


def _print_overflow(ev: Overflow, as_json: bool, out: Console) -> None:
    if as_json:
        line = {"op": "overflow", "map": ev.map, "dropped": ev.dropped}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()
    else:
        out.print(f"[yellow]overflow[/]: {ev.dropped} events dropped, rescanning", style="bold")


def run_dump(
    spec: str, *, as_json: bool, addr: Sequence[str] = (), agent: str | None = None,
    sync_name: str | None = None,
) -> None:
    out = Console(highlight=False)
    with Map.open(spec) as m:
        dec = Decoder(m, addr)
        entries = m.dump()
        slots: dict[str, dict[str, Any]] = {}
        if agent is not None:
            name = sync_name or (os.path.basename(spec) if spec.startswith("/") else m.name)
            slots = _fetch_slots(agent, name)
        if not as_json:
            out.print(f"{m!r}: {len(entries)} entries", style="dim")
        for key, value in entries:
            k, v = dec.key(key), dec.value(value)
            per_node = {
                node: None if s["value"] is None else dec.value(bytes.fromhex(s["value"]))
                for node, s in slots.get(key.hex(), {}).items()
            }
            if as_json:
                line: dict[str, Any] = {"key": key.hex(), "value": value.hex(),
                                        "key_fields": k, "value_fields": v}
                if agent is not None:
                    line["slots"] = per_node
                sys.stdout.write(json.dumps(line) + "\n")
            else:
                out.print(f"{k} = {v}")
                for node, slot in sorted(per_node.items()):
                    out.print(f"    node {node}: {slot}", style="dim")


def _fetch_slots(agent: str, name: str) -> dict[str, dict[str, Any]]:
    url = f"http://{agent}/slots/{name}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            data: dict[str, Any] = json.load(resp)
    except urllib.error.HTTPError as e:
        raise ConfigError(f"the agent at {agent} has no synced map {name!r} (give --name)") from e
    except (urllib.error.URLError, OSError) as e:
        raise ConfigError(f"no agent answers on {url} ({e}); is it running with --http?") from e
    keys: dict[str, dict[str, Any]] = data["keys"]
    return keys
