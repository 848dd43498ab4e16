"""`bpfsync run`'s transport flags into the config the agent gets, alone and over a --config
file, checked without starting an agent (run_agent replaced, as tests/deploy does)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bpfsync.agent import daemon
from bpfsync.agent.config import AgentConfig
from bpfsync.cli.main import app

BASE = ["run", "--node-id", "a", "--map", "/sys/fs/bpf/app/m", "--no-state"]
NATS = ["--transport", "nats", "--allow-node", "b", "--allow-node", "c"]


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[AgentConfig]:
    """The configs `run` hands to the agent."""
    configs: list[AgentConfig] = []
    monkeypatch.setattr(daemon, "run_agent", lambda cfg: configs.append(cfg) or 0)
    return configs


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(app, [*BASE, *args])
    return res.exit_code, res.output


def test_nats_from_flags_alone(taken: list[AgentConfig]) -> None:
    code, out = run(*NATS, "--nats", "nats://10.0.0.5:4222", "--nats", "tls://nats-2.example:4222",
                    "--nats-cluster", "edge-eu", "--nats-creds", "/etc/bpfsync/nats.creds",
                    "--listen", "0.0.0.0:7001")  # fmt: skip
    assert code == 0, out
    (cfg,) = taken
    assert cfg.transport == "nats" and cfg.nats is not None
    assert cfg.nats.servers == ("nats://10.0.0.5:4222", "tls://nats-2.example:4222")
    assert cfg.nats.cluster == "edge-eu"
    assert cfg.nats.creds == Path("/etc/bpfsync/nats.creds")
    assert cfg.members == frozenset({"a", "b", "c"})


def test_the_default_transport_is_the_mesh(taken: list[AgentConfig]) -> None:
    code, out = run("--peer", "127.0.0.1:7002")
    assert code == 0, out
    assert (taken[0].transport, taken[0].nats) == ("grpc", None)


def test_nats_flags_over_a_file(taken: list[AgentConfig], tmp_path: Path) -> None:
    """The servers and TLS in a shared file, a node's own credentials by flag; --nats replaces
    the file's servers, as --peer replaces its peers."""
    shared = tmp_path / "bpfsync.yaml"
    shared.write_text(yaml.safe_dump({
        "transport": "nats", "allowed_nodes": ["a", "b"],
        "nats": {"servers": ["tls://nats-1.example:4222"], "cluster": "edge-eu",
                 "tls": {"ca": "/etc/bpfsync/nats/ca.pem"}, "replicas": 3},
    }))
    code, out = run("--config", str(shared), "--nats-creds", "/etc/bpfsync/a.creds")
    assert code == 0, out
    nats = taken[0].nats
    assert nats is not None and nats.creds == Path("/etc/bpfsync/a.creds")
    assert (nats.servers, nats.cluster, nats.replicas) == (("tls://nats-1.example:4222",),
                                                           "edge-eu", 3)
    assert nats.tls is not None and nats.tls.ca == Path("/etc/bpfsync/nats/ca.pem")

    code, out = run("--config", str(shared), "--nats", "tls://nats-9.example:4222",
                    "--nats-cluster", "other")
    assert code == 0, out
    nats = taken[1].nats
    assert nats is not None and nats.servers == ("tls://nats-9.example:4222",)
    assert nats.cluster == "other" and nats.replicas == 3

    # a file for the mesh, switched to NATS by flags alone
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(yaml.safe_dump({"allowed_nodes": ["a", "b"]}))
    code, out = run("--config", str(mesh), "--transport", "nats", "--nats", "nats://n:4222")
    assert code == 0, out
    assert taken[2].transport == "nats"


@pytest.mark.parametrize(("args", "message"), [
    (["--nats", "nats://10.0.0.5:4222"], "set transport: nats (--transport nats)"),
    (["--nats-creds", "/etc/bpfsync/nats.creds"], "nats.servers: required field is missing"),
    (["--transport", "nats", "--allow-node", "b"], "--nats nats://HOST:4222"),
    (["--transport", "nats", "--nats", "nats://n:4222"], "--allow-node ID for each node"),
    ([*NATS, "--nats", "nats://n:4222", "--peer", "b@10.0.0.2:7001"], "peers: a setting of"),
    ([*NATS, "--nats", "n:4222"], "'n:4222' has no scheme"),
    ([*NATS, "--nats", "nats://n:4222", "--nats-cluster", "a.b"], "nats.cluster: must be"),
    (["--transport", "mqtt"], "transport: Input should be 'grpc' or 'nats'"),
])
def test_bad_transport_flags_are_config_errors(
    taken: list[AgentConfig], args: list[str], message: str,
) -> None:
    code, out = run(*args)
    assert code == 2 and not taken, out
    assert message in " ".join(out.split()), out
    assert "command line" in out and "Traceback" not in out
