"""The server's part that keeps it in step with the other servers sharing its database
(``chatapp.pg_store``; a layer of the server's state machine, between ``presence``
and ``server_delivery``): their changes, as they committed them, arrive here
(``handle_shared``), or the whole database after a server missed some
(``handle_reload``), or the clients of a stopped server that this one marked offline
(``handle_swept``).

Every server holds the whole table and every delivery stream; each sends the table,
and what is stored, only to its own clients: those whose record it saved last,
in a session it made. A record another server saved is that server's client
(``elsewhere``): no follower of this one's table, no session here, and what is for
it is stored, for its server to deliver. It becomes this server's client when it
registers here (it moved). Nothing here is committed again: the other server did
that.
"""

from __future__ import annotations

from typing import Protocol

from chatapp.protocol.changes import (
    Change,
    ClientRecord,
    ClientRemoved,
    ClientSaved,
    MessagesRemoved,
    MessageStored,
)
from chatapp.protocol.common import Effect, Log
from chatapp.protocol.presence import ServerPresence
from chatapp.wire import StoredItem


class Disk(Protocol):
    """What the database holds (``chatapp.store.ServerDisk``), as a rollback or a reload
    reads it."""

    key: bytes
    origin: str
    last_n: int
    clients: list[ClientRecord]
    mailbox: dict[str, list[StoredItem]]
    elsewhere: frozenset[str]  # the clients other servers sharing the database serve


class ServerSharing(ServerPresence):
    """Other servers' changes (the requests' rules: ``ServerProtocol``)."""

    def handle_shared(self, changes: list[Change], now: float) -> list[Effect]:
        """Another server committed ``changes`` to the database this server shares: hold
        them too, and tell this server's own clients what concerns them."""
        effects: list[Effect] = []
        arrived: dict[str, list[StoredItem]] = {}
        for change in changes:
            if isinstance(change, ClientSaved):
                effects += self._take_record(change.record())
            elif isinstance(change, ClientRemoved):
                effects += self._forget_record(change.name)
            elif isinstance(change, MessageStored):
                if self.mailboxes.adopt(change.recipient, change.item):
                    arrived.setdefault(change.recipient, []).append(change.item)
            elif isinstance(change, MessagesRemoved):
                self.mailboxes.forget(change.recipient, change.seqs)
        for name, items in arrived.items():
            record = self.clients.get(name)
            if record is not None and record.online and name not in self.elsewhere:
                effects += self._deliver_arrived(record, items, now)
        return effects + self._flush_table(now)

    def handle_reload(self, disk: Disk, now: float) -> list[Effect]:
        """The shared database as it is now (this server may have missed changes): what
        differs is taken as other servers' changes."""
        changes: list[Change] = [
            ClientSaved.of(record) for record in disk.clients if record.name in disk.elsewhere
        ]
        known = {record.name for record in disk.clients}
        changes += [ClientRemoved(name) for name in self.clients if name not in known]
        for name in list(self.mailboxes.boxes):
            kept = {item.seq for item in disk.mailbox.get(name, [])}
            gone = tuple(item.seq for item in self.mailboxes.items(name) if item.seq not in kept)
            if gone:
                changes.append(MessagesRemoved(name, gone))
        changes += [MessageStored(name, item) for name, box in disk.mailbox.items() for item in box]
        return self.handle_shared(changes, now)

    def handle_swept(self, changes: list[Change], now: float) -> list[Effect]:
        """This server marked offline the clients of servers whose heartbeat stopped
        (committed and announced already): hold that, and ask each of them, signed with
        the key every server shares, to register here (a client that lists this server
        moves to it; the others ignore it)."""
        if not changes:
            return []
        line = f"marked offline {len(changes)} clients of servers whose heartbeat stopped"
        effects: list[Effect] = [Log(line, "warning"), *self.handle_shared(changes, now)]
        for change in changes:
            record = self.clients.get(change.name) if isinstance(change, ClientSaved) else None
            if record is not None and record.sid:
                effects.append(self._ask_to_rekey(record, now))
        return effects

    def _take_record(self, record: ClientRecord) -> list[Effect]:
        """``record`` as another server saved it: that server serves it now (a client of
        this one that registered there moved)."""
        held = self.clients.get(record.name)
        effects: list[Effect] = []
        if held is not None and record.name not in self.elsewhere:  # it was this one's
            self._end_session(held)
            effects += self._stop_stream(record.name)
        # Asked here (after a restart, after a sweep) and registered at another server:
        # not waited for any more (its "did not come back" would undo that registration).
        self._retry.end(("rekey", record.name))
        self._returning.discard(record.name)
        self.elsewhere.add(record.name)
        self._end_waits(self.followers.offline(record.name))
        if held is None or held.entry() != record.entry() or held.presence != record.presence:
            self.roster.add(record)
        else:
            self.clients[record.name] = record
        return effects

    def _forget_record(self, name: str) -> list[Effect]:
        """Another server undid a registration that never completed."""
        self.elsewhere.discard(name)
        record = self.clients.get(name)
        if record is None:
            return []
        effects = self._stop_stream(name)
        self._end_waits(self.followers.removed(name))
        self._end_session(record)
        self.mailboxes.drop(name)
        self.roster.remove(name)
        return effects

    def _deliver_arrived(
        self, record: ClientRecord, items: list[StoredItem], now: float
    ) -> list[Effect]:
        """Messages another server stored for a client of this one: channel messages to
        a client waiting for nothing go as they would have from here, live (each leaves
        the database once ACKed); anything else in the order of its stream."""
        idle = record.name not in self.mailboxes.flights
        live = idle and self.mailboxes.items(record.name) == items
        if live and all(item.kind == "channel" for item in items):
            return [send for item in items for send in self._relay_channel(record, item, now)]
        return self._start_stream(record, now)

    def _ask_to_rekey(self, record: ClientRecord, now: float) -> Effect:
        """A rekey to ``record``'s session (``ServerProtocol``'s rule)."""
        raise NotImplementedError

    def _start_stream(self, record: ClientRecord, now: float) -> list[Effect]:
        """The stored messages to ``record``'s client (``ServerDelivery``'s rule)."""
        raise NotImplementedError

    def _relay_channel(self, record: ClientRecord, item: StoredItem, now: float) -> list[Effect]:
        """A stored channel message to ``record``'s client, live (``ServerDelivery``'s)."""
        raise NotImplementedError
