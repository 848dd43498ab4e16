"""How a map's key or value bytes split into named fields (``Layout``), and decoding them.

Pure data, no kernel access: the kernel layer builds a ``Layout`` from a map's BTF, and the core
uses it to merge per field (``packets: counter, last_seen: max``). Nested structs are flattened
with dotted names (``window.lo``); struct arrays get indexes (``hops[1].addr``). A value that is
not a struct (a plain ``__u64`` counter) is one field named ``""``, which stands for the whole
value; ``Layout.raw(size)`` is that, as bytes, for maps without BTF.

Decoded values: integers (little-endian, signed per the type), bools, floats, lists of those for
arrays, ``str`` for char arrays (up to the first NUL), and lowercase hex for anything else (byte
arrays, unions, types without a better reading). Fields never overlap; padding is in no field.

A prefix layout (``is_prefix``; ``Layout.prefix(size)``) is an LPM trie's key, the kernel's
``struct bpf_lpm_trie_key``: a ``__u32`` prefix length (little-endian, as every integer here),
then the address bytes in network order. Its fields stay fields (``prefixlen`` and ``addr``, or
the names its BTF gives them), and ``prefix_text`` reads the whole key as one prefix:
``198.51.100.0/24`` for 4 address bytes, ``2001:db8::/32`` for 16 (the stdlib ``ipaddress``
forms), ``<hex>/<length>`` for any other size. The bytes are shown as stored, bits past the
prefix length included, so ``prefix_bytes`` turns the text back into the same key. Which keys
are prefixes is the kernel layer's knowledge (a map's type); this module only reads and writes
them.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass

Scalar = int | float | bool
Value = Scalar | str | list[Scalar]


class Kind(enum.StrEnum):
    INT = "int"  # signed integer (and enums with negative values)
    UINT = "uint"  # unsigned integer, enum, pointer
    BOOL = "bool"
    FLOAT = "float"
    CHARS = "chars"  # char array holding NUL-terminated text
    BYTES = "bytes"  # opaque bytes, shown as hex

    @property
    def numeric(self) -> bool:
        return self in (Kind.INT, Kind.UINT, Kind.BOOL, Kind.FLOAT)


_FLOAT_FORMATS = {2: "<e", 4: "<f", 8: "<d"}
PREFIXLEN_SIZE = 4  # the __u32 prefixlen that starts struct bpf_lpm_trie_key


def prefix_text(raw: bytes | bytearray | memoryview) -> str:
    """An LPM trie key as text: ``198.51.100.0/24``, ``2001:db8::/32``, else ``<hex>/<len>``."""
    raw = bytes(raw)
    if len(raw) <= PREFIXLEN_SIZE:
        raise ValueError(f"an LPM trie key has more than {PREFIXLEN_SIZE} bytes, got {len(raw)}")
    length = int.from_bytes(raw[:PREFIXLEN_SIZE], "little")
    data = raw[PREFIXLEN_SIZE:]
    if len(data) in (4, 16):
        return f"{ipaddress.ip_address(data)}/{length}"
    return f"{data.hex()}/{length}"


def canonical_prefix(raw: bytes) -> bytes:
    """An LPM trie key with the bits past its prefix length zeroed: the kernel keeps one entry
    for ``198.51.100.0/24`` and ``198.51.100.7/24`` (writing one replaces the other), so both
    must name one key everywhere else too. A length past the data is left as it is (the kernel
    refuses it)."""
    length = int.from_bytes(raw[:PREFIXLEN_SIZE], "little")
    bits = 8 * (len(raw) - PREFIXLEN_SIZE)
    if length >= bits:
        return raw
    data = int.from_bytes(raw[PREFIXLEN_SIZE:], "big")
    kept = data >> (bits - length) << (bits - length)
    if kept == data:
        return raw
    return raw[:PREFIXLEN_SIZE] + kept.to_bytes(bits // 8, "big")


def prefix_bytes(text: str, size: int) -> bytes:
    """The ``size``-byte LPM trie key ``text`` names (``prefix_text``'s forms); an address
    without ``/LEN`` is the whole address (its full length). ValueError says what is wrong."""
    data_size = size - PREFIXLEN_SIZE
    if data_size <= 0:
        raise ValueError(f"an LPM trie key has more than {PREFIXLEN_SIZE} bytes, not {size}")
    addr, slash, length_text = text.strip().partition("/")
    if data_size in (4, 16):
        try:
            parsed = ipaddress.ip_address(addr)
        except ValueError:
            parsed = None
        if parsed is None or parsed.max_prefixlen != 8 * data_size:
            family = "IPv4" if data_size == 4 else "IPv6"
            raise ValueError(f"{text!r}: give an {family} prefix such as "
                             f"{'198.51.100.0/24' if data_size == 4 else '2001:db8::/32'}")
        data = parsed.packed
    else:
        try:
            data = bytes.fromhex(addr)
        except ValueError:
            data = b""
        if len(data) != data_size:
            raise ValueError(f"{text!r}: give {data_size} address bytes as hex, then /LEN")
    max_length = 8 * data_size
    if not slash:
        length = max_length
    elif length_text.isascii() and length_text.isdigit() and int(length_text) <= max_length:
        length = int(length_text)
    else:
        raise ValueError(f"{text!r}: the prefix length must be 0 to {max_length}")
    return length.to_bytes(PREFIXLEN_SIZE, "little") + data


@dataclass(frozen=True, slots=True)
class Field:
    """``size`` bytes at ``offset``. Numeric kinds may be arrays (``count`` > 0 elements of
    ``size // count`` bytes) or bitfields (``bits`` wide, ``bit_offset`` bits into the
    little-endian integer of ``size`` bytes at ``offset``)."""

    name: str
    offset: int
    size: int
    kind: Kind
    count: int = 0
    bit_offset: int = 0
    bits: int = 0

    def __post_init__(self) -> None:
        if self.offset < 0 or self.size <= 0:
            raise ValueError(f"field {self.name!r}: bad offset {self.offset} or size {self.size}")
        if self.count and (not self.kind.numeric or self.size % self.count):
            raise ValueError(f"field {self.name!r}: {self.count} elements do not fit {self.size}")
        if self.kind is Kind.FLOAT and self.elem_size not in _FLOAT_FORMATS:
            raise ValueError(f"field {self.name!r}: no {self.elem_size}-byte float")
        if self.bits and (self.count or self.bit_offset + self.bits > self.size * 8):
            raise ValueError(f"field {self.name!r}: bitfield does not fit")

    @property
    def signed(self) -> bool:
        return self.kind is Kind.INT

    @property
    def elem_size(self) -> int:
        return self.size // self.count if self.count else self.size

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def bit_range(self) -> tuple[int, int]:
        """[start, stop) in bits from the start of the layout."""
        if self.bits:
            start = self.offset * 8 + self.bit_offset
            return start, start + self.bits
        return self.offset * 8, self.end * 8

    def decode(self, data: bytes | bytearray | memoryview) -> Value:
        raw = bytes(data[self.offset : self.end])
        if len(raw) != self.size:
            raise ValueError(f"field {self.name!r} needs bytes {self.offset}..{self.end}")
        if self.kind is Kind.CHARS:
            return raw.split(b"\0", 1)[0].decode(errors="backslashreplace")
        if self.kind is Kind.BYTES:
            return raw.hex()
        if self.bits:
            return self._decode_bits(raw)
        if self.count:
            n = self.elem_size
            return [self._decode_scalar(raw[i * n : (i + 1) * n]) for i in range(self.count)]
        return self._decode_scalar(raw)

    def _decode_scalar(self, raw: bytes) -> Scalar:
        if self.kind is Kind.FLOAT:
            return float(struct.unpack(_FLOAT_FORMATS[len(raw)], raw)[0])
        number = int.from_bytes(raw, "little", signed=self.signed)
        return bool(number) if self.kind is Kind.BOOL else number

    def _decode_bits(self, raw: bytes) -> Scalar:
        number = (int.from_bytes(raw, "little") >> self.bit_offset) & ((1 << self.bits) - 1)
        if self.signed and number >> (self.bits - 1):
            number -= 1 << self.bits
        return bool(number) if self.kind is Kind.BOOL else number

    def encode_into(self, buf: bytearray, value: Value) -> None:
        """Write ``value`` (as ``decode`` returns it) into ``buf`` at this field."""
        if self.kind is Kind.CHARS:
            if not isinstance(value, str):
                raise TypeError(f"field {self.name!r} takes a str")
            text = value.encode()
            if len(text) > self.size:
                raise ValueError(f"field {self.name!r}: {value!r} is longer than {self.size}")
            buf[self.offset : self.end] = text.ljust(self.size, b"\0")
        elif self.kind is Kind.BYTES:
            raw = bytes.fromhex(value) if isinstance(value, str) else None
            if raw is None or len(raw) != self.size:
                raise ValueError(f"field {self.name!r} takes {self.size} bytes as hex")
            buf[self.offset : self.end] = raw
        elif self.bits:
            if not isinstance(value, int):
                raise TypeError(f"field {self.name!r} takes an int")
            mask = (1 << self.bits) - 1
            word = int.from_bytes(buf[self.offset : self.end], "little")
            word = (word & ~(mask << self.bit_offset)) | ((value & mask) << self.bit_offset)
            buf[self.offset : self.end] = word.to_bytes(self.size, "little")
        elif self.count:
            if not isinstance(value, list) or len(value) != self.count:
                raise ValueError(f"field {self.name!r} takes a list of {self.count}")
            n = self.elem_size
            for i, elem in enumerate(value):
                buf[self.offset + i * n : self.offset + (i + 1) * n] = self._encode_scalar(elem)
        else:
            if isinstance(value, (str, list)):
                raise TypeError(f"field {self.name!r} takes a number")
            buf[self.offset : self.end] = self._encode_scalar(value)

    def _encode_scalar(self, value: Scalar) -> bytes:
        if self.kind is Kind.FLOAT:
            return struct.pack(_FLOAT_FORMATS[self.elem_size], float(value))
        return int(value).to_bytes(self.elem_size, "little", signed=self.signed)


@dataclass(frozen=True, slots=True)
class Layout:
    """The fields of a ``size``-byte key or value; ``name`` is its C type (``struct stats``).
    ``is_prefix``: the whole is an LPM trie key, read as one prefix (see the module text)."""

    size: int
    fields: tuple[Field, ...]
    name: str = ""
    is_prefix: bool = False

    def __post_init__(self) -> None:
        if self.is_prefix and self.size <= PREFIXLEN_SIZE:
            raise ValueError(f"layout {self.name!r}: a prefix is a u32 length and address bytes")
        end = 0  # in bits: bitfields share bytes with their neighbours, never bits
        for f in sorted(self.fields, key=lambda f: f.bit_range):
            start, stop = f.bit_range
            if start < end or f.end > self.size:
                raise ValueError(f"layout {self.name!r}: field {f.name!r} overlaps or overflows")
            end = stop
        if len({f.name for f in self.fields}) != len(self.fields):
            raise ValueError(f"layout {self.name!r}: duplicate field names")

    @classmethod
    def raw(cls, size: int) -> Layout:
        """Opaque bytes: the layout of a key or value the kernel gives no type for."""
        return cls(size, (Field("", 0, size, Kind.BYTES),), "")

    @classmethod
    def prefix(cls, size: int, name: str = "") -> Layout:
        """An LPM trie key of ``size`` bytes the kernel gives no type for: ``prefixlen`` and
        ``addr`` (bytes), read whole as one prefix (``198.51.100.0/24``)."""
        fields = (Field("prefixlen", 0, PREFIXLEN_SIZE, Kind.UINT),
                  Field("addr", PREFIXLEN_SIZE, size - PREFIXLEN_SIZE, Kind.BYTES))
        return cls(size, fields, name, is_prefix=True)

    @property
    def is_raw(self) -> bool:
        return self.fields == (Field("", 0, self.size, Kind.BYTES),)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name or 'layout'} has no field {name!r} (has {self.names})")

    def decode(self, data: bytes | bytearray | memoryview) -> dict[str, Value]:
        """Field name -> decoded value. ``data`` must be exactly ``size`` bytes."""
        if len(data) != self.size:
            raise ValueError(f"{self.name or 'layout'} is {self.size} bytes, got {len(data)}")
        return {f.name: f.decode(data) for f in self.fields}

    def encode(self, values: Mapping[str, Value], base: bytes | None = None) -> bytes:
        """Bytes with ``values`` written over ``base`` (zeros by default; padding kept)."""
        buf = bytearray(base if base is not None else bytes(self.size))
        if len(buf) != self.size:
            raise ValueError(f"{self.name or 'layout'} is {self.size} bytes, base has {len(buf)}")
        for name, value in values.items():
            self.field(name).encode_into(buf, value)
        return bytes(buf)
