"""The benchmark's table: every phase's figures against the seed design and the targets."""

from __future__ import annotations

from typing import Any

from bpfsync.core.digest import DEFAULT_BUCKETS

Rows = list[tuple[str, str, str, str]]  # metric, value, vs seed, target


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def persist_rows(pc: dict[str, Any], seed_rate: float, rows: Rows) -> None:
    """The persist phase: thr-user with the state store and with --no-state, medians."""
    for label, how in (("store", "state store"), ("no_state", "--no-state")):
        m, runs = pc[label], pc["runs"][label]
        each = " / ".join(f"{r['writes_per_s']:,.0f}" if r.get("converged") else "NOT converged"
                          for r in runs)
        metric = f"16B user-space, {how} (median of {len(runs)}): writes/s on a -> b+c"
        if m["writes_per_s"] is None:
            rows.append((metric, f"NOT converged ({each})", "n/a", ""))
            continue
        rows.append((metric, f"{m['writes_per_s']:,.0f} (runs {each})",
                     f"{m['writes_per_s'] / seed_rate:,.1f}x", ""))
        rows.append((f"16B user-space, {how}: agents' CPU a / b+c (median), per write",
                     f"{m['cpu_a_s']:.1f} / {m['cpu_bc_s']:.1f} s, "
                     f"{m['cpu_us_per_write']:.1f} us/write", "", ""))
    if pc["ratio"] is not None:
        rows.append(("state store: 16B writes/s against --no-state",
                     f"{100 * pc['ratio']:.0f}%", "", ">=90%"))
    if pc["cpu_ratio"] is not None:
        rows.append(("state store: agents' CPU per write against --no-state",
                     f"{100 * (pc['cpu_ratio'] - 1):+.0f}%", "", ""))


_EVENTS = (("first line", "first log line"), ("restarted on stored state", "stored state in"),
           ("agent started", "started"),
           ("caught up", "caught up"), ("ready", "ready"))


def restart_rows(rs: dict[str, Any], rows: Rows) -> None:
    """The restart phase: one row per restart of b."""
    n = rs["entries"]
    if not rs["runs"]:
        rows.append((f"restart on an unchanged {n:,}-entry map", "NOT measured: a and b "
                     f"converged {rs['converged']}, b stored whole {rs.get('stored')}", "", ""))
        return
    for r in rs["runs"]:
        how = "state file" if r["state"] == "state" else "--no-state"
        ev = r["events"]
        marks = ", ".join(f"{name} {ev[m]['at_s']:.2f}" for m, name in _EVENTS if m in ev)
        why = ev.get("ready", {}).get("why")
        rdy = f"{r['ready_s']:.2f} s" if r["ready_s"] is not None else "NOT ready"
        rows.append((f"restart on an unchanged {n:,}-entry map, {how}, after {r['signal']}: "
                     "start -> ready",
                     f"{rdy} (log: {marks}{f'; {why}' if why else ''}); b sent "
                     f"{_bytes(r['b_bytes_sent'])}, {r['b_records_sent']:,} records, received "
                     f"{_bytes(r['b_bytes_received'])}, {r['b_records_received']:,} records"
                     f"{'' if r['identical'] else '; NOT identical'}",
                     "", "<=1 s" if r["state"] == "state" else ""))


def report(R: dict[str, Any], argv: list[str]) -> None:
    seed = R["seed"]
    rows: Rows = []

    def thr_rows(key: str, label: str) -> None:
        if key not in R:
            return
        t = R[key]
        if t["converged"]:
            rows.append((f"{label}: writes/s on a -> b+c", f"{t['writes_per_s']:,.0f}",
                         f"{t['writes_per_s'] / seed['rate']:,.1f}x", ">=200k/s, >=100x"))
        else:
            rows.append((f"{label}: writes/s on a -> b+c",
                         f"NOT converged {t['total_s']:.0f}s after start: b,c hold "
                         f"{min(t['keys_final_ok'].values()) if t['keys_final_ok'] else 0:,}"
                         f" of {t['keys_touched']:,} final values", "n/a", ">=200k/s, >=100x"))
        rows.append((f"{label}: distinct records applied/s (min of b,c)",
                     f"{t['distinct_applied_per_s']:,.0f}",
                     f"{t['distinct_applied_per_s'] / seed['rate']:,.1f}x", ""))
        rows.append((f"{label}: offered / written",
                     f"{t['offered_rate']:,.0f}/s, {t['written']:,} in {t['write_s']:.1f}s; "
                     f"done {t['total_s']:.1f}s; final values on b,c "
                     f"{min(t['keys_final_ok'].values()) if t['keys_final_ok'] else 0:,}"
                     f"/{t['keys_touched']:,}", "", ""))

    rows.append(("seed: changes/s (unary, new conn, 1 peer, 4B)", f"{seed['rate']:,.0f}", "1x",
                 ""))
    rows.append(("seed: latency p50/p99/p99.9",
                 f"{seed['p50_ms']:.2f}/{seed['p99_ms']:.2f}/{seed['p999_ms']:.2f} ms", "1x", ""))
    thr_rows("thr_user", "16B user-space")
    thr_rows("thr_user_tls", "16B user-space, mutual TLS")
    plain, tls = R.get("thr_user"), R.get("thr_user_tls")
    if plain and tls and plain["converged"] and tls["converged"]:
        rows.append(("mutual TLS: 16B writes/s against plaintext",
                     f"{100 * tls['writes_per_s'] / plain['writes_per_s']:.0f}%", "", ">=90%"))
    thr_rows("thr_user_low", "16B user-space, lower offered rate")
    thr_rows("thr_bpf", "16B BPF write_range")
    thr_rows("thr_256", "256B user-space")
    if "thr_256" not in R:
        rows.append(("256B", "not measured", "", ""))
    pc = R.get("persist")
    if pc:
        persist_rows(pc, seed["rate"], rows)
    for key in ("lat_auto", "lat_auto_tls", "lat_auto_80", "lat_poll"):
        lt = R.get(key)
        if lt:
            how = "auto (bpf(2) hooks + poll)" if lt["mode"] == "auto" else f"poll {lt['poll']}s"
            how += ", mutual TLS" if lt.get("tls") else ""
            rows.append((f"latency a->b @{lt['rate']:,.0f}/s, {how}: p50/p99/p99.9",
                         f"{lt['p50']:.1f}/{lt['p99']:.1f}/{lt['p999']:.1f} ms "
                         f"({lt['observed']:,} of {lt['written']:,} seen)",
                         f"p99 {lt['p99'] / seed['p99_ms']:.1f}x seed", "p99 <=10 ms"))
    plain, tls = R.get("lat_auto"), R.get("lat_auto_tls")
    if plain and tls:
        rows.append(("mutual TLS: latency p99 @10k/s against plaintext",
                     f"{tls['p99'] - plain['p99']:+.1f} ms", "", "<=+1 ms"))
    bu = R.get("burst")
    if bu:
        if bu["seconds"] is None:
            rows.append((f"burst of {bu['entries']:,} writes on a -> identical on b and c",
                         "NOT in time", "", ">=200k/s, >=100x"))
        else:
            rows.append((f"burst of {bu['entries']:,} writes on a -> identical on b and c",
                         f"{bu['seconds']:.1f} s = {bu['rate']:,.0f} records/s to each peer",
                         f"{bu['rate'] / seed['rate']:,.1f}x", ">=200k/s, >=100x"))
    for line in R.get("trace", []):
        rows.append(("trace watcher events into Python", " ".join(line.split()), "",
                     ">=1M events/s"))
    cu = R.get("catchup")
    if cu:
        idt = f"{cu['identical_s']:.2f} s" if cu["identical_s"] is not None else "NOT in time"
        rdy = f"{cu['ready_s']:.2f} s" if cu["ready_s"] is not None else "never"
        rows.append((f"catch-up of {cu['entries']:,} entries (new node)",
                     f"ready {rdy}, identical {idt}", "", "<=2 s"))
        rows.append(("catch-up TCP bytes a->b / b->a (ss -ti, live sockets only)",
                     f"{cu['wire']['from_sender'] / 1e6:.1f} MB / "
                     f"{cu['wire']['from_receiver'] / 1e6:.1f} MB; a's link to b reconnects "
                     f"{sum(p['reconnects'] or 0 for p in cu['a_peers'])}, dropped "
                     f"{sum(p['dropped'] or 0 for p in cu['a_peers'])}", "", ""))
        rows.append((f"agent RSS with {cu['entries']:,} entries, just caught up (a / b)",
                     f"{cu['a_rss_after']:.0f} MB / {cu['b_rss']:.0f} MB (b's buckets frozen: "
                     f"{cu['rest']['b_frozen_at_identical']}/{DEFAULT_BUCKETS})", "", "<=300 MB"))
        rest = cu["rest"]
        rows.append((f"agent RSS with {cu['entries']:,} entries at rest (a / b)",
                     f"{rest['a_rss']:.0f} MB / {rest['b_rss']:.0f} MB, every bucket frozen "
                     f"{rest['after_s']:.0f} s later" if rest["settled"] else
                     f"{rest['a_rss']:.0f} MB / {rest['b_rss']:.0f} MB, NOT all buckets frozen "
                     "in 90 s", "", "<=300 MB"))
        rows.append(("a: initial load of the full map (start -> ready)",
                     f"{cu['a_load_s']:.1f} s", "", ""))
    rs = R.get("restart")
    if rs:
        restart_rows(rs, rows)
    if "thr_rss_b" in R:
        rows.append(("agent b RSS after 16B throughput", f"{R['thr_rss_b']:.0f} MB", "", ""))
    d = R.get("detect")
    if d:
        rows.append((f"poll scan+diff {d['entries']:,} entries: no change / 1% changed",
                     f"{d['nochange_ms']:.0f} ms / {d['one_pct_ms']:.0f} ms "
                     f"(scan {d['scan_ms']:.0f} + diff {d['diff_ms']:.0f})", "", ""))

    h = R.get("hooks")
    if h:
        rows.append(("bpf(2) hooks: cost per syscall of every process (getppid)",
                     f"{h['getppid_ns']:.0f} -> {h['getppid_hooked_ns']:.0f} ns", "", ""))
        rows.append(("bpf(2) hooks: a bpf(2) map update of an unwatched map",
                     f"{h['bpf_update_ns']:.0f} -> {h['bpf_update_hooked_ns']:.0f} ns", "", ""))
        rows.append(("bpf(2) hooks: watched batch writes -> ring -> numpy",
                     f"{h['batch_elements_per_s'] / 1e6:.2f} M elements/s (packed records)",
                     "", ""))
    w = [max(len(r[i]) for r in [*rows, ("metric", "value", "vs seed", "target")])
         for i in range(4)]
    print("\n" + "  ".join(h.ljust(w[i]) for i, h in enumerate(("metric", "value", "vs seed",
                                                                    "target"))))
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    print("\n| metric | value | vs seed | target |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\ncommand: " + " ".join([".venv/bin/python", *argv]))
    prof = R.get("thr_user", {}).get("profiles")
    if prof:
        for name, p in prof.items():
            print(f"\npy-spy, agent {name} during 16B throughput ({p['total']} samples):")
            print("  self:")
            for f, n in p["self"]:
                print(f"    {100 * n / max(1, p['total']):5.1f}%  {f}")
            print("  inclusive (bpfsync frames):")
            for f, n in p["incl"]:
                print(f"    {100 * n / max(1, p['total']):5.1f}%  {f}")
