"""Fixtures for the example tests: labs (netlab.py) that are always torn down, and the agents'
logs printed when a test fails."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from natslab import nats_server
from netlab import Netlab

__all__ = ["nats_server", "netlab"]


@pytest.fixture
def netlab(request: pytest.FixtureRequest) -> Iterator[Callable[..., Netlab]]:
    """``netlab(example, program, rodata=...)``: a started lab, closed at teardown."""
    labs: list[Netlab] = []

    def make(*args: Any, **kwargs: Any) -> Netlab:
        try:
            lab = Netlab(*args, **kwargs)
        except FileNotFoundError as err:
            pytest.fail(str(err))
        labs.append(lab)
        return lab

    yield make
    rep = getattr(request.node, "rep_call", None)
    for lab in labs:
        if rep is not None and rep.failed and any(n.agent.log() for n in lab):
            print(lab.logs())
        lab.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep
