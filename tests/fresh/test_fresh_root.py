"""A fresh machine passes: tests/fresh/fresh-check.sh makes a new Debian 12 root (mmdebstrap),
clones the committed HEAD into it and runs `make setup vm-kernel`, a smoke `make test`, one boot of
the test VM and `make demo` there, with nothing a developer machine accumulated.

Slow (2-3 minutes with the base tarball cached in .cache/fresh/), about 4 GB of disk while it
runs; needs root and the network (Debian's mirror, PyPI). A root that cannot be made, or any phase
that fails, fails this test with the script's output: nothing here skips.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "fresh-check.sh"
TIMEOUT = 1500.0  # s; a passing run takes ~140 s here, the first one (no cached base) ~30 s more


def _tail(output: str, lines: int = 150) -> str:
    return "\n".join(output.splitlines()[-lines:])


@pytest.mark.timeout(TIMEOUT + 300)  # pytest's default 300 s is far too short for this one
def test_a_fresh_root_passes_setup_test_and_demo() -> None:
    with subprocess.Popen(
        ["bash", str(SCRIPT)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        try:
            output, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            # SIGTERM, not SIGKILL: the script's trap kills what it started and removes the root.
            proc.terminate()
            output, _ = proc.communicate(timeout=300)
            pytest.fail(f"fresh-check did not finish within {TIMEOUT:.0f} s:\n{_tail(output)}")
        finally:
            if proc.poll() is None:  # interrupted (^C, pytest-timeout): let the script clean up
                proc.terminate()
                proc.communicate(timeout=300)
    if "fresh-check: phases" in output:  # the time of each phase, in the report with -rA / -s
        print(output[output.rfind("fresh-check: phases") :])
    assert proc.returncode == 0 and "\nfresh-check: PASS" in output, (
        f"fresh-check exited {proc.returncode}:\n{_tail(output)}"
    )
