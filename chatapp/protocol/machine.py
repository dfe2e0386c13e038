"""What the client's and the server's state machines share: bytes in, effects out,
and the pending requests, each governed by its row of the table of waits."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

from chatapp.protocol.codecs import Sender
from chatapp.protocol.common import (
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
from chatapp.protocol.sealing import Replayed
from chatapp.protocol.waits import Wait
from chatapp.wire import Address, Message, WireError, fmt_addr, tag_of


class Waiting(Protocol):
    """What a machine keeps about a pending request: at least its row."""

    @property
    def kind(self) -> Wait: ...


class Codec(Protocol):
    def decode(self, data: bytes, addr: Address) -> tuple[Message, Sender]:
        """The message in ``data`` and who sent it; ``WireError`` if it is not one."""
        ...


W = TypeVar("W", bound=Waiting)


class Machine(Generic[W]):
    """Every datagram enters through ``handle_datagram``: ``codec`` opens it and says
    who sent it, as far as that could be proven, before any rule sees it. Answers and
    timeouts run the handlers that the pending request's row names
    (``chatapp.protocol.waits``)."""

    codec: Codec

    def __init__(self, timers: Timers) -> None:
        self.timers = timers
        self._retry: RetryQueue[W] = RetryQueue()
        #: Datagrams dropped because they did not decode (the log lines about them are
        #: rate-limited; this count is not).
        self.undecodable = 0
        self._started: list[Hashable] = []  # waits started since the last checkpoint

    def handle_message(self, message: Message, sender: Sender, now: float) -> list[Effect]:
        raise NotImplementedError

    def handle_datagram(self, data: bytes, addr: Address, now: float) -> list[Effect]:
        """Open ``data`` before any rule sees it: a bad datagram is dropped and logged and
        changes nothing. The first effect is always a ``Received``."""
        try:
            message, sender = self.codec.decode(data, addr)
        except WireError as exc:
            self.undecodable += not isinstance(exc, Replayed)  # a copy is no bad datagram
            return [Received(None, str(exc)), *self._undecodable(exc, addr, now)]
        except Exception as exc:
            # Decoding is total: whatever the bytes (and whatever a codec's own checks
            # miss: a limit such as RecursionError or MemoryError, a bug), the datagram is
            # dropped here and nothing else happens.
            self.undecodable += 1
            error = WireError(_unexpected(exc))
            return [Received(None, str(error)), bad_datagram(addr, error)]
        effects: list[Effect] = [Received(message)]
        effects += self.handle_message(message, sender, now)
        return effects

    def _undecodable(self, error: WireError, addr: Address, now: float) -> list[Effect]:
        if isinstance(error, Replayed):  # a network may duplicate: not worth a warning
            return [Log(f"dropped a copy from {fmt_addr(addr)}: {error}", "debug")]
        return [bad_datagram(addr, error)]

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

    def _answered(
        self, key: Hashable, message: Message, sender: Sender, now: float
    ) -> list[Effect]:
        """``message`` ends the wait ``key`` if it came from whom the request went to and
        its row takes it as an answer; the row names the handler."""
        pending = self._retry.get(key)
        if pending is None or not self._from_addressee(pending, message, sender):
            late = f"{tag_of(message)} {message.id} from {fmt_addr(sender.addr)}"
            return [Log(f"ignored a late or unknown {late}", "debug")]
        handler = pending.context.kind.rule.ended_by(message)
        if handler is None:
            why = f"it does not answer a {pending.context.kind} wait"
            return [dropped(message, sender.addr, why)]
        self._retry.end(key)
        effects: list[Effect] = getattr(self, handler)(pending, message, now)
        return effects

    def _from_addressee(self, pending: Pending[W], message: Message, sender: Sender) -> bool:
        """Whether ``sender`` is the one ``pending`` waits on an answer from."""
        raise NotImplementedError

    def _expired(self, now: float) -> list[Effect]:
        """Send again what has tries left (sealed afresh); run the give-up handler of the
        rest."""
        due, given_up = self._retry.expire(now)
        effects: list[Effect] = []
        for pending in due:
            resend = self._reseal(pending)
            if resend is not None:
                pending.send = resend
                effects.append(resend)
        for pending in given_up:
            if self._may_give_up(pending):
                effects += self._give_up(pending, now)
        return effects

    def _give_up(self, pending: Pending[W], now: float) -> list[Effect]:
        """A wait ran out of tries: its row's give-up handler."""
        effects: list[Effect] = getattr(self, pending.context.kind.rule.on_give_up)(pending, now)
        return effects

    def _reseal(self, pending: Pending[W]) -> Send | None:
        """The datagram for another try of ``pending`` (None: not now)."""
        return pending.send

    def _may_give_up(self, pending: Pending[W]) -> bool:
        """Whether a wait that ran out still matters (a machine that exited: no)."""
        return True


def _unexpected(exc: Exception) -> str:
    return f"undecodable ({type(exc).__name__}: {exc})"[:200]
