"""readiness.py's rules Y1-Y3, Y5 and Y6, as a pure decision over answers, links and time."""

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


def test_a_map_that_joins_later_catches_up_on_its_own() -> None:
    """Y5: by Y1-Y3 over that one map, counted from when it joined; answers of it from before
    do not count."""
    c = CatchUp(maps=["m"], started=T)
    c.answer("m", "b")
    assert c.verdict(T + 1, ["b"], 0, 10) == "caught up with b"
    c.answer("n", "b")  # an answer of n before it joined
    c.join("n", T + 100)
    assert c.joined_verdict("n", T + 101, ["b"], 0, 10) is None
    c.answer("n", "b")
    assert c.joined_verdict("n", T + 101, ["b"], 0, 10) == "caught up with b"
    c.join("o", T + 100)
    assert c.joined_verdict("o", T + 105, [], 0, 10) is None
    assert c.joined_verdict("o", T + 111, [], 0, 10) == "no peer reachable: starting alone"
    assert c.joined_verdict("o", T + 111, ["b"], T + 105, 10) is None
    assert c.joined_verdict("o", T + 136, ["b"], T + 105, 10) == (
        "peers ['b'] did not answer the catch-up digest")


def test_no_map_at_start_is_nothing_to_wait_for() -> None:
    """Y6: a node whose every pin was empty at start is ready at once."""
    assert CatchUp(maps=[], started=T).verdict(T, ["b"], 0, 10) == "caught up with b"
