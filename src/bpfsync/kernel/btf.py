"""A map's key and value types, read from its BTF and turned into ``Layout``s.

``map_layouts(info)`` loads the BTF object the map was created with (by id, from the kernel),
follows typedefs and const/volatile/restrict/type-tag modifiers, and flattens the key and value
types: struct members become fields with dotted names, arrays of numbers become list fields,
``char`` arrays become text, bitfields keep their bit position, unions and anything without a
better reading become opaque bytes. A map created without BTF (``bpftool map create``, old
loaders) raises ``NotFoundError``; ``map_layouts_or_raw`` falls back to ``Layout.raw``.

An LPM trie's key is a prefix (``Layout.is_prefix``, read whole as ``198.51.100.0/24``): the
kernel reads every such key as a ``__u32`` prefix length and address bytes. Without BTF that
follows from the map type (fields ``prefixlen`` and ``addr``); with BTF, a key struct of exactly
that shape (``{__u32 prefixlen; __u8 addr[4];}``, ``{__u32 prefixlen; __be32 addr;}``) is a
prefix with its own field names, ``struct bpf_lpm_trie_key_u8`` (a flexible array: no size) one
with the default names, and a struct with more fields after the length (an ifindex, then an
address) is no prefix: its fields say more than one prefix would.

``Btf`` is also the handle on vmlinux BTF used by the feature probes (``find``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import threading

from bpfsync.errors import InvalidError, NotFoundError
from bpfsync.kernel import _libbpf
from bpfsync.kernel._closing import Closing
from bpfsync.kernel.info import MapInfo, MapType
from bpfsync.layout import PREFIXLEN_SIZE, Field, Kind, Layout

# enum btf_kind (linux/btf.h)
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 7, 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19

_MODIFIERS = frozenset({KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG})
_INT_SIGNED, _INT_CHAR, _INT_BOOL = 1, 2, 4
_MAX_STRUCT_ARRAY = 16  # struct arrays up to this long are flattened per element; longer: bytes
_HDR = ctypes.sizeof(_libbpf.BtfType)


class BtfType:
    """One decoded ``struct btf_type`` with what follows it (members, array, enum values...)."""

    __slots__ = (
        "array",
        "btf_kind",
        "int_bits",
        "int_encoding",
        "int_offset",
        "kflag",
        "members",
        "name",
        "ref",
        "signed_enum",
        "type_id",
        "vlen",
    )

    def __init__(self, btf: Btf, type_id: int) -> None:
        addr = _libbpf.btf_type_by_id(btf.ptr, type_id)
        raw = _libbpf.BtfType.from_address(addr)
        self.type_id = type_id
        self.name = btf.name(raw.name_off)
        self.btf_kind = (raw.info >> 24) & 0x1F
        self.vlen = raw.info & 0xFFFF
        self.kflag = bool(raw.info >> 31)
        self.ref = raw.size_or_type  # the size for ints/structs/enums, else the referenced type
        self.int_encoding = self.int_offset = self.int_bits = 0
        self.array: _libbpf.BtfArray | None = None
        self.members: list[tuple[str, int, int, int]] = []  # name, type, bit offset, bitfield
        self.signed_enum = False
        tail = addr + _HDR
        if self.btf_kind == KIND_INT:
            word = ctypes.c_uint32.from_address(tail).value
            self.int_encoding = (word >> 24) & 0x0F
            self.int_offset = (word >> 16) & 0xFF
            self.int_bits = word & 0xFF
        elif self.btf_kind == KIND_ARRAY:
            self.array = _libbpf.BtfArray.from_address(tail)
        elif self.btf_kind in (KIND_STRUCT, KIND_UNION):
            for m in (_libbpf.BtfMember * self.vlen).from_address(tail):
                bit_off, bitfield = m.offset, 0
                if self.kflag:
                    bit_off, bitfield = m.offset & 0xFFFFFF, m.offset >> 24
                self.members.append((btf.name(m.name_off), m.type, bit_off, bitfield))
        elif self.btf_kind == KIND_ENUM:
            values = (_libbpf.BtfEnum * self.vlen).from_address(tail)
            self.signed_enum = self.kflag or any(v.val < 0 for v in values)
        elif self.btf_kind == KIND_ENUM64:
            self.signed_enum = self.kflag

    @property
    def size(self) -> int:
        return int(self.ref)


class Btf(Closing):
    """A BTF object loaded from the kernel (libbpf ``struct btf``); ``close()`` frees it."""

    def __init__(self, ptr: _libbpf.Ptr, what: str) -> None:
        self.ptr = ptr
        self.what = what

    @classmethod
    def load_by_id(cls, btf_id: int) -> Btf:
        return cls(_libbpf.btf_load_from_kernel_by_id(btf_id), f"BTF id {btf_id}")

    @classmethod
    def load_vmlinux(cls) -> Btf:
        return cls(_libbpf.btf_load_vmlinux(), "vmlinux BTF")

    def name(self, offset: int) -> str:
        return _libbpf.btf_name_by_offset(self.ptr, offset)

    def type_by_id(self, type_id: int) -> BtfType:
        return BtfType(self, type_id)

    def size_of(self, type_id: int) -> int:
        return _libbpf.btf_resolve_size(self.ptr, type_id)

    def find(self, name: str, kind: int) -> int | None:
        """Id of the type called ``name`` of ``kind`` (e.g. ``KIND_FUNC``), or None."""
        return _libbpf.btf_find_by_name_kind(self.ptr, name, kind)

    def resolve(self, type_id: int) -> BtfType:
        """The type behind typedefs and qualifiers."""
        t = self.type_by_id(type_id)
        for _ in range(64):  # BTF is acyclic through modifiers; bound it anyway
            if t.btf_kind not in _MODIFIERS:
                return t
            t = self.type_by_id(t.ref)
        raise InvalidError(f"{self.what}: type {type_id} has a modifier loop", errno.ELOOP)

    def layout(self, type_id: int) -> Layout:
        """The flattened ``Layout`` of a type (a map key or value)."""
        t = self.resolve(type_id)
        size = self.size_of(type_id)
        fields: list[Field] = []
        if t.btf_kind == KIND_STRUCT:
            self._struct(t, "", 0, fields)
        else:
            self._field(type_id, "", 0, fields)
        return Layout(size, tuple(fields), self._c_name(type_id))

    def _c_name(self, type_id: int) -> str:
        t = self.type_by_id(type_id)
        if t.name and t.btf_kind == KIND_STRUCT:
            return f"struct {t.name}"
        if t.name and t.btf_kind == KIND_UNION:
            return f"union {t.name}"
        if t.name:
            return t.name
        if t.btf_kind in _MODIFIERS:
            return self._c_name(t.ref)
        return ""

    def _struct(self, t: BtfType, prefix: str, base_bits: int, out: list[Field]) -> None:
        for name, member_type, bit_off, bitfield in t.members:
            full = f"{prefix}.{name}" if prefix and name else prefix or name
            bits = base_bits + bit_off
            if bitfield or bits % 8:
                self._bitfield(member_type, full, bits, bitfield, out)
                continue
            mt = self.resolve(member_type)
            if not name and mt.btf_kind == KIND_STRUCT:  # anonymous struct: members inline
                self._struct(mt, prefix, bits, out)
            else:
                self._field(member_type, full or f"anon@{bits // 8}", bits // 8, out)

    def _bitfield(self, type_id: int, name: str, bits: int, width: int, out: list[Field]) -> None:
        t = self.resolve(type_id)
        width = width or self.size_of(type_id) * 8
        offset = bits // 8
        bit_offset = bits % 8
        size = (bit_offset + width + 7) // 8
        kind = Kind.INT if _signed(t) else Kind.UINT
        out.append(Field(name, offset, size, kind, bit_offset=bit_offset, bits=width))

    def _field(self, type_id: int, name: str, offset: int, out: list[Field]) -> None:
        t = self.resolve(type_id)
        size = self.size_of(type_id)
        k = t.btf_kind
        if k == KIND_STRUCT:
            self._struct(t, name, offset * 8, out)
        elif k == KIND_INT and (t.int_offset or t.int_bits != size * 8):
            # legacy int bitfield encoding: the int itself carries the bit offset and width
            kind = Kind.INT if _signed(t) else Kind.UINT
            out.append(Field(name, offset, size, kind, bit_offset=t.int_offset, bits=t.int_bits))
        elif k in (KIND_INT, KIND_ENUM, KIND_ENUM64, KIND_FLOAT, KIND_PTR):
            out.append(Field(name, offset, size, _scalar_kind(t)))
        elif k == KIND_ARRAY:
            self._array(t, name, offset, size, out)
        else:  # unions, forward declarations, functions: no field-wise meaning
            out.append(Field(name, offset, size, Kind.BYTES))

    def _array(self, t: BtfType, name: str, offset: int, size: int, out: list[Field]) -> None:
        assert t.array is not None
        count = t.array.nelems
        elem_id = t.array.type
        elem = self.resolve(elem_id)
        while elem.btf_kind == KIND_ARRAY and elem.array is not None:  # int m[2][3] -> 6 ints
            count *= elem.array.nelems
            elem_id = elem.array.type
            elem = self.resolve(elem_id)
        if count == 0 or size == 0:
            return  # flexible array member: holds no bytes of the value
        if elem.btf_kind == KIND_INT and _is_char(elem):
            out.append(Field(name, offset, size, Kind.CHARS))
        elif elem.btf_kind == KIND_INT and elem.ref == 1 and not _signed(elem):
            out.append(Field(name, offset, size, Kind.BYTES))  # __u8 buf[6]: a MAC, a hash...
        elif elem.btf_kind in (KIND_INT, KIND_ENUM, KIND_ENUM64, KIND_FLOAT, KIND_PTR):
            out.append(Field(name, offset, size, _scalar_kind(elem), count=count))
        elif elem.btf_kind == KIND_STRUCT and count <= _MAX_STRUCT_ARRAY:
            stride = size // count
            for i in range(count):
                self._struct(elem, f"{name}[{i}]", (offset + i * stride) * 8, out)
        else:
            out.append(Field(name, offset, size, Kind.BYTES))

    def close(self) -> None:
        ptr, self.ptr = self.ptr, 0
        if ptr:
            _libbpf.btf_free(ptr)


def _is_char(t: BtfType) -> bool:
    return bool(t.int_encoding & _INT_CHAR) or t.name == "char"


def _signed(t: BtfType) -> bool:
    if t.btf_kind in (KIND_ENUM, KIND_ENUM64):
        return t.signed_enum
    return t.btf_kind == KIND_INT and bool(t.int_encoding & _INT_SIGNED)


def _scalar_kind(t: BtfType) -> Kind:
    if t.btf_kind == KIND_FLOAT:
        return Kind.FLOAT
    if t.btf_kind == KIND_INT and t.int_encoding & _INT_BOOL:
        return Kind.BOOL
    return Kind.INT if _signed(t) else Kind.UINT


def map_layouts(info: MapInfo) -> tuple[Layout, Layout]:
    """(key layout, value layout) of a map, from its BTF. NotFoundError if it has none.

    An LPM trie's key is a prefix unless its BTF names more fields (see the module text).
    For per-CPU maps the value layout describes one CPU's value (``info.value_size`` bytes)."""
    if not info.btf_id or not info.btf_value_type_id:
        raise NotFoundError(
            f"map {info.describe()} was created without BTF type information: "
            "its keys and values can only be shown as raw bytes (Layout.raw; an LPM trie's "
            "keys as prefixes, map_layouts_or_raw)",
            errno.ENOENT,
        )
    with Btf.load_by_id(info.btf_id) as btf:
        value = btf.layout(info.btf_value_type_id)
        key = btf.layout(info.btf_key_type_id) if info.btf_key_type_id else None
    if value.size != info.value_size:
        raise InvalidError(
            f"map {info.describe()}: BTF value type is {value.size} bytes, "
            f"the map's values {info.value_size}",
            errno.EINVAL,
        )
    return _key_layout(info, key), value


def map_layouts_or_raw(info: MapInfo) -> tuple[Layout, Layout]:
    """``map_layouts``, or raw byte layouts for a map without BTF (an LPM trie's key: a
    prefix, which its type implies)."""
    try:
        return map_layouts(info)
    except NotFoundError:
        return _key_layout(info, None), Layout.raw(info.value_size)


def _key_layout(info: MapInfo, btf_key: Layout | None) -> Layout:
    """The key's layout from its BTF (None: none), raw where that does not fit the map; an LPM
    trie's a prefix where the BTF says no more than the map type does."""
    key = btf_key if btf_key is not None and btf_key.size == info.key_size else None
    if info.type != MapType.LPM_TRIE or info.key_size <= PREFIXLEN_SIZE:
        return key if key is not None else Layout.raw(info.key_size)
    if key is None or key.is_raw:
        return Layout.prefix(info.key_size, key.name if key is not None else "")
    return dataclasses.replace(key, is_prefix=True) if _is_prefix_struct(key) else key


def _is_prefix_struct(key: Layout) -> bool:
    """{u32 prefix length; one address field up to the end}: an LPM key with nothing else.
    The length may be typed as a union (of ``struct bpf_lpm_trie_key_hdr`` and a ``__u32``)."""
    if len(key.fields) != 2 or key.size <= PREFIXLEN_SIZE:
        return False
    length, addr = sorted(key.fields, key=lambda f: f.offset)
    return (
        (length.offset, length.size, length.bits, length.count) == (0, PREFIXLEN_SIZE, 0, 0)
        and length.kind in (Kind.UINT, Kind.INT, Kind.BYTES)
        and (addr.offset, addr.end, addr.bits) == (PREFIXLEN_SIZE, key.size, 0)
        and addr.kind in (Kind.BYTES, Kind.UINT)
    )


_vmlinux_lock = threading.Lock()


@functools.cache
def _vmlinux() -> Btf:
    return Btf.load_vmlinux()


def vmlinux() -> Btf:
    """The running kernel's BTF, loaded once per process (never closed)."""
    with _vmlinux_lock:
        return _vmlinux()
