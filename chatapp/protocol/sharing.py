"""The server's part that keeps it in step with the other servers sharing its database
(``chatapp.pg_store``): their changes, as they committed them, arrive here
(``handle_shared``), or the whole database after a server missed some
(``handle_reload``).

Every server holds the whole table and every mailbox; each sends the table, and what
is stored, only to its own clients: those whose record it saved last. A record
another server saved is that server's client (``elsewhere``) until it speaks to this
one. Nothing here is committed again: the other server did that.
"""

from __future__ import annotations

from chatapp.protocol.changes import (
    Change,
    ClientRecord,
    ClientRemoved,
    ClientSaved,
    MessagesRemoved,
    MessageStored,
)
from chatapp.protocol.common import Effect
from chatapp.protocol.presence import ServerPresence
from chatapp.wire import StoredItem


class ServerSharing(ServerPresence):
    """Other servers' changes (the requests' rules: ``ServerProtocol``)."""

    def handle_shared(self, changes: list[Change], now: float) -> list[Effect]:
        """Another server committed ``changes`` to the database this server shares: hold
        them too, and tell this server's own clients what concerns them."""
        effects: list[Effect] = []
        arrived: dict[str, list[StoredItem]] = {}
        for change in changes:
            if isinstance(change, ClientSaved):
                self._take_record(change.record())
            elif isinstance(change, ClientRemoved):
                self._forget_record(change.name)
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
        known = {record.name for record in clients}
        changes += [ClientRemoved(name) for name in self.clients if name not in known]
        for name, box in self.mailbox.items():
            kept = {item.id for item in mailbox.get(name, [])}
            gone = tuple(item.id for item in box if item.id not in kept)
            if gone:
                changes.append(MessagesRemoved(name, gone))
        changes += [MessageStored(name, item) for name, box in mailbox.items() for item in box]
        return self.handle_shared(changes, now)

    def _take_record(self, record: ClientRecord) -> None:
        """``record`` as another server saved it: that server sends it its table now."""
        self.elsewhere.add(record.name)
        held = self.clients.get(record.name)
        if held is not None:
            if (held.addr, held.token, held.presence) == (
                record.addr,
                record.token,
                record.presence,
            ):
                return
            self.mailboxes.in_flight.pop(record.name, None)
        self._end_waits(self.followers.offline(record.name))
        self.roster.add(record)

    def _forget_record(self, name: str) -> None:
        """Another server undid a registration that never completed."""
        if name in self.clients:
            self._end_waits(self.followers.removed(name))
            self.mailboxes.in_flight.pop(name, None)
            self.roster.remove(name)
        self.elsewhere.discard(name)

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

    def _start_mailbox(self, record: ClientRecord, now: float) -> list[Effect]:
        """The stored messages to ``record``'s client (``ServerProtocol``'s rule)."""
        raise NotImplementedError

    def _relay_channel(self, record: ClientRecord, item: StoredItem, now: float) -> list[Effect]:
        """A stored channel message to ``record``'s client, live (``ServerProtocol``'s)."""
        raise NotImplementedError
