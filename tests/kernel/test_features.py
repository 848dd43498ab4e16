"""Feature probes: tracing support with a reason, kernel functions from BTF."""

from __future__ import annotations

import os
import platform
from importlib import resources

import pytest

from bpfsync.errors import PermissionDeniedError
from bpfsync.kernel.features import PROBE_OBJECT, function_exists, tracing_supported
from bpfsync.kernel.objects import BpfObject


def kernel_version() -> tuple[int, int]:
    major, minor = platform.release().split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def test_function_exists_reads_vmlinux_btf() -> None:
    assert function_exists("htab_map_update_elem")
    assert function_exists("array_map_update_elem")
    assert not function_exists("bpfsync_no_such_function")


def test_tracing_probe_gives_a_reason() -> None:
    ok, reason = tracing_supported()
    assert platform.release() in reason
    if ok:
        return
    # fentry/fexit exist since 5.5 with BTF: a refusal on a newer kernel must be an errno (a
    # policy), never "unsupported", or the probe itself is broken.
    if kernel_version() >= (5, 5) and os.path.exists("/sys/kernel/btf/vmlinux"):
        assert "EPERM" in reason or "EACCES" in reason, reason
        # and the probe's verdict matches loading the program ourselves
        probe = resources.files("bpfsync") / "bpf" / PROBE_OBJECT
        with (
            resources.as_file(probe) as path,
            BpfObject.open(path) as obj,
            pytest.raises(PermissionDeniedError),
        ):
            obj.load()
    assert tracing_supported() == (ok, reason)  # cached
