"""The replica: this node's state machine for every synced map. All its rules are here.

Feed it what the kernel watcher saw (``local_change``), what peers sent (``receive``) and the
time (``now_ns``); it returns records to send and kernel writes to make. It does no I/O.

State, per map
    registers    policy.py: one Record per key (lww) or per key and origin (counter, max, min)
    kernel view  what this node believes its kernel map holds: the value the registers imply,
                 except for the keys in ``_deviations`` (a failed write, a data-plane value the
                 policy does not take as is, a counter seeded from the kernel)
    horizon      the highest stamp of a tombstone purged from the map (table.py)

Rules
  L1  A local change equal to the kernel view is an echo of our own write (a poll watcher reports
      them) or no change at all: ignored. Anything else is a real change, including a data-plane
      write of a key we wrote before: stamped with ``clock.now`` (so it outranks every record
      this node has seen), merged, and returned for broadcast.
  L2  Per-origin policies turn the kernel value into this node's own contribution
      (``own_part``; for a counter: observed minus the other origins' sum).
  R1  ``receive`` validates each record: known map (UnknownMapError), exact key and value size
      (SizeMismatchError), well-formed stamp (MalformedMessageError: the form, and a logical
      part within hlc.MAX_LOGICAL), stamp within the clock drift bound (ClockDriftError,
      hlc.py), an origin that is a member of the cluster (NotMemberError, membership.py). A
      refused record is returned with its error and counted by reason; the rest of the batch
      is still processed. Accepted stamps advance the clock (C1).
  R2  Merge keeps the higher-ranked record per register. A record that changed state goes to
      ``forward``: relayed to the other peers, it converges the cluster through any live path;
      a record that changed nothing is not forwarded, so relaying ends. When our record ranks
      above the sender's, ours goes to ``reply`` so the sender catches up at once.
  R3  After the batch, every touched key whose implied value differs from the kernel view gives
      one write (bytes, or None for a delete): coalesced per key. The kernel view takes that
      value at once, so when the watcher reports the write back, L1 sees an echo.
  T1  A delete is a tombstone (value None), replicated like a value, kept for
      ``tombstone_ttl_ns`` after its stamp's wall time, so a late older update cannot
      resurrect the key.
  T2  ``expire(now)`` purges tombstones past the TTL. Safety condition: the TTL must exceed the
      longest time a record can take to arrive: longest partition or agent downtime plus the
      digest repair interval. Beyond that, T3 decides.
  T3  Purge horizon: a record for a register we do not hold, stamped at or below the map's
      horizon, is older than a delete we have forgotten. It is refused as stale and answered with
      a tombstone of the same stamp (tombstones win ties), sent back to the sender and forwarded,
      so every holder drops it and the cluster converges on "deleted". A stale tombstone is just
      dropped. Trade-off: a write that stayed undelivered for longer than the TTL is lost; the
      alternative is resurrecting deleted keys. Seed stamps are exempt (S2).
  S1  Seed (a map without stored state, or S5): at start, entries already in the kernel map take
      the seed stamp (wall 0, logical 0, this node): age unknown, below every real stamp. On
      catch-up any peer record wins: a key deleted cluster-wide while the agent was down is
      deleted here (its tombstone is still live, T2), a key updated elsewhere takes the newer
      value.
  S2  A seeded key no peer has is kept and replicated *with its seed stamp*, never restamped:
      peers take it, so entries the data plane created while the agent was down are not lost,
      yet any real write or delete still beats it. It is exempt from T3 (unknown is not old).
      Without stored state, an update made while the agent was down loses to the peers' older
      value, and counters take the cluster's value, losing the increments counted meanwhile
      (their kernel sum includes other nodes' slots, so it is not seeded as our slot): S4
      closes both.
  S3  Writes made during a partition while the agent runs carry real stamps and merge by rank
      when it heals; nothing special. After a restart, the clock has observed every stamp the
      store holds (P2), this node's own included; a node without stored state starts from
      physical time, and its previous incarnation may have issued stamps up to
      ``max_drift_ns`` ahead: the agent feeds local changes only after the first catch-up (the
      clock has then observed the peers' stamps) or ``max_drift_ns`` after start.
Persisted state (the agent's state store keeps what these rules need; ``load``, ``snapshot``)
  P1  The store holds every register (bucket snapshots) and every record that changed one
      since (the log): a record this node stamped, before it is sent; a peer's record that
      changed a register, before its kernel write. What it holds is their join, so order and
      repeats do not matter, and a crash between store and kernel leaves the store ahead of the
      kernel, never behind: no kernel value of a peer's is unknown to the store, so S4 cannot
      take a peer's value for a local change.
  P2  ``load`` takes a map's stored state in before anything else, checked first (a damaged
      blob is ValueError, and nothing of the map is taken); the clock observes the highest
      stored stamp, so a new local change outranks this node's writes of its previous run.
Restart (``restart``: after ``load``, the kernel map's entries as found at start; or, while the
agent runs, those of a new map object found at the map's pin: the data plane restarted)
  S4  The same map object (same map id, same boot): an entry equal to the registers' value
      keeps its stored stamp; an entry that is new or differs, and a key the registers hold
      that the kernel does not, were changed by the data plane while the agent was down. Such
      keys are held back (H1), then stamped as local changes once the catch-up has shown the
      clock every peer's stamp (``take_held``): the data plane's last word wins.
  S5  A new map object (another id, or another boot: the data plane recreated its map) is no
      cluster-wide delete: the registers (stored, or those of the running agent) are dropped
      and the kernel's entries seeded (S1, S2); peers refill the map. So an entry the data
      plane wrote into the new map is kept and sent where no peer has its key, and takes the
      peers' value where one has: its age is unknown, as a seeded entry's is. Found at start
      or while running, the rule is the same: the registers are written back only where S6
      asks, so a map emptied on purpose is as empty as its peers leave it.
  S6  ``restore`` (opt-in per map) takes the registers back into a new map object found
      empty: their values are written to it, so a cluster whose every node lost its maps (a
      power loss) comes back to its last stored state; a map emptied on purpose is restored
      only where this was asked for.
  H1  A held-back key keeps the kernel's value during the catch-up: peer records merge into its
      registers but write nothing (its kernel view is the kernel's value). ``take_held`` stamps
      it with the kernel's value then: an lww key takes that value; a per-origin key takes as
      this node's contribution what the value holds beyond the other origins' registers *as
      stored* (own_part at restart), so increments counted while down are added and the peers'
      increments since are not taken for ours; the key then gets the registers' value.
Filters (core/filter.py; the agent checks them, on the kernel's entries as they are, before
anything reaches these rules: agent/pipeline.py and agent/applier.py)
  F1  A local value that does not pass its map's filter is no change: not stamped, not sent. The
      registers keep what the key last synced, so peers keep it too: an entry that stops
      passing stays on the other nodes as it last passed (their own data planes, LRU or a delete
      remove it), and is not taken for a delete.
  F2  A peer's value or delete is not written over a local entry that does not pass: that entry
      is the node's own. The registers still merge the record (the replica stays convergent).
  F3  An entry that starts passing is a local change like any other, seen at its next change;
      one held back by an age condition is looked at again on the agent's timer (a bounded
      number a tick, oldest first) until it passes or is deleted.
  F4  Deletes are not filtered: deleting a key the cluster holds is a delete (T1).
  C1  The clock observes the highest stamp accepted in each batch (every stamp is checked
      for drift), so a local write made after seeing a record outranks it.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from bpfsync.core.digest import DEFAULT_BUCKETS, bucket_of, diff
from bpfsync.core.frozen import FrozenRegs, check_records, unseal
from bpfsync.core.hlc import DEFAULT_MAX_DRIFT_NS, MAX_LOGICAL, ClockDriftError, HybridClock
from bpfsync.core.lww_table import LwwTable
from bpfsync.core.membership import Membership
from bpfsync.core.messages import Digest, MapSchema, Pull, Record, Stamp, new_record
from bpfsync.core.policy import FieldPolicy, Policy, policy_for
from bpfsync.core.register import (
    MAX_NODE_BYTES,
    Packed,
    node_of,
    pack,
    stamp_of,
    unpack,
    value_of,
)
from bpfsync.core.restart import Content, differences, live_content, live_rows
from bpfsync.core.table import QUIET_CALLS, MapTable, SlotTable
from bpfsync.errors import (
    ConfigError,
    MalformedMessageError,
    NotMemberError,
    PeerError,
    SizeMismatchError,
    UnknownMapError,
)

_U64 = 1 << 64
_BE64 = struct.Struct(">Q")
_CLOCK = struct.Struct(">QQ")
_SEED_CLOCK = bytes(16)  # a packed record's wall and logical of a seed stamp

REJECT_REASONS: dict[type[PeerError], str] = {
    UnknownMapError: "unknown_map",
    SizeMismatchError: "size_mismatch",
    MalformedMessageError: "malformed",
    ClockDriftError: "clock_drift",
    NotMemberError: "not_member",
}


def seed_stamp(node: str) -> Stamp:
    """The stamp of entries found in the kernel at start: age unknown, below every real stamp."""
    return Stamp(0, 0, node)


def is_seed(stamp: Stamp) -> bool:
    # clock.now never issues (0, 0): its logical part is >= 1 whenever wall is 0
    return stamp.wall == 0 and stamp.logical == 0


Write = tuple[str, bytes, bytes | None]  # (map, key, value to write or None to delete)


class Fill(NamedTuple):
    """Writes of many keys at once (a catch-up's), as columns: every one an update."""

    map: str
    keys: bytes  # joined, of the map's key size each
    values: bytes  # joined, of its value size each, in the keys' order
    entries: int


@dataclass(slots=True)
class ApplyResult:
    """What a received batch asks of the caller."""

    writes: list[Write] = field(default_factory=list)  # to the local kernel maps, one per key
    fills: list[Fill] = field(default_factory=list)  # ... more, for keys not in ``writes``
    forward: Packed = field(default_factory=Packed.empty)  # to every other peer (R2, T3)
    reply: list[Record] = field(default_factory=list)  # back to the sender (R2, T3)
    rejected: list[tuple[Record, PeerError]] = field(default_factory=list)  # R1


@dataclass(slots=True)
class Restart:
    """What ``Replica.restart`` found (S4-S6) and the kernel writes it asks for."""

    case: str  # "resumed" (S4), "new map" (S5), "restored" (S6); "seeded" (S1: nothing held)
    held: int = 0  # keys the data plane changed while the agent was down (H1)
    deleted: int = 0  # ... of them, deleted
    seeded: int = 0  # S5: entries seeded
    fills: list[Fill] = field(default_factory=list)  # S6: the stored content, to write


def _drift_limit(now_ns: int, max_drift_ns: int) -> bytes:
    """R1's drift bound as a packed prefix: a packed record whose 8-byte big-endian wall is
    above the bound compares above it; one at the bound compares below (a node id's first byte
    is never 0xff in UTF-8)."""
    return _BE64.pack(max(0, min(now_ns + max_drift_ns, _U64 - 1))) + b"\xff" * 9


class Replica:
    """This node's replicated state of every synced map. See the module docstring for rules."""

    def __init__(
        self,
        node: str,
        maps: Iterable[MapSchema],
        tombstone_ttl_ns: int,
        *,
        max_drift_ns: int = DEFAULT_MAX_DRIFT_NS,
        digest_buckets: int = DEFAULT_BUCKETS,
        policies: Mapping[str, Policy] | None = None,
        members: Membership | None = None,
    ) -> None:
        """``members``: whose records to take in (R1); None takes any origin's."""
        if tombstone_ttl_ns <= 0:
            raise ConfigError(f"tombstone TTL must be > 0 ns, got {tombstone_ttl_ns}")
        self.node = node
        self.members = members
        self.clock = HybridClock(node, max_drift_ns=max_drift_ns)
        self.tombstone_ttl_ns = tombstone_ttl_ns
        self.digest_buckets = digest_buckets
        self.stats: Counter[str] = Counter()
        self._tables: dict[str, MapTable] = {}
        self._deviations: dict[str, dict[bytes, bytes | None]] = {}
        # H1, per map: held-back key -> the other origins' registers at restart (per-origin
        # maps; None for lww)
        self._held: dict[str, dict[bytes, tuple[Record, ...] | None]] = {}
        policies = dict(policies or {})
        for schema in maps:
            self.add_map(schema, policies.pop(schema.name, None))
        if policies:
            raise ConfigError(f"policies given for maps that are not synced: {sorted(policies)}")

    def add_map(self, schema: MapSchema, policy: Policy | None = None) -> None:
        """Sync one more map, from now on (a map the agent could not open at start). Its
        table starts empty: ``seed`` or ``load`` it next."""
        if schema.name in self._tables:
            raise ConfigError(f"map {schema.name!r} is listed twice")
        if schema.key_size <= 0 or schema.value_size <= 0:
            raise ConfigError(f"map {schema.name!r}: key and value sizes must be > 0")
        policy = policy or policy_for(schema)
        if policy.name != schema.policy:
            raise ConfigError(
                f"map {schema.name!r}: the schema says policy {schema.policy!r} but"
                f" {policy.name!r} was given; peers compare the schema's name"
            )
        if isinstance(policy, FieldPolicy) and policy.value_size != schema.value_size:
            raise ConfigError(
                f"map {schema.name!r}: policy is for {policy.value_size}-byte values,"
                f" the map's are {schema.value_size} bytes"
            )
        table = SlotTable if policy.per_origin else LwwTable  # the shape the policy needs
        self._tables[schema.name] = table(schema, policy, self.digest_buckets)
        self._deviations[schema.name] = {}
        self._held[schema.name] = {}

    # --- what the caller may ask ---------------------------------------------------------------

    @property
    def maps(self) -> tuple[MapSchema, ...]:
        return tuple(t.schema for t in self._tables.values())

    @property
    def per_origin_maps(self) -> frozenset[str]:
        """Maps whose policy keeps every origin's record per key (for Outbox coalescing)."""
        return frozenset(n for n, t in self._tables.items() if t.policy.per_origin)

    def kernel_view(self, map: str, key: bytes) -> bytes | None:
        """What this node believes its kernel map holds for ``key`` (None: absent)."""
        table = self._local_table(map)
        return self._expected(table, key)

    def content(self, map: str) -> dict[bytes, bytes]:
        """Key -> value the registers imply for every live key (the converged map content)."""
        table = self._local_table(map)
        out = {}
        for key in table.all_keys():
            value = table.kernel_value(key)
            if value is not None:
                out[key] = value
        return out

    def records(self, map: str) -> Packed:
        """Every register's record (tombstones included): a full snapshot for catch-up.

        A copy, not a view: the caller may send it in pieces while the replica keeps changing.
        """
        table = self._local_table(map)
        return table.records_in(range(table.nbuckets))

    def registers(self, map: str) -> int:
        return len(self._local_table(map))

    def buckets_at_rest(self, map: str) -> int:
        """How many of the map's buckets are frozen (``settle``)."""
        return self._local_table(map).at_rest()

    # --- local side ------------------------------------------------------------------------

    def seed(self, map: str, items: Iterable[tuple[bytes, bytes]]) -> int:
        """Take in the kernel map's entries at start (S1, S2); returns how many became our
        records (peers get them by digest repair: ``records``)."""
        table = self._local_table(map)
        if len(table):
            raise ValueError(f"seed({map!r}) must come before any other change of that map")
        stamp = seed_stamp(self.node)
        if isinstance(table, LwwTable):
            seeded = self._seed_lww(table, list(items), pack(stamp, b""))
            self.stats["local.seeded"] += seeded
            return seeded
        seeded = 0
        for key, value in items:
            self._check_local(table, key, value)
            if table.policy.seed_as_own:
                seeded += table.offer(Record(map, key, value, stamp)) is None
            self._set_view(table, key, value)
        self.stats["local.seeded"] += seeded
        return seeded

    def _seed_lww(self, table: LwwTable, items: list[tuple[bytes, bytes]], prefix: bytes) -> int:
        """``seed`` of an lww map, as one batch: a full map's buckets fill in bulk and come out
        frozen (frozen.py), as a catch-up's do. Every register then holds what the kernel does."""
        keys = [key for key, _ in items]
        values = [value for _, value in items]
        self._check_batch(table, keys, values)
        deviations = self._deviations[table.name]
        for key in keys if deviations else ():
            deviations.pop(key, None)
        return len(table.offer_all(keys, [prefix + value for value in values]).stored)

    def local_change(self, map: str, key: bytes, value: bytes | None, now_ns: int) -> Record | None:
        """A watcher saw ``key`` change to ``value`` (None: deleted). L1, L2.

        Returns the record to send to every peer, or None for an echo or no change.
        """
        table = self._local_table(map)
        self._check_local(table, key, value)
        b = bucket_of(key, table.nbuckets)
        deviations = self._deviations[map]
        # _expected(), inlined: every local change passes here
        if value == (deviations[key] if key in deviations else table.kernel_value(key, b)):
            self.stats["local.echo"] += 1
            return None
        if isinstance(table, SlotTable):
            return self._stamp_own(table, key, value, table.others(key, self.node), now_ns, b)
        rec = new_record((map, key, value, self.clock.now(now_ns)))
        table.offer(rec, b)  # wins: the clock outranks everything it has seen (C1)
        deviations.pop(key, None)  # the register now holds what the kernel does
        self.stats["local.changed"] += 1
        return rec

    def _stamp_own(
        self, table: SlotTable, key: bytes, value: bytes | None, others: list[Record],
        now_ns: int, b: int | None = None,
    ) -> Record | None:
        """L2: the kernel holds ``value``; this node's contribution is what it holds beyond
        ``others`` (the other origins' registers). Stamped and stored if it changed (the
        record, else None); the kernel view takes ``value``."""
        own = value if value is None else table.policy.own_part(value, others)
        mine = table.slots(key).get(self.node)
        rec = None
        if (None if mine is None else mine.value) != own:
            rec = new_record((table.name, key, own, self.clock.now(now_ns)))
            table.offer(rec, b)  # wins: the clock outranks everything it has seen (C1)
            self.stats["local.changed"] += 1
        self._set_view(table, key, value, b)
        return rec

    def local_changes(
        self, map: str, keys: Sequence[bytes], values: Sequence[bytes | None], now_ns: int
    ) -> tuple[Packed, list[int]]:
        """``local_change`` of each (key, value) in turn (a watcher's batch): the records to
        send, packed, and which of the changes they are (the others were echoes or changed
        nothing). An lww map takes the batch in one pass."""
        table = self._local_table(map)
        if not isinstance(table, LwwTable) or not keys:
            out, changed = Packed.empty(), []
            for i, (key, value) in enumerate(zip(keys, values, strict=True)):
                rec = self.local_change(map, key, value, now_ns)
                if rec is not None:
                    out.append(map, key, pack(rec.stamp, rec.value))
                    changed.append(i)
            return out, changed
        self._check_batch(table, keys, values)
        start = self.clock.peek(now_ns, len(keys))
        changed, packs = table.offer_own(keys, values, self._deviations[map], start, self.node)
        if changed:
            self.clock.take(start, len(changed))  # the stamps offer_own gave, from start
        self.stats["local.echo"] += len(keys) - len(changed)
        self.stats["local.changed"] += len(changed)
        return Packed([map] * len(changed), [keys[i] for i in changed], packs), changed

    def peers_value(self, map: str, key: bytes) -> bytes | None:
        """The other origins' merged value of ``key`` (per-origin maps): what a companion map
        holds in the exact counter layout. None when no other origin has a live slot."""
        table = self._local_table(map)
        if not isinstance(table, SlotTable):
            raise ValueError(f"map {map!r} keeps one register per key; it has no peers' value")
        return table.policy.combine(table.others(key, self.node))

    def slots(self, map: str, key: bytes) -> dict[str, Record]:
        """Every origin's register of ``key`` (per-origin maps; one entry for lww maps)."""
        table = self._local_table(map)
        if isinstance(table, SlotTable):
            return dict(table.slots(key))
        held = table.held(Record(map, key, None, seed_stamp(self.node)))
        return {} if held is None else {held.stamp.node: held}

    def note_kernel(self, map: str, key: bytes, value: bytes | None) -> None:
        """The kernel holds ``value`` for ``key`` because of the agent (a write failed, or a
        retried one succeeded): update the kernel view without making a change."""
        table = self._local_table(map)
        self._check_local(table, key, value)
        self._set_view(table, key, value)

    def desired(self, map: str, key: bytes) -> bytes | None:
        """The value the registers imply for ``key``: what to write when retrying."""
        return self._local_table(map).kernel_value(key)

    def expire(self, now_ns: int) -> int:
        """Purge tombstones older than the TTL (T2); returns how many were purged."""
        deadline = now_ns - self.tombstone_ttl_ns
        purged = sum(table.expire(deadline) for table in self._tables.values())
        self.stats["tombstones.purged"] += purged
        return purged

    def settle(self, most: int, quiet: int = QUIET_CALLS) -> int:
        """Let at most ``most`` buckets, over all maps, unwritten over the last ``quiet`` calls
        take less memory (frozen.py); call it at a steady pace. Returns how many did."""
        done = 0
        for table in self._tables.values():
            done += table.settle(most - done, quiet)
        return done

    # --- remote side -----------------------------------------------------------------------

    def receive(
        self, records: Sequence[Record], now_ns: int, sender: str = "", *, replies: bool = True
    ) -> ApplyResult:
        """Merge records a peer sent (R1-R3, T3).

        Batches off the wire are ``Packed`` (the codec checked their form) and are merged
        without building a Record each: a catch-up is a million of them. Anything else is
        checked, then packed. ``replies=False``: no R2 reply, for records of a repair (a digest
        answer starts with a Pull of the same buckets, which the sender's answer fills with
        ours; a reply would send them twice). T3 answers are still given.
        """
        res = ApplyResult()
        if isinstance(records, Packed):
            maps, keys, packs = records.maps, records.keys, records.packed
            strangers = self._strangers(records)
        else:
            maps, keys, packs = [], [], []
            for rec in records:
                try:
                    self._admit_form(rec, sender)
                except PeerError as err:
                    self._reject(res, rec, err)
                    continue
                maps.append(rec.map)
                keys.append(rec.key)
                packs.append(pack(rec.stamp, rec.value))
            strangers = self._strangers(Packed(maps, keys, packs))
        if packs and not strangers and self._receive_lww(
            res, maps, keys, packs, now_ns, sender, replies
        ):
            return res
        # kernel view before the batch, per key it changed: the writes are the differences
        touched: dict[tuple[str, bytes], tuple[MapTable, int, bytes | None]] = {}
        owed: dict[tuple[str, bytes, str], tuple[MapTable, bytes, bytes]] = {}  # R2, by register
        forward = res.forward
        # the loop below runs a million times per catch-up: names bound once
        fwd_map, fwd_key = forward.maps.append, forward.keys.append
        fwd_packed = forward.packed.append
        stats = self.stats
        tables = self._tables
        applied = ignored = 0
        drift_limit = _drift_limit(now_ns, self.clock.max_drift_ns)
        top: bytes | None = None  # C1: observing the highest stamp covers every lower one
        for name, key, packed in zip(maps, keys, packs, strict=True):
            table = tables.get(name)
            end = packed.find(0, 16)
            live = not packed[end + 1]
            if (
                table is None
                or len(key) != table.schema.key_size
                or (live and len(packed) - end - 2 != table.schema.value_size)
                or packed > drift_limit
                or (strangers and node_of(packed) in strangers)
            ):
                rec = unpack(name, key, packed)
                self._reject(res, rec, self._refusal(table, rec, now_ns, sender))
                continue
            if top is None or packed > top:
                top = packed
            b = bucket_of(key, table.nbuckets)
            horizon = table.horizon
            if (
                horizon is not None
                and not packed.startswith(_SEED_CLOCK)
                and stamp_of(packed) <= horizon
                and not table.holds(key, node_of(packed), b)
            ):
                stats["received.stale"] += 1
                if live:  # T3: answer with its tombstone
                    tomb = pack(stamp_of(packed), None)
                    forward.append(name, key, tomb)
                    res.reply.append(unpack(name, key, tomb))
                continue
            reg = (name, key)
            first = touched.get(reg)
            before = first[2] if first is not None else self._expected(table, key, b)
            kept = table.offer_packed(key, packed, b)
            if kept is None:
                applied += 1
                fwd_map(name)
                fwd_key(key)
                fwd_packed(packed)
                if first is None:
                    touched[reg] = (table, b, before)
            else:
                ignored += 1
                if kept > packed and replies:  # ours ranks above the sender's (register.py)
                    owed[(name, key, node_of(kept))] = (table, key, kept)
        stats["received.applied"] += applied
        stats["received.ignored"] += ignored
        for table, key, kept in owed.values():
            held = table.held(unpack(table.name, key, kept))
            if held is not None and pack(held.stamp, held.value) == kept:  # not superseded
                res.reply.append(held)
        held_back = self._held
        for (name, key), (table, b, before) in touched.items():
            if held_back[name] and key in held_back[name]:  # H1: the kernel keeps its value
                continue
            want = table.kernel_value(key, b)
            if want != before:
                res.writes.append((name, key, want))
            self._deviations[name].pop(key, None)
        if top is not None:
            self.clock.observe(stamp_of(top), now_ns, sender)
        return res

    def _receive_lww(
        self,
        res: ApplyResult,
        maps: list[str],
        keys: list[bytes],
        packs: list[bytes],
        now_ns: int,
        sender: str,
        replies: bool,
    ) -> bool:
        """``receive`` of the usual batch, in bulk: one lww map, no purge horizon, keys of its
        size, no stamp beyond the drift bound. False (nothing done) for any other batch."""
        name = maps[0]
        table = self._tables.get(name)
        if (
            not isinstance(table, LwwTable)
            or table.horizon is not None
            or maps.count(name) != len(maps)
            or not min(map(len, keys)) == max(map(len, keys)) == table.schema.key_size
        ):
            return False
        top = max(packs)  # C1: the highest stamp (register.py: bytes order is rank order)
        if top > _drift_limit(now_ns, self.clock.max_drift_ns):
            return False
        deviations = self._deviations[name]
        held = self._held[name]  # H1: every held key deviates
        # a register that held nothing has the kernel hold nothing, unless it deviates
        done = table.offer_all(keys, packs, fill=not deviations)
        for i in done.bad:
            rec = unpack(name, keys[i], packs[i])
            self._reject(res, rec, self._refusal(table, rec, now_ns, sender))
        if done.bad:  # C1 takes accepted stamps only
            bad = set(done.bad)
            top = max((p for i, p in enumerate(packs) if i not in bad), default=b"")
        forward = res.forward
        if len(done.stored) == len(packs):
            forward.extend(Packed(maps, keys, packs))
        else:
            for i in done.stored:
                forward.append(name, keys[i], packs[i])
        if done.filled:
            res.fills.append(Fill(name, b"".join([k for k, _, _ in done.filled]),
                                  b"".join([v for _, v, _ in done.filled]),
                                  sum(c for _, _, c in done.filled)))
        writes = res.writes
        for key, (old, new) in done.changed.items():
            if deviations and key in deviations:
                before = deviations.pop(key)
                if held and key in held:  # the kernel keeps the data plane's value
                    deviations[key] = before
                    continue
            else:
                before = None if old is None else value_of(old)
            end = new.find(0, 16)  # value_of(new), inlined: once per key of a catch-up
            want = None if new[end + 1] else new[end + 2 :]
            if want != before:
                writes.append((name, key, want))
        replied: set[bytes] = set()
        for i, kept in done.outranked if replies else ():  # R2: the sender catches up at once
            key = keys[i]
            if key not in replied and table.packed_of(key) == kept:  # not superseded since
                replied.add(key)
                res.reply.append(unpack(name, key, kept))
        self.stats["received.applied"] += len(done.stored)
        self.stats["received.ignored"] += len(done.ignored)
        if top:
            self.clock.observe(stamp_of(top), now_ns, sender)
        return True

    def _strangers(self, records: Packed) -> frozenset[str]:
        """R1: the origins of ``records`` that are not members (usually none)."""
        if self.members is None:
            return frozenset()
        return self.members.refused(records.origins())

    def _reject(self, res: ApplyResult, rec: Record, err: PeerError) -> None:
        res.rejected.append((rec, err))
        self.stats["rejected." + REJECT_REASONS.get(type(err), "other")] += 1

    # --- persisted state and restart -----------------------------------------------------------

    def snapshot(self, map: str, buckets: Iterable[int]) -> list[tuple[int, int, bytes]]:
        """(bucket, digest sum, sealed registers) of the given buckets, for the state store."""
        table = self._local_table(map)
        return [(b, table.sums[b], table.bucket_blob(b)) for b in buckets]

    def horizon(self, map: str) -> Stamp | None:
        """T3's purge horizon of ``map``."""
        return self._local_table(map).horizon

    def bucket_sums(self, map: str) -> tuple[int, ...]:
        """Each bucket's digest sum: a bucket whose sum moved holds other registers."""
        return tuple(self._local_table(map).sums)

    def load(
        self, map: str, buckets: Sequence[tuple[int, bytes]], log: Iterable[bytes], *,
        nbuckets: int, horizon: Stamp | None, now_ns: int,
    ) -> int:
        """P2: take in ``map``'s stored state, before any other change of it: bucket snapshots
        (split by ``nbuckets``) and logged records (``seal``ed, frozen.py). Everything is
        checked before anything is taken: ValueError says what is damaged. Returns how many
        registers the map then holds."""
        table = self._local_table(map)
        if len(table):
            raise ValueError(f"load({map!r}) must come before any other change of that map")
        ks, vs = table.schema.key_size, table.schema.value_size
        stored = [(b, *unseal(blob, ks)) for b, blob in buckets]
        logged = [unseal(blob, ks)[0] for blob in log]
        for regs in [regs for _, regs, _ in stored] + logged:
            why = check_records(regs.columns()[1], vs)
            if why:
                raise ValueError(f"map {map!r}: {why}")
        whole = isinstance(table, LwwTable) and nbuckets == table.nbuckets
        if whole and sorted(b for b, _, _ in stored) != sorted({b for b, _, _ in stored}):
            raise ValueError(f"map {map!r}: a bucket stored twice")
        if whole and any(not 0 <= b < nbuckets for b, _, _ in stored):
            raise ValueError(f"map {map!r}: a bucket outside 0..{nbuckets - 1}")
        top = (0, 0)
        for b, regs, digest_sum in stored:
            if isinstance(table, LwwTable) and whole:
                table.install(b, regs, digest_sum)
            else:
                self._merge_stored(table, regs)
            top = max(top, _top_clock(regs))
        for regs in logged:
            self._merge_stored(table, regs)
            top = max(top, _top_clock(regs))
        table.horizon = horizon
        if top > (0, 0):
            try:
                self.clock.observe(Stamp(top[0], top[1], self.node), now_ns)
            except ClockDriftError:  # this host's clock went back: new stamps may rank lower
                self.stats["restart.clock_behind"] += 1
        self.stats["restart.loaded"] += len(table)
        return len(table)

    @staticmethod
    def _merge_stored(table: MapTable, regs: FrozenRegs) -> None:
        keys, packs = regs.keys(), regs.values()
        if isinstance(table, LwwTable):
            table.offer_all(keys, packs)
            return
        for key, packed in zip(keys, packs, strict=True):
            table.offer_packed(key, packed)

    def restart(
        self, map: str, content: Content, *, same_object: bool, restore: bool = False,
        live: Content | None = None,
    ) -> Restart:
        """S4-S6: ``content``, the kernel map's entries as found at start (after ``load``), or
        those of a new map object found while running (the registers are then the running
        agent's). ``same_object``: the registers are of this very map object (its id, this
        boot); ``restore``: the map's configuration asks for S6; ``live``: ``live_rows(map)``
        taken since the registers last changed (after ``load``), if it was."""
        table = self._local_table(map)
        if not same_object:
            if restore and not len(content) and len(table):
                keys, values, n = live_content(table)
                self.stats["restart.restored"] += n
                return Restart("restored", fills=[Fill(map, keys, values, n)] if n else [])
            self._tables[map] = type(table)(table.schema, table.policy, table.nbuckets)
            self._deviations[map].clear()
            self._held[map].clear()  # H1's keys were the old object's
            return Restart("new map", seeded=self.seed(map, content.pairs()))
        held, deviations = self._held[map], self._deviations[map]
        changed = differences(table, content, live)
        for key, value in changed:
            others = table.others(key, self.node) if isinstance(table, SlotTable) else None
            held[key] = None if others is None else tuple(others)
            deviations[key] = value
        deleted = sum(value is None for _, value in changed)
        self.stats["restart.held"] += len(changed)
        return Restart("resumed", held=len(changed), deleted=deleted)

    def live_rows(self, map: str) -> Content | None:
        """An lww map's live registers as rows (for ``restart``'s comparison); None for a
        per-origin map, which is compared key by key."""
        table = self._local_table(map)
        return live_rows(table) if isinstance(table, LwwTable) else None

    def held_keys(self) -> dict[str, list[bytes]]:
        """H1: per map, the keys held back since the restart (their kernel values are to be
        read again for ``take_held``)."""
        return {name: list(held) for name, held in self._held.items() if held}

    def take_held(
        self, now_ns: int, current: Mapping[str, Mapping[bytes, bytes | None]]
    ) -> tuple[Packed, list[Write]]:
        """H1, after the catch-up: stamp every held-back key with its kernel value now
        (``current``, read again; a key missing from it keeps the value found at restart).
        Returns the records to send to every peer and the kernel writes to make."""
        records, writes = Packed.empty(), []
        for name, held in self._held.items():
            if not held:
                continue
            table, deviations = self._tables[name], self._deviations[name]
            now_values = current.get(name, {})
            items = list(held.items())
            held.clear()
            values = [now_values[k] if k in now_values else deviations.get(k) for k, _ in items]
            for key, _ in items:
                deviations.pop(key, None)
            if not isinstance(table, SlotTable):
                packed, _ = self.local_changes(name, [k for k, _ in items], values, now_ns)
                records.extend(packed)
                continue
            for (key, others), value in zip(items, values, strict=True):
                # the other origins as stored, not as the catch-up left them (no echo check:
                # the kernel may equal the registers by chance while holding our increments)
                rec = self._stamp_own(table, key, value, list(others or ()), now_ns)
                if rec is not None:
                    records.append(name, key, pack(rec.stamp, rec.value))
                want = table.kernel_value(key)
                if want != value:  # the kernel is to hold the registers' value
                    writes.append((name, key, want))
                    deviations.pop(key, None)
        return records, writes

    # --- anti-entropy ----------------------------------------------------------------------

    def digest(self, map: str, nbuckets: int | None = None) -> Digest:
        """Per-bucket hashes of ``map``; ``nbuckets`` must divide ``digest_buckets``."""
        return Digest(map, self._local_table(map).digest_buckets(nbuckets))

    def records_in(
        self, map: str, buckets: Iterable[int], nbuckets: int | None = None
    ) -> Packed:
        """Every record (live tombstones included) in the given buckets of ``map``."""
        return self._local_table(map).records_in(buckets, nbuckets)

    def answer_digest(
        self,
        remote: Digest,
        sender: str = "",
        only: Collection[int] | None = None,
        part: int = 8192,
    ) -> tuple[Pull | None, Iterator[Packed]]:
        """A peer's digest: the Pull for the buckets that differ, and our records in them
        (of the buckets in ``only``, when given), in parts of ``part`` records.

        Sending both repairs both sides in one round trip. The records are read as the parts
        are taken, bucket by bucket: the first part of a whole map can leave at once (reading
        1M records takes 0.07-0.25 s), and a part holds what the buckets hold by then.
        """
        table = self._remote_table(remote.map, sender)
        n = len(remote.buckets)
        if n == 0 or table.nbuckets % n:
            raise MalformedMessageError(
                f"digest of {remote.map!r} has {n} buckets; this node uses {table.nbuckets}"
                " (a digest must have a divisor of that many)",
                sender,
            )
        if part <= 0:
            raise ValueError(f"part must be > 0, got {part}")
        differing = diff(Digest(remote.map, table.digest_buckets(n)), remote)
        if only is not None:
            differing = [b for b in differing if b in only]
        if not differing:
            return None, iter(())
        return Pull(remote.map, tuple(differing)), _parts(table, differing, n, part)

    def answer_pull(
        self, pull: Pull, sender: str = "", nbuckets: int | None = None
    ) -> Packed:
        """Our records in the buckets a peer asked for (counted at the digest we sent it)."""
        table = self._remote_table(pull.map, sender)
        n = table.nbuckets if nbuckets is None else nbuckets
        bad = [b for b in pull.buckets if not 0 <= b < n]
        if bad:
            raise MalformedMessageError(
                f"pull of {pull.map!r} names buckets {bad[:5]} outside 0..{n - 1}", sender
            )
        return table.records_in(pull.buckets, n)

    # --- internals -------------------------------------------------------------------------

    def _local_table(self, map: str) -> MapTable:
        table = self._tables.get(map)
        if table is None:
            raise ValueError(f"map {map!r} is not synced here (synced: {sorted(self._tables)})")
        return table

    def _remote_table(self, map: str, sender: str) -> MapTable:
        table = self._tables.get(map)
        if table is None:
            raise UnknownMapError(f"map {map!r} is not synced by this node", sender)
        return table

    @staticmethod
    def _check_local(table: MapTable, key: bytes, value: bytes | None) -> None:
        schema = table.schema
        if len(key) != schema.key_size or (value is not None and len(value) != schema.value_size):
            raise ValueError(
                f"map {schema.name!r} has {schema.key_size}-byte keys and {schema.value_size}-byte"
                f" values; got key of {len(key)} and value of"
                f" {'None' if value is None else len(value)} bytes"
            )

    def _check_batch(
        self, table: MapTable, keys: Sequence[bytes], values: Sequence[bytes | None]
    ) -> None:
        """``_check_local`` of each (key, value), as two sets of sizes when all are right."""
        schema = table.schema
        if {len(key) for key in keys} - {schema.key_size} or (
            {len(value) for value in values if value is not None} - {schema.value_size}
        ):
            for key, value in zip(keys, values, strict=True):  # names the first wrong size
                self._check_local(table, key, value)

    def _admit_form(self, rec: Record, sender: str) -> None:
        """R1 for a record given as a Record (not off the wire): the types and the stamp's form;
        ``_refusal`` has the rest."""
        key, value, stamp = rec.key, rec.value, rec.stamp
        if type(key) is not bytes or (value is not None and type(value) is not bytes):
            raise MalformedMessageError(f"record for {rec.map!r}: key/value are not bytes", sender)
        if (
            not isinstance(stamp, Stamp)
            or type(stamp.node) is not str
            or not 0 < len(stamp.node.encode()) <= MAX_NODE_BYTES
            or "\x00" in stamp.node
            or type(stamp.wall) is not int
            or type(stamp.logical) is not int
            or not 0 <= stamp.wall < _U64
            or not 0 <= stamp.logical <= MAX_LOGICAL
        ):
            raise MalformedMessageError(f"record for {rec.map!r}: bad stamp {stamp!r}", sender)

    def _refusal(
        self, table: MapTable | None, rec: Record, now_ns: int, sender: str
    ) -> PeerError:
        """R1: why a well-formed record is refused (unknown map, sizes, clock drift, origin)."""
        if self.members is not None and not self.members.origin_ok(rec.stamp.node):
            return NotMemberError(
                f"record for map {rec.map!r} stamped by {rec.stamp.node!r}, which is not a"
                " member of this cluster", sender,
            )
        if table is None:
            return UnknownMapError(
                f"record for map {rec.map!r}, which this node does not sync", sender
            )
        schema = table.schema
        if len(rec.key) != schema.key_size:
            return SizeMismatchError(
                f"map {rec.map!r}: key of {len(rec.key)} bytes, expected {schema.key_size}", sender
            )
        if rec.value is not None and len(rec.value) != schema.value_size:
            return SizeMismatchError(
                f"map {rec.map!r}: value of {len(rec.value)} bytes, expected {schema.value_size}",
                sender,
            )
        try:
            self.clock.check(rec.stamp, now_ns, sender)
        except ClockDriftError as err:
            return err
        raise AssertionError(f"record {rec!r} was refused for no reason")

    def _expected(self, table: MapTable, key: bytes, b: int | None = None) -> bytes | None:
        deviations = self._deviations[table.name]
        if key in deviations:
            return deviations[key]
        return table.kernel_value(key, b)

    def _set_view(
        self, table: MapTable, key: bytes, actual: bytes | None, b: int | None = None
    ) -> None:
        """The kernel holds ``actual``: remember it where it differs from the registers."""
        if table.kernel_value(key, b) == actual:
            self._deviations[table.name].pop(key, None)
        else:
            self._deviations[table.name][key] = actual


def _top_clock(regs: FrozenRegs) -> tuple[int, int]:
    """The highest (wall, logical) among the records (big-endian at their start)."""
    _, records = regs.columns()
    if not len(records):
        return (0, 0)
    if isinstance(records, list):
        return max(_CLOCK.unpack_from(p) for p in records)
    rows = records.view(np.uint8).reshape(len(records), records.dtype.itemsize)
    clocks = np.ascontiguousarray(rows[:, :16]).view(">u8")
    wall = int(clocks[:, 0].max())
    return wall, int(clocks[clocks[:, 0] == wall, 1].max())


def _parts(table: MapTable, buckets: list[int], n: int, size: int) -> Iterator[Packed]:
    """The records in ``buckets`` (of ``n``), read bucket by bucket, in parts of at most ``size``
    made of whole buckets where a bucket fits in one: the receiver then fills each of its
    buckets in one go (LwwTable.offer_all)."""
    pending = Packed.empty()
    for b in buckets:
        got = table.records_in((b,), n)
        if len(pending) and len(pending) + len(got) > size:
            yield pending
            pending = Packed.empty()
        pending.extend(got)
        if len(pending) >= size:
            whole = len(pending) - len(pending) % size
            for start in range(0, whole, size):
                yield pending[start : start + size]
            pending = pending[whole:]
    if len(pending):
        yield pending
