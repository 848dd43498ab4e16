"""The VM runner's failure modes that need no boot: they must raise, never skip."""

from __future__ import annotations

import pytest
from runner import EXIT_MARKER, VmError, _script_output, run


def test_a_missing_kernel_fails_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BPFSYNC_VM_KERNEL", "/nonexistent/vmlinuz")
    with pytest.raises(VmError, match="make vm-kernel"):
        run("true")


def test_script_output_drops_kernel_messages_and_the_marker() -> None:
    console = f"[    1.234567] virtme: booting\nhello\n[   12.000001] x\n{EXIT_MARKER}0\nbye"
    assert _script_output(console) == "hello\nbye"
