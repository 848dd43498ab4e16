"""Batch update, delete and dump: 100k+ entries, per-CPU values, arrays, chunking, LRU."""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import pytest

from bpfsync.kernel.dump import MapDump, iterate_all
from bpfsync.kernel.maps import Map
from bpfsync.kernel.objects import BpfObject

N = 150_000  # t_hash holds 200k


def flow_keys(n: int, base: int = 0) -> np.ndarray:
    """n distinct 16-byte struct flow_key rows."""
    keys = np.zeros((n, 16), dtype=np.uint8)
    keys[:, 0:8].view(np.uint64)[:, 0] = np.arange(base, base + n, dtype=np.uint64) * 2654435761
    keys[:, 12] = 6
    return keys


def values_for(n: int, size: int, seed: int = 0) -> np.ndarray:
    vals = np.zeros((n, size), dtype=np.uint8)
    vals[:, 0:8].view(np.uint64)[:, 0] = np.arange(n, dtype=np.uint64) + seed
    vals[:, 8:16].view(np.uint64)[:, 0] = np.arange(n, dtype=np.uint64) * 3
    return vals


def as_dict(keys: np.ndarray, values: np.ndarray) -> dict[bytes, bytes]:
    return {k.tobytes(): v.tobytes() for k, v in zip(keys, values, strict=True)}


def test_batch_update_dump_delete_150k(all_maps: BpfObject) -> None:
    with all_maps.map("t_hash") as m:
        keys, values = flow_keys(N), values_for(N, m.value_stride)
        m.update_batch(keys, values)
        dump = m.dump()
        assert isinstance(dump, MapDump)
        assert dump.count == N
        assert len(dump.keys) == N * 16 and len(dump.values) == N * 72
        assert dump.key_array.shape == (N, 16) and dump.value_array.shape == (N, 72)
        assert dump.to_dict() == as_dict(keys, values)
        # the numpy views are the same memory as the bytes, read-only
        assert dump.key_array[0].tobytes() == dump.keys[:16]
        with pytest.raises(ValueError):
            dump.key_array[0, 0] = 1

        # delete every other key plus keys that were never there: those are skipped
        gone = np.concatenate([keys[::2], flow_keys(10, base=10 * N)])
        assert m.delete_batch(gone) == N // 2
        left = m.dump()
        assert left.count == N - N // 2
        assert left.to_dict() == as_dict(keys[1::2], values[1::2])


def test_batch_convenience_lists_and_count(make_map: Callable[..., Map]) -> None:
    m = make_map("hash", 4, 8, 1000)
    keys = [struct.pack("<I", i) for i in range(300)]
    values = [struct.pack("<Q", i * i) for i in range(300)]
    m.update_batch(keys, values)
    m.update_batch(b"".join(keys[:10]), b"\xff" * 80, count=5)  # only the first 5 entries
    got = dict(m.items())
    assert len(got) == 300
    assert got[keys[4]] == b"\xff" * 8 and got[keys[5]] == values[5]
    assert m.delete_batch(keys[:100]) == 100
    assert m.delete_batch(keys[:100]) == 0
    assert m.dump().count == 200
    with pytest.raises(ValueError, match="not a multiple"):
        m.update_batch(b"\0" * 6, b"\0" * 8)
    with pytest.raises(ValueError, match="buffer holds"):
        m.update_batch(b"\0" * 8, b"\0" * 8, count=2)
    with pytest.raises(ValueError, match="must be 4 bytes"):
        m.delete_batch([b"\0" * 3])


@pytest.mark.parametrize("name", ["t_pcpu_hash", "t_lru_pcpu"])
def test_percpu_batch_roundtrip(all_maps: BpfObject, name: str) -> None:
    with all_maps.map(name) as m:
        n = 3000
        keys, values = flow_keys(n), values_for(n, m.value_stride, seed=11)
        # make every CPU's slot different: slot c's first u64 is seed + i + 1000 * c
        for cpu in range(m.ncpus):
            values[:, cpu * 72 : cpu * 72 + 8].view(np.uint64)[:, 0] = (
                np.arange(n, dtype=np.uint64) + 11 + 1000 * cpu
            )
        m.update_batch(keys, values)
        dump = m.dump()
        assert dump.value_size == m.value_stride == 72 * m.ncpus
        assert dump.to_dict() == as_dict(keys, values)


@pytest.mark.parametrize("name", ["t_array", "t_pcpu_array"])
def test_array_batch_update_and_dump(all_maps: BpfObject, name: str) -> None:
    with all_maps.map(name) as m:
        n = m.max_entries
        keys = np.arange(n, dtype=np.uint32)
        values = values_for(n, m.value_stride, seed=5)
        m.update_batch(keys, values)
        dump = m.dump(chunk=7)  # several chunks, the last one ending in ENOENT
        assert dump.count == n
        assert np.array_equal(dump.key_array.view(np.uint32).ravel(), keys)
        assert np.array_equal(dump.value_array, values)


def test_small_chunks_grow_past_hash_buckets(make_map: Callable[..., Map]) -> None:
    # 20k keys in a 20k-entry hash: many buckets hold several keys, so a 1-entry chunk hits
    # ENOSPC and must grow; the result must still be exactly the map's content.
    m = make_map("hash", 8, 8, 20_000)
    keys = np.arange(20_000, dtype=np.uint64)
    m.update_batch(keys, keys * 7)
    small, big = m.dump(chunk=1), m.dump()
    assert small.count == big.count == 20_000
    assert (
        small.to_dict()
        == big.to_dict()
        == as_dict(keys.view(np.uint8).reshape(-1, 8), (keys * 7).view(np.uint8).reshape(-1, 8))
    )


def test_empty_map_dump(make_map: Callable[..., Map]) -> None:
    m = make_map("percpu_hash", 4, 4, 16)
    dump = m.dump()
    assert dump.count == 0 and dump.keys == b"" and dump.value_size == m.value_stride
    assert list(m.items()) == []


def test_lru_batch_update_beyond_capacity_evicts(make_map: Callable[..., Map]) -> None:
    m = make_map("lru_hash", 8, 8, 1024)
    keys = np.arange(4096, dtype=np.uint64)
    m.update_batch(keys, keys)
    dump = m.dump()
    assert 0 < dump.count <= 1024
    held = dump.key_array.view(np.uint64).ravel()
    assert np.array_equal(dump.value_array.view(np.uint64).ravel(), held)
    # the most recent insertions survive
    assert keys[-1] in set(held.tolist())


def test_get_next_key_fallback_matches_batch_dump(make_map: Callable[..., Map]) -> None:
    # the path for map types without BPF_MAP_LOOKUP_BATCH, checked against the batch path
    m = make_map("percpu_hash", 8, 12, 512)
    keys = np.arange(300, dtype=np.uint64)
    values = np.frombuffer(np.random.default_rng(1).bytes(300 * m.value_stride), np.uint8)
    m.update_batch(keys, values)
    slow = iterate_all(m.fd, m.key_size, m.value_stride)
    assert slow.count == 300
    assert slow.to_dict() == m.dump().to_dict()
