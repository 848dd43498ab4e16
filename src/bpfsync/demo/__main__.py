"""`make demo`: three nodes, three maps, three agents on loopback; watch them converge.

Each node writes its own keys (one of them from a BPF program), one key is written on two nodes at
once, one node deletes a key another created; then every node's map is shown to be identical.
Everything it creates (pins, processes) is removed when it ends, also on ^C.
"""

from __future__ import annotations

import hashlib
import sys
import time

from rich.console import Console
from rich.table import Table

from bpfsync.demo.cluster import VALUE, Cluster, session

out = Console(highlight=False)


def fingerprint(content: dict[bytes, bytes]) -> str:
    h = hashlib.blake2b(digest_size=6)
    for k in sorted(content):
        h.update(k + content[k])
    return h.hexdigest()


def show(c: Cluster, title: str) -> None:
    t = Table(title=title)
    for col in ("node", "entries", "content fingerprint", "key 7 (bytes field)", "agent"):
        t.add_column(col)
    for n in c:
        content = n.content()
        k7 = content.get((7).to_bytes(4, "little"))
        st = n.status()
        agent = "ready" if st and st.get("ready") else ("running" if n.running else "stopped")
        t.add_row(n.name, str(len(content)), fingerprint(content),
                  str(VALUE.unpack(k7)[0]) if k7 else "-", agent)
    out.print(t)


def main() -> int:
    with Cluster(tag="demo") as c:
        out.print("[bold]bpfsync demo[/]: 3 nodes, each with its own pinned map "
                  f"[cyan]{c['a'].pin.parent.parent}/<node>/sessions[/] and its own agent")
        c.start()
        if not c.wait_ready(30):
            out.print("[red]agents did not become ready[/]")
            for n in c:
                out.print(n.log()[-2000:])
            return 1
        for n in c:
            out.print(f"  node {n.name}: gRPC {n.address}, status http://127.0.0.1:{n.http_port}"
                      "/status")
        out.print("\n[bold]writes[/]: a writes keys 0-999 from user space, b keys 1000-1999 from "
                  "a BPF program, c keys 2000-2999; a and b both write key 7; c deletes key 5")
        started = time.monotonic()
        for k in range(1000):
            c["a"].put(k, session(k))
            c["b"].bpf_put(1000 + k, session(1000 + k))
            c["c"].put(2000 + k, session(2000 + k))
        c["a"].put(7, session(70))
        c["b"].put(7, session(700))
        time.sleep(0.5)
        c["c"].delete(5)
        ok = c.wait_converged(30)
        took = time.monotonic() - started
        show(c, "after the writes")
        if not ok:
            out.print("[red]the maps did not converge[/]")
            return 1
        out.print(f"[green]all three maps are identical[/] ({took:.2f} s after the first write)")

        out.print("\n[bold]restart[/]: stop node c, write on a, start c again")
        c["c"].stop()
        for k in range(3000, 3500):
            c["a"].put(k, session(k))
        c["a"].delete(2000)
        c["c"].start()
        c.wait(c["c"].is_ready, 30)
        ok = c.wait_converged(30)
        show(c, "after node c restarted")
        out.print("[green]node c caught up before reporting ready[/]" if ok
                  else "[red]node c did not catch up[/]")
        out.print("\nstopping the agents and removing the maps")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
