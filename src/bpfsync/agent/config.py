"""The agent's configuration: a YAML file or command-line flags, validated by pydantic.

A bad field is reported as a ConfigError that names the field and says how to fix it, never as a
traceback from deep inside the agent.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bpfsync.core.messages import NODE_ID_RULE, is_node_id
from bpfsync.errors import ConfigError

_MAP_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _check_hostport(value: str, what: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must be HOST:PORT with a port in 1-65535, got {value!r}")
    return value


def _check_node_id(value: str, what: str) -> str:
    if not is_node_id(value):
        raise ValueError(f"{what} must be {NODE_ID_RULE}, got {value!r}")
    return value


def split_peer(peer: str) -> tuple[str | None, str]:
    """``ID@HOST:PORT`` or ``HOST:PORT`` as (node id or None, address)."""
    node, at, address = peer.rpartition("@")
    return (node if at else None), address


def is_loopback(hostport: str) -> bool:
    """Whether a HOST:PORT listens on loopback only (127.0.0.0/8, ::1 or localhost)."""
    host = hostport.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


WholePolicy = Literal["lww", "counter", "max", "min"]
FieldOp = Literal["lww", "counter", "max", "min", "epoch"]


class MapConfig(_Strict):
    """One synced map: the same pin path (or name) on every node, and how it merges."""

    path: str = Field(description="pin path under /sys/fs/bpf, or name:NAME of a loaded map")
    name: str | None = Field(default=None, description="name peers know the map by")
    policy: WholePolicy | dict[str, FieldOp] = Field(
        default="lww",
        description="lww | counter | max | min for the whole value, or {field: op} by BTF name",
    )
    counters: Literal["in-place", "exact"] = Field(
        default="in-place",
        description="in-place: the agent folds peers' counts into the map; exact: into companion",
    )
    companion: str | None = Field(
        default=None, description="exact counters: pin path of the map that gets peers' sum"
    )

    @field_validator("path")
    @classmethod
    def _path_is_pin_or_name(cls, v: str) -> str:
        if v.startswith("name:"):
            if not _MAP_NAME.match(v[5:]):
                raise ValueError("name:NAME needs a map name of 1-64 letters, digits, _ . -")
            return v
        if v.startswith("id:"):
            raise ValueError(
                "map ids differ on every node; give a pin path or name:NAME instead of id:N"
            )
        if not v.startswith("/"):
            raise ValueError(f"expected an absolute pin path like /sys/fs/bpf/app/map, got {v!r}")
        return v

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str | dict[str, str]) -> str | dict[str, str]:
        if isinstance(v, dict):
            if not v:
                raise ValueError("give at least one field: op, or a word such as lww")
            if list(v.values()).count("epoch") > 1:
                raise ValueError("at most one field can be the epoch (window) field")
        return v

    @field_validator("companion")
    @classmethod
    def _companion(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"expected the companion map's absolute pin path, got {v!r}")
        return v

    @model_validator(mode="after")
    def _layout(self) -> MapConfig:
        if self.counters == "exact" and self.companion is None:
            raise ValueError("counters: exact needs companion: the pin path of the map that "
                             "receives the other nodes' counts")
        if self.companion is not None and self.counters != "exact":
            raise ValueError("companion is only used with counters: exact")
        if self.counters == "exact" and not self.has_counters:
            raise ValueError("counters: exact needs a counter policy (policy: counter or a "
                             "field with op counter)")
        return self

    @property
    def has_counters(self) -> bool:
        ops = self.policy.values() if isinstance(self.policy, dict) else [self.policy]
        return "counter" in ops

    @property
    def sync_name(self) -> str:
        if self.name:
            return self.name
        return self.path[5:] if self.path.startswith("name:") else os.path.basename(self.path)


class WatchConfig(_Strict):
    mode: Literal["auto", "trace", "poll"] = "auto"
    poll_interval: Annotated[float, Field(gt=0, le=3600)] = 0.25
    auto_poll_interval: Annotated[float, Field(gt=0, le=3600)] = 2.0
    # where fexit is refused, mode auto hooks bpf(2) instead: user-space writes are seen within
    # microseconds, for ~55 ns more on every syscall of every process (bench/syscall_hooks.py);
    # false polls instead
    syscall_hooks: bool = True


class SyncConfig(_Strict):
    batch_window_ms: Annotated[float, Field(ge=0, le=1000)] = 1.0
    max_batch_records: Annotated[int, Field(ge=1, le=1_000_000)] = 8192
    tombstone_ttl_s: Annotated[float, Field(gt=0)] = 3600.0
    anti_entropy_interval_s: Annotated[float, Field(gt=0)] = 2.0
    catchup_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    digest_buckets: Annotated[int, Field(ge=1, le=65536)] = 1024
    # a bucket of registers unwritten this long is frozen (core/table.py): a third of the
    # memory; its next write thaws it (~0.1 ms)
    freeze_after_s: Annotated[float, Field(ge=0, le=86400)] = 30.0
    max_message_bytes: Annotated[int, Field(ge=4096, le=1 << 30)] = 16 << 20
    # a record stamped further ahead of this node's clock is refused (and repaired once the
    # clocks agree, core/hlc.py): NTP keeps real clusters within milliseconds
    max_clock_drift_ms: Annotated[float, Field(ge=1, le=3_600_000)] = 1000.0
    # a member whose input was refused as its fault (malformed, unauthenticated) is refused
    # for base * 2**offences seconds, up to cap (with TLS; without, only its stream ends)
    penalty_base_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    penalty_cap_s: Annotated[float, Field(gt=0, le=86400)] = 60.0

    @model_validator(mode="after")
    def _penalties(self) -> SyncConfig:
        if self.penalty_cap_s < self.penalty_base_s:
            raise ValueError("penalty_cap_s must be at least penalty_base_s")
        return self


class TlsConfig(_Strict):
    """Mutual TLS between the nodes (docs/security.md): PEM files, re-read when they change."""

    ca: Path = Field(description="the cluster CA's certificate(s): peers must be signed by it")
    cert: Path = Field(description="this node's certificate (chain), naming its node id")
    key: Path = Field(description="this node's private key, unencrypted PEM")
    server_name: str | None = Field(
        default=None, description="the name every peer's certificate holds, when certificates "
        "do not name the peers' addresses (peers given as ID@HOST:PORT are checked by id)")


class AgentConfig(_Strict):
    node_id: str
    listen: str = "127.0.0.1:7001"
    peers: tuple[str, ...] = Field(
        default=(), description="HOST:PORT of every other node, or ID@HOST:PORT to bind the "
        "address to a node id (its certificate must then name that id)")
    allowed_nodes: tuple[str, ...] | None = Field(
        default=None, description="the cluster's node ids; with ids given in peers, their "
        "union. Unset: with tls, whoever the CA signs; without, the nodes at the peer addresses")
    tls: TlsConfig | None = None
    insecure: bool = Field(
        default=False, description="run without TLS on an address other hosts can reach")
    peers_dns: str | None = Field(default=None, description="HOST:PORT resolving to every peer")
    http_listen: str | None = Field(default=None, description="HOST:PORT for /metrics, /status")
    maps: tuple[MapConfig, ...]
    watch: WatchConfig = WatchConfig()
    sync: SyncConfig = SyncConfig()

    @field_validator("node_id")
    @classmethod
    def _node_id(cls, v: str) -> str:
        return _check_node_id(v, "node_id")

    @field_validator("allowed_nodes")
    @classmethod
    def _allowed(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for node in v or ():
            _check_node_id(node, "each allowed node")
        return v

    @field_validator("listen", "http_listen", "peers_dns")
    @classmethod
    def _hostport(cls, v: str | None) -> str | None:
        return None if v is None else _check_hostport(v, "address")

    @field_validator("peers")
    @classmethod
    def _peers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        addresses = []
        for p in v:
            node, address = split_peer(p)
            if node is not None:
                _check_node_id(node, f"the node id in peer {p!r}")
            addresses.append(_check_hostport(address, "each peer"))
        if len(set(addresses)) != len(addresses):
            raise ValueError("a peer is listed twice")
        return v

    @model_validator(mode="after")
    def _whole(self) -> AgentConfig:
        if not self.maps:
            raise ValueError("maps: give at least one map to sync, e.g. /sys/fs/bpf/app/m")
        names = [m.sync_name for m in self.maps]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"maps: maps share the sync name {sorted(dup)}; set `name:` on one")
        peers = [split_peer(p) for p in self.peers]
        if self.listen in [address for _, address in peers]:
            raise ValueError("peers: this node's own listen address is in its peer list")
        if self.node_id in [node for node, _ in peers]:
            raise ValueError(f"peers: a peer is given this node's own id {self.node_id!r}")
        if self.tls is not None and self.insecure:
            raise ValueError("insecure: true turns TLS off, but tls is set: give one of them")
        if self.tls is None and not self.insecure and not is_loopback(self.listen):
            raise ValueError(
                f"listen: {self.listen} is reachable from other hosts and TLS is off, so anyone "
                "who can reach it could change your maps. Give tls: {ca, cert, key} (flags "
                "--tls-ca, --tls-cert, --tls-key; `bpfsync certs` makes them, see "
                "docs/security.md), or insecure: true (--insecure) to run without "
                "authentication"
            )
        return self

    @property
    def members(self) -> frozenset[str] | None:
        """The configured member list (core/membership.py M1), or None when there is none."""
        ids = {node for node, _ in map(split_peer, self.peers) if node is not None}
        if self.allowed_nodes is None and not ids:
            return None
        return frozenset(ids | set(self.allowed_nodes or ()) | {self.node_id})


def _explain(err: ValidationError, source: str) -> ConfigError:
    found: dict[str, list[str]] = {}
    for e in err.errors():
        # union members show up as loc parts like "literal[...]": report the field once
        where = ".".join(str(p) for p in e["loc"] if "[" not in str(p)) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field; check its spelling (see `bpfsync run --help`)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        found.setdefault(where, []).append(msg)
    lines = [f"  {where}: {' -- or: '.join(msgs)}" for where, msgs in found.items()]
    return ConfigError(f"invalid configuration in {source}:\n" + "\n".join(lines))


def parse_config(data: Any, source: str = "config") -> AgentConfig:
    """Validate an already-parsed mapping (from YAML or flags)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of fields at the top level")
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as err:
        raise _explain(err, source) from err


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate a YAML config file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {p}: {err.strerror}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{p} is not valid YAML: {err}") from err
    return parse_config(data or {}, str(p))
