"""The server's part that keeps track of who is online and of every client's copy
of the table: the presence rules, the table updates (one in flight per client,
``chatapp.protocol.tables``), and registrations that never complete.

It builds on what the server holds (``chatapp.protocol.server_state``), and
``ServerProtocol`` (``chatapp.protocol.server``) on it with the requests' rules.
A client that stops ACKing is marked offline (silent) and sent its update once
more, so that a live client whose ACKs were lost comes back by contact; a
registration whose first table is never ACKed, that time either, is undone: a
name it brought leaves the table and the database.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from chatapp.protocol.changes import ClientRecord, ClientRemoved, Presence
from chatapp.protocol.common import Effect, Log, Pending, Send
from chatapp.protocol.server_state import ServerState, Waiting
from chatapp.protocol.waits import ServerWait
from chatapp.wire import Table, TableAck, TableDelta


class ServerPresence(ServerState):
    """Who is online, and every client's copy of the table (what the server holds:
    ``ServerState``; the requests' rules: ``ServerProtocol``)."""

    def start(self, now: float) -> list[Effect]:
        """After a restart, a new epoch: the clients that were online get the whole table."""
        for record in self.clients.values():
            if record.online and record.name not in self.elsewhere:
                self.roster.touch()
                self.followers.online(record.name)
        return self._flush_table(now)

    # --- the table --------------------------------------------------------------------

    def _flush_table(self, now: float) -> list[Effect]:
        """End the version this event made (if it changed anything) and send each client
        that needs an update, and has none in flight, what brings it from the version it
        holds to this one (changes made while an update is in flight go in the next)."""
        self.roster.close_version()
        effects: list[Effect] = []
        clients: set[str] = set()
        for record, part, data in self.followers.updates(
            self.roster, self._new_id, self.codec.encode
        ):
            kind = ServerWait.TABLE if isinstance(part, Table) else ServerWait.DELTA
            send, key = Send(part, data, record.addr), (record.addr, part.id)
            effects.append(self._wait(key, send, now, Waiting(kind, record.name)))
            clients.add(record.name)
        if clients:
            version = self.roster.version
            effects.insert(
                0, Log(f"table version {version} sent to {len(clients)} clients", "debug")
            )
        return effects

    def _slow_down_if_resent(self, effects: list[Effect], now: float) -> None:
        """A part of the table sent again: fewer at once (``Followers.resent``)."""
        for effect in effects:
            if isinstance(effect, Send) and isinstance(effect.message, Table | TableDelta):
                self.followers.resent(now, self.timers.ack_timeout)
                return

    def _end_waits(self, keys: Iterable[Hashable]) -> None:
        for key in keys:
            self._retry.end(key)

    def _table_acked(self, pending: Pending[Waiting], answer: TableAck, now: float) -> list[Effect]:
        """The client holds ``answer.version``: once its update is all ACKed, it gets the
        next one at the flush if it is still behind."""
        held = answer.version if answer.epoch == self.roster.epoch else None
        self.followers.acked(pending.context.recipient, pending.key, held)
        return []

    # --- presence ---------------------------------------------------------------------

    def _set_presence(self, record: ClientRecord, presence: Presence) -> None:
        self.roster.set_presence(record, presence)
        if presence is Presence.ONLINE:
            self.followers.online(record.name)
        else:
            self._end_waits(self.followers.offline(record.name))
            self.mailboxes.in_flight.pop(record.name, None)

    def _went_silent(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        record = self.clients[pending.context.recipient]
        self._end_waits(self.followers.lost(record.name, pending.key))
        silent = record.presence is Presence.SILENT and pending.send.addr == record.addr
        if silent and self.followers.is_joining(record.name):
            return self._undo_registration(record)  # the update sent once more: no ACK
        return self._no_ack_from(record, pending)

    def _no_ack_from(self, record: ClientRecord, pending: Pending[Waiting]) -> list[Effect]:
        """A client that did not ACK at its address is offline (and gets the next table as
        a probe: a lost datagram should not keep a live client offline)."""
        if pending.send.addr != record.addr or not record.online:
            return []
        self._set_presence(record, Presence.SILENT)
        self.followers.probe(record.name)
        return [
            Log(f"no ACK from {record.name} ({pending.context.kind}): marked offline", "warning"),
            self._saved(record),
        ]

    # --- registrations that never complete ----------------------------------------------

    def _displace(self, old: ClientRecord) -> list[Effect]:
        """Another name registered from ``old``'s address: ``old`` has left it."""
        if self.followers.joined_new(old.name) and not self.mailbox.get(old.name):
            return self._remove(old)  # its registration never completed, and never will
        if old.online:
            self._set_presence(old, Presence.SILENT)
        # Stored too: after a restart the displaced name must not come back online here.
        return [self._saved(old)]

    def _undo_registration(self, record: ClientRecord) -> list[Effect]:
        """``record``'s first table was never ACKed, nor the update sent once more: a
        name it brought leaves the table (unless messages were stored for it); a name
        known before stays offline."""
        if not self.followers.give_up_joining(record.name) or self.mailbox.get(record.name):
            return []
        return self._remove(record)

    def _remove(self, record: ClientRecord) -> list[Effect]:
        self._end_waits(self.followers.removed(record.name))
        self.roster.remove(record.name)
        return [
            Log(f"{record.name} never completed its registration: removed"),
            ClientRemoved(record.name),
        ]
