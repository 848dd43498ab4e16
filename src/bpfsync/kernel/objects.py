"""A compiled BPF ELF object (``BpfObject``): open it as a spec, adjust, load, attach, get its maps.

Spec vs. object, as in cilium/ebpf: ``BpfObject.open(path)`` only parses the ELF. Its programs
(``Program``) and maps (``MapSpec``) can then be adjusted: switch a program off with
``set_autoload(False)`` (one refused program makes libbpf fail the whole load), size a map, set a
``.rodata`` initial value. ``load()`` creates the kernel objects; a rejection raises
``VerifierError`` carrying the verifier log, ``PermissionDeniedError`` for EPERM (on some kernels a
policy refuses fentry/fexit outright) or ``NotSupportedError``. After load, ``program(name)``
attaches (``attach()`` for tracing/tp_btf/raw_tp sections, ``attach_xdp(ifindex)``) and test-runs,
and ``map(name)`` returns an independent ``Map`` on a duplicated fd, valid after ``close()``.

    with BpfObject.open("trace.bpf.o") as obj:
        obj.program("on_update").set_autoload(False)
        obj.load()
        link = obj.program("on_delete").attach()
        events = obj.map("events")
"""

from __future__ import annotations

import errno
import logging
import os
import re
from typing import NamedTuple

from bpfsync.errors import (
    KernelError,
    NotFoundError,
    PermissionDeniedError,
    VerifierError,
    kernel_error,
)
from bpfsync.kernel import _libbpf
from bpfsync.kernel._closing import Closing
from bpfsync.kernel.info import MapType, ProgramInfo
from bpfsync.kernel.links import Link
from bpfsync.kernel.maps import Map

log = logging.getLogger("bpfsync.kernel")

_LOG_RE = re.compile(r"-- BEGIN PROG LOAD LOG --\n(.*?)-- END PROG LOAD LOG --", re.S)
_FAILED_PROG_RE = re.compile(r"prog '([^']+)': (?:BPF program load failed|failed to load)")


class RunResult(NamedTuple):
    """Result of BPF_PROG_TEST_RUN: the program's return value and the packet it left."""

    retval: int
    data: bytes


class Program:
    """One program of a ``BpfObject``: a spec before ``load()``, a kernel program after."""

    def __init__(self, obj: BpfObject, ptr: _libbpf.Ptr) -> None:
        self._obj = obj
        self._ptr = ptr
        self.name = _libbpf.program_name(ptr)
        self.section = _libbpf.program_section(ptr)

    @property
    def autoload(self) -> bool:
        return _libbpf.program_autoload(self._live())

    def set_autoload(self, autoload: bool) -> None:
        """Whether ``load()`` loads this program (only before load)."""
        self._obj._require(loaded=False, op=f"set_autoload({self.name})")
        _libbpf.program_set_autoload(self._live(), autoload)

    @property
    def prog_type(self) -> int:
        """``enum bpf_prog_type`` (from the section name until load)."""
        return _libbpf.program_type(self._live())

    @property
    def fd(self) -> int:
        """The loaded program's fd (owned by the object)."""
        self._obj._require(loaded=True, op=f"fd of {self.name}")
        fd = _libbpf.program_fd(self._live())
        if fd < 0:
            raise ValueError(f"program {self.name!r} was not loaded (autoload off)")
        return fd

    def info(self) -> ProgramInfo:
        """The loaded program's id, run counters and recursion misses, read now."""
        return ProgramInfo.from_fd(self.fd)

    def attach(self) -> Link:
        """Attach where the section name says (fentry/fexit, tp_btf, raw_tp, tracepoint...)."""
        self._loaded()
        where = f"{self.name} ({self.section})"
        return Link(_libbpf.program_attach(self._live(), f"attach {where}"), where)

    def attach_xdp(self, ifindex: int) -> Link:
        """Attach an XDP program to an interface through a BPF link (detached on destroy)."""
        self._loaded()
        where = f"{self.name} (xdp on ifindex {ifindex})"
        return Link(_libbpf.program_attach_xdp(self._live(), ifindex, f"attach {where}"), where)

    def test_run(self, data: bytes, repeat: int = 1, out_size: int | None = None) -> RunResult:
        """Run the program ``repeat`` times on ``data`` (BPF_PROG_TEST_RUN)."""
        size = out_size if out_size is not None else len(data) + 512  # room for head/tail growth
        retval, out, _ = _libbpf.prog_test_run(self.fd, data, size, max(1, repeat))
        return RunResult(retval, out)

    def _live(self) -> _libbpf.Ptr:
        self._obj._live()
        return self._ptr

    def _loaded(self) -> None:
        """Raise the error ``fd`` gives when this program is not loaded."""
        _ = self.fd

    def __repr__(self) -> str:
        return f"<Program {self.name} ({self.section})>"


class MapSpec:
    """One map of a ``BpfObject`` as libbpf sees it; size it before ``load()``."""

    def __init__(self, obj: BpfObject, ptr: _libbpf.Ptr) -> None:
        self._obj = obj
        self._ptr = ptr
        self.name = _libbpf.map_name(ptr)

    @property
    def type(self) -> MapType:
        return MapType(_libbpf.map_type(self._live()))

    @property
    def key_size(self) -> int:
        return _libbpf.map_key_size(self._live())

    @property
    def value_size(self) -> int:
        return _libbpf.map_value_size(self._live())

    @property
    def max_entries(self) -> int:
        return _libbpf.map_max_entries(self._live())

    def set_max_entries(self, n: int) -> None:
        self._obj._require(loaded=False, op=f"set_max_entries({self.name})")
        _libbpf.map_set_max_entries(self._live(), n)

    @property
    def initial_value(self) -> bytes | None:
        """Contents of a global-data map (.data/.rodata/.bss), None for other maps."""
        return _libbpf.map_initial_value(self._live())

    def set_initial_value(self, data: bytes) -> None:
        """Replace a global-data map's contents (e.g. ``.rodata`` constants) before load."""
        self._obj._require(loaded=False, op=f"set_initial_value({self.name})")
        _libbpf.map_set_initial_value(self._live(), data)

    def _live(self) -> _libbpf.Ptr:
        self._obj._live()
        return self._ptr

    def __repr__(self) -> str:
        return f"<MapSpec {self.name}>"


class BpfObject(Closing):
    """A BPF ELF object opened with libbpf. Close it (or use ``with``) to free kernel objects."""

    def __init__(self, ptr: _libbpf.Ptr, path: str) -> None:
        self._ptr: _libbpf.Ptr | None = ptr
        self.path = path
        self.loaded = False
        self.programs = {p.name: p for p in map(self._program, _libbpf.object_programs(ptr))}
        self.maps = {m.name: m for m in map(self._map_spec, _libbpf.object_maps(ptr))}

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> BpfObject:
        """Parse the ELF at ``path``; nothing is created in the kernel yet."""
        path = os.fspath(path)
        with _libbpf.capture_output() as out:
            try:
                ptr = _libbpf.object_open_file(path)
            except KernelError as e:
                raise _with_output(e, out) from None
        return cls(ptr, path)

    def _program(self, ptr: _libbpf.Ptr) -> Program:
        return Program(self, ptr)

    def _map_spec(self, ptr: _libbpf.Ptr) -> MapSpec:
        return MapSpec(self, ptr)

    def program(self, name: str) -> Program:
        try:
            return self.programs[name]
        except KeyError:
            raise NotFoundError(
                f"{self.path}: no program {name!r} (has: {', '.join(self.programs)})",
                errno.ENOENT,
            ) from None

    def map_spec(self, name: str) -> MapSpec:
        """A map by name; global data also by section (``.rodata`` for ``obj_name.rodata``)."""
        if name in self.maps:
            return self.maps[name]
        ptr = _libbpf.object_find_map(self._live(), name)  # knows the section names
        for spec in self.maps.values():
            if spec._ptr == ptr:
                return spec
        raise NotFoundError(
            f"{self.path}: no map {name!r} (has: {', '.join(self.maps)})", errno.ENOENT
        )

    def load(self) -> None:
        """Create the maps and load the programs whose autoload is on."""
        self._require(loaded=False, op="load")
        with _libbpf.capture_output() as out:
            ret = _libbpf.object_load(self._live())
        if ret < 0:
            raise _load_error(ret, self.path, out)
        for level, text in out:  # a successful load may still have had something to say
            log.log(
                logging.WARNING if level == _libbpf.LIBBPF_WARN else logging.DEBUG,
                "%s: %s",
                self.path,
                text.rstrip(),
            )
        self.loaded = True

    def map(self, name: str) -> Map:
        """A ``Map`` for a loaded map, on its own (duplicated) fd: close it independently."""
        self._require(loaded=True, op=f"map({name})")
        fd = _libbpf.map_fd(self.map_spec(name)._live())
        if fd < 0:
            raise kernel_error(fd, f"map {name!r} of {self.path}")
        return Map(os.dup(fd))

    def close(self) -> None:
        """Free the object: its programs and maps go unless pinned, linked or opened elsewhere."""
        ptr, self._ptr = self._ptr, None
        if ptr is not None:
            _libbpf.object_close(ptr)

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def _live(self) -> _libbpf.Ptr:
        if self._ptr is None:
            raise ValueError(f"BPF object {self.path} is closed")
        return self._ptr

    def _require(self, *, loaded: bool, op: str) -> None:
        if self.loaded != loaded:
            when = "after" if loaded else "before"
            raise ValueError(f"{op} is only possible {when} load() ({self.path})")

    def __del__(self) -> None:
        if getattr(self, "_ptr", None) is not None:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "loaded" if self.loaded else "opened"
        return f"<BpfObject {self.path} {state}>"


def _libbpf_text(out: list[tuple[int, str]]) -> str:
    return "".join(text for _, text in out)


def _with_output(err: KernelError, out: list[tuple[int, str]]) -> KernelError:
    text = _libbpf_text(out).strip()
    if not text:
        return err
    return type(err)(f"{err}\nlibbpf: {text}", err.errno)


def _load_error(ret: int, path: str, out: list[tuple[int, str]]) -> KernelError:
    """Turn a failed bpf_object__load into the error that says why, with the verifier log."""
    text = _libbpf_text(out)
    logs = [m.group(1) for m in _LOG_RE.finditer(text)]
    verifier_log = "\n".join(part.strip("\n") for part in logs if part.strip())
    failed = _FAILED_PROG_RE.search(text)
    what = f"load {path}" + (f" (program {failed.group(1)!r})" if failed else "")
    base = kernel_error(ret, what)
    if isinstance(base, PermissionDeniedError) and base.errno == errno.EPERM:
        # libbpf suggests raising RLIMIT_MEMLOCK here; on memcg-accounted kernels (5.11+) EPERM
        # means missing capabilities or a security policy refusing this program type.
        return PermissionDeniedError(
            f"{base}: the kernel refused this program type "
            "(missing CAP_BPF/CAP_PERFMON, or a security policy)",
            base.errno,
        )
    if verifier_log:
        return VerifierError(f"{what}: rejected by the verifier", abs(ret), verifier_log)
    return _with_output(base, out)
