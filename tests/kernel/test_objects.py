"""BPF objects: load errors with the verifier log, autoload, test runs, attach, links, maps."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from bpfsync.demo.cluster import wait_for
from bpfsync.errors import KernelError, NotFoundError, VerifierError
from bpfsync.kernel.maps import Map
from bpfsync.kernel.objects import BpfObject

XDP_ABORTED, XDP_PASS = 0, 2


def test_verifier_error_carries_the_log(load_object: Callable[..., BpfObject]) -> None:
    obj = load_object("bad_verifier", load=False)
    with pytest.raises(VerifierError) as exc:
        obj.load()
    err = exc.value
    assert "invalid access to packet" in err.log
    assert "unchecked_read" in str(err)
    assert "verifier log (last lines)" in str(err)
    assert err.errno != 0
    assert not obj.loaded


def test_autoload_off_skips_the_bad_program(load_object: Callable[..., BpfObject]) -> None:
    obj = load_object("bad_verifier", load=False)
    assert obj.program("unchecked_read").autoload
    obj.program("unchecked_read").set_autoload(False)
    assert not obj.program("unchecked_read").autoload
    obj.load()
    assert obj.program("pass_all").test_run(bytes(14)).retval == XDP_PASS
    with pytest.raises(ValueError, match="not loaded"):
        obj.program("unchecked_read").test_run(bytes(14))
    with pytest.raises(ValueError, match="before load"):
        obj.program("pass_all").set_autoload(False)


def test_bpf_program_updates_and_deletes_through_test_run(
    load_object: Callable[..., BpfObject],
) -> None:
    obj = load_object("map_ops")
    prog = obj.program("apply_op")
    with obj.map("bpf_written") as m:
        for key in range(5):
            cmd = struct.pack("<IIQ", 1, key, key * 10).ljust(16, b"\0")
            assert prog.test_run(cmd).retval == XDP_PASS
        assert m.lookup(struct.pack("<I", 3)) == struct.pack("<Q", 30)
        assert prog.test_run(struct.pack("<IIQ", 2, 3, 0).ljust(16, b"\0")).retval == XDP_PASS
        assert m.lookup(struct.pack("<I", 3)) is None
        # deleting a missing key fails inside the program
        assert prog.test_run(struct.pack("<IIQ", 2, 3, 0).ljust(16, b"\0")).retval == XDP_ABORTED
        assert m.dump().count == 4


def test_xdp_counter_in_place_through_test_run(load_object: Callable[..., BpfObject]) -> None:
    obj = load_object("xdp_count")
    packet = udp_packet(bytes([198, 18, 0, 9]))
    result = obj.program("count_sources").test_run(packet, repeat=25)
    assert result.retval == XDP_PASS and result.data == packet
    with obj.map("src_counts") as m:
        raw = m.lookup(bytes([198, 18, 0, 9]))
    assert raw is not None
    assert struct.unpack("<QQ", raw) == (25, 25 * len(packet))


def test_map_outlives_object_and_pins(load_object: Callable[..., BpfObject], pin_dir: str) -> None:
    obj = load_object("map_ops")
    m = obj.map("bpf_written")
    pin = os.path.join(pin_dir, "bpf_written")
    m.pin(pin)
    obj.close()
    try:
        m.update(struct.pack("<I", 1), struct.pack("<Q", 2))
        with Map.open(pin) as again:
            assert again.lookup(struct.pack("<I", 1)) == struct.pack("<Q", 2)
    finally:
        m.close()
    with pytest.raises(ValueError, match="closed"):
        obj.map("bpf_written")


def test_generic_attach_pin_and_destroy(
    load_object: Callable[..., BpfObject], pin_dir: str
) -> None:
    obj = load_object("getpid_count", load=False)
    rodata = obj.map_spec(".rodata")
    assert rodata.initial_value == bytes(4)
    rodata.set_initial_value(struct.pack("<I", os.getpid()))
    obj.load()
    with pytest.raises(ValueError, match="before load"):
        rodata.set_initial_value(bytes(4))
    calls = obj.map("getpid_calls")
    zero = bytes(4)

    def count() -> int:
        raw = calls.lookup(zero)
        assert raw is not None
        return int.from_bytes(raw, "little")

    try:
        link = obj.program("on_sys_enter").attach()
        for _ in range(7):
            os.getpid()
        assert count() == 7

        pin = os.path.join(pin_dir, "link")
        link.pin(pin)
        link.destroy()  # the pin keeps the program attached
        link.destroy()  # idempotent
        os.getpid()
        assert count() == 8

        os.unlink(pin)  # last reference gone: detached (the kernel may finish that async)

        def detached() -> bool:
            before = count()
            os.getpid()
            return count() == before

        assert wait_for(detached, 2, every=0.02)
        with pytest.raises(ValueError, match="destroyed"):
            link.pin(pin)
    finally:
        calls.close()


def test_program_info_and_section(load_object: Callable[..., BpfObject]) -> None:
    obj = load_object("xdp_count")
    prog = obj.program("count_sources")
    assert prog.section == "xdp"
    info = prog.info()
    assert info.id > 0 and info.name == "count_sources" and info.verified_insns > 0


def test_open_errors(tmp_path: Path, load_object: Callable[..., BpfObject]) -> None:
    with pytest.raises(NotFoundError):
        BpfObject.open(tmp_path / "missing.bpf.o")
    junk = tmp_path / "junk.bpf.o"
    junk.write_bytes(b"not an ELF file")
    with pytest.raises(KernelError, match="libbpf"):
        BpfObject.open(junk)
    obj = load_object("xdp_count", load=False)
    with pytest.raises(NotFoundError, match="count_sources"):
        obj.program("nope")
    with pytest.raises(NotFoundError, match="src_counts"):
        obj.map_spec("nope")
    with pytest.raises(ValueError, match="after load"):
        obj.map("src_counts")


def udp_packet(
    src: bytes,
    dst: bytes = bytes([198, 18, 0, 1]),
    payload: bytes = b"x" * 18,
) -> bytes:
    """Ethernet + IPv4 + UDP frame (checksums left 0: XDP does not check them)."""
    udp = struct.pack("!HHHH", 40000, 9, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst)
    eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
    return eth + ip + udp
