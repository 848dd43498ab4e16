"""Anti-entropy digests: per-bucket hashes of a map's replicated state, equal on equal states.

A key's bucket is a stable hash of the key modulo the bucket count, so every node puts a key in
the same bucket. A bucket's hash is the sum mod 2**64 of its records' hashes: order-independent
and updatable in O(1) when one record replaces another (subtract the old, add the new), which is
what keeps a digest of a million-key map cheap (table.py maintains the sums).

With bucket counts that divide each other (powers of two), a coarse digest is a fold of a fine
one, because ``h % n == (h % N) % n`` when ``n`` divides ``N``. That allows asking for a small
digest first and a finer one only where it differs.

The hash is XXH3-64 (the ``xxhash`` package): ten times faster than blake2b here, and it runs
for every record a node stamps or merges. It is not a cryptographic hash; digests only compare
the states of authenticated peers, which could send any records they like anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

from xxhash import xxh3_64_intdigest

from bpfsync.core.messages import Digest, Record
from bpfsync.core.register import pack

DEFAULT_BUCKETS = 1024  # 8 KiB per map on the wire; ~1000 keys per bucket at 1M keys
MASK = (1 << 64) - 1


def bucket_of(key: bytes, nbuckets: int) -> int:
    """The bucket of ``key``; the same on every node and platform."""
    return xxh3_64_intdigest(key) % nbuckets


def record_hash(rec: Record) -> int:
    """A 64-bit hash of one record's key, stamp and value (or tombstone).

    Part of the protocol: the hash of the key followed by the record's packed form
    (register.py), which no two records of one map share.
    """
    return xxh3_64_intdigest(rec.key + pack(rec.stamp, rec.value))


def packed_hash(key: bytes, packed: bytes) -> int:
    """``record_hash`` of the record a packed register holds, without unpacking it."""
    return xxh3_64_intdigest(key + packed)


def fold(buckets: Sequence[int], nbuckets: int) -> tuple[int, ...]:
    """The digest at ``nbuckets`` from a finer one whose length ``nbuckets`` divides."""
    if nbuckets <= 0 or len(buckets) % nbuckets:
        raise ValueError(f"cannot fold {len(buckets)} buckets into {nbuckets}")
    out = [0] * nbuckets
    for i, h in enumerate(buckets):
        out[i % nbuckets] = (out[i % nbuckets] + h) & MASK
    return tuple(out)


def diff(local: Digest, remote: Digest) -> list[int]:
    """Indexes of the buckets whose hashes differ between two digests of the same map."""
    if local.map != remote.map or len(local.buckets) != len(remote.buckets):
        raise ValueError(
            f"digests are not comparable: {local.map!r}/{len(local.buckets)} buckets vs"
            f" {remote.map!r}/{len(remote.buckets)} buckets"
        )
    return [i for i, (a, b) in enumerate(zip(local.buckets, remote.buckets, strict=True)) if a != b]
