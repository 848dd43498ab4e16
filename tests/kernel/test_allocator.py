"""glibc's mmap threshold, pinned (agent/runtime.py): large blocks freed after a scan or a
batch go back to the kernel instead of staying in the heap."""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROGRAM = """
import sys
from bpfsync.kernel.allocator import pin_mmap_threshold

def rss_mb():
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS:")).split()[1]) / 1024

if sys.argv[1] == "pin":
    assert pin_mmap_threshold(128 * 1024)
del [bytearray(4 << 20)][0]  # a large block freed: glibc would now raise its threshold to 4 MiB
blocks, pins = [], []
for _ in range(200):  # 200 x 256 KiB, each followed by a small block that stays
    blocks.append(bytearray(256 << 10))
    pins.append(bytearray(1024))
before = rss_mb()
blocks.clear()
print(before - rss_mb())
"""


@pytest.mark.parametrize("pinned", [True, False])
def test_freed_large_blocks_are_returned_only_with_the_threshold_pinned(pinned: bool) -> None:
    out = subprocess.run([sys.executable, "-c", _PROGRAM, "pin" if pinned else "default"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    returned_mb = float(out.stdout)
    if pinned:
        assert returned_mb > 40, returned_mb  # 50 MB of blocks, mmap()ed and unmapped
    else:
        assert returned_mb < 10, returned_mb  # heap blocks between kept ones stay resident
