"""Faults injected where nodes send: chosen datagrams lost, duplicated or delayed.

A ``FaultPlan`` is handed to every node of a run (``run_node(faults=...)``); the
node asks it about each datagram it sends (``chatapp.node.Node``), records the
fault it gets (a ``fault`` event, just after the datagram's ``send``) and
carries it out. A scenario arms faults by path and type (``drop user1 -> user2
chat``: the next such datagram is lost) or at random from a seed; a replay
places each recorded fault at the same datagram (the same node, peer, type and
occurrence), so a run with lost and duplicated datagrams replays exactly.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from chatapp.net import Fault
from chatapp.wire import Address, Message, fmt_addr, tag_of

#: Any node, peer or message type, in an armed fault.
ANY = "*"

FaultKind = Literal["drop", "dup", "delay"]


@dataclass
class _Armed:
    node: str
    peer: str
    of: str
    what: FaultKind
    left: int
    delay: float = 0.0

    def matches(self, node: str, peer: str, of: str) -> bool:
        return self.node in (ANY, node) and self.peer in (ANY, peer) and self.of in (ANY, of)


class FaultPlan:
    """The faults of one run, for every node and every start of a node."""

    def __init__(self) -> None:
        self.names: dict[Address, str] = {}  # where each node listens (its latest start)
        self._counts: Counter[tuple[str, str, str]] = Counter()
        self._armed: list[_Armed] = []
        self._placed: dict[tuple[str, str, str, int], tuple[FaultKind, float]] = {}
        self._random: random.Random | None = None
        self._loss = self._dup = 0.0

    def learn(self, addr: Address, node: str) -> None:
        """``node`` listens at ``addr`` (called at each start of a node)."""
        self.names[addr] = node

    def peer_name(self, addr: Address) -> str:
        return self.names.get(addr, fmt_addr(addr))

    def arm(
        self, node: str, peer: str, of: str, what: FaultKind, count: int = 1, delay: float = 0.0
    ) -> None:
        """The next ``count`` datagrams of type ``of`` from ``node`` to ``peer`` (``*``:
        any) are dropped, duplicated or delayed."""
        self._armed.append(_Armed(node, peer, of, what, count, delay))

    def place(self, node: str, peer: str, of: str, n: int, what: FaultKind, delay: float) -> None:
        """The ``n``-th datagram of type ``of`` from ``node`` to ``peer`` (a replay's)."""
        self._placed[(node, peer, of, n)] = (what, delay)

    def at_random(self, loss: float, dup: float, seed: int) -> None:
        """From now on, lose and duplicate any datagram with these probabilities."""
        self._random = random.Random(seed)
        self._loss, self._dup = loss, dup

    def decide(self, node: str, addr: Address, message: Message | None) -> Fault | None:
        of = tag_of(message) if message is not None else "?"
        key = (node, self.peer_name(addr), of)
        self._counts[key] += 1
        n = self._counts[key]
        placed = self._placed.get((*key, n))
        if placed is not None:
            return Fault(placed[0], of, n, placed[1])
        for armed in self._armed:
            if armed.left > 0 and armed.matches(*key):
                armed.left -= 1
                return Fault(armed.what, of, n, armed.delay)
        return self._by_chance(of, n)

    def _by_chance(self, of: str, n: int) -> Fault | None:
        if self._random is None:
            return None
        draw = self._random.random()
        if draw < self._loss:
            return Fault("drop", of, n)
        if draw < self._loss + self._dup:
            return Fault("dup", of, n)
        return None


__all__ = ["ANY", "FaultPlan"]
