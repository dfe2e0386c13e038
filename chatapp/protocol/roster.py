"""The server's client table: every client's record, by name and by address; the
table's versions and their history; and the messages that bring a client's copy
from the version it holds to the current one (``chatapp.protocol.tables`` says
who holds what).

Every change to a record goes through the roster, which notes the name as
changed in the version being made; ``close_version`` ends that version (once
per event that changed something). The history is the version at which each
name last changed, plus the names that left the table (the most recent
``MAX_REMOVED`` of them): a delta from version v is every name changed after v.
A client that holds a version older than a removal that was forgotten gets the
whole table instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import msgspec

from chatapp.protocol.changes import ClientRecord, Presence
from chatapp.protocol.packing import ENVELOPE_ALLOWANCE
from chatapp.wire import MAX_DATAGRAM, Address, Table, TableDelta, TableEntry

#: Names that left the table that the history keeps (for the deltas that say so).
MAX_REMOVED = 4096
#: Bytes of entries (and names that left) in one part of a table or a delta.
PART_BUDGET = MAX_DATAGRAM - ENVELOPE_ALLOWANCE

Update = list[Table] | list[TableDelta]


class Roster:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch  # orders tables across restarts
        self.version = 0  # the last version made (0: none yet)
        self.clients: dict[str, ClientRecord] = {}
        self._by_addr: dict[Address, str] = {}  # the client registered last at each address
        self._pages = _Pages()
        self._changed: dict[str, int] = {}  # name -> version of its last change, oldest first
        self._removed: dict[str, int] = {}  # name -> version it left the table, oldest first
        self._floor = 0  # deltas can start from this version or a later one
        self._pending = False  # changed since the last version was made
        self._whole: list[Table] | None = None  # the current version's parts, once made
        self._deltas: dict[int, list[TableDelta]] = {}  # base -> delta to the current version

    def restore(self, records: Iterable[ClientRecord]) -> None:
        for record in records:
            self.clients[record.name] = record
            self._by_addr[record.addr] = record.name
            self._pages.put(record.entry())

    def name_at(self, addr: Address) -> str | None:
        return self._by_addr.get(addr)

    def authenticated(self, name: str | None, token: str, addr: Address) -> ClientRecord | None:
        """The record of the client at ``addr`` if ``token`` is its token (and ``name``
        its name)."""
        registered = self._by_addr.get(addr)
        record = self.clients.get(registered) if registered else None
        if record is None or record.token != token or (name is not None and record.name != name):
            return None
        return record

    # --- changes ----------------------------------------------------------------------

    def add(self, record: ClientRecord) -> None:
        """``record`` holds its name and its address from now on."""
        holder = self.clients.get(record.name)
        if holder is not None:
            self._by_addr.pop(holder.addr, None)
        self.clients[record.name] = record
        self._by_addr[record.addr] = record.name
        self._note(record)

    def set_presence(self, record: ClientRecord, presence: Presence) -> None:
        record.presence = presence
        self._note(record)

    def remove(self, name: str) -> None:
        """``name`` leaves the table (its record is forgotten)."""
        record = self.clients.pop(name)
        if self._by_addr.get(record.addr) == name:
            del self._by_addr[record.addr]
        self._pages.drop(name)
        self._changed.pop(name, None)
        self._removed[name] = self.version + 1
        self._pending = True
        if len(self._removed) > MAX_REMOVED:
            oldest = next(iter(self._removed))
            self._floor = max(self._floor, self._removed.pop(oldest))

    def touch(self) -> None:
        """Make a new version even with no change (a new epoch: every client needs it)."""
        self._pending = True

    def _note(self, record: ClientRecord) -> None:
        name = record.name
        self._changed.pop(name, None)  # to the end: the history stays in version order
        self._changed[name] = self.version + 1
        self._removed.pop(name, None)
        self._pages.put(record.entry())
        self._pending = True

    def close_version(self) -> bool:
        """End the version the changes so far went into; False if there were none."""
        if not self._pending:
            return False
        self._pending = False
        self.version += 1
        self._whole = None
        self._deltas = {}
        return True

    # --- updates ----------------------------------------------------------------------

    def update_for(self, held: int | None, new_id: Callable[[], str]) -> Update:
        """The parts that bring a client holding version ``held`` of this epoch (None:
        none) to the current version: a delta, or the whole table when the history does
        not reach back to ``held``. Made once per version and base, for every client."""
        if held is not None and held >= self._floor:
            return self._delta(held, new_id)
        return self.whole(new_id)

    def whole(self, new_id: Callable[[], str]) -> list[Table]:
        if self._whole is None:
            parts = self._pages.parts()
            self._whole = [
                Table(new_id(), self.epoch, self.version, index, len(parts), entries)
                for index, entries in enumerate(parts)
            ]
        return self._whole

    def _delta(self, base: int, new_id: Callable[[], str]) -> list[TableDelta]:
        delta = self._deltas.get(base)
        if delta is not None:
            return delta
        # oldest change first, as they happened
        entries = [self._pages.get(name) for name in _since(self._changed, base)][::-1]
        gone = list(_since(self._removed, base))[::-1]
        parts = _split(entries, gone)
        delta = [
            TableDelta(new_id(), self.epoch, base, self.version, index, len(parts), *part)
            for index, part in enumerate(parts)
        ]
        self._deltas[base] = delta
        return delta


def _since(history: dict[str, int], base: int) -> Iterable[str]:
    """The names in ``history`` (in version order) changed after version ``base``, newest
    first: the walk stops at the first older one, so it costs what it finds."""
    for name, version in reversed(history.items()):
        if version <= base:
            return
        yield name


_encoder = msgspec.json.Encoder()


def _size(item: TableEntry | str) -> int:
    return len(_encoder.encode(item)) + 1  # and its comma


def _split(entries: list[TableEntry], gone: list[str]) -> list[tuple[list[TableEntry], list[str]]]:
    """A delta's entries and names in parts that each fit in one datagram (at least one)."""
    parts: list[tuple[list[TableEntry], list[str]]] = [([], [])]
    used = 0
    items: list[TableEntry | str] = [*entries, *gone]
    for item in items:
        size = _size(item)
        if used + size > PART_BUDGET and used:
            parts.append(([], []))
            used = 0
        used += size
        if isinstance(item, str):
            parts[-1][1].append(item)
        else:
            parts[-1][0].append(item)
    return parts


class _Pages:
    """The whole table as the parts it is sent in. A name keeps its place while its
    entry fits there, so a new version costs encoding the parts, not building them."""

    def __init__(self) -> None:
        self._pages: list[dict[str, TableEntry]] = []
        self._sizes: list[int] = []
        self._page_of: dict[str, int] = {}

    def get(self, name: str) -> TableEntry:
        return self._pages[self._page_of[name]][name]

    def put(self, entry: TableEntry) -> None:
        size = _size(entry)
        index = self._page_of.get(entry.name)
        if index is not None:
            page = self._pages[index]
            grown = size - _size(page[entry.name])
            if self._sizes[index] + grown <= PART_BUDGET:
                page[entry.name] = entry
                self._sizes[index] += grown
                return
            self.drop(entry.name)
        index = self._with_room(size)
        self._pages[index][entry.name] = entry
        self._sizes[index] += size
        self._page_of[entry.name] = index

    def drop(self, name: str) -> None:
        index = self._page_of.pop(name, None)
        if index is not None:
            self._sizes[index] -= _size(self._pages[index].pop(name))

    def _with_room(self, size: int) -> int:
        """The last page if it has room, else the first that has (a name that left made
        room), else a new one."""
        candidates = range(len(self._pages))
        if self._sizes and self._sizes[-1] + size <= PART_BUDGET:
            candidates = range(len(self._pages) - 1, len(self._pages))
        for index in candidates:
            if self._sizes[index] + size <= PART_BUDGET:
                return index
        self._pages.append({})
        self._sizes.append(0)
        return len(self._pages) - 1

    def parts(self) -> list[list[TableEntry]]:
        """The entries of each page that has any (always at least one part)."""
        return [list(page.values()) for page in self._pages if page] or [[]]
