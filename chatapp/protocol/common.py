"""What both state machines share: effects, timer settings, retries and dedup.

Nothing here (or anywhere in ``chatapp.protocol``) touches a socket, a clock
or Trio. Time is passed in as ``now``; what to do is returned as effects.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from chatapp.wire import Address, Message, WireError, decode, encode, fmt_addr

# --- effects -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``data`` (the encoding of ``message``) to ``addr``."""

    message: Message
    data: bytes
    addr: Address


@dataclass(frozen=True, slots=True)
class Show:
    """A line on the client's screen."""

    line: str


@dataclass(frozen=True, slots=True)
class Log:
    """A line for the node's log (the server's screen; a client's stderr when verbose)."""

    text: str
    level: str = "info"  # "info" | "debug" | "warning"


@dataclass(frozen=True, slots=True)
class Exit:
    status: int


@dataclass(frozen=True, slots=True)
class Persist:
    """A change the server's database must commit before any later effect is carried out."""

    op: str  # "client" | "store" | "remove" | "epoch"
    args: tuple[object, ...]


Effect = Send | Show | Log | Exit | Persist


def send(message: Message, addr: Address) -> Send:
    return Send(message, encode(message), addr)


def kind(message: Message) -> str:
    """The message's type as it is named on the wire (``chat``, ``ack``, ...)."""
    return type(message).__struct_config__.tag  # type: ignore[return-value]


def dropped(message: Message, addr: Address, why: str) -> Log:
    return Log(f"dropped a {kind(message)} from {fmt_addr(addr)}: {why}", "warning")


def bad_datagram(addr: Address, error: WireError) -> Log:
    return Log(f"dropped a bad datagram from {fmt_addr(addr)}: {error}", "warning")


class Machine:
    """What the client's and the server's state machines share: bytes in, effects out."""

    def handle_message(self, message: Message, addr: Address, now: float) -> list[Effect]:
        raise NotImplementedError

    def handle_datagram(self, data: bytes, addr: Address, now: float) -> list[Effect]:
        """Check ``data`` before any rule sees it: a bad datagram is dropped and logged."""
        try:
            message = decode(data)
        except WireError as exc:
            return [bad_datagram(addr, exc)]
        return self.handle_message(message, addr, now)


# --- settings -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timers:
    """The protocol's timer settings (recorded in every trace header)."""

    ack_timeout: float = 0.5
    tries: int = 5


# --- ids --------------------------------------------------------------------------


class IdFactory:
    """Message ids: a per-process prefix (random in real runs, fixed in tests) and a counter."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}.{next(self._counter)}"


class SeenIds:
    """A bounded set of recently seen message ids: a duplicate is ACKed again, not shown again."""

    def __init__(self, capacity: int = 65536) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def add(self, msg_id: str) -> bool:
        """Remember ``msg_id``; True if it is new."""
        if msg_id in self._ids:
            self._ids.move_to_end(msg_id)
            return False
        self._ids[msg_id] = None
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
        return True

    def __contains__(self, msg_id: str) -> bool:
        return msg_id in self._ids


# --- retries ------------------------------------------------------------------------

C = TypeVar("C")


@dataclass(slots=True)
class Pending(Generic[C]):
    """A datagram waiting for its ACK."""

    key: Hashable
    send: Send
    tries_left: int
    deadline: float
    context: C


@dataclass
class RetryQueue(Generic[C]):
    """Datagrams waiting for an ACK, each with a deadline and a number of tries left.

    A heap orders the deadlines, so one timer serves any number of waits: a
    fan-out to a thousand receivers costs one timeout, not a thousand.
    """

    timers: Timers
    _pending: dict[Hashable, Pending[C]] = field(default_factory=dict)
    _heap: list[tuple[float, int, Hashable]] = field(default_factory=list)
    _order: Iterator[int] = field(default_factory=itertools.count)

    def start(self, key: Hashable, effect: Send, now: float, context: C, tries: int) -> Send:
        """Wait for ``key``'s ACK; ``effect`` is sent now and again on each timeout."""
        deadline = now + self.timers.ack_timeout
        self._pending[key] = Pending(key, effect, tries - 1, deadline, context)
        heapq.heappush(self._heap, (deadline, next(self._order), key))
        return effect

    def ack(self, key: Hashable) -> Pending[C] | None:
        return self._pending.pop(key, None)

    def cancel(self, key: Hashable) -> Pending[C] | None:
        return self._pending.pop(key, None)

    def get(self, key: Hashable) -> Pending[C] | None:
        return self._pending.get(key)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def values(self) -> list[Pending[C]]:
        return list(self._pending.values())

    def next_deadline(self) -> float | None:
        heap = self._heap
        while heap:
            deadline, _, key = heap[0]
            pending = self._pending.get(key)
            if pending is not None and pending.deadline == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def expire(self, now: float) -> tuple[list[Send], list[Pending[C]]]:
        """Re-send what has tries left; return (the re-sends, the waits that gave up)."""
        resends: list[Send] = []
        given_up: list[Pending[C]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, key = heapq.heappop(heap)
            pending = self._pending.get(key)
            if pending is None or pending.deadline != deadline:
                continue
            if pending.tries_left > 0:
                pending.tries_left -= 1
                pending.deadline = deadline + self.timers.ack_timeout
                heapq.heappush(heap, (pending.deadline, next(self._order), key))
                resends.append(pending.send)
            else:
                del self._pending[key]
                given_up.append(pending)
        return resends, given_up
