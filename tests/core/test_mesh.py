"""Replicas joined by in-memory streams converge (the h11 pattern: two instances, one link)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from meshsim import T0, Mesh, SimNode

from bpfsync.core.messages import MapSchema

SECOND = 10**9
M = MapSchema("blocklist", 4, 8)
C = MapSchema("ratelimit", 4, 8, "counter")


def k(i: int) -> bytes:
    return i.to_bytes(4, "little")


def v(i: int) -> bytes:
    return i.to_bytes(8, "little")


def mesh(*names: str, relay: bool = True, links: list[tuple[str, str]] | None = None) -> Mesh:
    m = Mesh(*(SimNode(n, [M, C], relay=relay) for n in names))
    for a, b in links if links is not None else [(a, b) for a in names for b in names if a < b]:
        m.connect(a, b)
    m.run()  # first contact: hellos, acks, catch-up digests
    return m


def test_two_replicas_see_what_the_other_wrote_and_never_echo_it_back() -> None:
    m = mesh("a", "b")
    a, b = m.nodes["a"], m.nodes["b"]
    a.write("blocklist", k(1), v(1), m.now)
    b.write("blocklist", k(2), v(2), m.now)
    a.write("blocklist", k(3), v(3), m.now)
    m.run()
    assert m.assert_converged("blocklist") == {k(1): v(1), k(2): v(2), k(3): v(3)}
    b.write("blocklist", k(1), None, m.now + 1)
    m.run()
    assert m.assert_converged("blocklist") == {k(2): v(2), k(3): v(3)}
    # 4 data-plane writes, 4 records: applying a peer's write never made a new one
    assert a.local_records + b.local_records == 4


def test_concurrent_writes_of_one_key_settle_on_the_highest_stamp_everywhere() -> None:
    m = mesh("a", "b", "c")
    for i, name in enumerate("abc"):
        m.nodes[name].write("blocklist", k(7), v(i), m.now)  # same physical time on all
    m.run()
    assert m.assert_converged("blocklist") == {k(7): v(2)}  # node id "c" breaks the tie


def test_a_write_reaches_a_node_with_no_direct_link_through_relays() -> None:
    m = mesh("a", "b", "c", links=[("a", "b"), ("b", "c")])
    m.nodes["a"].write("blocklist", k(1), v(1), m.now)
    m.nodes["c"].write("blocklist", k(2), v(2), m.now)
    m.run()
    assert m.assert_converged("blocklist") == {k(1): v(1), k(2): v(2)}


def test_without_relay_periodic_digests_still_converge_through_any_path() -> None:
    m = mesh("a", "b", "c", relay=False, links=[("a", "b"), ("b", "c")])
    m.nodes["a"].write("blocklist", k(1), v(1), m.now)
    m.run()
    assert k(1) not in m.nodes["c"].replica.content("blocklist")
    for _ in range(2):  # a -> b is direct; b -> c takes one anti-entropy round
        m.anti_entropy()
        m.run()
    m.assert_converged("blocklist")


def test_a_partition_heals_by_resend_and_rank() -> None:
    m = mesh("a", "b")
    a, b = m.nodes["a"], m.nodes["b"]
    m.disconnect("a", "b")
    a.write("blocklist", k(1), v(1), m.now)
    m.now += SECOND
    b.write("blocklist", k(1), v(2), m.now)  # later: wins
    m.now += SECOND
    a.write("blocklist", k(2), v(3), m.now)
    m.connect("a", "b")
    m.run()
    assert m.assert_converged("blocklist") == {k(1): v(2), k(2): v(3)}


def test_batches_lost_in_flight_are_resent_on_reconnect() -> None:
    m = mesh("a", "b")
    a = m.nodes["a"]
    for i in range(200):
        a.write("blocklist", k(i), v(i), m.now + i)
    m.flush()  # batches are on the stream to b ...
    m.disconnect("a", "b")  # ... and lost with it
    assert a.session("b").unacked > 0
    m.connect("a", "b")
    m.run()
    assert len(m.assert_converged("blocklist")) == 200


def test_digest_repair_converges_replicas_that_diverged_behind_the_protocols_back() -> None:
    m = mesh("a", "b")
    a, b = m.nodes["a"], m.nodes["b"]
    # state the streams never carried (e.g. a bug, a dropped relay): a lone record on each side
    a.replica.local_change("blocklist", k(1), v(1), m.now)
    a.kernel["blocklist"][k(1)] = v(1)
    b.replica.local_change("blocklist", k(2), v(2), m.now)
    b.kernel["blocklist"][k(2)] = v(2)
    m.anti_entropy()
    m.run()
    assert m.assert_converged("blocklist") == {k(1): v(1), k(2): v(2)}


def test_a_restarted_node_drops_keys_deleted_while_it_was_down_and_keeps_its_new_ones() -> None:
    m = mesh("a", "b", "c")
    a, c = m.nodes["a"], m.nodes["c"]
    a.write("blocklist", k(1), v(1), m.now)
    a.write("blocklist", k(2), v(2), m.now)
    m.run()
    m.isolate("c")  # c's agent stops; its kernel map stays
    m.now += SECOND
    a.write("blocklist", k(1), None, m.now)  # deleted while c is down
    a.write("blocklist", k(2), v(20), m.now)  # updated while c is down
    c.kernel["blocklist"][k(3)] = v(3)  # c's data plane adds a key while its agent is down
    m.run()
    c.restart(incarnation=2)
    m.connect("a", "c")
    m.connect("b", "c")
    m.run()
    assert m.assert_converged("blocklist") == {k(2): v(20), k(3): v(3)}


def test_a_node_partitioned_past_the_ttl_does_not_resurrect_a_purged_delete() -> None:
    m = mesh("a", "b", "c")
    ttl = m.nodes["a"].ttl_ns
    m.nodes["a"].write("blocklist", k(1), v(1), m.now)
    m.nodes["a"].write("blocklist", k(2), v(2), m.now)
    m.run()
    m.isolate("c")  # c keeps running, cut off
    m.now += SECOND
    m.nodes["a"].write("blocklist", k(1), None, m.now)
    m.run()
    for name in "ab":  # the partition outlasted the outboxes: what c missed goes by repair
        box = m.nodes[name].session("c").outbox
        box.take_batch(10**6, 10**9)
        box.overflowed = True
    m.now += ttl + SECOND
    for node in m.nodes.values():
        node.replica.expire(m.now)  # a and b forget the tombstone; c never saw it
    m.connect("a", "c")
    m.connect("b", "c")
    m.run()  # c's copy of k(1) is stale at a and b: they answer with its tombstone
    assert m.contents("blocklist")["c"] == {k(2): v(2)}
    for node in m.nodes.values():  # c's tombstone is already past the TTL: purged
        node.replica.expire(m.now)
    m.anti_entropy()
    m.run()
    assert m.assert_converged("blocklist") == {k(2): v(2)}


def test_counters_sum_every_nodes_slot_and_survive_relays() -> None:
    m = mesh("a", "b", "c", links=[("a", "b"), ("b", "c")])

    def count(name: str, packets: int) -> None:
        """The node's program adds to the (merged) value its map holds, in place."""
        node = m.nodes[name]
        held = int.from_bytes(node.kernel["ratelimit"].get(k(1), v(0)), "little")
        node.write("ratelimit", k(1), v(held + packets), m.now)

    count("a", 10)
    count("b", 20)  # concurrently: b has not seen a's 10 yet
    m.run()
    count("c", 30)
    m.run()
    assert m.assert_converged("ratelimit") == {k(1): v(60)}
    count("a", 5)
    count("c", 1)
    m.run()
    assert m.assert_converged("ratelimit") == {k(1): v(66)}


LINKS = ["ab", "bc", "ac"]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.sampled_from("abc"), st.integers(0, 4), st.integers(0, 3)),
        st.tuples(st.just("delete"), st.sampled_from("abc"), st.integers(0, 4), st.just(0)),
        st.tuples(st.just("count"), st.sampled_from("abc"), st.integers(0, 2), st.integers(1, 9)),
        st.tuples(st.just("cut"), st.sampled_from(LINKS), st.just(0), st.just(0)),
        st.tuples(st.just("heal"), st.sampled_from(LINKS), st.just(0), st.just(0)),
        st.tuples(st.just("step"), st.just(""), st.integers(1, 5), st.just(0)),
        st.tuples(st.just("restart"), st.sampled_from("abc"), st.just(0), st.just(0)),
        st.tuples(st.just("expire"), st.just(""), st.integers(0, 2), st.just(0)),
        st.tuples(st.just("digests"), st.just(""), st.just(0), st.just(0)),
    ),
    max_size=30,
)


@settings(max_examples=40, deadline=None)
@given(ops)
def test_any_schedule_of_writes_partitions_restarts_and_expiry_converges_once_healed(
    schedule: list[tuple[str, str, int, int]],
) -> None:
    m = mesh("a", "b", "c")
    ttl = m.nodes["a"].ttl_ns
    incarnation = 1
    for op, who, x, y in schedule:
        m.now += 1000
        node = m.nodes.get(who)
        if op == "write" and node:
            node.write("blocklist", k(x), v(y), m.now)
        elif op == "delete" and node:
            node.write("blocklist", k(x), None, m.now)
        elif op == "count" and node:
            held = int.from_bytes(node.kernel["ratelimit"].get(k(x), v(0)), "little")
            node.write("ratelimit", k(x), v(held + y), m.now)
        elif op == "cut":
            m.disconnect(who[0], who[1])
        elif op == "heal":
            m.connect(who[0], who[1])
        elif op == "restart" and node:
            m.isolate(who)
            incarnation += 1
            node.restart(incarnation)
        elif op == "expire":
            m.now += x * ttl // 2  # sometimes past the TTL
            for n in m.nodes.values():
                n.replica.expire(m.now)
        elif op == "digests":
            m.anti_entropy()
        else:
            for _ in range(x):
                m.step()
    for link in LINKS:
        m.connect(link[0], link[1])
    m.run()
    for n in m.nodes.values():  # tombstones the stale-record rule left behind (T3)
        n.replica.expire(m.now)
    m.anti_entropy()
    m.run()
    m.assert_converged("blocklist")
    counters = {
        n: (r.replica.content("ratelimit"), r.replica.digest("ratelimit"))
        for n, r in m.nodes.items()
    }
    assert counters["a"] == counters["b"] == counters["c"]
    # steady state: a fresh anti-entropy round finds nothing to repair
    before = m.delivered
    m.anti_entropy()
    m.run()
    assert m.delivered - before == 6 * 2  # 6 directed links x 2 maps: digests only


def test_mesh_time_is_realistic() -> None:
    assert T0 > 10**18
