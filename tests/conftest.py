"""Shared by every test directory: BPF objects from tests/bpf, BTF-less maps, pin directories.

Everything created is removed at teardown, also when the test fails. Needs root and the test
objects built by ``make bpf``.
"""

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

# Imported here, at a shallow stack: otherwise Hypothesis's pytest plugin first imports it from
# inside the terminal summary, where CPython 3.11.7's parser trips over the deep stack
# ("AST constructor recursion depth mismatch") in runs that select no Hypothesis test.
import hypothesis  # noqa: F401
import pytest

from bpfsync.kernel.info import MapFlags, MapType
from bpfsync.kernel.maps import Map
from bpfsync.kernel.objects import BpfObject

TESTS_BPF = Path(__file__).resolve().parent / "bpf"


def bpf_object_path(name: str) -> Path:
    path = TESTS_BPF / f"{name}.bpf.o"
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make bpf`")
    return path


@pytest.fixture
def pin_dir() -> Iterator[str]:
    """A fresh directory on bpffs; whatever is pinned in it is unpinned at teardown."""
    path = f"/sys/fs/bpf/bpfsync-test-{uuid.uuid4().hex[:12]}"
    os.mkdir(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_map(pin_dir: str) -> Iterator[Callable[..., Map]]:
    """``make_map(type, key_size, value_size, entries, name=...)``: a map without BTF (like
    bpftool makes them), pinned in ``pin_dir`` and opened. An ``lpm_trie`` is made with
    BPF_F_NO_PREALLOC, which the kernel requires of it."""
    opened: list[Map] = []

    def make(kind: str, key: int, value: int, entries: int, name: str = "bst_map") -> Map:
        map_type = MapType[kind.upper()]
        flags = MapFlags.NO_PREALLOC if map_type == MapType.LPM_TRIE else MapFlags.NONE
        m = Map.create(map_type, key, value, entries, name=name, flags=flags)
        m.pin(os.path.join(pin_dir, f"{name}-{len(opened)}"))
        opened.append(m)
        return m

    yield make
    for m in opened:
        m.close()


@pytest.fixture
def load_object() -> Iterator[Callable[..., BpfObject]]:
    """``load_object(name, load=True)``: tests/bpf/<name>.bpf.o opened (and loaded); closed at
    teardown."""
    objects: list[BpfObject] = []

    def load(name: str, load: bool = True) -> BpfObject:
        obj = BpfObject.open(bpf_object_path(name))
        objects.append(obj)
        if load:
            obj.load()
        return obj

    yield load
    for obj in objects:
        obj.close()
