"""Boot the test VM (virtme-ng, Debian's 6.1 kernel, TCG) and run one command inside it.

The host refuses fentry/fexit by policy, so everything that needs them runs here. The guest sees
the host's filesystem read-only (/tmp, /etc, /var... get throw-away overlays; ``rwdirs`` are
shared writable) and starts in ``cwd``, the repository by default.

virtme-ng copies the script's output to the console only with ``-v``; the console also carries
kernel messages, so the command's exit status travels as a marker line (``BPFSYNC-VM-EXIT=<n>``)
and its output is the console lines that are not printk lines.

A VM that does not boot, hangs or never prints the marker raises ``VmError`` carrying the whole
console log: a broken VM must fail the test run loudly, never skip it.

Only one VM runs at a time on this machine (a file lock): the host has two cores and TCG uses
all it gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VM_DIR = ROOT / ".cache" / "vm"
LOCK_PATH = Path("/tmp/bpfsync-vm.lock")
EXIT_MARKER = "BPFSYNC-VM-EXIT="
# TCG's "max" CPU without AVX2: with AVX2 advertised, numpy dispatches its sorts to AVX2 kernels
# that come out wrong under QEMU's emulation (np.argsort of 1000 uint64 misordered in 35 of 50
# runs, measured 2026-11), which silently breaks everything that sorts (the poll watcher's diff).
# guest/test_vm.py checks that the guest sorts correctly.
GUEST_CPU = "max,avx2=off"
_PRINTK = re.compile(r"^\[\s*\d+\.\d+\] ")
_EXIT = re.compile(re.escape(EXIT_MARKER) + r"(\d+)")


class VmError(RuntimeError):
    """The VM could not run the command; ``console`` holds everything it printed."""

    def __init__(self, message: str, console: str) -> None:
        tail = "\n".join(console.splitlines()[-80:])
        super().__init__(f"{message}\n--- VM console (last 80 lines) ---\n{tail}")
        self.console = console


@dataclass(frozen=True)
class VmResult:
    status: int  # the command's exit status inside the guest
    output: str  # the command's output (console minus kernel messages)
    console: str  # everything the VM printed
    seconds: float  # wall time, boot included


def kernel_image() -> Path:
    """The kernel `make vm-kernel` unpacked; fails with the fix when it is missing."""
    image = Path(os.environ.get("BPFSYNC_VM_KERNEL", VM_DIR / "vmlinuz"))
    if not image.exists():
        raise VmError(f"no VM kernel at {image}: run `make vm-kernel` first", "")
    return image


def vng_path() -> str:
    """PATH with the virtualenv's bin first: `vng` runs `virtme-run` from there."""
    venv_bin = str(ROOT / ".venv" / "bin")
    return f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}"


def run(
    command: str,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 900.0,
    cpus: int = 2,
    memory: str = "2G",
    rwdirs: Sequence[str] = (),
    cwd: Path = ROOT,
) -> VmResult:
    """Boot the VM, run ``command`` with ``sh -c`` in ``cwd``, and return its status and output."""
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env or {}).items())
    script = f"cd {shlex.quote(str(cwd))} && {exports + ' ' if exports else ''}{command}"
    # The marker also goes through printk (/dev/kmsg): the console's tty output may not be
    # flushed when the VM powers off right after the command, printk is.
    guest = (
        f"sh -c {shlex.quote(script)}; rc=$?; echo {EXIT_MARKER}$rc; "
        f"echo {EXIT_MARKER}$rc > /dev/kmsg; sleep 1"
    )
    argv = [
        "vng", "-v", "-r", str(kernel_image()), "--disable-kvm",
        "--memory", memory, "--cpus", str(cpus), "--cwd", str(cwd),
        f"--qemu-opts=-cpu {GUEST_CPU}",
    ]  # fmt: skip
    for d in rwdirs:
        argv += ["--rwdir", d]
    argv += ["--exec", guest]
    host_env = dict(os.environ, PATH=vng_path())
    start = time.monotonic()
    with _vm_lock():
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=host_env,
                start_new_session=True,  # so a timeout can kill qemu along with vng
            )
        except FileNotFoundError as e:
            raise VmError(f"cannot start vng ({e}): run `make venv` (virtme-ng)", "") from e
        try:
            raw, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raw, _ = proc.communicate()
            console = raw.decode(errors="replace")
            raise VmError(f"VM did not finish within {timeout:.0f} s", console) from None
    console = raw.decode(errors="replace")
    seconds = time.monotonic() - start
    found = _EXIT.findall(console)
    if not found:
        raise VmError(
            f"VM printed no exit marker (vng exited {proc.returncode}): it did not boot, "
            "crashed, or the command killed it",
            console,
        )
    return VmResult(int(found[-1]), _script_output(console), console, seconds)


def _script_output(console: str) -> str:
    lines = []
    for line in console.splitlines():
        if _PRINTK.match(line) or line.startswith(EXIT_MARKER):
            continue
        lines.append(line)
    return "\n".join(lines)


@contextlib.contextmanager
def _vm_lock() -> Iterator[None]:
    with open(LOCK_PATH, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


if __name__ == "__main__":
    import sys

    result = run(" ".join(shlex.quote(a) for a in sys.argv[1:]) or "uname -a")
    print(result.output)
    print(f"[vm] exit {result.status} after {result.seconds:.1f} s")
    sys.exit(result.status)
