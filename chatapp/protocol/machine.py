"""What the client's and the server's state machines share: bytes in, effects out,
and the pending requests, each governed by its row of the table of waits."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

from chatapp.protocol.common import (
    PLAIN,
    Codec,
    Effect,
    Log,
    Pending,
    Received,
    RetryQueue,
    Send,
    Timers,
    bad_datagram,
    dropped,
)
from chatapp.protocol.waits import Wait
from chatapp.wire import Address, Message, WireError, fmt_addr, tag_of


class Waiting(Protocol):
    """What a machine keeps about a pending request: at least its row."""

    @property
    def kind(self) -> Wait: ...


W = TypeVar("W", bound=Waiting)


class Machine(Generic[W]):
    """Every datagram enters through ``handle_datagram`` and every one that leaves is
    made by ``send``: both go through ``codec``, the one place to change how messages
    look on the wire. Answers and timeouts run the handlers that the pending request's
    row names (``chatapp.protocol.waits``)."""

    def __init__(self, timers: Timers, codec: Codec | None) -> None:
        self.timers = timers
        self.codec: Codec = codec if codec is not None else PLAIN
        self._retry: RetryQueue[W] = RetryQueue()
        #: Datagrams dropped because they did not decode (the log lines about them are
        #: rate-limited; this count is not).
        self.undecodable = 0
        self._started: list[Hashable] = []  # waits started since the last checkpoint

    def handle_message(self, message: Message, addr: Address, now: float) -> list[Effect]:
        raise NotImplementedError

    def handle_datagram(self, data: bytes, addr: Address, now: float) -> list[Effect]:
        """Check ``data`` before any rule sees it: a bad datagram is dropped and logged.
        The first effect is always a ``Received``."""
        try:
            message = self.codec.decode(data)
        except Exception as exc:
            # Decoding is total: whatever the bytes (and whatever a codec's own checks
            # miss: a limit such as RecursionError or MemoryError, a bug), the datagram is
            # dropped here and nothing else happens.
            self.undecodable += 1
            error = exc if isinstance(exc, WireError) else WireError(_unexpected(exc))
            return [Received(None, str(error)), bad_datagram(addr, error)]
        effects: list[Effect] = [Received(message)]
        effects += self.handle_message(message, addr, now)
        return effects

    def send(self, message: Message, addr: Address) -> Send:
        return Send(message, self.codec.encode(message), addr)

    def next_deadline(self) -> float | None:
        return self._retry.next_deadline()

    def checkpoint(self) -> None:
        """Everything handled so far stands: the runtime carried out its effects (and
        committed its changes). A rollback goes back to here. A runtime calls it after the
        effects of each handling (or of a group of them); until then the machine keeps a
        note of what a rollback would undo."""
        self._started.clear()

    def _end_waits_since_checkpoint(self) -> set[Hashable]:
        """End the waits started since the last checkpoint (their datagrams never went
        out); which they were."""
        ended = set(self._started)
        for key in ended:
            self._retry.end(key)
        self._started.clear()
        return ended

    # --- pending requests -------------------------------------------------------------

    def _wait(self, key: Hashable, effect: Send, now: float, waiting: W) -> Send:
        """Send ``effect`` and wait for its answer, as ``waiting``'s row says."""
        rule = waiting.kind.rule
        tries, timeout = rule.tries_for(self.timers), rule.timeout_for(self.timers)
        self._started.append(key)
        return self._retry.start(key, effect, now, waiting, tries=tries, timeout=timeout)

    def _answered(self, key: Hashable, message: Message, addr: Address, now: float) -> list[Effect]:
        """``message`` ends the wait ``key`` if it came from where the request went and its
        row takes it as an answer; the row names the handler."""
        pending = self._retry.get(key)
        if pending is None or pending.send.addr != addr:
            late = f"{tag_of(message)} {message.id} from {fmt_addr(addr)}"
            return [Log(f"ignored a late or unknown {late}", "debug")]
        handler = pending.context.kind.rule.ended_by(message)
        if handler is None:
            return [dropped(message, addr, f"it does not answer a {pending.context.kind} wait")]
        self._retry.end(key)
        effects: list[Effect] = getattr(self, handler)(pending, message, now)
        return effects

    def _expired(self, now: float) -> list[Effect]:
        """Send again what has tries left; run the give-up handler of the rest."""
        resends, given_up = self._retry.expire(now)
        effects: list[Effect] = list(resends)
        for pending in given_up:
            if self._may_give_up(pending):
                effects += self._give_up(pending, now)
        return effects

    def _give_up(self, pending: Pending[W], now: float) -> list[Effect]:
        """A wait ran out of tries: its row's give-up handler."""
        effects: list[Effect] = getattr(self, pending.context.kind.rule.on_give_up)(pending, now)
        return effects

    def _may_give_up(self, pending: Pending[W]) -> bool:
        """Whether a wait that ran out still matters (a machine that exited: no)."""
        return True


def _unexpected(exc: Exception) -> str:
    return f"undecodable ({type(exc).__name__}: {exc})"[:200]
