"""deploy/kubernetes, checked offline: the kustomize base rendered, every manifest validated
against Kubernetes' own schemas (kubernetes-validate, strict: an unknown or misspelt field
fails), the wiring between the pieces, and the agent's command line accepted by `bpfsync run`.

kustomize itself is not installed: ``render`` below does what the base uses of it (namespace,
resources, configMapGenerator) and refuses any other kustomization field, so a base that starts
using more fails here until this renderer learns it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from typer.testing import CliRunner

from bpfsync.agent import daemon
from bpfsync.agent.config import AgentConfig, parse_config
from bpfsync.cli.main import RUN_FLAGS, app
from bpfsync.transport.tls import TlsFiles, load_tls

try:
    import kubernetes_validate
    from kubernetes_validate.utils import all_versions
except ImportError:  # a failure below, not a skip: the dev extra installs it
    kubernetes_validate = None

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "kubernetes"
# the oldest and the newest Kubernetes whose schemas kubernetes-validate 1.37 ships
KUBERNETES_VERSIONS = ("1.32.0", "1.37.0")
NAMESPACED = {"ConfigMap", "DaemonSet", "Secret", "Service", "ServiceAccount"}
KUSTOMIZE_FIELDS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator"}
NODE, NODE_IP = "worker-1.eu-west.example", "10.20.30.40"  # what the downward API would give


def render() -> list[dict[str, Any]]:
    """The base as `kustomize build` renders it (for the fields it uses)."""
    k = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    unknown = set(k) - KUSTOMIZE_FIELDS
    assert not unknown, f"kustomization.yaml uses {unknown}: teach render() in {__file__}"
    docs = [d for f in k["resources"] for d in yaml.safe_load_all((BASE / f).read_text()) if d]
    renamed: dict[str, str] = {}
    for gen in k.get("configMapGenerator", []):
        assert set(gen) <= {"name", "files"}, f"configMapGenerator: {gen}"
        data = {Path(f).name: (BASE / f).read_text() for f in gen["files"]}
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
        renamed[gen["name"]] = f"{gen['name']}-{digest}"
        docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": renamed[gen["name"]]}, "data": data})
    for d in docs:
        if d["kind"] in NAMESPACED and "namespace" in k:
            d["metadata"]["namespace"] = k["namespace"]
        if d["kind"] == "DaemonSet":  # kustomize points references at the generated names
            for v in d["spec"]["template"]["spec"]["volumes"]:
                if "configMap" in v:
                    v["configMap"]["name"] = renamed.get(v["configMap"]["name"],
                                                         v["configMap"]["name"])
    return docs


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def agent_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "agent")


def config_file(docs: list[dict[str, Any]]) -> str:
    return str(one(docs, "ConfigMap")["data"]["bpfsync.yaml"])


def downward(arg: str) -> str:
    """An argument as the kubelet expands it, with the env the DaemonSet gives."""
    return arg.replace("$(NODE_NAME)", NODE).replace("$(NODE_IP)", NODE_IP)


@pytest.fixture(scope="module")
def docs() -> list[dict[str, Any]]:
    return render()


def test_every_file_of_the_base_is_used() -> None:
    k = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    used = {"kustomization.yaml", *k["resources"],
            *(f for g in k.get("configMapGenerator", []) for f in g["files"])}
    assert {p.name for p in BASE.glob("*.yaml")} == used


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_pass_kubernetes_schemas(docs: list[dict[str, Any]], version: str) -> None:
    if kubernetes_validate is None:
        pytest.fail("kubernetes-validate is missing: pip install -e '.[dev]' (pyproject.toml)")
    assert version in all_versions(), f"kubernetes-validate has no schemas for {version}"
    assert {d["kind"] for d in docs} == {"Namespace", "ServiceAccount", "Service", "DaemonSet",
                                         "ConfigMap"}
    for d in docs:
        try:
            kubernetes_validate.validate(d, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{d['kind']}/{d['metadata']['name']} on {version}: "
                        f"{'.'.join(map(str, err.path))}: {err.message}")


def completed(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The ConfigMap's file with what the DaemonSet's flags add on every node (the node id,
    the node's own certificate and key), as `bpfsync run` merges them before it checks."""
    data: dict[str, Any] = yaml.safe_load(config_file(docs))
    data["node_id"] = NODE
    data["tls"] = {**data["tls"], "cert": f"/etc/bpfsync/tls/{NODE}.pem",
                   "key": f"/etc/bpfsync/tls/{NODE}.key"}
    return data


def test_configmap_file_passes_the_agent_loader(docs: list[dict[str, Any]]) -> None:
    cfg = parse_config(completed(docs), "bpfsync.yaml")
    assert cfg.tls is not None and cfg.tls.server_name == "bpfsync-peers"
    assert cfg.peers_dns and cfg.http_listen and cfg.maps


def test_bpfsync_run_accepts_the_daemonset_command_line(
    docs: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    c = agent_container(docs)
    assert c["command"] == ["bpfsync"] and c["args"][0] == "run"
    args = [downward(a) for a in c["args"][1:]]
    config_at = args.index("--config") + 1
    mounted = Path(args[config_at])
    local = tmp_path / mounted.name
    local.write_text(config_file(docs))
    args[config_at] = str(local)
    taken: list[AgentConfig] = []
    monkeypatch.setattr(daemon, "run_agent", lambda cfg: taken.append(cfg) or 0)
    res = CliRunner().invoke(app, ["run", *args])
    assert res.exit_code == 0 and taken, f"bpfsync run refused it:\n{res.output}"
    cfg = taken[0]
    assert cfg.node_id == NODE and cfg.listen == f"{NODE_IP}:7001"
    assert cfg.tls is not None
    assert (str(cfg.tls.cert), str(cfg.tls.key)) == (f"/etc/bpfsync/tls/{NODE}.pem",
                                                     f"/etc/bpfsync/tls/{NODE}.key")
    assert cfg.tls.server_name == "bpfsync-peers"  # kept from the file under the TLS flags
    # every flag is one of run's (the table cli/main.py keeps in step with its options)
    flags = {f for spec in RUN_FLAGS.values() for f in spec.split("/")} | {"--config"}
    assert {a for a in c["args"] if a.startswith("--")} <= flags


def test_wiring(docs: list[dict[str, Any]]) -> None:
    ds, svc, sa = one(docs, "DaemonSet"), one(docs, "Service"), one(docs, "ServiceAccount")
    cfg = parse_config(completed(docs))
    pod = ds["spec"]["template"]["spec"]
    c = agent_container(docs)
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ns = one(docs, "Namespace")["metadata"]["name"]
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] in NAMESPACED} == {ns}

    # one node at a time, gated by readiness
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}
    assert ds["spec"]["minReadySeconds"] > 0

    # peers by node IP: host network, cluster DNS from it, the headless Service
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
    assert svc["spec"]["selector"].items() <= labels.items()
    host, _, port = (cfg.peers_dns or "").rpartition(":")
    assert host.split(".")[0] == svc["metadata"]["name"]
    assert [p["port"] for p in svc["spec"]["ports"]] == [int(port)]
    listen = downward(c["args"][c["args"].index("--listen") + 1])
    assert listen == f"{NODE_IP}:{port}"
    assert {"name": "grpc", "containerPort": int(port), "protocol": "TCP"} in c["ports"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"]}
    assert env == {"NODE_NAME": "spec.nodeName", "NODE_IP": "status.hostIP"}

    # capabilities, not privileged
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"],
                                  "add": ["BPF", "PERFMON", "SYS_ADMIN", "SYS_RESOURCE"]}

    # probes on http_listen
    http_host, _, http_port = (cfg.http_listen or "").rpartition(":")
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):
        assert c[probe]["httpGet"] == {"host": http_host, "path": path, "port": int(http_port)}

    # volumes: bpffs and the state dir from the host, the config, the certificates
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert volumes[mounts["/sys/fs/bpf"]["name"]]["hostPath"]["path"] == "/sys/fs/bpf"
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    assert volumes[mounts["/var/lib/bpfsync"]["name"]]["hostPath"] == {
        "path": "/var/lib/bpfsync", "type": "DirectoryOrCreate"}
    for m in cfg.maps:
        assert m.path.startswith("/sys/fs/bpf/")
    config_dir = str(Path(c["args"][c["args"].index("--config") + 1]).parent)
    assert volumes[mounts[config_dir]["name"]]["configMap"]["name"] == (
        one(docs, "ConfigMap")["metadata"]["name"])
    tls_dir = str(Path(c["args"][c["args"].index("--tls-cert") + 1]).parent)
    assert volumes[mounts[tls_dir]["name"]]["secret"]["secretName"] == "bpfsync-tls"
    for flag, name in (("--tls-ca", "ca.pem"), ("--tls-cert", "$(NODE_NAME).pem"),
                       ("--tls-key", "$(NODE_NAME).key")):
        assert c["args"][c["args"].index(flag) + 1] == f"{tls_dir}/{name}"
    assert c["args"][c["args"].index("--node-id") + 1] == "$(NODE_NAME)"


def test_node_certs_script_makes_what_the_agent_accepts(tmp_path: Path) -> None:
    env = {**os.environ, "BPFSYNC": str(Path(sys.executable).with_name("bpfsync"))}
    script = BASE / "node-certs.sh"
    nodes = [NODE, "worker-2"]
    run = subprocess.run([script, tmp_path / "ca", tmp_path / "tls", *nodes], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "tls").iterdir()) == sorted(
        ["ca.pem", *(f"{n}.{ext}" for n in nodes for ext in ("pem", "key"))])
    for n in nodes:
        files = TlsFiles(cert=tmp_path / "tls" / f"{n}.pem", key=tmp_path / "tls" / f"{n}.key",
                         ca=tmp_path / "tls" / "ca.pem", server_name="bpfsync-peers")
        load_tls(files, node=n)  # the agent's own checks: signed, valid, names the node
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "bpfsync-peers" in names.get_values_for_type(x509.DNSName)
    # again with a new node: only that one is issued, the others keep their files
    before = (tmp_path / "tls" / f"{NODE}.pem").read_bytes()
    again = subprocess.run([script, tmp_path / "ca", tmp_path / "tls", *nodes, "worker-3"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert re.findall(r"issued \S+", again.stdout) == [f"issued {tmp_path}/tls/worker-3.pem"]
    assert (tmp_path / "tls" / f"{NODE}.pem").read_bytes() == before
