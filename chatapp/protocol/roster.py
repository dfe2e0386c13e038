"""The server's client table: every client's record, by name and by address, and
the versions of the table it sends them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from chatapp.protocol.changes import ClientRecord, Presence
from chatapp.protocol.packing import split
from chatapp.wire import Address, Table, TableEntry


class Roster:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch  # orders tables across restarts
        self.clients: dict[str, ClientRecord] = {}
        self._by_addr: dict[Address, str] = {}  # the client registered last at each address
        self.version = 0
        self.changed = False  # changed since the last table was made
        self.latest: list[Table] = []  # the parts of the newest table
        self._settled: tuple[int, list[Table], bool] = (0, [], False)

    def restore(self, records: Iterable[ClientRecord]) -> None:
        for record in records:
            self.clients[record.name] = record
            self._by_addr[record.addr] = record.name

    def checkpoint(self) -> None:
        """The tables made so far went out."""
        self._settled = (self.version, self.latest, self.changed)

    def reload(self, records: Iterable[ClientRecord]) -> None:
        """Every record as ``records`` have them (the database's); the tables made since
        the checkpoint never went out, and a new one is made only if the clients' last
        table is not the database's."""
        self.version, self.latest, changed = self._settled
        self.clients, self._by_addr = {}, {}
        self.restore(records)
        sent = [entry for part in self.latest for entry in part.entries]
        self.changed = changed or self._entries() != sent

    def _entries(self) -> list[TableEntry]:
        return [record.entry() for record in sorted(self.clients.values(), key=_by_name)]

    def name_at(self, addr: Address) -> str | None:
        return self._by_addr.get(addr)

    def add(self, record: ClientRecord) -> None:
        """``record`` holds its name and its address from now on."""
        holder = self.clients.get(record.name)
        if holder is not None:
            self._by_addr.pop(holder.addr, None)
        self.clients[record.name] = record
        self._by_addr[record.addr] = record.name
        self.changed = True

    def set_presence(self, record: ClientRecord, presence: Presence) -> None:
        record.presence = presence
        self.changed = True

    def authenticated(self, name: str | None, token: str, addr: Address) -> ClientRecord | None:
        """The record of the client at ``addr`` if ``token`` is its token (and ``name``
        its name)."""
        registered = self._by_addr.get(addr)
        record = self.clients.get(registered) if registered else None
        if record is None or record.token != token or (name is not None and record.name != name):
            return None
        return record

    def next_table(self, new_id: Callable[[], str]) -> list[Table]:
        """The parts of a new version of the table, if it changed (else none)."""
        if not self.changed:
            return []
        self.changed = False
        self.version += 1
        parts = split(self._entries())
        self.latest = [
            Table(new_id(), self.epoch, self.version, index, len(parts), part)
            for index, part in enumerate(parts)
        ]
        return self.latest


def _by_name(record: ClientRecord) -> str:
    return record.name
