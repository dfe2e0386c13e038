"""The server's part that keeps track of who is online and of every client's copy
of the table: the presence rules, the table updates (one in flight per client,
``chatapp.protocol.tables``), and registrations that never complete (a layer of
the server's state machine; see ``server_core``).

A table update is sealed in the client's session like everything else the
server sends, so only the server can move a client's copy. A client that
stops ACKing is marked offline (silent) and sent its update once more, so
that a live client whose ACKs were lost comes back by contact; a
registration whose first table is never ACKed, that time either, is undone:
a name it brought leaves the table and the database (its binding too), so
that registrations that never complete leave nothing behind.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from chatapp.protocol.changes import ClientRecord, ClientRemoved, ClientSaved, Presence
from chatapp.protocol.common import Effect, Log, Pending, Send
from chatapp.protocol.sealing import TO_CLIENT
from chatapp.protocol.server_core import ServerCore, Waiting
from chatapp.protocol.waits import ServerWait
from chatapp.wire import Table, TableAck, TableDelta, encode


class ServerPresence(ServerCore):
    # --- the table --------------------------------------------------------------------

    def _flush_table(self, now: float) -> list[Effect]:
        """End the version this event made (if it changed anything) and send each client
        that needs an update, and has none in flight, what brings it from the version it
        holds to this one, sealed in its session (changes made while an update is in
        flight go in the next). After a restart: only once the clients asked to
        register again are back (or their waits ran out), not once for each."""
        if self._returning:
            self._returning = {n for n in self._returning if ("rekey", n) in self._retry}
            if self._returning:
                return []
        self.roster.close_version()
        effects: list[Effect] = []
        clients: set[str] = set()
        updates = self.followers.updates(
            self.roster, self.new_id, encode, reachable=self._session_of
        )
        for record, part, plaintext in updates:  # encoded once for all, sealed for each
            session = self._session_of(record)
            assert session is not None  # ``reachable``
            kind = ServerWait.TABLE if isinstance(part, Table) else ServerWait.DELTA
            send = Send(part, session.seal_bytes(TO_CLIENT, plaintext), record.addr)
            waiting = Waiting(kind, record.name)
            effects.append(self._wait((record.name, part.id), send, now, waiting))
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

    def _set_presence(self, record: ClientRecord, presence: Presence) -> list[Effect]:
        """What follows from it: a client back online gets the table's update; one going
        offline gets nothing more and its delivery stops (a relay's sender is told the
        message is stored)."""
        self.roster.set_presence(record, presence)
        if presence is Presence.ONLINE:
            self.followers.online(record.name)
            return []
        self._end_waits(self.followers.offline(record.name))
        return self._stop_stream(record.name)

    def _went_silent(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        record = self.clients[pending.context.recipient]
        self._end_waits(self.followers.lost(record.name, pending.key))
        current = self._sent_in_current_session(pending, record)
        silent = record.presence is Presence.SILENT and current
        if silent and self.followers.is_joining(record.name):
            return self._undo_registration(record)  # the update sent once more: no ACK
        return self._no_ack_from(record, pending)

    def _no_ack_from(self, record: ClientRecord, pending: Pending[Waiting]) -> list[Effect]:
        """A client that did not ACK in its session is offline (and gets the next table
        update as a probe: a lost datagram should not keep a live client offline)."""
        if not record.online or not self._sent_in_current_session(pending, record):
            return []
        stopped = self._set_presence(record, Presence.SILENT)
        self.followers.probe(record.name)
        return [
            Log(f"no ACK from {record.name} ({pending.context.kind}): marked offline", "warning"),
            ClientSaved.of(record),
            *stopped,
        ]

    # --- registrations that never complete ----------------------------------------------

    def _displace(self, old: ClientRecord) -> list[Effect]:
        """Another name registered from ``old``'s address: ``old`` has left it (and its
        session ends)."""
        if self.followers.joined_new(old.name) and not self.mailboxes.count(old.name):
            return self._remove(old)  # its registration never completed, and never will
        effects: list[Effect] = []
        if old.online:
            effects += self._set_presence(old, Presence.SILENT)
        self._end_session(old)
        # Stored too: after a restart the displaced name must not come back online here.
        return [*effects, ClientSaved.of(old)]

    def _undo_registration(self, record: ClientRecord) -> list[Effect]:
        """``record``'s first table was never ACKed, nor the update sent once more: a
        name it brought leaves the table (unless messages were stored for it); a name
        known before stays offline."""
        if not self.followers.give_up_joining(record.name) or self.mailboxes.count(record.name):
            return []
        return self._remove(record)

    def _remove(self, record: ClientRecord) -> list[Effect]:
        """``record``'s name leaves the table: its binding, its session, and what it sent
        that is still stored (as the database's ``ClientRemoved`` does)."""
        self._end_waits(self.followers.removed(record.name))
        stopped = self._stop_stream(record.name)
        self._end_session(record)
        self.roster.remove(record.name)
        self.mailboxes.drop_sender(record.name)
        return [
            *stopped,
            Log(f"{record.name} never completed its registration: removed"),
            ClientRemoved(record.name),
        ]
