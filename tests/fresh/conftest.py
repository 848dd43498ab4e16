"""tests/fresh: the fresh-machine check (test_fresh_root.py runs fresh-check.sh).

Inside a fresh check's root (its processes carry BPFSYNC_FRESH_RUN) the check is not collected,
rather than skipped: running it there would only nest the same check in a root of its own.
"""

import os

collect_ignore = ["test_fresh_root.py"] if os.environ.get("BPFSYNC_FRESH_RUN") else []
