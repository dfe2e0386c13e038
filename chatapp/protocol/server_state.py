"""What the server holds: its client table, its mailboxes, the answers it remembers and
its pending requests; restored from the database at start, rolled back to what the
database holds when a commit fails, and kept in step with the other servers that share
the database (their changes, ``handle_shared``). The rules are in
``chatapp.protocol.server``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from chatapp.protocol.changes import (
    Change,
    ClientRecord,
    ClientSaved,
    MessagesRemoved,
    MessageStored,
)
from chatapp.protocol.common import Codec, Effect, IdFactory, Log, RecentAnswers, Send, Timers
from chatapp.protocol.machine import Machine
from chatapp.protocol.mailbox import DEFAULT_MAILBOX_LIMIT, Mailboxes
from chatapp.protocol.roster import Roster
from chatapp.protocol.waits import ServerWait
from chatapp.wire import Address, Message, Refused, Register, Saved, StoredItem

#: The reason given with a ``storage`` refusal.
CANNOT_STORE = "the server cannot store anything right now (its database failed)."


@dataclass(frozen=True, slots=True)
class Waiting:
    """A pending request: its row in the table of waits, and what its handlers need."""

    kind: ServerWait
    recipient: str
    item: StoredItem | None = None  # CHANNEL and DELIVER: what to store if it is not ACKed
    reply_to: Address | None = None  # DELIVER and CLAIM: who waits on the outcome
    # MAILBOX: the items in the batch; CHANNEL: the item, if stored already (relayed)
    item_ids: tuple[str, ...] = ()
    claim: Register | None = None  # CLAIM: the registration waiting on the answer


class ServerState(Machine[Waiting]):
    """The base of ``ServerProtocol``: what the server holds, and how it gets back to what
    its database holds."""

    def __init__(
        self,
        *,
        timers: Timers = Timers(),
        id_prefix: str = "s",
        epoch: int = 0,
        wall_offset: float = 0.0,
        token_factory: Callable[[], str] = lambda: secrets.token_hex(8),
        mailbox_limit: int = DEFAULT_MAILBOX_LIMIT,
        codec: Codec | None = None,
    ) -> None:
        """``wall_offset`` turns ``now`` into Unix time for the stored messages' timestamps;
        ``epoch`` orders tables across restarts (a larger one on every start)."""
        super().__init__(timers, codec)
        self.roster = Roster(epoch)
        self.wall_offset = wall_offset
        self.mailboxes = Mailboxes(mailbox_limit)
        self._new_id = IdFactory(id_prefix)
        self._new_token = token_factory
        self._recent = RecentAnswers()
        self._table_waits: dict[str, list[tuple[Address, str]]] = {}
        self._probes: set[str] = set()  # marked offline in this event: sent the table as a probe
        #: Names whose record another server sharing the database saved last: that server
        #: pushes their table and delivers to them (``chatapp.pg_store``; none otherwise).
        self.elsewhere: set[str] = set()

    # --- restoring from the database --------------------------------------------------

    def restore(
        self,
        clients: Iterable[ClientRecord],
        mailbox: dict[str, list[StoredItem]],
        elsewhere: Iterable[str] = (),
    ) -> None:
        self.roster.restore(clients)
        self.mailboxes.restore(mailbox)
        self.elsewhere = set(elsewhere)

    @property
    def clients(self) -> dict[str, ClientRecord]:
        """Every client's record, by name."""
        return self.roster.clients

    @property
    def mailbox(self) -> dict[str, list[StoredItem]]:
        """The stored messages, by recipient, oldest first."""
        return self.mailboxes.boxes

    def checkpoint(self) -> None:
        super().checkpoint()
        self._recent.checkpoint()
        self.roster.checkpoint()

    def rollback(
        self,
        clients: Iterable[ClientRecord],
        mailbox: dict[str, list[StoredItem]],
        now: float,
        elsewhere: Iterable[str] | None = None,
    ) -> list[Effect]:
        """The database did not take the changes made since the last checkpoint, and none
        of their effects went out: forget them, go back to what the database holds, and
        refuse every request that asked for a change (never "done"; a retry is redone)."""
        self._end_waits_since_checkpoint()
        self._probes.clear()
        self.roster.reload(clients)
        if elsewhere is not None:
            self.elsewhere = set(elsewhere)
        delivering = {p.context.recipient for p in self._retry.values() if p.context.item_ids}
        self.mailboxes.reload(mailbox, delivering=delivering)  # the others start on reg
        answers = self._recent.forget_since_checkpoint(self._storage_refusal)
        refused = sum(
            send.message == Refused(send.message.id, CANNOT_STORE, "storage") for send in answers
        )
        log = Log(f"rolled back to what the database holds; refused {refused} requests it needed")
        return [log, *answers, *self._flush_table(now)]

    def _storage_refusal(self, key: tuple[Address, str], answer: list[Send]) -> Send | None:
        """None if ``answer`` stands without the database (a refusal; a message delivered
        by the server itself), else the refusal that replaces it."""
        if all(_stands(send.message) for send in answer):
            return None
        return self.send(Refused(key[1], CANNOT_STORE, "storage"), key[0])

    def _flush_table(self, now: float) -> list[Effect]:
        """The table to every online client, if it changed (``ServerProtocol``'s rule)."""
        raise NotImplementedError

    def _start_mailbox(self, record: ClientRecord, now: float) -> list[Effect]:
        """The stored messages to ``record``'s client (``ServerProtocol``'s rule)."""
        raise NotImplementedError

    def _relay_channel(self, record: ClientRecord, item: StoredItem, now: float) -> list[Effect]:
        """A stored channel message to ``record``'s client, live (``ServerProtocol``'s)."""
        raise NotImplementedError

    def _cancel_table_waits(self, name: str) -> None:
        for key in self._table_waits.pop(name, []):
            self._retry.end(key)

    # --- changes made by other servers (a shared database) ------------------------------

    def handle_shared(self, changes: list[Change], now: float) -> list[Effect]:
        """Another server committed ``changes`` to the database this server shares: hold
        them too, and tell this server's own clients what concerns them."""
        effects: list[Effect] = []
        arrived: dict[str, list[StoredItem]] = {}
        for change in changes:
            if isinstance(change, ClientSaved):
                self._take_record(change.record())
            elif isinstance(change, MessageStored):
                if self.mailboxes.adopt(change.recipient, change.item):
                    arrived.setdefault(change.recipient, []).append(change.item)
            elif isinstance(change, MessagesRemoved):
                self.mailboxes.remove(change.recipient, change.ids)
        for name, items in arrived.items():
            record = self.clients.get(name)
            if record is not None and record.online and name not in self.elsewhere:
                effects += self._deliver_arrived(record, items, now)
        return effects + self._flush_table(now)

    def _deliver_arrived(
        self, record: ClientRecord, items: list[StoredItem], now: float
    ) -> list[Effect]:
        """Messages another server stored for a client of this one: channel messages to
        a client waiting for nothing go as they would have from here, live; anything else
        in the order of its mailbox."""
        live = record.name not in self.mailboxes.in_flight and self.mailbox[record.name] == items
        if live and all(item.kind == "channel" for item in items):
            return [send for item in items for send in self._relay_channel(record, item, now)]
        return self._start_mailbox(record, now)

    def handle_reload(
        self,
        clients: list[ClientRecord],
        mailbox: dict[str, list[StoredItem]],
        elsewhere: set[str],
        now: float,
    ) -> list[Effect]:
        """The shared database as it is now (this server may have missed changes): what
        differs is taken as other servers' changes."""
        changes: list[Change] = [ClientSaved.of(r) for r in clients if r.name in elsewhere]
        for name, box in self.mailbox.items():
            kept = {item.id for item in mailbox.get(name, [])}
            gone = tuple(item.id for item in box if item.id not in kept)
            if gone:
                changes.append(MessagesRemoved(name, gone))
        changes += [MessageStored(name, item) for name, box in mailbox.items() for item in box]
        return self.handle_shared(changes, now)

    def _take_record(self, record: ClientRecord) -> None:
        """``record`` as another server saved it: that server pushes its table now."""
        self.elsewhere.add(record.name)
        held = self.clients.get(record.name)
        if held is not None:
            if (held.addr, held.token, held.presence) == (
                record.addr,
                record.token,
                record.presence,
            ):
                return
            self._cancel_table_waits(record.name)
            self.mailboxes.in_flight.pop(record.name, None)
        self.roster.add(record)


def _stands(answer: Message) -> bool:
    return isinstance(answer, Refused) or (
        isinstance(answer, Saved) and answer.outcome == "delivered"
    )
