"""bpfsync.h as a program sees it: compiled (warnings are errors) from where the package installs
it, accepted by the verifier, and adding the companion's count only when it should."""

from __future__ import annotations

import shutil
import struct
import subprocess
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest
from netlab import EXAMPLES

from bpfsync.kernel.objects import BpfObject

VMLINUX_H = EXAMPLES.parent / ".cache" / "include" / "vmlinux.h"
VAL = struct.Struct("<QQII")  # struct val below
CMD = struct.Struct("<I4x")  # struct cmd header; a struct val follows

# Every helper of bpfsync.h on one own value: __u64 fields through the functions, a __u32 field
# through the macros, with the __u64 epoch in both.
SOURCE = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "bpfsync.h"

char LICENSE[] SEC("license") = "GPL";

struct val { __u64 epoch; __u64 count; __u32 small; __u32 pad; };
struct cmd { __u32 key; __u32 pad; struct val own; };
#define OFF(field) __builtin_offsetof(struct val, field)

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, 16);
    __type(key, __u32);
    __type(value, struct val);
} companion SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 4);
    __type(key, __u32);
    __type(value, __u64);
} totals SEC(".maps");

static __always_inline void put(__u32 i, __u64 v)
{
    bpf_map_update_elem(&totals, &i, &v, BPF_ANY);
}

SEC("xdp")
int totals_of(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    struct cmd *c = data;
    struct val own;
    __u32 key;

    if ((void *)(c + 1) > data_end)
        return XDP_ABORTED;
    key = c->key;
    __builtin_memcpy(&own, &c->own, sizeof(own));
    put(0, bpfsync_counter_total(&companion, &key, own.count, OFF(count)));
    put(1, bpfsync_counter_total_epoch(&companion, &key, own.count, own.epoch, OFF(count),
                                       OFF(epoch)));
    put(2, BPFSYNC_COUNTER_TOTAL(&companion, &key, &own, struct val, small));
    put(3, BPFSYNC_COUNTER_TOTAL_EPOCH(&companion, &key, &own, struct val, small, epoch));
    return bpfsync_window(0) == 0 && bpfsync_now_ns() > 0 ? XDP_PASS : XDP_DROP;
}
"""


@pytest.fixture
def header_program(tmp_path: Path) -> Iterator[BpfObject]:
    if not VMLINUX_H.exists() or shutil.which("clang") is None:
        pytest.fail(f"needs clang and {VMLINUX_H}: run `make bpf`")
    installed = Path(str(resources.files("bpfsync") / "bpf"))
    assert (installed / "bpfsync.h").is_file()
    src, out = tmp_path / "uses_header.bpf.c", tmp_path / "uses_header.bpf.o"
    src.write_text(SOURCE)
    res = subprocess.run(
        ["clang", "-g", "-O2", "-target", "bpf", "-D__TARGET_ARCH_x86", "-Wall", "-Werror",
         f"-I{VMLINUX_H.parent}", f"-I{installed}", "-c", str(src), "-o", str(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr
    with BpfObject.open(out) as obj:
        obj.load()
        yield obj


def test_totals_add_the_companion_only_in_the_same_epoch(header_program: BpfObject) -> None:
    prog = header_program.program("totals_of")
    companion, totals = header_program.map("companion"), header_program.map("totals")
    key = 7

    def run(epoch: int, count: int, small: int) -> list[int]:
        res = prog.test_run(CMD.pack(key) + VAL.pack(epoch, count, small, 0))
        assert res.retval == 2  # XDP_PASS: the clock helpers answered
        return [struct.unpack("<Q", totals.lookup(struct.pack("<I", i)) or b"")[0]
                for i in range(4)]

    assert run(5, 10, 3) == [10, 10, 3, 3]  # no companion entry: own only
    companion.update(struct.pack("<I", key), VAL.pack(5, 100, 40, 0))
    assert run(5, 10, 3) == [110, 110, 43, 43]  # same epoch: own + companion
    assert run(6, 10, 3) == [110, 10, 43, 3]  # other epoch: plain totals only
    companion.update(struct.pack("<I", key), VAL.pack(6, 2**64 - 1, 2**32 - 1, 0))
    # macro totals are __u64 sums, not wrapped at the field's width
    assert run(6, 10, 3)[2:] == [2**32 + 2, 2**32 + 2]
