"""readiness.py's rules Y1-Y3, as a pure decision over answers, links and time."""

from __future__ import annotations

from bpfsync.agent.readiness import CatchUp

T = 1000.0


def test_ready_once_every_linked_peer_answered_every_map() -> None:
    c = CatchUp(maps=["m", "n"], started=T)
    assert c.verdict(T + 1, ["b", "c"], 0, 10) is None
    c.answer("m", "b")
    c.answer("n", "b")
    assert c.verdict(T + 1, ["b", "c"], 0, 10) is None  # c is linked and has not answered
    c.answer("m", "c")
    assert c.verdict(T + 1, ["b", "c"], 0, 10) is None  # nor for map n
    c.answer("n", "c")
    assert c.verdict(T + 1, ["b", "c"], 0, 10) == "caught up with b, c"


def test_no_answer_counts_without_a_peer_having_answered() -> None:
    """An empty map of answers is never done, linked peers or not (before the timeout)."""
    c = CatchUp(maps=["m"], started=T)
    assert c.verdict(T + 5, [], 0, 10) is None
    assert not c.done([])


def test_alone_after_the_timeout_and_silent_peers_after_three() -> None:
    c = CatchUp(maps=["m"], started=T)
    assert c.verdict(T + 10.5, [], 0, 10) == "no peer reachable: starting alone"
    # linked but silent: waits three timeouts after its last batch
    assert c.verdict(T + 10.5, ["b"], T + 5, 10) is None
    assert c.verdict(T + 34, ["b"], T + 5, 10) is None
    assert c.verdict(T + 36, ["b"], T + 5, 10) == "peers ['b'] did not answer the catch-up digest"
