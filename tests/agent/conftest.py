"""Fixtures for end-to-end tests: real agent processes, real maps, real gRPC on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from natslab import nats_cluster, nats_server

from bpfsync.demo.cluster import Cluster

__all__ = ["cluster", "nats_cluster", "nats_server"]


@pytest.fixture
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    with Cluster(tag="test") as c:
        yield c
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            for n in c:
                print(f"--- agent log of node {n.name} (last 4000 chars) ---")
                print(n.log()[-4000:])


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep
