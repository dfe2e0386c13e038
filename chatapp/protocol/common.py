"""What both state machines are made of: effects, the codec, timer settings, retries, dedup.

Nothing here (or anywhere in ``chatapp.protocol``) touches a socket, a clock
or Trio. Time is passed in as ``now``; what to do is returned as effects.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from chatapp.protocol.changes import Change
from chatapp.wire import Address, Message, WireError, fmt_addr, tag_of

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
    #: Limited at its source already (a summary at most once a second): the log's own
    #: limit on warnings, which would hide it in the flood it sums up, does not apply.
    summary: bool = False


@dataclass(frozen=True, slots=True)
class Exit:
    status: int


@dataclass(frozen=True, slots=True)
class Received:
    """How the machine read a datagram: its ``message``, or why it could not (``error``).
    Always the first effect of ``handle_datagram``, so that the runtime can record what
    arrived before anything it caused."""

    message: Message | None
    error: str | None = None


Effect = Send | Show | Log | Exit | Received | Change


class TokenBucket:
    """At most ``rate`` events a second, ``burst`` at once (time passed in)."""

    __slots__ = ("_allowance", "_last", "burst", "rate")

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._allowance = burst
        self._last: float | None = None

    def take(self, now: float) -> bool:
        if self._last is not None:
            self._allowance = min(self.burst, self._allowance + (now - self._last) * self.rate)
        self._last = now
        if self._allowance >= 1:
            self._allowance -= 1
            return True
        return False


def dropped(message: Message, addr: Address, why: str) -> Log:
    return Log(f"dropped a {tag_of(message)} from {fmt_addr(addr)}: {why}", "warning")


def bad_datagram(addr: Address, error: WireError) -> Log:
    return Log(f"dropped a bad datagram from {fmt_addr(addr)}: {error}", "warning")


# --- settings -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timers:
    """The protocol's timer settings (recorded in every trace header)."""

    ack_timeout: float = 0.5
    tries: int = 5


# --- remembering ----------------------------------------------------------------------


class SeenIds:
    """A bounded set of recently seen messages, by (authenticated sender, id): a duplicate
    is ACKed again, not shown again."""

    def __init__(self, capacity: int = 65536) -> None:
        self._ids: OrderedDict[Hashable, None] = OrderedDict()
        self._capacity = capacity
        self._since_checkpoint: list[Hashable] = []

    def add(self, msg_id: Hashable) -> bool:
        """Remember ``msg_id``; True if it is new."""
        if msg_id in self._ids:
            self._ids.move_to_end(msg_id)
            return False
        self._ids[msg_id] = None
        self._since_checkpoint.append(msg_id)
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
        return True

    def checkpoint(self) -> None:
        """What was added so far stands (it was shown)."""
        self._since_checkpoint.clear()

    def forget_since_checkpoint(self) -> None:
        """What was added since the last checkpoint was never shown: it is new again."""
        for msg_id in self._since_checkpoint:
            self._ids.pop(msg_id, None)
        self._since_checkpoint.clear()

    def __contains__(self, msg_id: Hashable) -> bool:
        return msg_id in self._ids


class RecentAnswers:
    """Answers to recent requests, by (who asked, id): a retry is answered again, not
    redone. Who asked is a client's name (in its session) or an address (a
    registration). ``None`` stands for a request still being worked on."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._answers: OrderedDict[tuple[Hashable, str], list[Send] | None] = OrderedDict()
        self._since_checkpoint: list[tuple[Hashable, str]] = []

    def lookup(self, key: tuple[Hashable, str]) -> tuple[bool, list[Send] | None]:
        if key in self._answers:
            return True, self._answers[key]
        return False, None

    def forget(self, key: tuple[Hashable, str]) -> None:
        self._answers.pop(key, None)

    def remember(self, key: tuple[Hashable, str], answer: list[Send] | None) -> None:
        self._answers[key] = answer
        self._answers.move_to_end(key)
        self._since_checkpoint.append(key)
        if len(self._answers) > self.capacity:
            self._answers.popitem(last=False)

    def checkpoint(self) -> None:
        """What was remembered so far stands (its changes were committed)."""
        self._since_checkpoint.clear()

    def forget_since_checkpoint(
        self, refusal: Callable[[tuple[Hashable, str], list[Send]], Send | None]
    ) -> list[Send]:
        """The changes of what was remembered since the last checkpoint were not committed,
        and its answers were held back: what to send now. ``refusal(key, answer)`` says
        whether an answer stands (None: sent, and still remembered) or is replaced by a
        refusal (the request is forgotten, so that a retry is tried again). A request still
        being worked on is forgotten."""
        instead: list[Send] = []
        for key in dict.fromkeys(self._since_checkpoint):
            answer = self._answers.get(key)
            refused = refusal(key, answer) if answer else None
            if answer and refused is None:
                instead += answer
            else:
                self._answers.pop(key, None)
                instead += [refused] if refused else []
        self._since_checkpoint.clear()
        return instead


# --- retries ------------------------------------------------------------------------

C = TypeVar("C")


@dataclass(slots=True)
class Pending(Generic[C]):
    """A datagram waiting for its ACK."""

    key: Hashable
    send: Send
    tries_left: int
    deadline: float
    timeout: float
    context: C


@dataclass
class RetryQueue(Generic[C]):
    """Datagrams waiting for an ACK, each with a deadline and a number of tries left.

    A heap orders the deadlines, so one timer serves any number of waits: a
    fan-out to a thousand receivers costs one timeout, not a thousand.
    """

    _pending: dict[Hashable, Pending[C]] = field(default_factory=dict)
    _heap: list[tuple[float, int, Hashable]] = field(default_factory=list)
    _order: Iterator[int] = field(default_factory=itertools.count)

    def start(
        self, key: Hashable, effect: Send, now: float, context: C, *, tries: int, timeout: float
    ) -> Send:
        """Wait for ``key``'s ACK; ``effect`` is sent now and again on each timeout."""
        deadline = now + timeout
        self._pending[key] = Pending(key, effect, tries - 1, deadline, timeout, context)
        heapq.heappush(self._heap, (deadline, next(self._order), key))
        return effect

    def end(self, key: Hashable) -> Pending[C] | None:
        """Stop waiting for ``key`` (answered, or no longer needed)."""
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

    def expire(self, now: float) -> tuple[list[Pending[C]], list[Pending[C]]]:
        """Move on the waits whose try ran out: (those to send again, those that gave up).
        The caller seals each re-send afresh (a session datagram never repeats a counter)."""
        resends: list[Pending[C]] = []
        given_up: list[Pending[C]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, _, key = heapq.heappop(heap)
            pending = self._pending.get(key)
            if pending is None or pending.deadline != deadline:
                continue
            if pending.tries_left > 0:
                pending.tries_left -= 1
                pending.deadline = deadline + pending.timeout
                heapq.heappush(heap, (pending.deadline, next(self._order), key))
                resends.append(pending)
            else:
                del self._pending[key]
                given_up.append(pending)
        return resends, given_up
