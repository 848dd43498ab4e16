"""The ctypes binding: struct layouts match the C headers, libbpf output is captured."""

from __future__ import annotations

import ctypes

import pytest

from bpfsync.errors import NotFoundError
from bpfsync.kernel import _libbpf


def test_struct_sizes_match_libbpf_1_1_headers() -> None:
    # sizeof() / offsetof() printed by a C program compiled against /usr/include (libbpf-dev)
    assert ctypes.sizeof(_libbpf.BpfMapInfo) == 88
    assert _libbpf.BpfMapInfo.btf_id.offset == 64
    assert _libbpf.BpfMapInfo.map_extra.offset == 80
    assert ctypes.sizeof(_libbpf.BpfProgInfo) == 232
    assert _libbpf.BpfProgInfo.recursion_misses.offset == 208
    assert ctypes.sizeof(_libbpf.BpfMapBatchOpts) == 24
    assert ctypes.sizeof(_libbpf.BpfTestRunOpts) == 80
    assert _libbpf.BpfTestRunOpts.retval.offset == 56
    assert _libbpf.BpfTestRunOpts.batch_size.offset == 76
    for struct_type, size in [
        (_libbpf.BtfType, 12),
        (_libbpf.BtfMember, 12),
        (_libbpf.BtfArray, 12),
        (_libbpf.BtfEnum, 8),
        (_libbpf.BtfEnum64, 12),
    ]:
        assert ctypes.sizeof(struct_type) == size


def test_capture_output_collects_formatted_libbpf_messages() -> None:
    with _libbpf.capture_output() as out, pytest.raises(NotFoundError):
        _libbpf.object_open_file("/nonexistent/bpfsync.bpf.o")
    text = "".join(t for _, t in out)
    # printf-style arguments were formatted (the path came through va_list)
    assert "/nonexistent/bpfsync.bpf.o" in text
