"""Thin ctypes binding over the system ``libbpf.so.1`` (libbpf 1.1); the only module doing bpf(2).

Every function used has its argtypes/restype declared once, in ``_PROTOTYPES``. Struct layouts
follow the libbpf 1.1 and UAPI headers (``bpf/bpf.h``, ``linux/bpf.h``, ``linux/btf.h``).

Error conventions of libbpf 1.x: int-returning calls return ``-errno``; pointer-returning calls
return NULL and set errno. Wrappers for object, id and BTF calls raise ``KernelError`` subclasses
(via ``bpfsync.errors.kernel_error``); wrappers for element and batch map operations return the raw
``-errno`` because their callers give some errnos a meaning (ENOENT: no such key / end of a dump;
ENOSPC: a batch chunk smaller than one hash bucket).

libbpf reports diagnostics (the verifier log among them) through one process-wide print callback.
It is installed when the library is first loaded; ``capture_output()`` collects what libbpf prints
on the current thread, everything else goes to the ``bpfsync.libbpf`` logger.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import logging
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from ctypes import (
    POINTER,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_int,
    c_int32,
    c_int64,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)
from typing import Any

from bpfsync.errors import NotSupportedError, kernel_error

LIBBPF_SONAME = "libbpf.so.1"
BPF_OBJ_NAME_LEN = 16

log = logging.getLogger("bpfsync.libbpf")

# A C pointer as ctypes hands it over with restype c_void_p: an address, or None for NULL.
Ptr = int
# Anything ctypes accepts for a `const void *` argument.
CBuffer = bytes | ctypes.Array[c_char] | int | None


# --- UAPI / libbpf structs ---------------------------------------------------------------------


class BpfMapInfo(Structure):
    """``struct bpf_map_info`` (linux/bpf.h), 88 bytes."""

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("key_size", c_uint32),
        ("value_size", c_uint32),
        ("max_entries", c_uint32),
        ("map_flags", c_uint32),
        ("name", c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32),
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("btf_id", c_uint32),
        ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32),
        ("_pad", c_uint32),
        ("map_extra", c_uint64),
    ]


class BpfProgInfo(Structure):
    """``struct bpf_prog_info`` (linux/bpf.h), 232 bytes; pointer fields stay 0 (not fetched)."""

    _fields_ = [
        ("type", c_uint32),
        ("id", c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", c_uint32),
        ("xlated_prog_len", c_uint32),
        ("jited_prog_insns", c_uint64),
        ("xlated_prog_insns", c_uint64),
        ("load_time", c_uint64),
        ("created_by_uid", c_uint32),
        ("nr_map_ids", c_uint32),
        ("map_ids", c_uint64),
        ("name", c_char * BPF_OBJ_NAME_LEN),
        ("ifindex", c_uint32),
        ("gpl_compatible", c_uint32),  # bit 0; the other 31 bits are padding
        ("netns_dev", c_uint64),
        ("netns_ino", c_uint64),
        ("nr_jited_ksyms", c_uint32),
        ("nr_jited_func_lens", c_uint32),
        ("jited_ksyms", c_uint64),
        ("jited_func_lens", c_uint64),
        ("btf_id", c_uint32),
        ("func_info_rec_size", c_uint32),
        ("func_info", c_uint64),
        ("nr_func_info", c_uint32),
        ("nr_line_info", c_uint32),
        ("line_info", c_uint64),
        ("jited_line_info", c_uint64),
        ("nr_jited_line_info", c_uint32),
        ("line_info_rec_size", c_uint32),
        ("jited_line_info_rec_size", c_uint32),
        ("nr_prog_tags", c_uint32),
        ("prog_tags", c_uint64),
        ("run_time_ns", c_uint64),
        ("run_cnt", c_uint64),
        ("recursion_misses", c_uint64),
        ("verified_insns", c_uint32),
        ("attach_btf_obj_id", c_uint32),
        ("attach_btf_id", c_uint32),
        ("_pad", c_uint32),
    ]


class BpfMapCreateOpts(Structure):
    """``struct bpf_map_create_opts`` (bpf/bpf.h, libbpf 1.1), 48 bytes."""

    _fields_ = [
        ("sz", c_size_t),
        ("btf_fd", c_uint32),
        ("btf_key_type_id", c_uint32),
        ("btf_value_type_id", c_uint32),
        ("btf_vmlinux_value_type_id", c_uint32),
        ("inner_map_fd", c_uint32),
        ("map_flags", c_uint32),
        ("map_extra", c_uint64),
        ("numa_node", c_uint32),
        ("map_ifindex", c_uint32),
    ]


class BpfMapBatchOpts(Structure):
    """``struct bpf_map_batch_opts`` (bpf/bpf.h), 24 bytes."""

    _fields_ = [("sz", c_size_t), ("elem_flags", c_uint64), ("flags", c_uint64)]


class BpfTestRunOpts(Structure):
    """``struct bpf_test_run_opts`` (bpf/bpf.h), 80 bytes."""

    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


class BtfType(Structure):
    """``struct btf_type`` (linux/btf.h); ``size_or_type`` is the anonymous size/type union."""

    _fields_ = [("name_off", c_uint32), ("info", c_uint32), ("size_or_type", c_uint32)]


class BtfMember(Structure):
    _fields_ = [("name_off", c_uint32), ("type", c_uint32), ("offset", c_uint32)]


class BtfArray(Structure):
    _fields_ = [("type", c_uint32), ("index_type", c_uint32), ("nelems", c_uint32)]


class BtfEnum(Structure):
    _fields_ = [("name_off", c_uint32), ("val", c_int32)]


class BtfEnum64(Structure):
    _fields_ = [("name_off", c_uint32), ("val_lo32", c_uint32), ("val_hi32", c_uint32)]


# --- loading and prototypes --------------------------------------------------------------------

_PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_libc: ctypes.CDLL | None = None
_print_cb: Any = None  # keeps the ctypes callback alive for as long as libbpf may call it
_local = threading.local()

# sizeof(va_list) where copying its bytes is a valid va_copy (x86-64 SysV: __va_list_tag[1];
# AArch64: struct __va_list, passed by reference to a copy). Elsewhere one pass, 64 KiB max.
_VA_LIST_SIZE = {"x86_64": 24, "aarch64": 32}.get(platform.machine(), 0)

_PROTOTYPES: dict[str, tuple[Any, list[Any]]] = {
    # bpf.h: low-level syscall wrappers
    "bpf_map_create": (
        c_int, [c_int, c_char_p, c_uint32, c_uint32, c_uint32, POINTER(BpfMapCreateOpts)],
    ),
    "bpf_map_get_fd_by_id": (c_int, [c_uint32]),
    "bpf_map_get_next_id": (c_int, [c_uint32, POINTER(c_uint32)]),
    "bpf_obj_get": (c_int, [c_char_p]),
    "bpf_obj_pin": (c_int, [c_int, c_char_p]),
    "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, POINTER(c_uint32)]),
    "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, c_uint64]),
    "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
    "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_lookup_batch": (
        c_int,
        [c_int, c_void_p, c_void_p, c_void_p, c_void_p, POINTER(c_uint32), c_void_p],
    ),
    "bpf_map_update_batch": (
        c_int,
        [c_int, c_void_p, c_void_p, POINTER(c_uint32), c_void_p],
    ),
    "bpf_map_delete_batch": (c_int, [c_int, c_void_p, POINTER(c_uint32), c_void_p]),
    "bpf_prog_test_run_opts": (c_int, [c_int, POINTER(BpfTestRunOpts)]),
    # libbpf.h: objects, programs, maps, links
    "libbpf_set_print": (c_void_p, [_PRINT_FN]),
    "bpf_object__open_file": (c_void_p, [c_char_p, c_void_p]),
    "bpf_object__load": (c_int, [c_void_p]),
    "bpf_object__close": (None, [c_void_p]),
    "bpf_object__find_program_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__next_program": (c_void_p, [c_void_p, c_void_p]),
    "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__next_map": (c_void_p, [c_void_p, c_void_p]),
    "bpf_program__name": (c_char_p, [c_void_p]),
    "bpf_program__section_name": (c_char_p, [c_void_p]),
    "bpf_program__autoload": (c_bool, [c_void_p]),
    "bpf_program__set_autoload": (c_int, [c_void_p, c_bool]),
    "bpf_program__fd": (c_int, [c_void_p]),
    "bpf_program__type": (c_int, [c_void_p]),
    "bpf_program__attach": (c_void_p, [c_void_p]),
    "bpf_program__attach_xdp": (c_void_p, [c_void_p, c_int]),
    "bpf_link__fd": (c_int, [c_void_p]),
    "bpf_link__pin": (c_int, [c_void_p, c_char_p]),
    "bpf_link__unpin": (c_int, [c_void_p]),
    "bpf_link__destroy": (c_int, [c_void_p]),
    "bpf_map__fd": (c_int, [c_void_p]),
    "bpf_map__name": (c_char_p, [c_void_p]),
    "bpf_map__type": (c_int, [c_void_p]),
    "bpf_map__key_size": (c_uint32, [c_void_p]),
    "bpf_map__value_size": (c_uint32, [c_void_p]),
    "bpf_map__max_entries": (c_uint32, [c_void_p]),
    "bpf_map__set_max_entries": (c_int, [c_void_p, c_uint32]),
    "bpf_map__set_initial_value": (c_int, [c_void_p, c_void_p, c_size_t]),
    "bpf_map__initial_value": (c_void_p, [c_void_p, POINTER(c_size_t)]),
    "bpf_map__pin": (c_int, [c_void_p, c_char_p]),
    # btf.h
    "btf__load_from_kernel_by_id": (c_void_p, [c_uint32]),
    "btf__load_vmlinux_btf": (c_void_p, []),
    "btf__free": (None, [c_void_p]),
    "btf__type_cnt": (c_uint32, [c_void_p]),
    "btf__type_by_id": (c_void_p, [c_void_p, c_uint32]),
    "btf__name_by_offset": (c_char_p, [c_void_p, c_uint32]),
    "btf__resolve_size": (c_int64, [c_void_p, c_uint32]),
    "btf__find_by_name_kind": (c_int32, [c_void_p, c_char_p, c_uint32]),
}


def lib() -> ctypes.CDLL:
    """The loaded libbpf, with prototypes declared and the print callback installed."""
    global _lib, _libc, _print_cb
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is None:
            try:
                handle = ctypes.CDLL(LIBBPF_SONAME, use_errno=True)
                libc = ctypes.CDLL(None, use_errno=True)
            except OSError as e:
                raise NotSupportedError(
                    f"cannot load {LIBBPF_SONAME} (install the libbpf1 package): {e}"
                ) from e
            for name, (restype, argtypes) in _PROTOTYPES.items():
                fn = getattr(handle, name)
                fn.restype = restype
                fn.argtypes = argtypes
            libc.vsnprintf.restype = c_int
            libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
            _libc = libc
            _print_cb = _PRINT_FN(_on_print)
            handle.libbpf_set_print(_print_cb)
            _lib = handle
    return _lib


# --- libbpf's print callback -------------------------------------------------------------------

LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2


def _format(fmt: bytes, ap: int) -> str:
    assert _libc is not None
    if _VA_LIST_SIZE:
        # vsnprintf consumes the va_list: size the message on a copy, then format the original.
        copy = ctypes.create_string_buffer(ctypes.string_at(ap, _VA_LIST_SIZE), _VA_LIST_SIZE)
        n = _libc.vsnprintf(None, 0, fmt, ctypes.addressof(copy))
        if n < 0:
            return fmt.decode(errors="replace")
        buf = ctypes.create_string_buffer(n + 1)
    else:
        buf = ctypes.create_string_buffer(65536)
    _libc.vsnprintf(buf, len(buf), fmt, ap)
    return buf.value.decode(errors="replace")


def _on_print(level: int, fmt: bytes | None, ap: int | None) -> int:
    try:
        if fmt is None or ap is None:
            return 0
        text = _format(fmt, ap)
        sink: list[tuple[int, str]] | None = getattr(_local, "sink", None)
        if sink is not None and level <= LIBBPF_INFO:
            sink.append((level, text))
        elif level == LIBBPF_WARN and sink is None:
            log.warning("%s", text.rstrip())
        else:
            log.debug("%s", text.rstrip())
    except Exception:  # an exception must never unwind into libbpf's C frames
        log.exception("libbpf print callback failed")
    return 0


@contextmanager
def capture_output() -> Iterator[list[tuple[int, str]]]:
    """Collect (level, text) of what libbpf prints (WARN and INFO) on this thread meanwhile."""
    lib()
    previous = getattr(_local, "sink", None)
    sink: list[tuple[int, str]] = []
    _local.sink = sink
    try:
        yield sink
    finally:
        _local.sink = previous


# --- error helpers -----------------------------------------------------------------------------


def check(ret: int, what: str) -> int:
    """Raise the KernelError for a negative libbpf return value; pass other values through."""
    if ret < 0:
        raise kernel_error(ret, what)
    return ret


def check_ptr(ptr: Ptr | None, what: str) -> Ptr:
    """Raise the KernelError for a NULL pointer returned by libbpf (errno says why)."""
    if not ptr:
        raise kernel_error(ctypes.get_errno() or _errno.EINVAL, what)
    return ptr


def _s(text: str) -> bytes:
    return text.encode()


def _str(raw: bytes | None) -> str:
    return raw.decode(errors="replace") if raw is not None else ""


# --- ids, pins, info ---------------------------------------------------------------------------


def map_create(map_type: int, name: str, key_size: int, value_size: int, entries: int,
               flags: int = 0) -> int:
    what = f"create map {name or '(unnamed)'} (type {map_type}, {key_size}/{value_size} bytes)"
    opts = BpfMapCreateOpts(sz=ctypes.sizeof(BpfMapCreateOpts), map_flags=flags)
    return check(lib().bpf_map_create(map_type, _s(name) if name else None, key_size,
                                      value_size, entries, ctypes.byref(opts)), what)


def map_get_fd_by_id(map_id: int) -> int:
    return check(lib().bpf_map_get_fd_by_id(map_id), f"open map id {map_id}")


def map_get_next_id(start_id: int) -> int | None:
    """The next map id after ``start_id``, or None when there is none."""
    next_id = c_uint32(0)
    ret = lib().bpf_map_get_next_id(start_id, ctypes.byref(next_id))
    if ret == -_errno.ENOENT:
        return None
    check(ret, "iterate map ids")
    return next_id.value


def obj_get(path: str) -> int:
    return check(lib().bpf_obj_get(_s(path)), f"open pinned object {path}")


def obj_pin(fd: int, path: str) -> None:
    check(lib().bpf_obj_pin(fd, _s(path)), f"pin to {path}")


def map_info(fd: int) -> BpfMapInfo:
    info = BpfMapInfo()
    size = c_uint32(ctypes.sizeof(info))
    check(
        lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
        "get map info",
    )
    return info


def prog_info(fd: int) -> BpfProgInfo:
    """BPF_OBJ_GET_INFO_BY_FD for a program; fields this kernel lacks stay 0."""
    info = BpfProgInfo()
    size = c_uint32(ctypes.sizeof(info))
    check(
        lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
        "get program info",
    )
    return info


# --- map element and batch operations (raw -errno returns) -------------------------------------


def map_lookup_elem(fd: int, key: CBuffer, value: CBuffer) -> int:
    return int(lib().bpf_map_lookup_elem(fd, key, value))


def map_update_elem(fd: int, key: CBuffer, value: CBuffer, flags: int) -> int:
    return int(lib().bpf_map_update_elem(fd, key, value, flags))


def map_delete_elem(fd: int, key: CBuffer) -> int:
    return int(lib().bpf_map_delete_elem(fd, key))


def map_get_next_key(fd: int, key: CBuffer, next_key: CBuffer) -> int:
    return int(lib().bpf_map_get_next_key(fd, key, next_key))


def _batch_opts(elem_flags: int) -> BpfMapBatchOpts:
    return BpfMapBatchOpts(ctypes.sizeof(BpfMapBatchOpts), elem_flags, 0)


def map_lookup_batch(
    fd: int, in_batch: CBuffer, out_batch: CBuffer, keys: int, values: int, count: int
) -> tuple[int, int]:
    """One BPF_MAP_LOOKUP_BATCH call; returns (ret, entries filled). Buffers are addresses."""
    n = c_uint32(count)
    opts = _batch_opts(0)
    ret = lib().bpf_map_lookup_batch(
        fd, in_batch, out_batch, keys, values, ctypes.byref(n), ctypes.byref(opts)
    )
    return int(ret), n.value


def map_update_batch(
    fd: int, keys: int, values: int, count: int, elem_flags: int
) -> tuple[int, int]:
    """One BPF_MAP_UPDATE_BATCH call; returns (ret, entries processed)."""
    n = c_uint32(count)
    opts = _batch_opts(elem_flags)
    ret = lib().bpf_map_update_batch(fd, keys, values, ctypes.byref(n), ctypes.byref(opts))
    return int(ret), n.value


def map_delete_batch(fd: int, keys: int, count: int) -> tuple[int, int]:
    """One BPF_MAP_DELETE_BATCH call; returns (ret, entries processed)."""
    n = c_uint32(count)
    opts = _batch_opts(0)
    ret = lib().bpf_map_delete_batch(fd, keys, ctypes.byref(n), ctypes.byref(opts))
    return int(ret), n.value


# --- programs: test run ------------------------------------------------------------------------


def prog_test_run(fd: int, data: bytes, out_size: int, repeat: int) -> tuple[int, bytes, int]:
    """BPF_PROG_TEST_RUN with packet data; returns (retval, data_out, duration_ns)."""
    out = ctypes.create_string_buffer(out_size)
    data_in = ctypes.create_string_buffer(data, len(data))
    opts = BpfTestRunOpts()
    opts.sz = ctypes.sizeof(BpfTestRunOpts)
    opts.data_in = ctypes.addressof(data_in)
    opts.data_size_in = len(data)
    opts.data_out = ctypes.addressof(out)
    opts.data_size_out = out_size
    opts.repeat = repeat
    check(lib().bpf_prog_test_run_opts(fd, ctypes.byref(opts)), "BPF_PROG_TEST_RUN")
    return opts.retval, out.raw[: opts.data_size_out], opts.duration


# --- bpf_object / bpf_program / bpf_map (libbpf's spec-and-load side) --------------------------


def object_open_file(path: str) -> Ptr:
    return check_ptr(lib().bpf_object__open_file(_s(path), None), f"open BPF object {path}")


def object_load(obj: Ptr) -> int:
    """Raw -errno: the caller turns a failure into VerifierError with the captured log."""
    return int(lib().bpf_object__load(obj))


def object_close(obj: Ptr) -> None:
    lib().bpf_object__close(obj)


def object_programs(obj: Ptr) -> list[Ptr]:
    progs: list[Ptr] = []
    prog: Ptr | None = lib().bpf_object__next_program(obj, None)
    while prog:
        progs.append(prog)
        prog = lib().bpf_object__next_program(obj, prog)
    return progs


def object_find_program(obj: Ptr, name: str) -> Ptr | None:
    ptr: Ptr | None = lib().bpf_object__find_program_by_name(obj, _s(name))
    return ptr


def object_maps(obj: Ptr) -> list[Ptr]:
    maps: list[Ptr] = []
    m: Ptr | None = lib().bpf_object__next_map(obj, None)
    while m:
        maps.append(m)
        m = lib().bpf_object__next_map(obj, m)
    return maps


def object_find_map(obj: Ptr, name: str) -> Ptr | None:
    ptr: Ptr | None = lib().bpf_object__find_map_by_name(obj, _s(name))
    return ptr


def program_name(prog: Ptr) -> str:
    return _str(lib().bpf_program__name(prog))


def program_section(prog: Ptr) -> str:
    return _str(lib().bpf_program__section_name(prog))


def program_autoload(prog: Ptr) -> bool:
    return bool(lib().bpf_program__autoload(prog))


def program_set_autoload(prog: Ptr, autoload: bool) -> None:
    check(lib().bpf_program__set_autoload(prog, autoload), "set autoload")


def program_fd(prog: Ptr) -> int:
    return int(lib().bpf_program__fd(prog))


def program_type(prog: Ptr) -> int:
    return int(lib().bpf_program__type(prog))


def program_attach(prog: Ptr, what: str) -> Ptr:
    with capture_output() as out:
        link: Ptr | None = lib().bpf_program__attach(prog)
    return _link_or_raise(link, what, out)


def program_attach_xdp(prog: Ptr, ifindex: int, what: str) -> Ptr:
    with capture_output() as out:
        link: Ptr | None = lib().bpf_program__attach_xdp(prog, ifindex)
    return _link_or_raise(link, what, out)


def _link_or_raise(link: Ptr | None, what: str, out: list[tuple[int, str]]) -> Ptr:
    if link:
        return link
    err = kernel_error(ctypes.get_errno() or _errno.EINVAL, what)
    detail = "".join(text for _, text in out).strip()
    if detail:
        raise type(err)(f"{err}\nlibbpf: {detail}", err.errno)
    raise err


def link_fd(link: Ptr) -> int:
    return int(lib().bpf_link__fd(link))


def link_pin(link: Ptr, path: str) -> None:
    check(lib().bpf_link__pin(link, _s(path)), f"pin link to {path}")


def link_unpin(link: Ptr) -> None:
    check(lib().bpf_link__unpin(link), "unpin link")


def link_destroy(link: Ptr) -> None:
    check(lib().bpf_link__destroy(link), "destroy link")


def map_fd(m: Ptr) -> int:
    return int(lib().bpf_map__fd(m))


def map_name(m: Ptr) -> str:
    return _str(lib().bpf_map__name(m))


def map_type(m: Ptr) -> int:
    return int(lib().bpf_map__type(m))


def map_key_size(m: Ptr) -> int:
    return int(lib().bpf_map__key_size(m))


def map_value_size(m: Ptr) -> int:
    return int(lib().bpf_map__value_size(m))


def map_max_entries(m: Ptr) -> int:
    return int(lib().bpf_map__max_entries(m))


def map_set_max_entries(m: Ptr, n: int) -> None:
    check(lib().bpf_map__set_max_entries(m, n), "set max_entries")


def map_set_initial_value(m: Ptr, data: bytes) -> None:
    check(lib().bpf_map__set_initial_value(m, data, len(data)), "set initial value")


def map_initial_value(m: Ptr) -> bytes | None:
    size = c_size_t(0)
    ptr: Ptr | None = lib().bpf_map__initial_value(m, ctypes.byref(size))
    return ctypes.string_at(ptr, size.value) if ptr else None


def map_pin(m: Ptr, path: str) -> None:
    check(lib().bpf_map__pin(m, _s(path)), f"pin map to {path}")


# --- BTF ---------------------------------------------------------------------------------------


def btf_load_from_kernel_by_id(btf_id: int) -> Ptr:
    return check_ptr(lib().btf__load_from_kernel_by_id(btf_id), f"load BTF id {btf_id}")


def btf_load_vmlinux() -> Ptr:
    return check_ptr(lib().btf__load_vmlinux_btf(), "load vmlinux BTF")


def btf_free(btf: Ptr) -> None:
    lib().btf__free(btf)


def btf_type_cnt(btf: Ptr) -> int:
    return int(lib().btf__type_cnt(btf))


def btf_type_by_id(btf: Ptr, type_id: int) -> Ptr:
    """Address of the ``struct btf_type`` (its members, params... follow it in memory)."""
    return check_ptr(lib().btf__type_by_id(btf, type_id), f"BTF type {type_id}")


def btf_name_by_offset(btf: Ptr, offset: int) -> str:
    return _str(lib().btf__name_by_offset(btf, offset))


def btf_resolve_size(btf: Ptr, type_id: int) -> int:
    return check(int(lib().btf__resolve_size(btf, type_id)), f"size of BTF type {type_id}")


def btf_find_by_name_kind(btf: Ptr, name: str, kind: int) -> int | None:
    ret = int(lib().btf__find_by_name_kind(btf, _s(name), kind))
    if ret == -_errno.ENOENT:
        return None
    return check(ret, f"find BTF type {name!r}")
