"""The VM itself computes correctly: a canary for emulation bugs that would make other guest
tests fail at random (see GUEST_CPU in tests/vm/runner.py)."""

from __future__ import annotations

import numpy as np


def test_numpy_sorts_correctly_on_the_guest_cpu() -> None:
    rng = np.random.default_rng(7)
    for _ in range(20):
        a = rng.integers(0, 2**40, 1000, dtype=np.uint64)
        order = np.argsort(a)
        assert (a[order][1:] >= a[order][:-1]).all()
        assert (np.sort(a)[1:] >= np.sort(a)[:-1]).all()
