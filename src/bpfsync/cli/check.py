"""`bpfsync check`: a config file checked against this machine, without starting the agent.

The file is validated first (every wrong field at once, as `bpfsync run` reports them). Then it
is checked against the running kernel as the agent would find things at start: each map opened
the way the agent opens it (``agent/synced.py`` ``open_synced``: the map, its policy against its
sizes and BTF, the per-CPU layout, the companion of exact counters), its type one the agent can
sync, and the TLS files read and checked the way the agent reads them (``transport/tls.py``
``load_tls``: key, certificate, CA, validity, node id). Nothing is started: no watcher, no
listener, no write to any map; only ``watch.mode`` trace and auto load the fexit probe, for an
instant, to say whether this kernel allows fexit. ``state.dir`` is read, never written: whether
it can be made or written, and whether its state file would be taken or set aside.

Every problem is reported, not only the first, each with the message the agent gives: the
agent's own verdict on each map, plus the checks it reaches only once an earlier one passes
(each field of a per-field policy, the companion opened on its own) and those across maps (a
kernel map listed twice, a companion that is a synced map). Not checked: whether the listen and
HTTP ports are free (a running agent holds them) and whether the peers answer.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path

from bpfsync.agent.config import AgentConfig, MapConfig, is_loopback, load_config
from bpfsync.agent.store import FILE_NAME, MapShape, inspect_store
from bpfsync.agent.synced import open_synced, split_rules, unsyncable
from bpfsync.core.policy import FieldPolicy
from bpfsync.errors import BpfsyncError, ConfigError, KernelError, NotSupportedError
from bpfsync.kernel.btf import map_layouts
from bpfsync.kernel.features import tracing_supported
from bpfsync.kernel.maps import Map
from bpfsync.transport.tls import TlsFiles, load_tls
from bpfsync.watch.trace_abi import WATCH_MAX, check_traceable

__all__ = ["Finding", "Report", "check_file"]

@dataclass
class Finding:
    """What one check found: a one-line summary when fine, else a title and its problems."""

    subject: str  # config, maps.N, watch, tls
    summary: str = ""
    title: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class Report:
    """Every finding about one config file, in the order checked."""

    source: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return sum(len(f.problems) for f in self.findings)

    def render(self) -> str:
        width = max(len(f.subject) for f in self.findings)
        lines = [f"bpfsync check {self.source}"]
        for f in self.findings:
            text = f.summary if f.ok else f.title
            lines.append(f"  {'ok' if f.ok else 'FAIL':4}  {f.subject:{width}}  {text}".rstrip())
            for problem in f.problems:
                first, *rest = problem.splitlines()
                lines.append(f"        - {first}")
                lines += [f"          {line}" for line in rest]
        n = self.problems
        if n:
            lines.append(f"{n} problem{'s' if n > 1 else ''}: `bpfsync run` would refuse this "
                         "config on this machine")
        else:
            lines.append("no problems found (not checked: free ports, reachable peers)")
        return "\n".join(lines)


def check_file(path: str | Path) -> Report:
    """Validate the config file at ``path`` and check it against the running kernel."""
    report = Report(str(path))
    try:
        cfg = load_config(path)
    except ConfigError as err:
        report.findings.append(Finding("config", problems=[str(err)]))
        return report
    tls = "on" if cfg.tls is not None else "off"
    report.findings.append(Finding(
        "config", f"valid: node {cfg.node_id}, {len(cfg.maps)} map(s), watch {cfg.watch.mode}, "
        f"TLS {tls}"))
    opened = _Opened()
    for index, mc in enumerate(cfg.maps):
        report.findings.append(_check_map(index, mc, cfg, opened))
    opened.cross_check()
    report.findings.append(_check_watch(cfg))
    report.findings.append(_check_tls(cfg))
    report.findings.append(_check_state(cfg))
    return report


# --- maps ----------------------------------------------------------------------------------------


@dataclass
class _Opened:
    """The kernel maps the config names, by kernel id, to find one named twice."""

    # kernel map id -> each (finding, what names it, whether as a companion)
    maps: dict[int, list[tuple[Finding, str, bool]]] = field(default_factory=dict)

    def add(self, m: Map, finding: Finding, role: str, companion: bool = False) -> None:
        self.maps.setdefault(m.info.id, []).append((finding, role, companion))

    def cross_check(self) -> None:
        for map_id, uses in self.maps.items():
            first, first_role, first_companion = uses[0]
            for finding, role, companion in uses[1:]:
                why = ("a companion must be a map of its own, which the data plane's program "
                       "reads and the agent alone writes" if companion or first_companion
                       else "give each map once")
                finding.problems.append(f"{role} is the same kernel map (id {map_id}) as "
                                        f"{first_role} of {first.subject}: {why}")


def _check_map(index: int, mc: MapConfig, cfg: AgentConfig, opened: _Opened) -> Finding:
    finding = Finding(f"maps.{index}", title=f"{mc.sync_name} ({mc.path})")
    problems = finding.problems
    m = _open(mc.path, problems)
    companion = _open(mc.companion, problems) if mc.companion is not None else None
    try:
        if m is not None:
            opened.add(m, finding, mc.path)
        if companion is not None:
            opened.add(companion, finding, f"companion {mc.companion}", companion=True)
        if m is None:
            return finding
        why = unsyncable(mc.path, m.info)
        if why is not None:
            problems.append(why)
        problems += _field_problems(mc, m)
        if cfg.watch.mode == "trace":
            try:
                check_traceable(mc.sync_name, m.info)
            except NotSupportedError as err:
                problems.append(f"watch.mode trace: {err}")
        verdict = _agent_verdict(mc)
        if verdict is not None and verdict not in problems:
            problems.append(verdict)
        finding.summary = _describe(mc, m)
        return finding
    finally:
        for opened_map in (m, companion):
            if opened_map is not None:
                opened_map.close()


def _open(spec: str, problems: list[str]) -> Map | None:
    try:
        return Map.open(spec)
    except BpfsyncError as err:
        problems.append(str(err))
        return None


def _field_problems(mc: MapConfig, m: Map) -> list[str]:
    """Each field of a per-field policy checked on its own, so that every wrong one is named
    (the agent stops at the first)."""
    if not isinstance(mc.policy, dict):
        return []
    try:
        _, layout = map_layouts(m.info)
    except KernelError:  # no BTF, or BTF that does not fit: the agent's verdict says which
        return []
    problems = []
    try:
        ops, bit_ranges = split_rules(mc.policy)
    except ConfigError as err:
        return [str(err)]
    checks: list[tuple[dict[str, str], dict[str, dict[str, str]]]] = [
        ({name: op}, {}) for name, op in ops.items()]
    checks += [({}, {name: ranges}) for name, ranges in bit_ranges.items()]  # a field's together
    for one_op, one_field in checks:
        try:
            FieldPolicy.from_layout(layout, one_op, one_field)
        except ConfigError as err:
            problems.append(str(err))
    return problems


def _agent_verdict(mc: MapConfig) -> str | None:
    """What the agent says when it opens this map at start (None: it takes it)."""
    try:
        open_synced(mc).close()
    except BpfsyncError as err:
        return str(err)
    return None


def _describe(mc: MapConfig, m: Map) -> str:
    info = m.info
    values = f"{info.value_size}-byte values{' per CPU' if info.type.percpu else ''}"
    policy = (mc.policy if isinstance(mc.policy, str)
              else "{" + ", ".join(f"{k}: {v}" for k, v in mc.policy.items()) + "}")
    counters = ""
    if mc.counters == "exact":
        counters = f", exact counters (peers' sum into {mc.companion})"
    elif mc.has_counters:
        counters = ", counters in place"
    return (f"{mc.sync_name} ({mc.path}): {info.type.name.lower()}, {info.key_size}-byte keys, "
            f"{values}, {info.max_entries} entries, {'BTF' if info.btf_id else 'no BTF'}; "
            f"policy {policy}{counters}")


# --- watch and TLS -------------------------------------------------------------------------------


def _check_watch(cfg: AgentConfig) -> Finding:
    watch = cfg.watch
    finding = Finding("watch")
    if watch.mode == "poll":
        finding.summary = f"mode poll: every map scanned every {watch.poll_interval:g} s"
        return finding
    fexit, why = tracing_supported()
    if watch.mode == "trace":
        if len(cfg.maps) > WATCH_MAX:
            finding.problems.append(
                f"watch.mode trace: the trace watcher watches at most {WATCH_MAX} maps")
        if not fexit:
            finding.problems.append(
                f"watch.mode trace needs fexit programs, but {why}: use mode auto (bpf(2) "
                "hooks and scans) or poll")
        else:
            finding.summary = "mode trace: fexit loads here"
        return finding
    if fexit:
        finding.summary = (f"mode auto: fexit loads here; repair scans every "
                           f"{watch.auto_poll_interval:g} s")
    elif watch.syscall_hooks:
        finding.summary = (f"mode auto: no fexit ({why}); bpf(2) hooks if they load, BPF "
                           f"programs' writes by scans every {watch.poll_interval:g} s")
    else:
        finding.summary = (f"mode auto: no fexit ({why}), syscall_hooks off: scans every "
                           f"{watch.poll_interval:g} s")
    return finding


def _check_tls(cfg: AgentConfig) -> Finding:
    finding = Finding("tls")
    tls = cfg.tls
    if cfg.nats is not None:
        return _check_nats_files(cfg, finding)
    if tls is None:
        where = "loopback only" if is_loopback(cfg.listen) else "insecure: true"
        finding.summary = f"off ({where}, listen {cfg.listen}): peers are not authenticated"
        return finding
    try:
        material = load_tls(TlsFiles(tls.cert, tls.key, tls.ca, tls.server_name), cfg.node_id)
    except ConfigError as err:
        finding.problems.append(str(err))
        return finding
    until = datetime.datetime.fromtimestamp(material.not_after, datetime.UTC)
    days = (until - datetime.datetime.now(datetime.UTC)).days
    finding.summary = (f"{tls.cert} names {list(material.names)}, signed by the CA in {tls.ca}, "
                       f"valid until {until:%Y-%m-%d} UTC ({days} days)")
    return finding


def _check_nats_files(cfg: AgentConfig, finding: Finding) -> Finding:
    """transport: nats: the files the agent reads to reach the NATS servers (their servers'
    answers are not checked: `bpfsync run` says at start whether they take the credentials)."""
    nc = cfg.nats
    assert nc is not None
    files = [("nats.creds", nc.creds), ("nats.nkey_seed", nc.nkey_seed)]
    if nc.tls is not None:
        files += [("nats.tls.ca", nc.tls.ca), ("nats.tls.cert", nc.tls.cert),
                  ("nats.tls.key", nc.tls.key)]
    for what, path in files:
        if path is not None and not os.access(path, os.R_OK):
            finding.problems.append(f"{what}: {path} cannot be read")
    finding.title = "NATS credentials and TLS files"
    kind = ("creds file" if nc.creds else "nkey seed" if nc.nkey_seed else "token" if nc.token
            else "user/password" if nc.user else "no credentials")
    tls = f"TLS with the CA in {nc.tls.ca}" if nc.tls is not None else "no TLS"
    finding.summary = (f"NATS {', '.join(nc.servers)} ({kind}, {tls}); the mesh's tls is not "
                       "used")
    return finding


def _check_state(cfg: AgentConfig) -> Finding:
    """state.dir as the agent would find it at start (read-only: nothing is made or moved)."""
    finding = Finding("state")
    where = cfg.state.dir
    if where is None:
        finding.summary = "off (state.dir: null): a restart takes the maps as older than peers"
        return finding
    if where.exists() and not where.is_dir():
        finding.problems.append(f"state.dir {where} is not a directory")
        return finding
    if not where.exists():
        parent = next((p for p in where.parents if p.exists()), Path("/"))
        if not os.access(parent, os.W_OK):
            finding.problems.append(f"state.dir {where} is missing and {parent} is not writable")
        else:
            finding.summary = f"{where}: no state yet, made at the first start"
        return finding
    if not os.access(where, os.W_OK):
        finding.problems.append(f"state.dir {where} is not writable")
        return finding
    shapes = []
    for mc in cfg.maps:
        try:
            sm = open_synced(mc)
        except BpfsyncError:
            continue  # the map's own finding says why
        shapes.append(MapShape(sm.name, sm.schema.key_size, sm.schema.value_size,
                               sm.schema.policy))  # fmt: skip
        sm.close()
    stored, why = inspect_store(where, cfg.node_id, shapes)
    if why is not None:
        finding.problems.append(f"{where / FILE_NAME} would be set aside at start (its state"
                                f" not used): {why}")
        return finding
    names = ", ".join(sorted(stored)) or "none yet"
    finding.summary = f"{where / FILE_NAME}: maps stored: {names}"
    return finding
