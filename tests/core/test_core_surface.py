"""The core's public surface is pinned: changing it is a decision, not an accident."""

from __future__ import annotations

import bpfsync.core


def test_exported_names() -> None:
    assert sorted(bpfsync.core.__all__) == sorted(
        [
            "DEFAULT_BUCKETS",
            "DEFAULT_MAX_DRIFT_NS",
            "LWW",
            "Companion",
            "Ack",
            "Answered",
            "ApplyResult",
            "Batch",
            "ClockDriftError",
            "Digest",
            "FieldPolicy",
            "FieldRule",
            "Hello",
            "HybridClock",
            "MapSchema",
            "Message",
            "Outbox",
            "PeerSession",
            "Policy",
            "Pull",
            "Record",
            "Replica",
            "Stamp",
            "Write",
            "diff",
            "is_seed",
            "map_mismatches",
            "policy_for",
            "seed_stamp",
            "split",
        ]
    )
    for name in bpfsync.core.__all__:
        assert getattr(bpfsync.core, name) is not None


def test_the_core_imports_no_io() -> None:
    import subprocess
    import sys

    # numpy (frozen buckets' key search, frozen.py) is computation, but loads ctypes for its
    # own use: what counts is what the core itself adds to what numpy loads
    code = (
        "import sys, numpy; before = set(sys.modules); import bpfsync.core;"
        " bad = {'grpc', 'socket', 'ctypes', 'asyncio', 'subprocess', 'threading',"
        " 'bpfsync.kernel', 'bpfsync.transport', 'bpfsync.watch'} & (set(sys.modules) - before);"
        " print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
