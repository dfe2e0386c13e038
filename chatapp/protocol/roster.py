"""The server's client table: every client's record, by name and by address, and
the versions of the table it sends them."""

from __future__ import annotations

from collections.abc import Iterable

from chatapp.protocol.changes import ClientRecord, Presence
from chatapp.protocol.packing import split
from chatapp.wire import Address, TableEntry


class Roster:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch  # orders tables across restarts
        self.clients: dict[str, ClientRecord] = {}
        self._by_addr: dict[Address, str] = {}  # the client registered last at each address
        self.version = 0
        self.changed = False  # changed since the last table was made
        self.latest: list[TableEntry] = []  # the entries of the newest table
        self._settled: tuple[int, list[TableEntry], bool] = (0, [], False)

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
        self.changed = changed or self._entries() != self.latest

    def _entries(self) -> list[TableEntry]:
        return [record.entry() for record in sorted(self.clients.values(), key=_by_name)]

    def name_at(self, addr: Address) -> str | None:
        return self._by_addr.get(addr)

    def add(self, record: ClientRecord) -> None:
        """``record`` holds its name and its address from now on."""
        holder = self.clients.get(record.name)
        if holder is not None and self._by_addr.get(holder.addr) == holder.name:
            del self._by_addr[holder.addr]
        self.clients[record.name] = record
        self._by_addr[record.addr] = record.name
        self.changed = True

    def remove(self, name: str) -> None:
        record = self.clients.pop(name, None)
        if record is not None and self._by_addr.get(record.addr) == name:
            del self._by_addr[record.addr]
        self.changed = True

    def set_presence(self, record: ClientRecord, presence: Presence) -> None:
        record.presence = presence
        self.changed = True

    def next_table(self) -> list[list[TableEntry]] | None:
        """The parts of a new version of the table, if it changed (else None)."""
        if not self.changed:
            return None
        self.changed = False
        self.version += 1
        self.latest = self._entries()
        return split(self.latest)


def _by_name(record: ClientRecord) -> str:
    return record.name
