"""The `bpfsync` command line: watch a map, run the agent or check its config, ask a running agent
for its status."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bpfsync.errors import BpfsyncError

app = typer.Typer(
    help=(
        "Keep eBPF maps consistent across the nodes of a cluster.\n\n"
        "MAP arguments are a pin path (/sys/fs/bpf/app/map), name:NAME or id:N."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)

# The config field (its YAML path in docs/config.md) that each flag of `run` sets; the reference
# generator (cli/reference.py) prints them, and a test holds this table to run's options
# (--no-insecure, which typer adds, sets nothing: it does not undo a file's insecure: true).
RUN_FLAGS: dict[str, str] = {
    "node_id": "--node-id",
    "listen": "--listen",
    "peers": "--peer",
    "peers_dns": "--peers-dns",
    "maps[].path": "--map",
    "http_listen": "--http",
    "watch.mode": "--watch",
    "watch.syscall_hooks": "--syscall-hooks/--no-syscall-hooks",
    "watch.poll_interval": "--poll-interval",
    "tls.ca": "--tls-ca",
    "tls.cert": "--tls-cert",
    "tls.key": "--tls-key",
    "insecure": "--insecure",
    "allowed_nodes": "--allow-node",
    "state.dir": "--state-dir/--no-state",
    "transport": "--transport",
    "nats.servers": "--nats",
    "nats.cluster": "--nats-cluster",
    "nats.creds": "--nats-creds",
}


def _fail(e: BaseException) -> typer.Exit:
    err.print(f"[bold red]error:[/] {e}", highlight=False)
    return typer.Exit(2)


def _print_version(value: bool) -> None:
    if value:
        from bpfsync import __version__

        print(f"bpfsync {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True,
                           help="print the version and exit")
    ] = False,
) -> None:
    # no docstring: the app's help above is the one `bpfsync --help` shows
    pass


@app.command()
def watch(
    map_spec: Annotated[str, typer.Argument(metavar="MAP", help="pin path, name:NAME or id:N")],
    mode: Annotated[
        str, typer.Option(help="auto: fexit where the kernel allows it plus a slow poll, else "
                          "bpf(2) syscall hooks plus the poll; trace: fexit programs only; "
                          "poll: batch scans only")
    ] = "auto",
    interval: Annotated[float, typer.Option(help="poll interval in seconds")] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    count: Annotated[int, typer.Option(help="stop after this many changes (0: run until ^C)")] = 0,
) -> None:
    """Print every change to a map as it happens, decoded by the map's BTF where it has one
    (an LPM trie's keys as prefixes, 198.51.100.0/24, with or without BTF).

    Example: bpfsync watch /sys/fs/bpf/xdp/blocklist --json
    """
    from bpfsync.cli.watching import run_watch

    try:
        run_watch(map_spec, mode=mode, interval=interval, as_json=as_json, count=count)
    except BpfsyncError as e:
        raise _fail(e) from e
    except KeyboardInterrupt:
        pass


@app.command()
def dump(
    map_spec: Annotated[str, typer.Argument(metavar="MAP", help="pin path, name:NAME or id:N")],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
    addr: Annotated[
        list[str] | None,
        typer.Option(help="print this field as an IP address ('key' for the whole key); repeat. "
                     "Fields named like saddr, daddr, src_ip, ip, addr are by default"),
    ] = None,
    agent: Annotated[
        str | None,
        typer.Option(help="HOST:PORT of the agent syncing MAP (its --http): also show every "
                     "node's slot per key (counter, max, min maps)"),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="the map's sync name at the agent (default: pin name)")
    ] = None,
) -> None:
    """Print every entry of a map, fields decoded by BTF (an LPM trie's keys as prefixes,
    198.51.100.0/24, with or without BTF).

    Example: bpfsync dump /sys/fs/bpf/dns_rl/rl_counts --addr key --agent 127.0.0.1:9100
    """
    from bpfsync.cli.watching import run_dump

    try:
        run_dump(map_spec, as_json=as_json, addr=addr or [], agent=agent, sync_name=name)
    except BpfsyncError as e:
        raise _fail(e) from e


@app.command()
def run(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML config file (docs/config.md)")
    ] = None,
    node_id: Annotated[str | None, typer.Option(help="this node's unique id")] = None,
    listen: Annotated[str | None, typer.Option(help="HOST:PORT to accept peers on")] = None,
    peer: Annotated[
        list[str] | None, typer.Option(help="HOST:PORT of a peer; repeat for each peer")
    ] = None,
    peers_dns: Annotated[
        str | None, typer.Option(help="HOST:PORT whose name resolves to every peer")
    ] = None,
    map_path: Annotated[
        list[str] | None,
        typer.Option("--map", help="pin path of a map to sync (same map on every node); repeat"),
    ] = None,
    http: Annotated[
        str | None, typer.Option(help="HOST:PORT for /metrics, /healthz, /readyz, /status")
    ] = None,
    watch_mode: Annotated[
        str | None, typer.Option("--watch", help="auto | trace | poll (default auto)")
    ] = None,
    syscall_hooks: Annotated[
        bool | None,
        typer.Option("--syscall-hooks/--no-syscall-hooks",
                     help="where fexit is refused, trace bpf(2) instead (default on)"),
    ] = None,
    poll_interval: Annotated[
        float | None,
        typer.Option(help="seconds between scans of maps whose BPF programs' writes are not "
                     "traced (default 0.25)"),
    ] = None,
    tls_ca: Annotated[
        Path | None, typer.Option(help="the cluster CA's certificate (PEM): peers must be "
                                  "signed by it. With --tls-cert and --tls-key: mutual TLS")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option(help="this node's certificate (PEM), naming its node id")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="this node's private key (PEM)")] = None,
    insecure: Annotated[
        bool, typer.Option(help="run without TLS although --listen is reachable from other "
                           "hosts: anyone who reaches it can change your maps")
    ] = False,
    allow_node: Annotated[
        list[str] | None,
        typer.Option(help="a node id of the cluster; repeat. Only members may connect, and "
                     "only their records count (peers given as ID@HOST:PORT are members too)"),
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="directory of this node's state file (default "
                                  "/var/lib/bpfsync): restarts resume from it")
    ] = None,
    no_state: Annotated[
        bool, typer.Option("--no-state", help="keep no state: a restart then takes what the "
                           "maps hold as older than any peer's record")
    ] = False,
    transport: Annotated[
        str | None,
        typer.Option(help="how the nodes reach each other: grpc (default), the embedded full "
                     "mesh of --listen and --peer, fine to ~30 nodes; or nats, through NATS "
                     "JetStream servers (--nats), for larger clusters. E.g. --transport nats"),
    ] = None,
    nats: Annotated[
        list[str] | None,
        typer.Option("--nats", metavar="URL",
                     help="a NATS server, nats://HOST:PORT or tls://HOST:PORT, for --transport "
                     "nats; repeat for each server of the NATS cluster. E.g. --nats "
                     "nats://10.0.0.5:4222 --nats nats://10.0.0.6:4222"),
    ] = None,
    nats_cluster: Annotated[
        str | None,
        typer.Option(metavar="NAME",
                     help="prefix of the NATS subjects, streams and buckets this cluster uses, "
                     "so that several clusters can share NATS servers (default bpfsync). E.g. "
                     "--nats-cluster edge-eu"),
    ] = None,
    nats_creds: Annotated[
        Path | None,
        typer.Option(metavar="FILE",
                     help="a NATS .creds file (the user's JWT and nkey seed, as `nsc` makes "
                     "it), for NATS servers that authenticate clients. E.g. --nats-creds "
                     "/etc/bpfsync/nats.creds"),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error")] = "info",
) -> None:
    """Run the sync agent until SIGTERM or SIGINT; SIGHUP re-reads the TLS files.

    From a file: bpfsync run --config /etc/bpfsync.yaml

    From flags, on loopback: bpfsync run --node-id a --listen 127.0.0.1:7001
    --peer 127.0.0.1:7002 --peer 127.0.0.1:7003 --map /sys/fs/bpf/demo/m

    Across hosts, with mutual TLS (certificates from `bpfsync certs`):
    bpfsync run --node-id a --listen 10.0.0.1:7001 --peer b@10.0.0.2:7001
    --peer c@10.0.0.3:7001 --map /sys/fs/bpf/demo/m --tls-ca ca.pem --tls-cert a.pem
    --tls-key a.key

    Through NATS JetStream, for larger clusters: every node lists the members, no peers:
    bpfsync run --node-id a --transport nats --nats nats://10.0.0.5:4222 --allow-node a
    --allow-node b --allow-node c --map /sys/fs/bpf/demo/m

    Flags given together with --config override the file's fields.
    """
    # gRPC's C core logs every GOAWAY of a restarting peer at INFO; our own logs say what matters
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from bpfsync.agent.config import parse_config, read_config_file
    from bpfsync.agent.daemon import run_agent
    from bpfsync.agent.logs import setup_logging

    try:
        setup_logging(log_level)
        data: dict[str, Any] = {}
        if config is not None:
            # validated once, with the flags merged in: a file may leave fields to flags
            # (node_id from --node-id on every node of a DaemonSet)
            data = read_config_file(config)
        overrides = {
            "node_id": node_id, "listen": listen, "peers_dns": peers_dns, "http_listen": http,
            "peers": tuple(peer) if peer else None,
            "maps": _maps_from_flags(map_path, data.get("maps")) if map_path else None,
        }
        data.update({k: v for k, v in overrides.items() if v is not None})
        _merge(data, "watch", mode=watch_mode, poll_interval=poll_interval,
               syscall_hooks=syscall_hooks)
        # the three TLS files may come from the file, the flags or both (the CA in a shared
        # file, each node's own certificate by flag); the model says which one is missing
        _merge(data, "tls", ca=tls_ca and str(tls_ca), cert=tls_cert and str(tls_cert),
               key=tls_key and str(tls_key))
        if insecure:
            data["insecure"] = True
        if state_dir is not None and no_state:
            raise typer.BadParameter("give --state-dir or --no-state, not both")
        _merge(data, "state", dir=str(state_dir) if state_dir else None)
        if no_state:
            current = data.get("state")
            data["state"] = {**(current if isinstance(current, dict) else {}), "dir": None}
        if allow_node:
            data["allowed_nodes"] = tuple(allow_node)
        if transport is not None:
            data["transport"] = transport
        # like the TLS files: the servers in a shared file, a node's own credentials by flag
        _merge(data, "nats", servers=tuple(nats) if nats else None, cluster=nats_cluster,
               creds=nats_creds and str(nats_creds))
        if "node_id" not in data:
            raise typer.BadParameter("give --node-id or a --config file with node_id")
        cfg = parse_config(data, f"{config} with the command line" if config else "command line")
        sys.exit(run_agent(cfg))
    except BpfsyncError as e:
        raise _fail(e) from e


def _maps_from_flags(paths: list[str], in_file: object) -> list[Any]:
    """The maps --map names; one the file lists too keeps the file's settings for it."""
    listed = {m.get("path"): m for m in in_file if isinstance(m, dict)} if isinstance(
        in_file, list) else {}  # fmt: skip
    return [listed.get(p, {"path": p}) for p in paths]


def _merge(data: dict[str, Any], section: str, **flags: object) -> None:
    """Flags given (not None) over the fields of ``section`` in ``data``."""
    given = {k: v for k, v in flags.items() if v is not None}
    if given:
        current = data.get(section)
        data[section] = {**(current if isinstance(current, dict) else {}), **given}


@app.command()
def check(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="YAML config file (docs/config.md)")
    ],
) -> None:
    """Check a config file against this machine without starting the agent.

    Validates the file, then opens each map and reads the TLS files as the agent would.

    Maps: present, of a type bpfsync syncs, sizes and BTF fields fitting the policy, companions.

    TLS: key, certificate, CA, validity, node id. No listener, watcher or write is started.

    Prints every problem, each as the agent reports it, and exits 1 if there is any.

    Example: bpfsync check --config /etc/bpfsync.yaml
    """
    from bpfsync.cli.check import check_file

    report = check_file(config)
    print(report.render())
    if report.problems:
        raise typer.Exit(1)


certs = typer.Typer(
    help="Make the certificates for mutual TLS: one CA per cluster, one certificate per node.\n\n"
    "  bpfsync certs ca --out /etc/bpfsync/ca\n\n"
    "  bpfsync certs node a --ca-dir /etc/bpfsync/ca --ip 10.0.0.1 --out /etc/bpfsync/tls\n\n"
    "Then run each node with --tls-ca ca.pem --tls-cert NODE.pem --tls-key NODE.key. Keep "
    "ca.key off the nodes. See docs/security.md.",
    no_args_is_help=True,
)
app.add_typer(certs, name="certs")


@certs.command("ca")
def certs_ca(
    out: Annotated[Path, typer.Option(help="directory for ca.pem and ca.key")],
    name: Annotated[str, typer.Option(help="the CA's common name")] = "bpfsync cluster CA",
    days: Annotated[int, typer.Option(min=1, help="validity in days")] = 3650,
    force: Annotated[bool, typer.Option(help="replace existing files")] = False,
) -> None:
    """Make a new cluster CA (ECDSA P-256): ca.pem for every node, ca.key for you."""
    from bpfsync.transport.certs import make_ca

    try:
        issued = make_ca(out, name, days, force)
    except BpfsyncError as e:
        raise _fail(e) from e
    print(f"{issued.cert}\n{issued.key}  (keep it off the nodes)")


@certs.command("node")
def certs_node(
    node_id: Annotated[str, typer.Argument(metavar="NODE_ID", help="the node's --node-id")],
    ca_dir: Annotated[
        Path | None, typer.Option(help="directory holding ca.pem and ca.key (certs ca --out)")
    ] = None,
    ca: Annotated[Path | None, typer.Option(help="the CA's certificate (instead of --ca-dir)")
                  ] = None,
    ca_key: Annotated[Path | None, typer.Option(help="the CA's key (instead of --ca-dir)")
                      ] = None,
    out: Annotated[Path, typer.Option(help="directory for NODE_ID.pem and NODE_ID.key")
                   ] = Path("."),
    ip: Annotated[
        list[str] | None,
        typer.Option(help="an address peers dial this node at; repeat (not needed for peers "
                     "given as NODE_ID@HOST:PORT, which are checked by id)"),
    ] = None,
    dns: Annotated[list[str] | None, typer.Option(help="a DNS name peers dial; repeat")] = None,
    days: Annotated[int, typer.Option(min=1, help="validity in days")] = 365,
    force: Annotated[bool, typer.Option(help="replace existing files")] = False,
) -> None:
    """Issue a node's certificate, naming its id (CN and DNS name) and its addresses."""
    from bpfsync.transport.certs import issue_node

    if ca_dir is not None:
        ca, ca_key = ca or ca_dir / "ca.pem", ca_key or ca_dir / "ca.key"
    if ca is None or ca_key is None:
        raise _fail(BpfsyncError("give --ca-dir, or both --ca and --ca-key"))
    try:
        issued = issue_node(node_id, ca, ca_key, out, ips=tuple(ip or ()), dns=tuple(dns or ()),
                            days=days, force=force)
    except BpfsyncError as e:
        raise _fail(e) from e
    print(f"{issued.cert}\n{issued.key}")


@app.command("nats-users")
def nats_users(
    nodes: Annotated[list[str], typer.Argument(metavar="NODE_ID...", help="the cluster's nodes")],
    cluster: Annotated[str, typer.Option(help="the cluster's nats.cluster (--nats-cluster)")
                       ] = "bpfsync",
) -> None:
    """Print a nats-server `authorization` block: one user per node, with a fresh random
    password, allowed only that node's subjects.

    With it, a node cannot publish another's changes or Hellos, message its peers under
    another id, or move another node's consumer: the servers refuse it, as mutual TLS does
    on the mesh. Include the block in nats-server's config, and give each node its
    `nats.user` and `nats.password` (docs/security.md):

      bpfsync nats-users a b c --cluster prod > /etc/nats/bpfsync-users.conf
    """
    import secrets

    from bpfsync.agent.config import nats_cluster_name
    from bpfsync.core.messages import NODE_ID_RULE, is_node_id
    from bpfsync.transport.natsbus import NatsOptions

    try:
        nats_cluster_name(cluster)
    except ValueError as e:
        raise _fail(BpfsyncError(f"--cluster: {e}")) from e
    bad = [n for n in nodes if not is_node_id(n)]
    if bad:
        raise _fail(BpfsyncError(f"not node ids ({NODE_ID_RULE}): {', '.join(bad)}"))
    if len(set(nodes)) != len(nodes):
        raise _fail(BpfsyncError("a node is named twice"))
    options = NatsOptions(servers=(), cluster=cluster)
    print(f"# bpfsync cluster {cluster!r}: one NATS user per node (bpfsync nats-users)")
    print("authorization {\n  users = [")
    for node in nodes:
        allowed = options.permissions(node)
        print(f"    {{user: {json.dumps(node)}, "
              f"password: {json.dumps(secrets.token_urlsafe(24))},")
        print("     permissions: {")
        for kind in ("publish", "subscribe"):
            print(f"       {kind}: {{allow: [")
            print("".join(f"         {json.dumps(subject)}\n" for subject in allowed[kind]),
                  end="")
            print("       ]}")
        print("     }}")
    print("  ]\n}")


@app.command()
def status(
    http: Annotated[str, typer.Option(help="the agent's --http address")] = "127.0.0.1:9100",
    as_json: Annotated[bool, typer.Option("--json", help="raw JSON")] = False,
) -> None:
    """Show a running agent's peers (connected, lag, last error), maps and readiness."""
    try:
        with urllib.request.urlopen(f"http://{http}/status", timeout=5) as resp:
            state = json.load(resp)
    except (urllib.error.URLError, OSError) as e:
        raise _fail(
            BpfsyncError(f"no agent answers on http://{http}/status ({e}); is it running with "
                         f"--http {http}?")
        ) from e
    if as_json:
        print(json.dumps(state, indent=1))
        return
    out = Console()
    ready = "[green]ready[/]" if state.get("ready") else "[yellow]catching up[/]"
    out.print(f"node [bold]{state.get('node')}[/] — {ready} — watching by {state.get('watch')}")
    sec = state.get("security") or {}
    tls = sec.get("tls")
    members = ", ".join(sec.get("members") or []) or "-"
    if tls:
        until = time.strftime("%Y-%m-%d", time.gmtime(tls.get("not_after", 0)))
        out.print(f"mutual TLS, certificate {str(tls.get('fingerprint'))[:16]} valid until "
                  f"{until}; members ({sec.get('membership')}): {members}", highlight=False)
    elif sec and not state.get("stream"):
        out.print(f"[yellow]TLS off[/]; members ({sec.get('membership')}): {members}",
                  highlight=False)
    stream = state.get("stream")
    if stream:  # transport: nats
        reached = (f"[green]connected[/] to {stream.get('server')}" if stream.get("connected")
                   else f"[red]no NATS server reached[/] ({stream.get('last_error') or '-'})")
        out.print(f"NATS {', '.join(stream.get('servers') or [])}: {reached}; stream "
                  f"{stream.get('stream')}, {stream.get('published', 0)} batches published, "
                  f"{stream.get('publish_backlog_bytes', 0)} bytes waiting; members: {members}",
                  highlight=False)
    now = time.time()
    peers = Table("peer", "node", "connected", "lag", "sent", "received", "reconnects",
                  "last error")
    for p in state.get("peers", []):
        since = p.get("connected_since")
        connected = Text("no", style="red")
        if p.get("connected"):
            connected = Text("yes", style="green")
            if since is not None:
                connected.append(f" ({_ago(now - since)})")
        peers.add_row(
            str(p.get("address")), str(p.get("node") or "?"), connected,
            str(p.get("lag_records", 0)), str(p.get("sent", 0)), str(p.get("received", 0)),
            str(p.get("reconnects", 0)), _last_error(p, now),
        )
    out.print(peers)
    maps = Table("map", "id", "path", "pin", "keys (incl. tombstones)", "local changes",
                 "applied", "rejected")
    problems = []
    for m in state.get("maps", []):
        maps.add_row(
            str(m.get("name")), str(m.get("id") or "-"), str(m.get("path")), _pin_state(m),
            str(m.get("registers")), str(m.get("local_changes", "-")),
            str(m.get("applied", "-")), str(m.get("rejected", "-")),
        )
        if m.get("problem"):
            problems.append(f"map {m.get('name')}: {m['problem']}")
    out.print(maps)
    for line in problems:
        out.print(Text(line, style="red"))


def _pin_state(row: dict[str, Any]) -> Text:
    """What the map's pin holds and how far the map is (agent/readiness.py Y5, Y6): ready,
    catching up, or missing (while the map object open until now is still synced, if any)."""
    if not row.get("present", True):
        if row.get("id") is None:
            return Text("missing", style="red")
        return Text("missing (syncing the map open until now)", style="yellow")
    if row.get("ready", True):
        return Text("ready", style="green")
    return Text("catching up", style="yellow")


def _ago(seconds: float) -> str:
    """A duration as a person reads it in a table: 42s, 17m, 5h, 3d."""
    s = max(0, round(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= 2 * size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _last_error(peer: dict[str, Any], now: float) -> Text:
    """How long ago the peer's last error happened, then the error (errors are long: the age
    goes first, where a wrapped cell still shows it); dim, and marked as from before the link
    came up, when the link is up and the error is older than it: an old "connection refused"
    of a peer connected since is no problem of now."""
    error = peer.get("last_error")
    if not error:
        return Text("")
    at, since = peer.get("last_error_at"), peer.get("connected_since")
    if at is None:  # an agent older than last_error_at
        return Text(str(error))
    if peer.get("connected") and since is not None and at <= since:
        return Text(f"{_ago(now - at)} ago (before the link came up): {error}", style="dim")
    return Text(f"{_ago(now - at)} ago: {error}")


if __name__ == "__main__":
    app()
