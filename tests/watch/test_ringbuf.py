"""The ring buffer reader against a real BPF ring, filled by an XDP program's test runs.

ringbuf_producer.bpf.c numbers its records (map_id = sequence, key = sequence, value = ~sequence)
so every test can check order, content and that nothing was lost or duplicated.
"""

from __future__ import annotations

import mmap
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from bpfsync.errors import InvalidError
from bpfsync.kernel.maps import Map
from bpfsync.kernel.objects import BpfObject, Program
from bpfsync.kernel.ringbuf import RingBuffer, slot_size
from bpfsync.watch.trace_abi import RECORD

PRODUCER = Path(__file__).resolve().parents[1] / "bpf" / "ringbuf_producer.bpf.o"
PLAIN, DISCARD, FOREIGN = 0, 1, 2
STAT_SUBMITTED, STAT_DISCARDED, STAT_DROPPED, STAT_FOREIGN = range(4)


class Producer:
    def __init__(self, obj: BpfObject) -> None:
        self.obj = obj
        self.prog: Program = obj.program("produce")
        self.ring: Map = obj.map("ring")
        self.stats: Map = obj.map("stats")

    def produce(self, count: int, mode: int = PLAIN, runs: int = 1) -> None:
        """``runs`` test runs of ``count`` (<= 64) records each."""
        self.prog.test_run(struct.pack("<II", count, mode) + bytes(56), repeat=runs)

    def stat(self, slot: int) -> int:
        raw = self.stats.lookup(struct.pack("<I", slot))
        assert raw is not None
        return int(np.frombuffer(raw, "<u8").sum())

    def reader(self) -> RingBuffer:
        return RingBuffer(self.ring.fd, self.ring.max_entries, RECORD)

    def close(self) -> None:
        self.ring.close()
        self.stats.close()
        self.obj.close()


def open_producer(ring_bytes: int) -> Producer:
    obj = BpfObject.open(PRODUCER)
    obj.map_spec("ring").set_max_entries(ring_bytes)
    obj.load()
    return Producer(obj)


@pytest.fixture
def producer() -> Iterator[Producer]:
    p = open_producer(1 << 20)
    yield p
    p.close()


@pytest.fixture
def rb(producer: Producer) -> Iterator[RingBuffer]:
    r = producer.reader()
    yield r
    r.close()


def seqs(records: npt.NDArray[np.void]) -> list[int]:
    """The sequence numbers, after checking each record's payload matches its number."""
    n = records["map_id"].astype(np.uint64)
    assert (records["key"][:, :8].copy().view("<u8").ravel() == n).all()
    assert (records["value"][:, :8].copy().view("<u8").ravel() == ~n).all()
    return [int(x) for x in n]


def test_reads_every_record_in_order(producer: Producer, rb: RingBuffer) -> None:
    producer.produce(64, runs=10)
    records = rb.read()
    assert records.dtype == RECORD
    assert seqs(records) == list(range(640))
    assert rb.pending() == 0
    assert len(rb.read()) == 0


def test_a_read_is_bounded_and_resumes_where_it_stopped(producer: Producer, rb: RingBuffer) -> None:
    producer.produce(64, runs=5)
    first = rb.read(max_records=100)
    assert seqs(first) == list(range(100))
    assert rb.pending() == 220 * rb.stride
    assert seqs(rb.read(max_records=1000)) == list(range(100, 320))


def test_the_consumer_position_moves_once_per_read(producer: Producer, rb: RingBuffer) -> None:
    producer.produce(10)
    with mmap.mmap(producer.ring.fd, mmap.PAGESIZE, prot=mmap.PROT_READ) as page:
        assert struct.unpack_from("<Q", page)[0] == 0
        rb.read(max_records=4)
        assert struct.unpack_from("<Q", page)[0] == 4 * slot_size(RECORD.itemsize)


def test_discarded_records_are_skipped(producer: Producer, rb: RingBuffer) -> None:
    producer.produce(64, DISCARD, runs=3)
    got = seqs(rb.read())
    assert got == [n for n in range(192) if n % 3]
    assert producer.stat(STAT_DISCARDED) == 192 - len(got)


def test_records_of_another_size_are_skipped_and_counted(
    producer: Producer, rb: RingBuffer
) -> None:
    producer.produce(64, FOREIGN, runs=2)
    assert seqs(rb.read()) == list(range(128))
    assert rb.foreign == producer.stat(STAT_FOREIGN) == 26  # n % 5 == 0 for n < 128
    assert rb.pending() == 0


def test_records_that_wrap_past_the_end_of_the_ring_are_whole() -> None:
    p = open_producer(4 * mmap.PAGESIZE)  # 30 records: wraps every couple of runs
    r = p.reader()
    try:
        expected = 0
        for _ in range(20):
            p.produce(17)
            got = seqs(r.read())
            assert got == list(range(expected, expected + 17))
            expected += 17
        assert p.stat(STAT_DROPPED) == 0
    finally:
        r.close()
        p.close()


def test_a_full_ring_drops_records_the_reader_never_sees() -> None:
    p = open_producer(4 * mmap.PAGESIZE)
    r = p.reader()
    try:
        p.produce(64)
        capacity = 4 * mmap.PAGESIZE // slot_size(RECORD.itemsize)
        assert seqs(r.read()) == list(range(capacity))
        assert p.stat(STAT_DROPPED) == 64 - capacity
    finally:
        r.close()
        p.close()


def test_wait_times_out_when_the_ring_stays_empty(rb: RingBuffer) -> None:
    start = time.monotonic()
    assert rb.wait(0.2) is False
    assert 0.15 < time.monotonic() - start < 2
    assert len(rb.poll(0.05)) == 0


def test_wait_returns_when_a_record_arrives(producer: Producer, rb: RingBuffer) -> None:
    timer = threading.Timer(0.1, producer.produce, args=(3,))
    timer.start()
    try:
        start = time.monotonic()
        got = rb.poll(timeout=10)
        assert time.monotonic() - start < 5
    finally:
        timer.join()
    if len(got) < 3:  # woken by the first commit, the rest may follow right after
        got = np.concatenate([got, rb.read()])
    assert seqs(got) == [0, 1, 2]


def test_wake_interrupts_a_wait_from_another_thread(rb: RingBuffer) -> None:
    threading.Timer(0.1, rb.wake).start()
    start = time.monotonic()
    assert rb.wait(10) is False
    assert time.monotonic() - start < 5


def test_close_wakes_a_waiting_reader_and_is_idempotent(producer: Producer, rb: RingBuffer) -> None:
    done = threading.Event()

    def wait() -> None:
        rb.poll(timeout=10)
        done.set()

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.1)
    rb.close()
    t.join(5)
    assert done.is_set()
    rb.close()
    producer.produce(1)
    assert len(rb.read()) == 0 and rb.pending() == 0


def test_refuses_a_size_that_is_not_a_power_of_two(producer: Producer) -> None:
    with pytest.raises(InvalidError, match="power-of-2"):
        RingBuffer(producer.ring.fd, 3 * mmap.PAGESIZE, RECORD)
