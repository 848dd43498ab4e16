"""deploy/image: the agent's container image, run for real.

deploy/image/build.sh (what ``make image`` runs) builds localhost/bpfsync:<version>: seconds when
nothing changed, about a minute from nothing. Then three containers of it, each an agent with the
host's network and pid namespaces, the host's /sys/fs/bpf and only the capabilities
deploy/image/README.md names, sync three maps this process made and pinned
(``bpfsync.demo.cluster``, mutual TLS). The host writes into one map and the two others must
converge, then one write the other way: real kernel maps, real agents in containers. A build that
fails fails the test; nothing here skips.

Everything is named per test run (containers ``bpfsync-test-<run>-<node>``, their state volumes
``...-state``, pins under /sys/fs/bpf/bpfsync-image-<random>/, logs in /tmp) and removed in a
``finally`` whatever happened; the containers also run with ``--rm``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import tomllib
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from bpfsync.demo.cluster import KEY, Cluster, Node, session, wait_for

ROOT = Path(__file__).resolve().parents[2]
IMAGE_DIR = ROOT / "deploy" / "image"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = os.environ.get("BPFSYNC_IMAGE", f"localhost/bpfsync:{VERSION}")
# The set deploy/image/README.md gives, and why: CAP_SYS_ADMIN to read the maps' BTF by id (and,
# with Debian 12's libbpf and podman, to load the tracer and pass the default seccomp profile);
# CAP_BPF and CAP_PERFMON, which it implies today, for what they will cover alone once it can go.
CAPS = ("CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN")
# our podman settings (runc, no default ulimits), as build.sh uses them
ENV = {**os.environ, "CONTAINERS_CONF": str(IMAGE_DIR / "containers.conf")}
PODMAN = ("podman", "--runtime", "runc")


def podman(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PODMAN, *args], env=ENV, capture_output=True, text=True,
                          check=check, timeout=120)


class ContainerNode(Node):
    """A demo node whose map this process makes and pins, and whose agent runs in a container
    of the image: ``bpfsync ARGS`` as the container's command, its output in the node's log."""

    def __init__(self, name: str, root: Path, port: int, http_port: int, run_id: str) -> None:
        super().__init__(name, root, port, http_port)
        self.container = f"bpfsync-test-{run_id}-{name}"
        self.volume = f"{self.container}-state"

    def podman_run(self, args: Sequence[str]) -> list[str]:
        mounts = ["-v", "/sys/fs/bpf:/sys/fs/bpf", "-v", f"{self.volume}:/var/lib/bpfsync"]
        if self.tls is not None:  # the cluster's certificates, at the paths the command names
            mounts += ["-v", f"{self.tls[0].parent}:{self.tls[0].parent}:ro"]
        return [
            *PODMAN, "run", "--rm", "--name", self.container,
            # the agents meet each other and the host on loopback; the host's pid namespace
            # because the tracer knows the agent's own writes by its pid as the kernel sees it
            "--network", "host", "--pid", "host",
            "--cap-drop", "all", *[arg for cap in CAPS for arg in ("--cap-add", cap)],
            "--security-opt", "no-new-privileges", "--read-only",
            *mounts, IMAGE, *args,
        ]

    def spawn(self, args: Sequence[str]) -> None:
        if self.running:
            raise RuntimeError(f"agent {self.name} is already running")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.podman_run(args), env=ENV, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)

    def remove(self) -> None:
        """The container (if the agent did not stop with its podman client) and its volume."""
        podman("rm", "--force", "--ignore", "--time", "5", self.container, check=False)
        podman("volume", "rm", "--force", self.volume, check=False)


def build_image() -> float:
    """deploy/image/build.sh, as ``make image`` runs it (the test suite's set-up has built the
    BPF objects and gRPC code); its wall time. A failed build fails the test."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run(["bash", str(IMAGE_DIR / "build.sh")], capture_output=True,
                              text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"building the image took over 900 s: {e.stdout!r}")
    if proc.returncode != 0:
        pytest.fail(f"building the image failed (exit {proc.returncode}):\n"
                    f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return time.monotonic() - t0


def ours(kind: str, run_id: str) -> list[str]:
    """This run's containers (kind "ps") or volumes (kind "volume"), by name."""
    args = ("ps", "--all") if kind == "ps" else ("volume", "ls")
    names = podman(*args, "--format", "{{.Names}}" if kind == "ps" else "{{.Name}}").stdout
    return [n for n in names.split() if n.startswith(f"bpfsync-test-{run_id}-")]


@pytest.fixture
def run_id() -> Iterator[str]:
    """A name for this run's containers and volumes; any of them still there at teardown (the
    test failed before its own cleanup) is removed."""
    run_id = uuid.uuid4().hex[:8]
    yield run_id
    for name in ours("ps", run_id):
        podman("rm", "--force", "--ignore", "--time", "5", name, check=False)
    for name in ours("volume", run_id):
        podman("volume", "rm", "--force", name, check=False)


def logs(cluster: Cluster) -> str:
    return "\n".join(f"--- agent {n.name}:\n{n.log()[-3000:]}" for n in cluster)


def status(node: Node) -> dict[str, Any]:
    st = node.status()
    assert st is not None, f"agent {node.name} does not answer /status"
    return st


def test_three_agents_in_containers_converge(run_id: str) -> None:
    assert os.geteuid() == 0, "needs root: podman, pinned maps"
    build_s = build_image()
    config = json.loads(podman("image", "inspect", IMAGE).stdout)[0]["Config"]
    assert config["Entrypoint"] == ["/opt/bpfsync/bin/bpfsync"], config
    assert "/var/lib/bpfsync" in (config.get("Volumes") or {}), config

    def factory(name: str, root: Path, port: int, http_port: int) -> Node:
        return ContainerNode(name, root, port, http_port, run_id)

    cluster = Cluster(("a", "b", "c"), tag="image", tls=True, factory=factory)
    try:
        t0 = time.monotonic()
        cluster.start()
        assert cluster.wait_ready(60), f"agents not ready within 60 s:\n{logs(cluster)}"
        assert cluster.wait_linked(30), f"agents not linked within 30 s:\n{logs(cluster)}"
        started_s = time.monotonic() - t0
        for node in cluster:
            # the tracer loaded in the container (polling alone would mean a capability short)
            assert status(node)["watch"] != "poll", f"{node.name} polls only:\n{logs(cluster)}"

        a, b, c = cluster["a"], cluster["b"], cluster["c"]
        # from the host into a's map: user-space updates, a BPF program's write, a delete
        for k in range(200):
            a.put(k, session(k))
        a.bpf_put(1000, session(1000))
        a.delete(7)
        want = {KEY.pack(k): session(k) for k in [*range(200), 1000] if k != 7}
        t1 = time.monotonic()
        ok = wait_for(lambda: b.content() == want and c.content() == want, 30, every=0.1)
        assert ok, (f"b and c did not converge on a's writes within 30 s: {len(b.content())} "
                    f"and {len(c.content())} entries of {len(want)}\n{logs(cluster)}")
        # In the host's pid namespace the tracer knows the agent's own writes: none of those
        # b and c applied comes back as a report (in a pid namespace of its own, every one
        # does). /status is refreshed every tick: wait for it to show the applies first.
        def stats(node: Node) -> dict[str, Any]:
            maps: list[dict[str, Any]] = status(node)["maps"]
            return maps[0]

        shown = wait_for(lambda: all(stats(n)["applied"] >= len(want) for n in (b, c)), 10)
        assert shown, f"/status of b, c: {stats(b)}, {stats(c)}"
        assert stats(b)["reported"] == 0 and stats(c)["reported"] == 0, (stats(b), stats(c))
        # and the other way: a write into c's map reaches a and b
        c.put(5000, session(5000))
        want[KEY.pack(5000)] = session(5000)
        ok = wait_for(lambda: a.content() == want and b.content() == want, 30, every=0.1)
        assert ok, f"c's write did not reach a and b within 30 s\n{logs(cluster)}"
        converged_s = time.monotonic() - t1
        for node in cluster:
            assert node.running, f"agent {node.name} exited:\n{logs(cluster)}"
        print(f"image build {build_s:.1f} s; 3 agents ready and linked in {started_s:.1f} s; "
              f"converged both ways in {converged_s:.1f} s")
    finally:
        try:
            for node in cluster:
                node.stop()
        finally:
            for node in cluster:
                node.remove()
                node.log_path.unlink(missing_ok=True)
            cluster.close()
    assert not cluster.root.exists()
    assert not ours("ps", run_id) and not ours("volume", run_id)
