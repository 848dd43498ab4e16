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

from bpfsync.core.filter import check_syntax
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


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
_PORT = re.compile(r"[0-9]{1,5}")


def _nats_server(url: str) -> tuple[str, int]:
    """(host, port) of ``nats://HOST:PORT`` or ``tls://HOST:PORT`` (an IPv6 host in brackets);
    a ValueError that says what is wrong with anything else."""
    form = "give each server as nats://HOST:PORT, or tls://HOST:PORT to require TLS"
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"{url!r} has no scheme: {form}")
    if scheme not in ("nats", "tls"):
        raise ValueError(f"{url!r} has the scheme {scheme!r}: {form}")
    if "@" in rest:
        # a URL's user:password would sit beside nats.user/token/creds as a second kind
        raise ValueError(f"{url!r} holds credentials: give them as nats.user and nats.password "
                         "(or nats.token, nats.creds, nats.nkey_seed), not in the URL")
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ValueError(f"{url!r}: the IPv6 address has no closing ]")
        host, after = rest[1:end], rest[end + 1:]
        if after and not after.startswith(":"):
            raise ValueError(f"{url!r}: give :PORT right after the ], e.g. nats://[::1]:4222")
        port = after[1:]
    else:
        host, colon, port = rest.rpartition(":")
        if not colon:
            host, port = rest, ""
        if ":" in host:
            raise ValueError(f"{url!r}: put an IPv6 address in brackets, e.g. "
                             "nats://[2001:db8::1]:4222")
    if not host:
        raise ValueError(f"{url!r} has no host: {form}")
    if not port:
        raise ValueError(f"{url!r} has no port: {form} (NATS servers listen on 4222 unless "
                         "told otherwise)")
    if not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise ValueError(f"{url!r}: the port must be a number in 1-65535, got {port!r} "
                         "(nothing may follow it)")
    if rest.startswith("["):
        try:
            host = ipaddress.IPv6Address(host).compressed
        except ValueError:
            raise ValueError(f"{url!r}: {host!r} in brackets is not an IPv6 address") from None
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{url!r}: {host!r} is not a host name or IP address")
    return host.lower().rstrip("."), int(port)


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
FieldOp = Literal["lww", "counter", "max", "min", "epoch", "local"]
_RULE_KEY = re.compile(r"^[A-Za-z0-9_.\[\]]*?(\[[0-9]+:[0-9]+\])?$")


class MapConfig(_Strict):
    """One synced map: the same pin path (or name) on every node, and how it merges."""

    path: str = Field(description=(
        "The map: its pin path on bpffs (/sys/fs/bpf/app/map), or name:NAME for a loaded map "
        "the kernel knows by that name (15 characters are compared; two maps of one name are "
        "an error). Not id:N: map ids differ on every node and change when the program is "
        "reloaded."))
    name: str | None = Field(default=None, description=(
        "The name peers know this map by, the same on every node (a record names its map by "
        "it). Unset: the pin's file name, or NAME of name:NAME. Set it when two synced maps "
        "share a file name, or when a map's file name differs between nodes."))
    policy: WholePolicy | dict[str, FieldOp] = Field(
        default="lww",
        description=(
            "How a key's values from several nodes merge, the same on every node (peers compare "
            "policies at Hello and report a difference). A word for the whole value: lww (last "
            "writer wins, by hybrid logical clock), or counter (sum of every node's count), max "
            "or min, which read the value as one unsigned integer of 1, 2, 4 or 8 bytes. Or "
            "{field: op} by the value's BTF field names (nested fields dotted, e.g. "
            "stats.packets), op one of lww, counter, max, min, epoch, local: counter/max/min "
            "need unsigned integer fields; one epoch field at most, a window number whose "
            "increase resets the counters; local fields are this node's alone (never sent, "
            "kept when a peer's value is written, a change to them alone is no change); fields "
            "not named follow lww. An unsigned integer field can be split by bits, "
            "FIELD[LO:HI] for bits LO to HI-1 (bit 0 the least significant), every bit in "
            "exactly one range: e.g. {\"flags[0:8]\": lww, \"flags[8:64]\": local}; [LO:HI] "
            "alone splits a value that is one integer, also without BTF. Per-CPU maps take "
            "every policy: a merged value goes into every CPU's slot, counts are summed over "
            "the CPUs."),
    )
    counters: Literal["in-place", "exact"] = Field(
        default="in-place",
        description=(
            "Where the other nodes' counts go, for a policy with counters. in-place: the agent "
            "adds them into the map itself, right after re-reading the key, so unmodified "
            "programs work, but an increment landing between that read and the write is lost "
            "(bpfsync_counter_raced counts the races caught). exact: the map holds only this "
            "node's counts and the agent never writes it; the peers' merged value goes into "
            "companion, which the program adds with bpfsync_counter_total() (bpfsync.h). Use "
            "exact for hot counters."),
    )
    companion: str | None = Field(default=None, description=(
        "With counters: exact, and only then: the absolute pin path of the map that receives "
        "the other nodes' merged counts. A plain (not per-CPU) map with the same key and value "
        "sizes as the synced map."))

    filter: tuple[str, ...] = Field(default=(), description=(
        "Which entries sync: conditions on key and value fields that an entry must all meet, "
        "each TERM OP NUMBER. TERM: key, value (read as one integer), key.FIELD, value.FIELD "
        "(BTF names, [LO:HI] for bits), or age(value.FIELD) (seconds since the CLOCK_TAI "
        "nanosecond timestamp in that field); OP: == != < <= > >=. E.g. [\"value.state == 2\", "
        "\"age(value.created_ns) >= 10\"]. Entries that do not pass stay this node's: not sent, "
        "and peers' values are not written over them; an entry that stops passing is no longer "
        "sent, and peers keep the value it last synced (deletes always sync): rules F1-F4 in "
        "core/replica.py."))
    restore: Literal["never", "on_empty"] = Field(default="never", description=(
        "What a node does with this map's stored state (state.dir) when it finds a new map "
        "object (the data plane recreated the map, or the host rebooted). never: nothing; the "
        "map is seeded from what it holds and the peers refill it, so a map emptied on purpose "
        "stays empty. on_empty: if the new map is empty, the agent writes the stored content "
        "(found while it runs: the content it holds) back into it, so a cluster whose every "
        "node lost its maps (a power loss) comes back "
        "to its last stored state, losing at most state.fsync_interval_s of writes; the peers' "
        "newer records still win."))

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
            bad = [k for k in v if not _RULE_KEY.match(k)]
            if bad:
                raise ValueError(f"{bad[0]!r} is not FIELD, FIELD[LO:HI] or [LO:HI] (bits LO "
                                 "to HI-1 of an unsigned integer field)")
        return v

    @field_validator("filter")
    @classmethod
    def _filter(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_syntax(text) for text in v)

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
    """How the agent sees writes to the synced maps (docs/architecture.md, section 1)."""

    mode: Literal["auto", "trace", "poll"] = Field(default="auto", description=(
        "auto: fexit on the kernel's map-update and -delete functions where the kernel allows "
        "it, else hooks on bpf(2) (see syscall_hooks), plus a scan underneath for what tracing "
        "cannot see (in-place increments, LRU evictions, a dropped ring record); maps that "
        "cannot be traced (type, key or value over 256 bytes) are scanned alone. trace: fexit "
        "only, and the agent refuses to start where the kernel does not allow it; no scans, so "
        "writes through lookup pointers go unseen. poll: scans only."))
    poll_interval: Annotated[float, Field(gt=0, le=3600, description=(
        "Seconds between two scans of a map whose BPF programs' writes are not traced (bpf(2) "
        "hooks, poll mode, untraceable maps) or that the data plane writes in place (counter, "
        "max and min policies): the longest such a write waits to be seen. A scan dumps the "
        "whole map, and each map's dumps take at most a quarter of the time, so a large map is "
        "scanned less often than this."))] = 0.25
    auto_poll_interval: Annotated[float, Field(gt=0, le=3600, description=(
        "In mode auto, seconds between the repair scans of a map fexit traces, which look only "
        "for what tracing misses (LRU evictions, lost ring records); while they find nothing "
        "they come up to 4 times less often, but at least every 5 s (or every "
        "auto_poll_interval, where that is longer)."))] = 2.0
    syscall_hooks: bool = Field(default=True, description=(
        "Where the kernel refuses fexit, mode auto traces bpf(2) instead: every user-space "
        "write is then seen within microseconds, and BPF programs' writes by the scans every "
        "poll_interval. The hooks sit on the system-call entry and exit, so every system call "
        "of every process on the node pays a few tens of nanoseconds. false: scan instead."))


class SyncConfig(_Strict):
    """How changes are merged, batched, sent and repaired between the nodes (docs/architecture.md,
    sections 3-6)."""

    batch_window_ms: Annotated[float, Field(ge=0, le=1000, description=(
        "Milliseconds a batch stays open before it is sent to a peer: a key written several "
        "times meanwhile is sent once, with its last value. Longer windows coalesce more and "
        "delay every change by as much; 0 sends at the next turn of the event loop."))] = 1.0
    max_batch_records: Annotated[int, Field(ge=1, le=1_000_000, description=(
        "Records in one batch at most, and in one part of a repair answer; batches are also "
        "cut to stay well under max_message_bytes. The bound stays below the 2^20 records a "
        "peer accepts in one batch."))] = 8192
    tombstone_ttl_s: Annotated[float, Field(gt=0, description=(
        "Seconds a deleted key's tombstone is kept, so that a late, older update cannot bring "
        "the key back; a record older than a forgotten tombstone is refused and answered with a "
        "delete. Must exceed the longest partition or agent downtime you expect: a write "
        "undelivered for longer is refused rather than resurrect a deleted key."))] = 3600.0
    anti_entropy_interval_s: Annotated[float, Field(gt=0, description=(
        "Seconds between two digest rounds: each node sends digest_fanout peers the hashes "
        "of its maps' buckets and repairs the buckets that stay different, so anything a "
        "batch missed converges within a few rounds. Tombstones past tombstone_ttl_s are "
        "purged at the same pace."))] = 2.0
    digest_fanout: Annotated[int, Field(ge=0, le=1000, description=(
        "Peers a routine digest round goes to, chosen at random each round among those "
        "owed nothing; 0: every peer. A repair carries state, so what one node lacks reaches "
        "it from whichever peer that holds it compares with it, and most peers do; every "
        "peer would cost each node N-1 digests a round, a million a round across a thousand "
        "nodes. Catch-up and gap-repair digests go to every peer they need."))] = 4
    catchup_timeout_s: Annotated[float, Field(gt=0, description=(
        "Seconds a starting node waits for a peer to answer its catch-up digest: a node that "
        "reaches no peer in that time reports ready alone (the first node of a cluster must "
        "come up), and one whose linked peers send nothing for three times as long stops "
        "waiting for them."))] = 10.0
    digest_buckets: Annotated[int, Field(ge=1, le=65536, description=(
        "Buckets per map in a digest: a repair sends the keys of the buckets that differ, so "
        "more buckets make smaller repairs and larger digests. Keep it the same on every node "
        "(a power of two): a digest whose bucket count does not divide this node's is refused "
        "as malformed."))] = 1024
    freeze_after_s: Annotated[float, Field(ge=0, le=86400, description=(
        "Seconds without a write after which a bucket of last-writer-wins registers is frozen "
        "into one packed object (core/frozen.py), a third of the memory of a dict, for slower "
        "lookups; its next write thaws it. 0: as soon as the agent has time."))] = 30.0
    max_message_bytes: Annotated[int, Field(ge=4096, le=1 << 30, description=(
        "The largest frame this node sends or accepts (16 MiB by default), the same on every "
        "node: a peer's larger frame ends its stream. Bounds the memory one frame can make a "
        "node allocate; a record must fit in it."))] = 16 << 20
    max_clock_drift_ms: Annotated[float, Field(ge=1, le=3_600_000, description=(
        "Milliseconds a record's stamp may be ahead of this node's clock: one stamped further "
        "ahead is refused, never clamped (clamping would give two nodes different versions of "
        "one write), and arrives by repair once the clocks agree (core/hlc.py). NTP keeps real "
        "clusters within milliseconds."))] = 1000.0
    penalty_base_s: Annotated[float, Field(gt=0, le=3600, description=(
        "With TLS, a member whose input was refused as its own fault (malformed, "
        "unauthenticated) is disconnected and refused for penalty_base_s * 2^offences seconds, "
        "so a broken or hostile node cannot keep the others busy; without TLS only its stream "
        "ends, as nothing proves which node it was."))] = 1.0
    penalty_cap_s: Annotated[float, Field(gt=0, le=86400, description=(
        "The longest a member is refused after bad input, however many offences; at least "
        "penalty_base_s."))] = 60.0

    @model_validator(mode="after")
    def _penalties(self) -> SyncConfig:
        if self.penalty_cap_s < self.penalty_base_s:
            raise ValueError("penalty_cap_s must be at least penalty_base_s")
        return self


class StateConfig(_Strict):
    """The node's persisted replica state (docs/architecture.md, "Restarts")."""

    dir: Path | None = Field(default=Path("/var/lib/bpfsync"), description=(
        "Directory of the node's state file (bpfsync.db, SQLite), made if missing (mode 0700). "
        "It keeps every synced map's registers and stamps, so a restarted agent resumes where "
        "it stopped: changes the data plane made while the agent was down are taken as this "
        "node's, counts made meanwhile are kept, and an unchanged map only compares digests "
        "with its peers. One directory per node. null: no state is kept; a restart then "
        "stamps what the map holds as older than any peer's record."))
    fsync_interval_s: Annotated[float, Field(gt=0, le=3600, description=(
        "Seconds between two flushes of the state file to disk. A crashed or killed agent "
        "loses nothing (the kernel's page cache holds what was written); a power loss of the "
        "host loses at most the writes of this interval, which matters for restore: "
        "on_empty."))] = 1.0


class TlsConfig(_Strict):
    """Mutual TLS between the nodes (docs/security.md): PEM files, re-read when they change."""

    ca: Path = Field(description=(
        "The cluster CA's certificate(s), PEM: peers must present a certificate it signed. "
        "Several CA certificates in the file are all trusted, which is how a CA is rotated."))
    cert: Path = Field(description=(
        "This node's certificate (chain), PEM, signed by the CA, naming this node's id as its "
        "common name or a DNS name (peers bind a node id to its certificate), valid now and "
        "for both TLS client and server use; `bpfsync certs node` makes one."))
    key: Path = Field(description=(
        "This node's private key, unencrypted PEM: the key of cert. The three files are "
        "re-read every few seconds and on SIGHUP; a new set is taken only if it passes every "
        "check, so they can be replaced in any order."))
    server_name: str | None = Field(
        default=None, description=(
            "The name every peer's certificate holds, for clusters whose certificates do not "
            "name the peers' addresses: peers given as HOST:PORT are then checked against it "
            "instead of HOST. Peers given as ID@HOST:PORT are checked against their id."))


class NatsTlsConfig(_Strict):
    """TLS to the NATS servers (transport: nats): PEM files."""

    ca: Path = Field(description=(
        "The CA certificate(s), PEM, that signed the NATS servers' certificates: a server "
        "whose certificate it did not sign is not spoken to. Several certificates in the file "
        "are all trusted."))
    cert: Path | None = Field(default=None, description=(
        "A client certificate (chain), PEM, for NATS servers that verify their clients' "
        "certificates (verify: true in the server's tls block); with key. Unset: no client "
        "certificate."))
    key: Path | None = Field(default=None, description=(
        "The private key of cert, unencrypted PEM. Give cert and key together, or neither."))

    @model_validator(mode="after")
    def _pair(self) -> NatsTlsConfig:
        if (self.cert is None) != (self.key is None):
            given, missing = ("cert", "key") if self.key is None else ("key", "cert")
            raise ValueError(f"{given} is set without {missing}: a client certificate needs "
                             "both (for servers that verify clients); give both, or neither")
        return self


# The kinds of NATS credentials, each by its fields. A node has one identity on the servers, so
# a config gives one kind at most: with two, which one a client presents would be the client
# library's choice, not the operator's.
NATS_CREDENTIALS: tuple[tuple[str, ...], ...] = (
    ("user", "password"), ("token",), ("creds",), ("nkey_seed",),
)
_NATS_CLUSTER = re.compile(r"[A-Za-z0-9_-]{1,32}")


def nats_cluster_name(v: str) -> str:
    """``v`` if it may be ``nats.cluster``, else ValueError saying why."""
    if not _NATS_CLUSTER.fullmatch(v):
        raise ValueError(f"must be 1-32 letters, digits, _ or -, got {v!r}: it begins NATS "
                         "subject, stream and bucket names, which cannot hold . * > or spaces")
    return v


class NatsConfig(_Strict):
    """The NATS JetStream transport (transport: nats): the servers, the names this cluster uses
    on them, the node's credentials, and the change stream's retention (docs/scaling.md)."""

    servers: tuple[str, ...] = Field(description=(
        "The NATS servers to connect to, at least one, each nats://HOST:PORT, or "
        "tls://HOST:PORT to require TLS (see nats.tls); an IPv6 host in brackets. List several "
        "servers of one NATS cluster, so that the node moves to another when one fails: e.g. "
        "[nats://10.0.0.5:4222, nats://10.0.0.6:4222]. Credentials go in their own fields, "
        "not in the URLs."))
    cluster: str = Field(default="bpfsync", description=(
        "The prefix of every subject, stream and bucket name this cluster uses, so that "
        "several bpfsync clusters can share NATS servers: the same on every node of a cluster, "
        "different for each cluster on the same servers. 1-32 letters, digits, _ or -."))
    user: str | None = Field(default=None, description=(
        "A NATS user name, with password. Credentials are of one kind at most: user and "
        "password, token, creds or nkey_seed. None of them: for servers that ask for no "
        "credentials."))
    password: str | None = Field(default=None, repr=False, description=(
        "The password of user (give both, or neither). It stands in the config file in "
        "clear: keep the file readable by root alone, or prefer creds."))
    token: str | None = Field(default=None, repr=False, description=(
        "A NATS authentication token, instead of the other kinds of credentials; in clear in "
        "the config file, like password."))
    creds: Path | None = Field(default=None, description=(
        "A NATS .creds file: a user JWT and its nkey seed, as `nsc` makes them for accounts "
        "run by an operator; instead of the other kinds of credentials. Keep it readable by "
        "root alone: the seed is the node's secret."))
    nkey_seed: Path | None = Field(default=None, description=(
        "A file holding a user's nkey seed (a line starting SU; `nk -gen user` makes one), "
        "for servers that list the user's public nkey; instead of the other kinds of "
        "credentials."))
    tls: NatsTlsConfig | None = Field(default=None, description=(
        "TLS to the NATS servers: the CA that signed their certificates and, for servers that "
        "verify clients, a client certificate. Give it with tls:// servers: over nats:// "
        "without TLS every change, and any password or token, crosses the network in clear."))
    stream_max_age_s: Annotated[float, Field(gt=0, le=30 * 86400, description=(
        "Seconds the change stream keeps a change (retention by age, at most 30 days). A node "
        "away for longer (stopped, cut off) catches up from the snapshots and the digests "
        "instead of the stream, as does one that missed changes the stream dropped."))] = 3600.0
    stream_max_bytes: Annotated[int, Field(ge=1 << 20, description=(
        "Bytes the change stream keeps at most (1 GiB by default, at least 1 MiB), the oldest "
        "changes dropped first: retention by size, beside stream_max_age_s, so that a burst "
        "of writes cannot fill the servers' disks."))] = 1 << 30
    replicas: Annotated[int, Field(ge=1, le=5, description=(
        "JetStream replicas of the change stream and of the snapshot bucket: 1 keeps them on "
        "one server, lost with it; 3 on a 3-server NATS cluster survives the loss of any one. "
        "At most the number of JetStream servers (JetStream's own limit is 5)."))] = 1
    snapshot_interval_s: Annotated[float, Field(gt=0, le=3600, description=(
        "Seconds between two rounds in which a node stores the buckets of its maps that moved "
        "since the last round as snapshots in JetStream; a starting node catches up from them "
        "without a live peer (any node's snapshot is valid: the merge is state-based). "
        "Shorter: fresher snapshots, more writes to the servers."))] = 10.0
    connect_timeout_s: Annotated[float, Field(gt=0, le=300, description=(
        "Seconds a connection attempt to a NATS server may take before it counts as "
        "failed."))] = 5.0

    @field_validator("servers")
    @classmethod
    def _servers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("give at least one NATS server, e.g. [nats://10.0.0.5:4222]")
        seen: dict[tuple[str, int], str] = {}
        for url in v:
            where = _nats_server(url)
            if where in seen:
                same = "is listed twice" if seen[where] == url else f"is {seen[where]!r} again"
                raise ValueError(f"{url!r} {same}: list each server once")
            seen[where] = url
        return v

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, v: str) -> str:
        return nats_cluster_name(v)

    @field_validator("user", "password", "token")
    @classmethod
    def _not_empty(cls, v: str | None) -> str | None:
        # an empty value reads as no credential: a node would connect unauthenticated
        if v == "":
            raise ValueError("is empty, which is no credential: give its value, or remove "
                             "the field")
        return v

    @model_validator(mode="after")
    def _credentials(self) -> NatsConfig:
        if (self.user is None) != (self.password is None):
            given, missing = ("user", "password") if self.password is None else (
                "password", "user")
            raise ValueError(f"{given} is set without {missing}: give both, or neither")
        kinds = ["/".join(kind) for kind in NATS_CREDENTIALS if getattr(self, kind[0]) is not None]
        if len(kinds) > 1:
            named = ", ".join(kinds[:-1]) + " and " + kinds[-1]
            raise ValueError(f"{named} are set, but a node connects with one kind of "
                             "credentials: keep the one the NATS servers expect of this node, "
                             "and remove the other" + ("s" if len(kinds) > 2 else ""))
        return self


class AgentConfig(_Strict):
    """One node's configuration: who it is, whom it talks to, and which maps it keeps in sync."""

    node_id: str = Field(description=(
        f"This node's id, unique in the cluster: {NODE_ID_RULE}. Records are stamped with it, "
        "ties between equal clocks are broken by it, and with TLS the node's certificate must "
        "name it."))
    transport: Literal["grpc", "nats"] = Field(default="grpc", description=(
        "How the nodes reach each other. grpc: the embedded full mesh, each node streaming to "
        "every other (listen, peers, peers_dns, tls), fine to ~30 nodes. nats: each node "
        "publishes its changes once through NATS JetStream, whose servers fan them out "
        "(nats, and allowed_nodes as the member list), for larger clusters. See "
        "docs/scaling.md."))
    listen: str = Field(default="127.0.0.1:7001", description=(
        "HOST:PORT where peers connect (gRPC). An address other hosts can reach needs tls, or "
        "insecure: true, as anyone who reaches a plaintext port can change your maps. Not "
        "used with transport: nats, which starts no listener."))
    peers: tuple[str, ...] = Field(
        default=(), description=(
            "Every other node of the cluster (a full mesh: each node lists all the others), as "
            "HOST:PORT, or ID@HOST:PORT to bind the address to a node id: the peer must then "
            "announce that id and, with TLS, its certificate must name it. Ids given here are "
            "members (see allowed_nodes). transport: grpc only."))
    allowed_nodes: tuple[str, ...] | None = Field(
        default=None, description=(
            "The cluster's node ids (this node's is added): only these may connect, and only "
            "their records count; with ids given in peers, the union of both. Unset and no ids "
            "in peers: with tls, every node the CA signs a certificate for; without, the nodes "
            "that answer at the peer addresses (docs/security.md). Required with transport: "
            "nats, which has no peer addresses."))
    tls: TlsConfig | None = Field(default=None, description=(
        "Mutual TLS between the nodes (PEM files; `bpfsync certs` makes them). Unset: "
        "plaintext, which authenticates nothing, so the agent then listens on loopback only, "
        "unless insecure: true. transport: grpc only (TLS to NATS servers is nats.tls)."))
    insecure: bool = Field(
        default=False, description=(
            "Run without TLS on a listen address other hosts can reach. Whoever reaches the "
            "port can then write any key under any member's id; for trusted networks and tests "
            "only. Cannot be combined with tls."))
    peers_dns: str | None = Field(default=None, description=(
        "HOST:PORT whose name resolves to the cluster's nodes (a Kubernetes headless service, "
        "say): every address it resolves to is dialed, in addition to peers, and the name is "
        "re-resolved periodically, so nodes can come and go without a config change. This "
        "node's own address among them is recognised and skipped. transport: grpc only."))
    nats: NatsConfig | None = Field(default=None, description=(
        "The NATS JetStream transport's settings: required with transport: nats, and an error "
        "with transport: grpc, which would ignore them."))
    http_listen: str | None = Field(default=None, description=(
        "HOST:PORT for the HTTP endpoints /metrics (Prometheus), /healthz, /readyz and "
        "/status (what `bpfsync status` reads). Unset: no HTTP server. They are read-only but "
        "unauthenticated: keep them on loopback or a management network."))
    maps: tuple[MapConfig, ...] = Field(description=(
        "The maps to keep in sync, at least one: the same maps (by sync name) on every node."))
    watch: WatchConfig = Field(default=WatchConfig(), description=(
        "How writes to the maps are seen."))
    sync: SyncConfig = Field(default=SyncConfig(), description=(
        "How changes are merged, batched, sent and repaired."))
    state: StateConfig = Field(default=StateConfig(), description=(
        "Where and how the node keeps its replica state across restarts."))

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
    def _transport(self) -> AgentConfig:
        # each transport's settings are an error under the other one, not ignored: a node
        # configured for one while running the other would sync with nobody, silently
        if self.transport == "grpc":
            if self.nats is not None:
                raise ValueError(
                    "nats: given, but transport is grpc (the default), which does not use it: "
                    "set transport: nats (--transport nats) to sync through NATS, or remove "
                    "nats to keep the gRPC mesh")
            return self
        if self.nats is None:
            raise ValueError(
                "transport: nats needs the NATS servers to connect to: give nats: {servers: "
                "[nats://HOST:4222, ...]} (--nats nats://HOST:4222, once per server)")
        mesh = [name for name, value in (("peers", self.peers), ("peers_dns", self.peers_dns),
                                         ("tls", self.tls)) if value]
        if mesh:
            one = len(mesh) == 1
            raise ValueError(
                f"{', '.join(mesh)}: {'a setting' if one else 'settings'} of the gRPC mesh, but "
                f"transport is nats: remove {'it' if one else 'them'} (the nodes meet through "
                "the NATS servers; TLS to those is nats.tls)")
        if self.allowed_nodes is None:
            # the mesh learns ids from ID@HOST:PORT peers and certificates; NATS has neither
            raise ValueError(
                "allowed_nodes: required with transport: nats, as the cluster's member list, "
                "e.g. allowed_nodes: [a, b, c] (--allow-node ID for each node): there are no "
                "peer addresses to bind ids to, and only members' records count")
        return self

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
        # the gRPC listener alone takes connections: transport nats starts none
        if (self.transport == "grpc" and self.tls is None and not self.insecure
                and not is_loopback(self.listen)):
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
            msg = "unknown field; check its spelling (every field: docs/config.md)"
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


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML config file's mapping of fields, not yet validated (flags may complete it)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {p}: {err.strerror}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{p} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of fields at the top level")
    return data


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate a YAML config file."""
    return parse_config(read_config_file(path), str(path))
