"""Process-wide settings of the agent's interpreter and allocator, for a million live records.

* **Cyclic GC.** Its default (a young collection every 700 container allocations, the old
  generations soon after) walks millions of live records over and over: it cost more than
  decoding and merging themselves (per record at 300k: decode 3.2 -> 0.9 us, merge 4.1 -> 2.4
  us, seed 2.6 -> 1.8 us). The agent makes few reference cycles; refcounting frees the rest.
* **glibc's mmap threshold.** Large blocks (a scan's arrays, a batch's frames) are mmap()ed
  and handed back to the kernel when freed, but glibc raises the threshold to the size of the
  largest block freed so far (up to 32 MiB). After the first scan of a 1M-entry map, every
  later scan came from the heap, which keeps what is freed: ~100 MB more RSS on a node that
  had just caught up (424 -> 321 MB; at rest 306 -> 203 MB). Pinning the threshold keeps
  large blocks returnable; page faults on them cost ~0.5 ms per 8 MB array.
"""

from __future__ import annotations

import gc

from bpfsync.kernel.allocator import pin_mmap_threshold

GC_THRESHOLDS = (100_000, 50, 100)
# 1 MiB: a scan's arrays of a large map (the memory that matters) are mmap()ed; a batch's
# dicts and frames (up to ~0.5 MB) still come from the heap, without page faults each time.
# At glibc's own 128 KiB, those faults cost 3% of bench/run.py's 250k/s run and 17% of the
# 50k/s run after it.
MMAP_THRESHOLD = 1 << 20


def tune_process() -> bool:
    """Apply both settings; False if the allocator's could not be (not glibc)."""
    gc.set_threshold(*GC_THRESHOLDS)
    return pin_mmap_threshold(MMAP_THRESHOLD)
