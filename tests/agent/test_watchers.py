"""The agent's choice of watcher on this host (fexit refused, BTF tracepoints allowed)."""

from __future__ import annotations

from collections.abc import Callable

from bpfsync.agent.config import WatchConfig
from bpfsync.agent.watchers import open_watcher
from bpfsync.kernel.maps import Map


def test_auto_uses_the_syscall_hooks_unless_they_are_switched_off(
    make_map: Callable[..., Map],
) -> None:
    m = make_map("hash", 4, 8, 16)
    m.update(b"\1\0\0\0", bytes(8))
    hooked, first = open_watcher(WatchConfig(), {"m": m})
    try:
        assert hooked.mode == "syscall+poll"
        assert list(first["m"]) == [(b"\1\0\0\0", bytes(8))]  # the seed
    finally:
        hooked.close()
    polled, _ = open_watcher(WatchConfig(syscall_hooks=False), {"m": m})
    try:
        assert polled.mode == "poll"  # fexit refused and the bpf(2) hooks not wanted
    finally:
        polled.close()
