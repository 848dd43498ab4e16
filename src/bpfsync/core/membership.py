"""Who belongs to the cluster: which nodes may connect, and which origins a record may name.

Sans-I/O: the transport asks ``admits`` at each Hello, the replica asks ``origin_ok`` of every
record's origin; the transport tells ``learn`` which node answered a configured address, the
agent tells ``vouch`` what a member's digest says it is linked to.

Rules (one of M1-M3 holds, by configuration; M4 always):

  M1  Listed: a member list in the configuration (``allowed_nodes``, ``--allow-node``, or the ids
      of peers given as ``ID@HOST:PORT``) is the whole membership. A node not on it is refused at
      its Hello, before any state exists for it; a record whose origin is not on it is refused.
  M2  CA: with TLS and no list, the cluster CA decides. A node is a member when its certificate,
      signed by the CA, names its id (the transport checks that at the handshake). Members relay
      records of other origins; an origin is not checked beyond its form, since a member could
      write any key under its own id anyway.
  M3  Learned: with neither (plaintext quick starts), the members are the nodes that answered
      this node's own dials of its configured peer addresses (``learn``): an unknown id that
      dials in is refused until then. A record may also name a node that a member's digest says
      it is linked to (``vouch``), so records relayed around a cut link still arrive. Plaintext
      authenticates nothing: whoever reaches the port can claim a learned id (docs/security.md).
  M4  This node is a member of its own cluster; its own records come back in repairs.

Every set is bounded (``MAX_MEMBERS``): what peers say cannot grow it without limit.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from bpfsync.core.messages import is_node_id

__all__ = ["MAX_MEMBERS", "Membership"]

MAX_MEMBERS = 4096  # far above a mesh (~32 nodes) or a NATS fleet (hundreds)

Mode = Literal["listed", "ca", "learned", "open"]


class Membership:
    """The membership of one node's cluster; see the module docstring for the rules."""

    __slots__ = ("_learned", "_listed", "_vouched", "mode", "node")

    def __init__(self, node: str, listed: Iterable[str] | None = None, *, ca: bool = False) -> None:
        """``listed``: the configured member ids (M1), if any; ``ca``: TLS is on (M2)."""
        if not is_node_id(node):
            raise ValueError(f"{node!r} is not a node id")
        self.node = node
        self._listed = None if listed is None else frozenset(listed) | {node}
        if self._listed is not None and len(self._listed) > MAX_MEMBERS:
            raise ValueError(f"at most {MAX_MEMBERS} members, {len(self._listed)} listed")
        self._learned: set[str] = {node}
        self._vouched: set[str] = set()
        self.mode: Mode = "listed" if self._listed is not None else "ca" if ca else "learned"

    @classmethod
    def open(cls, node: str) -> Membership:
        """Every well-formed node id is a member: for in-process tests of the layers above."""
        m = cls(node)
        m.mode = "open"
        return m

    def admits(self, node: str) -> bool:
        """Whether ``node`` may connect (asked at its Hello)."""
        if not is_node_id(node):
            return False
        if self._listed is not None:
            return node in self._listed
        return self.mode != "learned" or node in self._learned

    def origin_ok(self, node: str) -> bool:
        """Whether a record stamped by ``node`` may be taken in."""
        if self._listed is not None:
            return node in self._listed
        if self.mode == "learned":
            return node in self._learned or node in self._vouched
        return self.mode == "open" or is_node_id(node)

    def refused(self, origins: Iterable[str]) -> frozenset[str]:
        """The origins among ``origins`` that ``origin_ok`` refuses."""
        return frozenset(o for o in origins if not self.origin_ok(o))

    def learn(self, node: str) -> bool:
        """A configured peer address answered as ``node`` (M3); True if it is new."""
        if self.mode != "learned" or node in self._learned or not is_node_id(node):
            return False
        if len(self._learned) >= MAX_MEMBERS:
            return False
        self._learned.add(node)
        self._vouched.discard(node)
        return True

    def vouch(self, nodes: Iterable[str]) -> None:
        """A member's digest says it is linked to ``nodes`` (M3: their records may be relayed)."""
        if self.mode != "learned":
            return
        for node in nodes:
            if len(self._learned) + len(self._vouched) >= MAX_MEMBERS:
                return
            if node not in self._learned and is_node_id(node):
                self._vouched.add(node)

    def known(self) -> list[str]:
        """The member ids this node knows of, for status pages (empty in mode ca/open)."""
        if self._listed is not None:
            return sorted(self._listed)
        return sorted(self._learned) if self.mode == "learned" else []
