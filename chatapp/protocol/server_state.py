"""What the server holds: its client table (and its versions), what it knows of each
client's copy of the table, its mailboxes, the answers it remembers and its pending
requests; restored from the database at start, and rolled back to what the database
holds when a commit fails. The rules are in ``chatapp.protocol.presence`` (who is online,
the table's updates), ``chatapp.protocol.sharing`` (the changes of other servers sharing
the database) and ``chatapp.protocol.server`` (the requests).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from chatapp.protocol.changes import ClientRecord, ClientSaved
from chatapp.protocol.common import Codec, Effect, IdFactory, Log, RecentAnswers, Send, Timers
from chatapp.protocol.machine import Machine
from chatapp.protocol.mailbox import DEFAULT_MAILBOX_LIMIT, Mailboxes
from chatapp.protocol.roster import Roster
from chatapp.protocol.tables import Followers, Window
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
        table_window: Window = Window(),
        codec: Codec | None = None,
    ) -> None:
        """``wall_offset`` turns ``now`` into Unix time for the stored messages' timestamps;
        ``epoch`` tells tables of one start from another's (a new one on every start);
        ``table_window`` bounds the table's updates unanswered at once (their ACKs must
        fit in the socket's receive buffer)."""
        super().__init__(timers, codec)
        self.roster = Roster(epoch)
        self.followers = Followers(table_window)  # who holds which version of the table
        self.wall_offset = wall_offset
        self.mailboxes = Mailboxes(mailbox_limit)
        self._new_id = IdFactory(id_prefix)
        self._new_token = token_factory
        self._recent = RecentAnswers()
        #: Names whose record another server sharing the database saved last: that server
        #: sends them their table and what is stored for them (``chatapp.protocol.sharing``;
        #: none when the database is this server's alone).
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
        self.followers.checkpoint()

    def rollback(
        self,
        clients: Iterable[ClientRecord],
        mailbox: dict[str, list[StoredItem]],
        now: float,
        elsewhere: Iterable[str] | None = None,
    ) -> list[Effect]:
        """The database did not take the changes made since the last checkpoint, and none
        of their effects went out: forget them, go back to what the database holds, and
        refuse every request that asked for a change (never "done"; a retry is redone).
        The table goes back to its version at the checkpoint and the updates started since
        are dropped, so that no client hears of a change the database does not hold; each
        online client is then sent what differs, if anything."""
        ended = self._end_waits_since_checkpoint()
        clients = list(clients)
        self.roster.reload(clients)
        if elsewhere is not None:
            self.elsewhere = set(elsewhere)
        online = {c.name for c in clients if c.online and c.name not in self.elsewhere}
        for key in self.followers.reload(online, self.roster.clients, ended):
            self._retry.end(key)
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

    def _saved(self, record: ClientRecord) -> ClientSaved:
        """The change that saves ``record``: from now on this server sends it its table."""
        self.elsewhere.discard(record.name)
        return ClientSaved.of(record)

    def _flush_table(self, now: float) -> list[Effect]:
        """Each client's table update, if it needs one (``ServerPresence``'s rule)."""
        raise NotImplementedError


def _stands(answer: Message) -> bool:
    return isinstance(answer, Refused) or (
        isinstance(answer, Saved) and answer.outcome == "delivered"
    )
