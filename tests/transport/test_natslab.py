"""The NATS lab proven with nats-py: real nats-server processes, JetStream, auth, a 3-node cluster.

These pin what a NATS transport will rely on: a stream keeps order, a bad credential fails the
connect at once when asked to, and a client holding every cluster URL keeps publishing to an R3
stream across the crash of the member it is connected to (which is also the stream's leader).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from aio import WAIT, run
from nats.js.api import StreamConfig
from natslab import (
    NatsCluster,
    NatsLabError,
    NatsServer,
    Token,
    UserPassword,
)

# nats.connect options. A refused credential: nats-py retries it like an unreachable server
# (every reconnect_time_wait, 2 s, up to max_reconnect_attempts, 60, per URL; 0 or less means
# forever) unless reconnecting is off, when the first -ERR is raised.
REFUSED_FAST: dict[str, Any] = {"allow_reconnect": False, "connect_timeout": 2}
# Failover: retry the next URL 0.1 s after a failed one and never give up on the pool (a member
# comes back after a restart); a TCP connect to a dead member is refused at once on loopback,
# connect_timeout bounds one that does not answer.
FAILOVER: dict[str, Any] = {
    "reconnect_time_wait": 0.1, "max_reconnect_attempts": -1, "connect_timeout": 1,
}
# What a JetStream publish may meet while a member is down: its reply lost with the connection
# (TimeoutError), no stream leader yet (503: NoStreamResponseError), a reconnect under way.
TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.ConnectionReconnectingError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)
PUBLISH_TIMEOUT = 1.0  # s per attempt: a lost reply is retried soon, with the same Nats-Msg-Id
VIOLATION = "nats: 'Authorization Violation'"

def test_one_server_stream_in_order_and_kv(nats_server: NatsServer) -> None:
    async def body() -> None:
        nc = await nats.connect(nats_server.url, **REFUSED_FAST)
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name="T", subjects=["t.>"]))
            for i in range(100):
                ack = await js.publish(f"t.{i % 7}", f"m{i}".encode())
                assert (ack.stream, ack.seq) == ("T", i + 1)

            ordered = await js.subscribe("t.>", ordered_consumer=True)
            got = [await ordered.next_msg(timeout=WAIT) for _ in range(100)]
            assert [m.data for m in got] == [f"m{i}".encode() for i in range(100)]
            assert [m.metadata.sequence.stream for m in got] == list(range(1, 101))

            pull = await js.pull_subscribe("t.>", durable="reader")
            pulled: list[Any] = []
            while len(pulled) < 100:
                for m in await pull.fetch(100 - len(pulled), timeout=WAIT):
                    await m.ack()
                    pulled.append(m)
            assert [m.data for m in pulled] == [f"m{i}".encode() for i in range(100)]

            kv = await js.create_key_value(bucket="cfg")
            first = await kv.put("a", b"1")
            entry = await kv.get("a")
            assert (entry.value, entry.revision) == (b"1", first)
            assert await kv.put("a", b"2") > first
            assert (await kv.get("a")).value == b"2"
        finally:
            await nc.close()

    run(body)


def test_restart_keeps_ports_and_store(nats_server: NatsServer) -> None:
    async def body() -> None:
        nc = await nats.connect(nats_server.url, **FAILOVER)
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name="T", subjects=["t.>"]))
            for i in range(10):
                await js.publish("t.x", bytes([i]))
            url, pid = nats_server.url, nats_server.pid
            await asyncio.to_thread(nats_server.restart)
            assert nats_server.running and nats_server.url == url and nats_server.pid != pid
            info = await js.stream_info("T")  # over the reconnected client
            assert (info.state.messages, info.state.last_seq) == (10, 10)
            assert nc.stats["reconnects"] == 1
        finally:
            await nc.close()

    run(body)


def test_a_server_that_cannot_start_fails_with_its_log() -> None:
    server = NatsServer()
    try:
        server.store_dir.write_text("a file where the JetStream store should be")
        started = time.monotonic()
        with pytest.raises(NatsLabError, match="exited with 1 while starting") as info:
            server.start()
        assert "Can't start JetStream: storage directory is not a directory" in str(info.value)
        assert time.monotonic() - started < 10 and not server.running
    finally:
        server.close()
    assert not server.dir.exists()


async def refused(url: str, **credentials: str) -> tuple[BaseException, float, list[str]]:
    """Connect with REFUSED_FAST: the exception, the seconds it took, what error_cb saw."""
    seen: list[str] = []

    async def error_cb(err: Exception) -> None:
        seen.append(f"{type(err).__name__}: {err}")

    started = time.perf_counter()
    with pytest.raises(nats.errors.Error) as info:
        await nats.connect(url, error_cb=error_cb, **REFUSED_FAST, **credentials)
    return info.value, time.perf_counter() - started, seen


def refusals(seen: list[str]) -> int:
    """How many of the errors error_cb saw are the refusal. Any other may only be a
    ConnectionResetError: the server closes a refused connection right after its -ERR, and
    nats-py at times reports the reset too when it closes its end."""
    assert all(e == f"Error: {VIOLATION}" or e.startswith("ConnectionResetError:")
               for e in seen), seen
    return seen.count(f"Error: {VIOLATION}")


async def check_auth(server: NatsServer, wrong: dict[str, str]) -> None:
    nc = await nats.connect(server.url, **REFUSED_FAST, **server.auth_options())
    assert nc.is_connected
    await nc.flush()  # a round trip: the server took the CONNECT
    await nc.close()

    for credentials in (wrong, {}):
        err, took, seen = await refused(server.url, **credentials)
        # The -ERR during the handshake is a plain nats.errors.Error: nats-py's
        # AuthorizationError is only what an -ERR after the handshake leaves as last_error.
        assert type(err) is nats.errors.Error and str(err) == VIOLATION
        assert not isinstance(err, nats.errors.AuthorizationError)
        assert refusals(seen) == 1
        assert took < 2.0, took  # one round trip on loopback, not retries

    # With reconnecting left on, a bounded pool fails fast too: NoServersError once every URL
    # has had max_reconnect_attempts + 1 tries, each refusal seen by error_cb alone.
    retried: list[str] = []

    async def error_cb(err: Exception) -> None:
        retried.append(f"{type(err).__name__}: {err}")

    started = time.perf_counter()
    with pytest.raises(nats.errors.NoServersError):
        await nats.connect(server.url, max_reconnect_attempts=1, reconnect_time_wait=0.1,
                           error_cb=error_cb, **wrong)
    assert time.perf_counter() - started < 2.0
    assert refusals(retried) == 2


def test_user_password() -> None:
    with NatsServer(auth=UserPassword("alice", "right \"horse\" battery")) as server:
        run(lambda: check_auth(server, {"user": "alice", "password": "wrong"}))


def test_token() -> None:
    with NatsServer(auth=Token("s3cret-token")) as server:
        run(lambda: check_auth(server, {"token": "not-the-token"}))


async def publish_acked(js: Any, subject: str, data: bytes, msg_id: str,
                        retries: dict[str, int], timeout: float = WAIT) -> Any:
    """js.publish until acked, retrying TRANSIENT errors for ``timeout`` s. The stream drops a
    retry whose first attempt was stored (same Nats-Msg-Id, within its duplicate window)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})
        except TRANSIENT as err:
            retries[type(err).__name__] = retries.get(type(err).__name__, 0) + 1
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def test_r3_stream_survives_killing_the_member_the_client_is_on(
    nats_cluster: NatsCluster,
) -> None:
    async def body() -> None:
        admin = await nats.connect(nats_cluster.urls, **FAILOVER)
        si = await admin.jetstream().add_stream(
            StreamConfig(name="R3", subjects=["t.>"], num_replicas=3))
        await admin.close()
        assert si.config.num_replicas == 3 and si.cluster.leader
        victim = nats_cluster.index(si.cluster.leader)
        doomed = nats_cluster[victim]

        events: list[str] = []

        async def disconnected() -> None:
            events.append("disconnected")

        async def reconnected() -> None:
            events.append(f"reconnected to {nc.connected_url.port}")

        async def error_cb(err: Exception) -> None:
            events.append(f"{type(err).__name__}: {err}")

        # The doomed member first, kept first: the kill takes the client's server and the
        # stream leader at once.
        urls = [doomed.url] + [s.url for s in nats_cluster if s is not doomed]
        nc = await nats.connect(urls, dont_randomize=True, error_cb=error_cb,
                                disconnected_cb=disconnected, reconnected_cb=reconnected,
                                **FAILOVER)
        try:
            assert nc.connected_url.port == doomed.port
            js = nc.jetstream(timeout=PUBLISH_TIMEOUT)
            retries: dict[str, int] = {}
            acks = []
            for i in range(200):
                if i == 100:
                    nats_cluster.kill(victim)
                acks.append(await publish_acked(js, f"t.{i}", b"%d" % i, f"m{i}", retries))
            print(f"retries {retries}; events {events}")
            assert [a.seq for a in acks] == list(range(1, 201))
            assert "disconnected" in events and nc.connected_url.port != doomed.port

            await asyncio.to_thread(nats_cluster.start, victim)
            await asyncio.to_thread(nats_cluster.wait_formed)  # healthz: its replica is current
            state = (await js.stream_info("R3")).state
            assert (state.messages, state.first_seq, state.last_seq) == (200, 1, 200)

            # Read back through the restarted member alone.
            reader = await nats.connect(doomed.url, **FAILOVER)
            try:
                ordered = await reader.jetstream().subscribe("t.>", ordered_consumer=True)
                got = [await ordered.next_msg(timeout=WAIT) for _ in range(200)]
            finally:
                await reader.close()
            assert [m.metadata.sequence.stream for m in got] == list(range(1, 201))
            assert [m.data for m in got] == [b"%d" % i for i in range(200)]
        finally:
            await nc.close()

    run(body)


def test_cluster_urls_and_members(nats_cluster: NatsCluster) -> None:
    assert len(nats_cluster) == 3 and len(set(nats_cluster.urls)) == 3
    assert all(u.startswith("nats://127.0.0.1:") for u in nats_cluster.urls)
    assert {s.server_name for s in nats_cluster} == {"n0", "n1", "n2"}
    leader = nats_cluster.meta_leader()
    assert leader is not None and all(s.meta_leader() == leader for s in nats_cluster)
