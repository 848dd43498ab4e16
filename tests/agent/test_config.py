"""agent/config.py's rules for the transports: the NATS JetStream section (servers, cluster
name, credentials, TLS, bounds) and which top-level fields each transport takes; the gRPC mesh's
own rules stay as they were. Every refusal is a ConfigError that names the field and says what to
do."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from bpfsync.agent.config import AgentConfig, NatsConfig, NatsTlsConfig, parse_config
from bpfsync.errors import ConfigError

MAPS = [{"path": "/sys/fs/bpf/app/m"}]
SERVER = "nats://10.0.0.5:4222"


def nats_config(nats: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    """A valid transport: nats config, with ``nats`` over its nats section and ``top`` over
    its top-level fields (None removes one)."""
    data = {"node_id": "a", "transport": "nats", "allowed_nodes": ["a", "b", "c"],
            "maps": MAPS, "nats": {"servers": [SERVER], **(nats or {})}, **top}
    return {k: v for k, v in data.items() if v is not None}


def refused(data: dict[str, Any], where: str, message: str) -> str:
    """The error ``data`` gets: ``where`` is the field it names, ``message`` a regex in it."""
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "test")
    text = str(caught.value)
    line = next((ln for ln in text.splitlines() if ln.startswith(f"  {where}: ")), None)
    assert line is not None, f"no error at {where}:\n{text}"
    assert re.search(message, line), line
    return line


def test_a_full_nats_config_parses() -> None:
    cfg = parse_config(nats_config({
        "servers": ["tls://nats-1.example:4222", "tls://[2001:db8::1]:4222"],
        "cluster": "edge-eu_1", "creds": "/etc/bpfsync/nats.creds",
        "tls": {"ca": "/etc/bpfsync/nats/ca.pem", "cert": "/etc/bpfsync/nats/a.pem",
                "key": "/etc/bpfsync/nats/a.key"},
        "stream_max_age_s": 30 * 86400, "stream_max_bytes": 1 << 20, "replicas": 3,
        "snapshot_interval_s": 3600, "connect_timeout_s": 300,
    }))
    assert cfg.transport == "nats" and cfg.nats is not None
    assert cfg.nats.servers == ("tls://nats-1.example:4222", "tls://[2001:db8::1]:4222")
    assert cfg.nats.cluster == "edge-eu_1" and cfg.nats.creds == Path("/etc/bpfsync/nats.creds")
    assert cfg.nats.tls == NatsTlsConfig(ca=Path("/etc/bpfsync/nats/ca.pem"),
                                         cert=Path("/etc/bpfsync/nats/a.pem"),
                                         key=Path("/etc/bpfsync/nats/a.key"))
    assert (cfg.nats.replicas, cfg.nats.stream_max_bytes) == (3, 1 << 20)
    assert cfg.members == frozenset({"a", "b", "c"})
    # files are named, not read: `bpfsync check` and the transport open them
    assert not Path("/etc/bpfsync/nats.creds").exists()


def test_nats_defaults() -> None:
    nats = NatsConfig(servers=(SERVER,))
    assert (nats.cluster, nats.tls, nats.user, nats.password, nats.token, nats.creds,
            nats.nkey_seed) == ("bpfsync", None, None, None, None, None, None)
    assert (nats.stream_max_age_s, nats.stream_max_bytes, nats.replicas,
            nats.snapshot_interval_s, nats.connect_timeout_s) == (3600.0, 1 << 30, 1, 10.0, 5.0)
    cfg = parse_config({"node_id": "a", "maps": MAPS})
    assert (cfg.transport, cfg.nats) == ("grpc", None)


def test_secrets_stay_out_of_the_repr() -> None:
    """A config may be logged: the password and the token are not in its text."""
    for nats in ({"user": "u", "password": "pw-123456"}, {"token": "tok-123456"}):
        cfg = parse_config(nats_config(nats))
        assert "123456" not in repr(cfg) and "123456" not in str(cfg)


def test_with_nats_a_listen_address_other_hosts_reach_needs_no_tls() -> None:
    """The gRPC listener is not started with NATS; the mesh keeps its rule."""
    assert parse_config(nats_config(listen="0.0.0.0:7001")).listen == "0.0.0.0:7001"
    refused({"node_id": "a", "maps": MAPS, "listen": "0.0.0.0:7001"}, "(top level)",
            r"listen: 0\.0\.0\.0:7001 is reachable from other hosts and TLS is off.*--insecure")


def test_transport_nats_needs_the_nats_section() -> None:
    refused(nats_config(nats=None) | {"nats": None}, "(top level)",
            r"transport: nats needs the NATS servers.*nats: \{servers: .*--nats nats://HOST")
    data = nats_config()
    del data["nats"]
    refused(data, "(top level)", r"transport: nats needs the NATS servers")
    refused(nats_config() | {"nats": {}}, "nats.servers", "required field is missing")


def test_a_nats_section_with_transport_grpc_is_refused() -> None:
    line = refused(nats_config(transport=None), "(top level)",
                   r"nats: given, but transport is grpc \(the default\)")
    assert "set transport: nats (--transport nats)" in line and "or remove nats" in line
    refused(nats_config(transport="grpc"), "(top level)", "transport is grpc")


def test_transport_nats_needs_the_member_list() -> None:
    line = refused(nats_config(allowed_nodes=None), "(top level)",
                   r"allowed_nodes: required with transport: nats")
    assert "--allow-node" in line and "only members' records count" in line
    assert parse_config(nats_config(allowed_nodes=["b"])).members == frozenset({"a", "b"})


@pytest.mark.parametrize(("top", "named"), [
    ({"peers": ["b@10.0.0.2:7001"]}, "peers: a setting of the gRPC mesh"),
    ({"peers_dns": "bpfsync-peers.example:7001"}, "peers_dns: a setting of the gRPC mesh"),
    ({"tls": {"ca": "/ca.pem", "cert": "/a.pem", "key": "/a.key"}},
     "tls: a setting of the gRPC mesh"),
    ({"peers": ["10.0.0.2:7001"], "tls": {"ca": "/ca.pem", "cert": "/a.pem", "key": "/a.key"}},
     "peers, tls: settings of the gRPC mesh"),
])
def test_the_mesh_s_settings_are_refused_with_nats(top: dict[str, Any], named: str) -> None:
    line = refused(nats_config(**top), "(top level)", re.escape(named))
    assert "transport is nats" in line and "nats.tls" in line


@pytest.mark.parametrize(("url", "message"), [
    ("10.0.0.5:4222", "has no scheme"),
    ("http://10.0.0.5:4222", "has the scheme 'http'"),
    ("NATS://10.0.0.5:4222", "has the scheme 'NATS'"),
    ("nats://10.0.0.5", "has no port.*4222"),
    ("nats://:4222", "has no host"),
    ("nats://10.0.0.5:0", "port must be a number in 1-65535, got '0'"),
    ("nats://10.0.0.5:65536", "got '65536'"),
    ("nats://10.0.0.5:http", "got 'http'"),
    ("nats://10.0.0.5:4222/x", "got '4222/x'"),
    ("nats://user:pw@10.0.0.5:4222", "holds credentials: give them as nats.user"),
    ("nats://2001:db8::1:4222", "put an IPv6 address in brackets"),
    ("nats://[2001:db8::1]", "has no port"),
    ("nats://[2001:db8::1]4222", "give :PORT right after the ]"),
    ("nats://[2001:db8::1:4222", "no closing ]"),
    ("nats://[nats-1]:4222", "'nats-1' in brackets is not an IPv6 address"),
    ("nats://nats_1.example:4222", "'nats_1.example' is not a host name"),
    ("nats://-nats.example:4222", "is not a host name"),
])
def test_a_bad_server_url_says_what_is_wrong(url: str, message: str) -> None:
    line = refused(nats_config({"servers": [SERVER, url]}), "nats.servers", message)
    assert repr(url) in line or "got" in line


@pytest.mark.parametrize("url", ["nats://localhost:4222", "tls://nats-1.example.com:1",
                                 "nats://10.0.0.5:65535", "tls://[::1]:4222",
                                 "nats://NATS.example.:4222"])
def test_good_server_urls(url: str) -> None:
    cfg = parse_config(nats_config({"servers": [url]}))
    assert cfg.nats is not None and cfg.nats.servers == (url,)


@pytest.mark.parametrize(("servers", "message"), [
    ([SERVER, SERVER], f"'{SERVER}' is listed twice: list each server once"),
    ([SERVER, "tls://10.0.0.5:4222"], f"'tls://10.0.0.5:4222' is '{SERVER}' again"),
    (["nats://Nats.example:4222", "nats://nats.example.:4222"], "again"),
    (["nats://[2001:db8::1]:4222", "nats://[2001:db8:0::1]:4222"], "again"),
    ([], r"give at least one NATS server, e.g. \[nats://"),
])
def test_servers_at_least_one_each_once(servers: list[str], message: str) -> None:
    refused(nats_config({"servers": servers}), "nats.servers", message)


@pytest.mark.parametrize("name", ["", "a.b", "a b", "a*", "a>", "x" * 33, "bpfsync\n"])
def test_a_cluster_name_unfit_for_nats_names_is_refused(name: str) -> None:
    refused(nats_config({"cluster": name}), "nats.cluster",
            r"must be 1-32 letters, digits, _ or -, got .*subject, stream and bucket names")


@pytest.mark.parametrize("name", ["a", "edge-eu_1", "X" * 32])
def test_good_cluster_names(name: str) -> None:
    cfg = parse_config(nats_config({"cluster": name}))
    assert cfg.nats is not None and cfg.nats.cluster == name


@pytest.mark.parametrize("creds", [
    {}, {"user": "bpfsync", "password": "pw"}, {"token": "t"},
    {"creds": "/etc/bpfsync/nats.creds"}, {"nkey_seed": "/etc/bpfsync/nats.nk"},
])
def test_each_kind_of_credentials_alone_parses(creds: dict[str, str]) -> None:
    parse_config(nats_config(creds))


def test_user_and_password_come_together() -> None:
    refused(nats_config({"user": "bpfsync"}), "nats",
            "user is set without password: give both, or neither")
    refused(nats_config({"password": "pw"}), "nats",
            "password is set without user: give both, or neither")


@pytest.mark.parametrize(("creds", "named"), [
    ({"user": "u", "password": "p", "token": "t"}, "user/password and token are set"),
    ({"token": "t", "creds": "/c"}, "token and creds are set"),
    ({"creds": "/c", "nkey_seed": "/n"}, "creds and nkey_seed are set"),
    ({"user": "u", "password": "p", "nkey_seed": "/n"}, "user/password and nkey_seed are set"),
    ({"token": "t", "creds": "/c", "nkey_seed": "/n"},
     "token, creds and nkey_seed are set.*remove the others"),
])
def test_two_kinds_of_credentials_are_refused_by_name(creds: dict[str, str], named: str) -> None:
    line = refused(nats_config(creds), "nats", named)
    assert "one kind of credentials" in line


@pytest.mark.parametrize("field", ["user", "password", "token"])
def test_an_empty_credential_is_refused(field: str) -> None:
    creds = {"user": "u", "password": "p"} if field in ("user", "password") else {}
    refused(nats_config({**creds, field: ""}), f"nats.{field}",
            "is empty, which is no credential")


def test_nats_tls_client_certificate_needs_cert_and_key() -> None:
    ca = "/etc/bpfsync/nats/ca.pem"
    cfg = parse_config(nats_config({"tls": {"ca": ca}}))
    assert cfg.nats is not None and cfg.nats.tls == NatsTlsConfig(ca=Path(ca))
    refused(nats_config({"tls": {"ca": ca, "cert": "/a.pem"}}), "nats.tls",
            "cert is set without key: a client certificate needs both")
    refused(nats_config({"tls": {"ca": ca, "key": "/a.key"}}), "nats.tls",
            "key is set without cert")
    refused(nats_config({"tls": {"cert": "/a.pem", "key": "/a.key"}}), "nats.tls.ca",
            "required field is missing")


@pytest.mark.parametrize(("field", "bad", "edge"), [
    ("stream_max_age_s", 0, 30 * 86400),
    ("stream_max_age_s", 30 * 86400 + 1, 0.001),
    ("stream_max_bytes", (1 << 20) - 1, 1 << 20),
    ("replicas", 0, 1),
    ("replicas", 6, 5),
    ("snapshot_interval_s", 0, 3600),
    ("snapshot_interval_s", 3601, 0.01),
    ("connect_timeout_s", 0, 300),
    ("connect_timeout_s", 301, 0.1),
])
def test_nats_bounds(field: str, bad: float, edge: float) -> None:
    refused(nats_config({field: bad}), f"nats.{field}", "Input should be")
    cfg = parse_config(nats_config({field: edge}))
    assert getattr(cfg.nats, field) == edge


def test_unknown_transport_and_unknown_nats_field() -> None:
    refused(nats_config(transport="udp"), "transport", "'grpc' or 'nats'")
    refused(nats_config({"server": SERVER}), "nats.server", "unknown field")


def test_the_models_are_frozen() -> None:
    cfg = AgentConfig.model_validate(nats_config())
    assert cfg.nats is not None
    with pytest.raises(ValueError, match="frozen"):
        cfg.nats.cluster = "x"  # type: ignore[misc]
