"""Feature probes: can this kernel trace map writes, and which kernel functions does it have?

``tracing_supported()`` loads and attaches the smallest fexit program (``bpf/probe_fexit.bpf.c``)
on ``htab_map_update_elem`` and returns ``(ok, reason)``; the reason says what failed and why in
words an operator can act on (no BTF, a policy refusing fentry/fexit with EPERM, ...). The answer
is cached per process. ``function_exists(name)`` looks a FUNC up in the running kernel's BTF;
``preempt_count_in_btf()`` whether the tracer can tell interrupt context from it.
"""

from __future__ import annotations

import errno
import functools
import os
import platform
from importlib import resources

from bpfsync.errors import KernelError, NotSupportedError, PermissionDeniedError
from bpfsync.kernel.btf import KIND_FUNC, KIND_VAR, vmlinux
from bpfsync.kernel.objects import BpfObject

VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
PROBE_TARGET = "htab_map_update_elem"
PROBE_OBJECT = "probe_fexit.bpf.o"
_PROBE_PROGRAM = "probe"


def function_exists(name: str) -> bool:
    """Whether the running kernel has a function ``name`` (a FUNC in vmlinux BTF)."""
    if not os.path.exists(VMLINUX_BTF):
        return False
    return vmlinux().find(name, KIND_FUNC) is not None


# Per-CPU variables that hold the preempt count (6.1/6.15+, 6.2-6.14): without one of them the
# tracer's kernel side cannot tell interrupt context, so it could not suppress own writes safely.
_PREEMPT_COUNT_VARS = ("__preempt_count", "pcpu_hot")


def preempt_count_in_btf() -> bool:
    """Whether the running kernel's BTF names a per-CPU preempt count the tracer can read."""
    if not os.path.exists(VMLINUX_BTF):
        return False
    btf = vmlinux()
    return any(btf.find(var, KIND_VAR) is not None for var in _PREEMPT_COUNT_VARS)


def lockdown_mode() -> str:
    """The active kernel lockdown mode ('none', 'integrity', 'confidentiality'), or ''."""
    try:
        with open("/sys/kernel/security/lockdown") as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


@functools.cache
def tracing_supported() -> tuple[bool, str]:
    """Whether fexit programs on map-update functions load and attach here, and why not."""
    kernel = f"kernel {platform.release()}"
    if not os.path.exists(VMLINUX_BTF):
        return False, f"{kernel} has no BTF ({VMLINUX_BTF} missing; needs CONFIG_DEBUG_INFO_BTF)"
    if not function_exists(PROBE_TARGET):
        return False, f"{kernel} has no function {PROBE_TARGET} to attach fexit programs to"
    probe = resources.files("bpfsync") / "bpf" / PROBE_OBJECT
    if not probe.is_file():
        return False, f"the probe object {PROBE_OBJECT} is not built (run `make bpf`)"
    try:
        with resources.as_file(probe) as path, BpfObject.open(path) as obj:
            obj.load()
            obj.program(_PROBE_PROGRAM).attach().destroy()
    except PermissionDeniedError as e:
        lockdown = lockdown_mode()
        mode = f", lockdown {lockdown}" if lockdown else ""
        return False, (
            f"{kernel} refuses fexit programs: BPF_PROG_LOAD failed with "
            f"{errno.errorcode.get(e.errno, e.errno)} (a kernel security policy or missing "
            f"CAP_BPF/CAP_PERFMON forbids tracing programs{mode})"
        )
    except NotSupportedError as e:
        return False, f"{kernel} does not support fexit programs: {e}"
    except KernelError as e:
        name = errno.errorcode.get(e.errno, str(e.errno))
        return False, f"{kernel}: the fexit probe failed with {name}: {e}"
    return True, f"{kernel} loads and attaches fexit programs"
