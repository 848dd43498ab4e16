"""The benchmark's figures as PNGs: `bench/run.py --plot DIR` draws them from the run's results.

  latency_cdf.png  every latency phase's distribution (the share of writes seen on b within a
                   time, and the tail: the share seen later), against the seed design's
                   percentiles and the p99 target
  throughput.png   writes/s of each throughput phase: end to end, distinct records applied, the
                   offered rate; the burst's records/s; the target
  catchup.png      a new node's catch-up: time to ready and to identical, and the agents' RSS

A figure whose phases were skipped is not drawn. matplotlib (the dev extra) with the Agg
backend: no display needed. Also on its own, from the results file a run leaves (which has no raw
latencies: the latency figure then shows each phase's percentiles):

    .venv/bin/python bench/plots.py /tmp/bpfsync-bench-results-full.json DIR
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

LAT_TARGET_MS = 10.0  # p99
THR_TARGET = 200_000.0  # writes/s
CATCHUP_TARGET_S = 2.0
RSS_TARGET_MB = 300.0
SAMPLES = "samples_ms"  # a latency phase's raw latencies (phases.latency); the table ignores it
LAT_RUNS = ("lat_auto", "lat_auto_tls", "lat_auto_80", "lat_poll")  # the table's order
THR_RUNS = (("thr_user", "16 B user-space"), ("thr_user_low", "16 B user-space, lower rate"),
            ("thr_user_tls", "16 B user-space, mutual TLS"), ("thr_bpf", "16 B BPF write_range"),
            ("thr_256", "256 B user-space"))


def plot_all(R: dict[str, Any], out: Path) -> list[Path]:
    """Draw every figure the results allow into ``out``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("latency_cdf.png", latency_cdf), ("throughput.png", throughput),
                       ("catchup.png", catchup)):
        fig = draw(R)
        if fig is None:
            continue
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _lat_label(lt: dict[str, Any]) -> str:
    how = "auto" if lt["mode"] == "auto" else f"poll {lt['poll']} s"
    return f"@{lt['rate']:,.0f}/s, {how}" + (", mutual TLS" if lt.get("tls") else "")


def _curve(samples: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted latencies thinned to a few thousand points, evenly over the body and densely in
    the tail: (x, share seen by x, share seen after x)."""
    x = np.sort(np.asarray(samples, dtype=np.float64))
    n = x.size
    idx = np.unique(np.concatenate([
        np.linspace(0, n - 1, min(n, 2000)),
        n - np.logspace(math.log10(n), 0, min(n, 1000)),
    ]).astype(np.int64).clip(0, n - 1))
    return x[idx], (idx + 1) / n, (n - idx) / n


def latency_cdf(R: dict[str, Any]) -> Figure | None:
    runs = [R[k] for k in LAT_RUNS if R.get(k)]
    if not runs:
        return None
    fig, (body, tail) = plt.subplots(1, 2, figsize=(13, 6.2), layout="constrained")
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, lt in enumerate(runs):
        color = cycle[i % len(cycle)]
        label = f"bpfsync {_lat_label(lt)} (p99 {lt['p99']:.1f} ms)"
        samples = lt.get(SAMPLES)
        if samples is not None and len(samples):
            x, seen, later = _curve(samples)
            body.plot(x, seen, color=color, label=label)
            tail.plot(x, later, color=color, label=label)
        else:  # results without the raw latencies: the percentiles alone
            ps = [lt["p50"], lt["p99"], lt["p999"]]
            body.plot(ps, [0.5, 0.99, 0.999], "o--", color=color, label=f"{label}, percentiles")
            tail.plot(ps, [0.5, 0.01, 0.001], "o--", color=color, label=label)
    seed = R.get("seed")
    if seed:
        label = (f"seed design: p50/p99/p99.9 {seed['p50_ms']:.2f}/{seed['p99_ms']:.2f}/"
                 f"{seed['p999_ms']:.2f} ms")
        if seed.get(SAMPLES) is not None and len(seed[SAMPLES]):
            x, seen, later = _curve(seed[SAMPLES])
            body.plot(x, seen, "k-", label=label)
            tail.plot(x, later, "k-", label=label)
        else:
            ps = [seed["p50_ms"], seed["p99_ms"], seed["p999_ms"]]
            body.plot(ps, [0.5, 0.99, 0.999], "ks--", label=label)
            tail.plot(ps, [0.5, 0.01, 0.001], "ks--", label=label)
    for ax in (body, tail):
        ax.set_xscale("log")
        ax.axvline(LAT_TARGET_MS, color="red", ls=":", label=f"target: p99 <= {LAT_TARGET_MS:g} ms")
        ax.set_xlabel("latency, write on a -> written on b (ms, log scale)")
        ax.grid(True, which="both", alpha=0.3)
    body.set_ylim(0, 1.005)
    body.set_ylabel("share of the writes seen on b within that time")
    body.set_title("CDF")
    tail.set_yscale("log")
    tail.set_ylim(bottom=1e-4, top=1.05)
    tail.set_yticks([1, 0.5, 0.1, 0.01, 0.001, 1e-4],
                    ["all", "p50", "p90", "p99", "p99.9", "p99.99"])
    tail.set_ylabel("share seen later than that (log scale)")
    tail.set_title("the tail")
    fig.suptitle("latency: bpfsync from a write on a to b's agent writing it into b's map, "
                 "while a takes writes at the rate given;\nthe seed design from one change's "
                 "call (a new connection each) to the peer's answer, one change at a time",
                 fontsize=9)
    fig.legend(*body.get_legend_handles_labels(), loc="outside lower center", ncol=3,
               fontsize=8)
    return fig


def throughput(R: dict[str, Any]) -> Figure | None:
    rows = [(label, R[k]) for k, label in THR_RUNS if R.get(k)]
    bu = R.get("burst")
    if not rows and not bu:
        return None
    seed_rate = R.get("seed", {}).get("rate") or float("nan")
    n = len(rows) + (1 if bu else 0)
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.9 * n), layout="constrained")
    h = 0.38
    top = 0.0
    for i, (_label, t) in enumerate(rows):
        y = n - 1 - i
        done = t["converged"]
        ax.barh(y + h / 2, t["writes_per_s"], h, color="C0", hatch=None if done else "//",
                label="writes/s on a, end to end (until b and c hold a's values)" if i == 0
                else None)
        ax.barh(y - h / 2, t["distinct_applied_per_s"], h, color="C1",
                label="distinct records applied/s (min of b, c)" if i == 0 else None)
        ax.plot([t["offered_rate"]] * 2, [y - h, y + h], "k-", lw=2,
                label="offered rate" if i == 0 else None)
        note = f"{t['writes_per_s']:,.0f}/s = {t['writes_per_s'] / seed_rate:,.0f}x seed"
        # after the offered rate's mark where it is just past the bar
        at = (t["offered_rate"] if t["writes_per_s"] < t["offered_rate"] < 1.3 * t["writes_per_s"]
              else t["writes_per_s"])
        ax.text(at, y + h / 2, "  " + (note if done else "NOT converged: " + note), va="center",
                fontsize=8)
        top = max(top, t["writes_per_s"], t["offered_rate"])
    if bu:
        rate = bu.get("rate") or 0.0
        ax.barh(0, rate, h, color="C2", label="burst: records/s to each peer")
        note = (f"{rate:,.0f}/s = {rate / seed_rate:,.0f}x seed" if bu.get("seconds") else
                "NOT in time")
        ax.text(rate, 0, "  " + note, va="center", fontsize=8)
        top = max(top, rate)
    ax.axvline(THR_TARGET, color="red", ls=":", label=f"target: >= {THR_TARGET:,.0f} writes/s")
    labels = [label for label, _ in rows] + ([f"burst of {bu['entries']:,} writes"] if bu else [])
    ax.set_yticks(range(n - 1, -1, -1), labels)
    ax.set_xlim(0, 1.3 * max(top, THR_TARGET))
    ax.xaxis.set_major_formatter(lambda v, _pos: f"{v / 1000:,.0f}k")
    ax.set_xlabel(f"per second (the seed design: {seed_rate:,.0f} changes/s)")
    ax.set_title("throughput per phase, a -> b + c")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def catchup(R: dict[str, Any]) -> Figure | None:
    cu = R.get("catchup")
    if not cu:
        return None
    fig, (times, mem) = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    bars = [("a: start -> ready\non its full map", cu.get("a_load_s")),
            ("b (new, empty): start\n-> ready", cu.get("ready_s")),
            ("b: start -> identical\nto a", cu.get("identical_s"))]
    xs = range(len(bars))
    values = [v if v is not None else 0.0 for _, v in bars]
    times.bar(xs, values, color=["C7", "C0", "C1"])
    for x, (_, v) in zip(xs, bars, strict=True):
        times.text(x, v or 0.0, f"{v:.2f} s" if v is not None else "never", ha="center",
                   va="bottom", fontsize=9)
    times.axhline(CATCHUP_TARGET_S, color="red", ls=":",
                  label=f"target: b ready <= {CATCHUP_TARGET_S:g} s")
    times.set_xticks(xs, [label for label, _ in bars])
    times.set_ylim(0, 1.12 * max(CATCHUP_TARGET_S, *values))
    times.set_ylabel("seconds")
    times.set_title(f"catch-up of {cu['entries']:,} entries")
    times.legend(fontsize=8)
    rest = cu.get("rest", {})
    groups = [("just caught up", cu.get("a_rss_after"), cu.get("b_rss")),
              ("at rest (every bucket\nfrozen)" if rest.get("settled") else
               "90 s later (NOT every\nbucket frozen)", rest.get("a_rss"), rest.get("b_rss"))]
    if R.get("thr_rss_b"):
        groups.append(("b after the 16 B throughput\nphase (its own cluster)", None,
                       R["thr_rss_b"]))
    w = 0.38
    for i, (_, a, b) in enumerate(groups):
        pair = a is not None and b is not None
        for dx, v, color, who in ((-w / 2 if pair else 0, a, "C7", "a"),
                                  (w / 2 if pair else 0, b, "C0", "b")):
            if v is None:
                continue
            mem.bar(i + dx, v, w, color=color, label=f"agent {who}" if i == 0 else None)
            mem.text(i + dx, v, f"{v:.0f}", ha="center", va="bottom", fontsize=9)
    mem.axhline(RSS_TARGET_MB, color="red", ls=":", label=f"target: <= {RSS_TARGET_MB:g} MB")
    mem.set_xticks(range(len(groups)), [g[0] for g in groups])
    mem.set_ylim(0, 1.12 * max([RSS_TARGET_MB, *(v for g in groups for v in g[1:] if v)]))
    mem.set_ylabel("RSS (MB)")
    mem.set_title(f"agent memory with {cu['entries']:,} entries")
    mem.legend(fontsize=8)
    return fig


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} RESULTS.json DIR")
    for written in plot_all(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])):
        print(written)
