"""The sans-I/O core: what replicas say to each other and how each one merges it.

Nothing here reads a clock, touches the kernel or the network: callers pass the time and carry
the messages. Where things happen:

    messages.py   the protocol's values (Stamp, Record, Hello, Batch, Ack, Digest, Pull,
                  Answered)
    hlc.py        hybrid logical clock: the stamps that order writes
    policy.py     policies: how records of one key become the kernel value (lww, counter, ...)
    table.py      one map's replicated state, bucketed for digests (per-origin: SlotTable)
    lww_table.py  ... of an lww map: packed registers, bulk fills, this node's own writes
    frozen.py     an lww bucket at rest as one bytes object, and its numpy row helpers
    digest.py     anti-entropy hashing: buckets, record hashes, diff
    replica.py    the state machine and its rules: local changes, received records, seeding
    outbox.py     per-peer coalescing of records waiting to be sent
    session.py    per-peer batch numbering, acks, resend and repair triggers
    membership.py who may connect, and whose records count
"""

from bpfsync.core.digest import DEFAULT_BUCKETS, diff
from bpfsync.core.hlc import DEFAULT_MAX_DRIFT_NS, ClockDriftError, HybridClock
from bpfsync.core.messages import (
    Ack,
    Answered,
    Batch,
    Digest,
    Hello,
    MapSchema,
    Message,
    Pull,
    Record,
    Stamp,
)
from bpfsync.core.outbox import Outbox, split
from bpfsync.core.policy import LWW, Companion, FieldPolicy, FieldRule, Policy, policy_for
from bpfsync.core.replica import ApplyResult, Replica, Write, is_seed, seed_stamp
from bpfsync.core.session import PeerSession, map_mismatches

__all__ = [
    "DEFAULT_BUCKETS",
    "DEFAULT_MAX_DRIFT_NS",
    "LWW",
    "Ack",
    "Answered",
    "ApplyResult",
    "Batch",
    "ClockDriftError",
    "Companion",
    "Digest",
    "FieldPolicy",
    "FieldRule",
    "Hello",
    "HybridClock",
    "MapSchema",
    "Message",
    "Outbox",
    "PeerSession",
    "Policy",
    "Pull",
    "Record",
    "Replica",
    "Stamp",
    "Write",
    "diff",
    "is_seed",
    "map_mismatches",
    "policy_for",
    "seed_stamp",
    "split",
]
