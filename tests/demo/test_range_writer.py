"""The demo node's BPF writers, run with BPF_PROG_TEST_RUN against its real pinned map."""

from __future__ import annotations

import pytest

from bpfsync.demo.cluster import KEY, RANGE, RANGE_MAX, VALUE, Cluster


def test_write_range_writes_its_keys_wrapping_at_the_modulus() -> None:
    with Cluster(("a",), tag="test") as c:
        node = c["a"]
        node.bpf_put_range(65530, 10, 65536, 100)
        got = node.content()
        want = {(65530 + i) % 65536: 100 + i for i in range(10)}
        assert {KEY.unpack(k)[0]: VALUE.unpack(v) for k, v in got.items()} == {
            k: (v, 0, 0, 0, 0) for k, v in want.items()
        }
        node.bpf_put_range(0, RANGE_MAX, 1000, 7)  # a full run overwrites 0..3 too
        assert len(node.content()) == 6 + RANGE_MAX
        assert VALUE.unpack(node.content()[KEY.pack(255)])[0] == 7 + 255
        with pytest.raises(ValueError, match="count"):
            node.bpf_put_range(0, RANGE_MAX + 1, 1000, 0)
        # the program checks too: XDP_ABORTED (0), nothing written
        assert node.range_writer.test_run(RANGE.pack(2000, RANGE_MAX + 1, 9000, 0, 1)).retval == 0
        assert node.range_writer.test_run(RANGE.pack(2000, 1, 0, 0, 1)).retval == 0
        assert len(node.content()) == 6 + RANGE_MAX
