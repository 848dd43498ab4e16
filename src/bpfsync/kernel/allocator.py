"""The C library's allocator, for the agent's process-wide settings (agent/runtime.py): this
layer is where bpfsync reaches C through ctypes."""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("bpfsync.kernel")

_M_MMAP_THRESHOLD = -3  # <malloc.h>


def pin_mmap_threshold(size: int) -> bool:
    """glibc ``mallopt(M_MMAP_THRESHOLD, size)``: blocks of ``size`` bytes or more are mmap()ed,
    and the threshold no longer moves. False where there is no mallopt (musl) or glibc refuses
    the value; the allocator is then left as it was."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        log.info("no glibc mallopt: the allocator's mmap threshold is left as is")
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, size) != 1:
        log.warning("mallopt(M_MMAP_THRESHOLD, %d) refused", size)
        return False
    return True
