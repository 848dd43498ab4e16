"""Process-wide settings of the agent's interpreter and allocator, for a million live records.

* **Cyclic GC.** Its default (a young collection every 700 container allocations, the old
  generations soon after) walks millions of live records over and over, at a cost above that
  of decoding and merging them. The agent makes few reference cycles; refcounting frees the
  rest, so collections are made rare.
* **glibc's mmap threshold.** Large blocks (a scan's arrays, a batch's frames) are mmap()ed
  and handed back to the kernel when freed, but glibc raises the threshold to the size of the
  largest block freed so far (up to 32 MiB). After the first scan of a big map, every later
  scan would come from the heap, which keeps what is freed: a node would hold a scan's worth
  of memory more for good. Pinning the threshold keeps large blocks returnable, at the price
  of page faults on them.
"""

from __future__ import annotations

import gc

from bpfsync.kernel.allocator import pin_mmap_threshold

GC_THRESHOLDS = (100_000, 50, 100)
# 1 MiB: a scan's arrays of a large map (the memory that matters) are mmap()ed; a batch's
# dicts and frames (up to ~0.5 MB) still come from the heap, without page faults each time,
# which at glibc's own 128 KiB would be a measurable share of a busy agent's time.
MMAP_THRESHOLD = 1 << 20


def tune_process() -> bool:
    """Apply both settings; False if the allocator's could not be (not glibc)."""
    gc.set_threshold(*GC_THRESHOLDS)
    return pin_mmap_threshold(MMAP_THRESHOLD)
