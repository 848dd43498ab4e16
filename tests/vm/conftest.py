"""tests/vm: the host side boots the kernel VM (test_guest_suite.py); guest/ runs inside it.

Outside the VM the guest tests are not collected at all (rather than skipped): the host refuses
the fexit programs they need, and test_guest_suite.py runs them where they work.
"""

import os

IN_VM = os.environ.get("BPFSYNC_IN_VM") == "1"

collect_ignore = [] if IN_VM else ["guest"]
