"""Fixtures for the kernel-layer tests (pin directories, maps, objects: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from bpfsync.kernel.maps import Map
from bpfsync.kernel.objects import BpfObject


@pytest.fixture
def all_maps(load_object: Callable[..., BpfObject]) -> BpfObject:
    """tests/bpf/all_maps.bpf.o loaded: one BTF-typed map of each synced type."""
    return load_object("all_maps")


@pytest.fixture
def open_maps() -> Iterator[list[Map]]:
    """Append maps here to have them closed at teardown."""
    maps: list[Map] = []
    yield maps
    for m in maps:
        m.close()
