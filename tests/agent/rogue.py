"""A rogue peer for the trust tests: raw frames from the project's own codec, sent to one real
agent over real gRPC, with or without a certificate, under any node id it likes."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import grpc.aio

from bpfsync.core.messages import Batch, Hello, MapSchema, Stamp
from bpfsync.core.register import Packed, pack
from bpfsync.demo.cluster import KEY, MAP_NAME, VALUE, AgentProcess
from bpfsync.transport import codec
from bpfsync.transport.certs import Issued
from bpfsync.transport.rpc import METHOD

SCHEMA = MapSchema(MAP_NAME, KEY.size, VALUE.size)


def hello(node: str, incarnation: int | None = None) -> bytes:
    return codec.encode(Hello(node, incarnation or time.time_ns(), (SCHEMA,)))


def write(sender: str, seq: int, key: int, value: bytes, *, origin: str | None = None,
          wall: int | None = None, logical: int = 0) -> bytes:
    """A Batch frame of one record, its stamp as given (``pack`` takes any 64-bit parts)."""
    stamp = Stamp(time.time_ns() if wall is None else wall, logical, origin or sender)
    records = Packed([MAP_NAME], [KEY.pack(key)], [pack(stamp, value)])
    return codec.encode(Batch(sender, seq, records))


class Rogue:
    """Streams to one agent's address: plaintext, or TLS with ``creds`` (the CA's certificate
    and a certificate of the rogue's own)."""

    def __init__(self, address: str, creds: tuple[Path, Issued] | None = None) -> None:
        self.address = address
        self._creds = creds

    def channel(self) -> grpc.aio.Channel:
        """A new channel to the agent, on the running loop."""
        opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1),
                ("grpc.use_local_subchannel_pool", 1)]
        if self._creds is None:
            return grpc.aio.insecure_channel(self.address, options=opts)
        ca, mine = self._creds
        creds = grpc.ssl_channel_credentials(ca.read_bytes(), mine.key.read_bytes(),
                                             mine.cert.read_bytes())
        return grpc.aio.secure_channel(self.address, creds, options=opts)

    async def streams(
        self, runs: Sequence[Sequence[bytes]], linger: float = 0.3, concurrency: int = 1,
    ) -> list[tuple[grpc.StatusCode | None, str]]:
        """One stream per run of frames, ``concurrency`` at a time, on one channel: each
        writes its frames, then waits up to ``linger`` s for the agent to end it. Returns how
        each ended (None: the agent kept it open)."""
        limit = asyncio.Semaphore(concurrency)
        async with self.channel() as channel:
            async def one(frames: Sequence[bytes]) -> tuple[grpc.StatusCode | None, str]:
                async with limit:
                    return await _stream(channel, frames, linger)

            return list(await asyncio.gather(*(one(r) for r in runs)))

    def send(self, *frames: bytes, linger: float = 0.5) -> tuple[grpc.StatusCode | None, str]:
        """One stream of ``frames``, from a test that is not a coroutine."""
        return asyncio.run(self.streams([frames], linger))[0]


async def _stream(
    channel: grpc.aio.Channel, frames: Sequence[bytes], linger: float
) -> tuple[grpc.StatusCode | None, str]:
    call = channel.stream_stream(METHOD)()
    try:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            for i, frame in enumerate(frames):
                await call.write(frame)
                if i == 0 and len(frames) > 1:
                    # the agent's answer to the first frame (its Hello, or a refusal) before
                    # the rest, as a peer would: writing into a stream the agent has already
                    # refused races its refusal, and the client may then see INTERNAL
                    async with asyncio.timeout(linger + 5):
                        if await call.read() is grpc.aio.EOF:
                            break
            async with asyncio.timeout(linger):
                while await call.read() is not grpc.aio.EOF:
                    pass
        if not call.done():
            return None, ""
        return await call.code(), await call.details() or ""
    except TimeoutError:
        return None, ""
    finally:
        call.cancel()


def rss_mb(agent: AgentProcess) -> float:
    """The agent process's resident set, in MB."""
    assert agent.proc is not None
    status = Path(f"/proc/{agent.proc.pid}/status").read_text()
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert found, status
    return int(found.group(1)) / 1024


def metrics(agent: AgentProcess) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{agent.http_port}/metrics", timeout=5) as r:
        return r.read().decode()


def counter(text: str, name: str, **labels: str) -> float:
    """A sample's value in a Prometheus text page (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
