"""Run tests/vm/guest inside the kernel VM, booted once, and check what it reports.

The guest run prints ``BPFSYNC-GUEST-RESULT passed=N failed=N error=N skipped=N`` (from
guest/conftest.py). A VM that does not boot fails this test with its console log; nothing here
skips.
"""

from __future__ import annotations

import re

import pytest
from runner import ROOT, run

# no cache, no hypothesis database: the guest sees the host's filesystem read-only
GUEST_COMMAND = (
    f"{ROOT}/.venv/bin/python -m pytest tests/vm/guest -p no:cacheprovider "
    "-p no:hypothesispytest -v -rA"
)
GUEST_ENV = {"BPFSYNC_IN_VM": "1", "PYTHONDONTWRITEBYTECODE": "1"}
_RESULT = re.compile(r"BPFSYNC-GUEST-RESULT passed=(\d+) failed=(\d+) error=(\d+) skipped=(\d+)")


@pytest.mark.timeout(1200)
def test_guest_suite() -> None:
    result = run(GUEST_COMMAND, env=GUEST_ENV, timeout=1100)
    found = _RESULT.search(result.console)
    assert found, f"the guest printed no result line (exit {result.status}):\n{result.output}"
    passed, failed, errors, skipped = map(int, found.groups())
    summary = f"guest: {passed} passed, {failed} failed, {errors} errors, {skipped} skipped"
    print(f"{summary} in {result.seconds:.0f} s (boot included)")
    assert failed == 0 and errors == 0, f"{summary}\n{result.output}"
    assert skipped == 0, f"{summary}: guest tests must not skip\n{result.output}"
    assert passed > 0, f"{summary}\n{result.output}"
    assert result.status == 0, f"{summary} but pytest exited {result.status}\n{result.output}"
