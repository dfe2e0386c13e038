"""Who is online, and every client's copy of the table (a layer of the server's state
machine; see ``server_core``): the presence rules, the table's updates (one in flight
per client, ``chatapp.protocol.tables``, each part sealed in the client's session), and
registrations that never complete.

A client that stops ACKing in its session is marked offline (silent) and sent its
update once more, so that a live client whose ACKs were lost comes back by contact; a
registration whose first table is never ACKed, that time either, is undone: a name it
bound (unless something is stored for it or from it) is unbound and leaves the table
and the database.
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
        flight go in the next). After a restart, nothing goes until the clients asked to
        register again are back (or their waits ran out): each then gets one whole table,
        not one per return."""
        if self._returning:
            self._returning = {n for n in self._returning if ("rekey", n) in self._retry}
            if self._returning:
                return []
        self.roster.close_version()
        effects: list[Effect] = []
        clients: set[str] = set()
        updates = self.followers.updates(
            self.roster, self.new_id, encode, lambda record: self._session_of(record) is not None
        )
        for record, part, plaintext in updates:
            session = self._session_of(record)
            assert session is not None  # reachable: it has one
            kind = ServerWait.TABLE if isinstance(part, Table) else ServerWait.DELTA
            send = Send(part, session.seal_bytes(TO_CLIENT, plaintext), record.addr)
            key = (record.name, part.id)
            effects.append(self._wait(key, send, now, Waiting(kind, record.name)))
            clients.add(record.name)
        if clients:
            version = self.roster.version
            log = Log(f"table version {version} sent to {len(clients)} clients", "debug")
            effects.insert(0, log)
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

    # --- presence -----------------------------------------------------------------------

    def _set_presence(self, record: ClientRecord, presence: Presence) -> list[Effect]:
        """What follows from it: a client going offline gets no more table updates, and
        its delivery stops (a relay's sender is told the message is stored)."""
        self.roster.set_presence(record, presence)
        if presence is Presence.ONLINE:
            self.followers.online(record.name)
            return []
        self._end_waits(self.followers.offline(record.name))
        return self._stop_stream(record.name)

    def _went_silent(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        record = self.clients[pending.context.recipient]
        self._end_waits(self.followers.lost(record.name, pending.key))
        if (
            record.presence is Presence.SILENT
            and self._sent_in_current_session(pending, record)
            and self.followers.is_joining(record.name)
        ):
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
        """Another name registered from ``old``'s address: ``old`` has left it (the same
        person under another name, or another person on a port it freed)."""
        self._end_session(old)
        if self.followers.joined_new(old.name) and self._holds_nothing_of(old.name):
            return self._remove(old)  # its registration never completed, and never will
        effects = self._set_presence(old, Presence.SILENT) if old.online else []
        # Stored too: after a restart the displaced name must not come back online here.
        return [*effects, ClientSaved.of(old)]

    def _undo_registration(self, record: ClientRecord) -> list[Effect]:
        """``record``'s first table was never ACKed, nor the update sent once more: a
        name it bound leaves the table (unless something is stored for it or from it); a
        name bound before stays offline."""
        new = self.followers.give_up_joining(record.name)
        if not new or not self._holds_nothing_of(record.name):
            return []
        return self._remove(record)

    def _holds_nothing_of(self, name: str) -> bool:
        """Whether nothing is stored for ``name`` or from it (removing it would lose it)."""
        return not self.mailboxes.count(name) and not self.mailboxes.sent_by(name)

    def _remove(self, record: ClientRecord) -> list[Effect]:
        self._end_waits(self.followers.removed(record.name))
        self._end_session(record)
        self.mailboxes.drop(record.name)
        self.roster.remove(record.name)
        return [
            Log(f"{record.name} never completed its registration: removed (name unbound)"),
            ClientRemoved(record.name),
        ]
