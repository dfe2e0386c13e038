"""The server's client table: every client's record, by name and by address; the
table's versions and their history; and the parts that bring a client's copy from
the version it holds to the current one (``chatapp.protocol.tables`` says who
holds what).

Every change to a record goes through the roster, which logs the entry as it now
is under the version being made; ``close_version`` ends that version (once per
event that changed something). A delta from version v is the log after v (each
name once, as it is now) and the names that left the table after v. The log is
compacted when it grows past twice the table; the names that left are kept for
the last ``MAX_REMOVED`` of them, and a client that holds a version older than a
removal that was forgotten gets the whole table instead. When a commit fails,
``reload`` takes the table back to what went out at the last ``checkpoint`` and
makes a new version only of what the database holds otherwise.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import TypeVar

import msgspec

from chatapp.protocol.changes import ClientRecord, Presence
from chatapp.protocol.packing import ENVELOPE_ALLOWANCE
from chatapp.wire import MAX_DATAGRAM, Address, Table, TableDelta, TableEntry

#: Names that left the table that the history keeps (for the deltas that say so).
MAX_REMOVED = 4096
#: Bytes of entries (and names that left) in one part of a table or a delta.
PART_BUDGET = MAX_DATAGRAM - ENVELOPE_ALLOWANCE
#: Deltas to the current version kept made (by the version they start from): after one
#: change every client starts from the same one; in a storm few share.
CACHED_DELTAS = 64

Part = Table | TableDelta
#: The parts of an update, each with its encoding (made once, whoever it goes to).
Update = list[tuple[Part, bytes]]
Encode = Callable[[Part], bytes]


class Roster:
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch  # tells one start's tables from another's
        self.version = 0  # the last version made (0: none yet)
        self.clients: dict[str, ClientRecord] = {}
        self._by_addr: dict[Address, str] = {}  # the client registered last at each address
        self._pages = _Pages()
        self._log_versions: list[int] = []  # the log: each change's version, in order ...
        self._log: list[TableEntry] = []  # ... and the entry as it was then
        self._next = 1  # the version being made (one int for every change in it)
        self._removed: dict[str, int] = {}  # name -> version it left the table, oldest first
        self._floor = 0  # deltas can start from this version or a later one
        self._pending = False  # changed since the last version was made
        self._whole: Update | None = None  # the current version's parts, once made
        self._deltas: OrderedDict[int, Update] = OrderedDict()  # base -> delta to current
        # What a rollback goes back to: the version and the log's length at the last
        # checkpoint, and each name changed since, as it was then (entry, left at).
        self._compactions = 0
        self._settled = (0, 0, 0)
        self._touched: dict[str, tuple[TableEntry | None, int | None]] = {}

    def restore(self, records: Iterable[ClientRecord]) -> None:
        for record in records:
            self.clients[record.name] = record
            self._by_addr[record.addr] = record.name
            self._pages.put(record.entry())

    def checkpoint(self) -> None:
        """What was made so far went out (the runtime carried out the effects)."""
        self._settled = (self.version, len(self._log), self._compactions)
        self._touched.clear()

    def reload(self, records: Iterable[ClientRecord]) -> None:
        """Every record as ``records`` have them (the database's), after a commit failed:
        nothing made since the last checkpoint went out. The table goes back to what it
        was then (its version, its log, each name changed since); a record the database
        has otherwise than that (or a name it does not have) makes a new version."""
        stored = {record.name: record for record in records}
        version, logged, compactions = self._settled
        if compactions == self._compactions:  # what was logged since is the log's tail
            del self._log[logged:], self._log_versions[logged:]
            self.version, self._next, self._pending = version, version + 1, False
            self._whole, self._deltas = None, OrderedDict()
            for name, (entry, left_at) in self._touched.items():
                if entry is None:
                    self._pages.drop(name)
                else:
                    self._pages.put(entry)
                self._removed.pop(name, None)
                if left_at is not None:
                    self._removed[name] = left_at
            self._removed = dict(sorted(self._removed.items(), key=lambda item: item[1]))
        self._touched.clear()
        for name in [name for name in self._pages.names() if name not in stored]:
            self._leave(name)
        self.clients, self._by_addr = {}, {}
        for record in stored.values():  # oldest change first: the last owns its address
            self.clients[record.name] = record
            self._by_addr[record.addr] = record.name
            if self._pages.entry(record.name) != record.entry():
                self._note(record)

    def _touch(self, name: str) -> None:
        """``name`` changes: how it was at the checkpoint is kept, once, for a rollback."""
        if name not in self._touched:
            self._touched[name] = (self._pages.entry(name), self._removed.get(name))

    def name_at(self, addr: Address) -> str | None:
        return self._by_addr.get(addr)

    # --- changes ----------------------------------------------------------------------

    def add(self, record: ClientRecord) -> None:
        """``record`` holds its name and its address from now on."""
        holder = self.clients.get(record.name)
        if holder is not None and self._by_addr.get(holder.addr) == holder.name:
            del self._by_addr[holder.addr]
        self.clients[record.name] = record
        self._by_addr[record.addr] = record.name
        self._note(record)

    def set_presence(self, record: ClientRecord, presence: Presence) -> None:
        record.presence = presence
        self._note(record)

    def remove(self, name: str) -> None:
        """``name`` leaves the table (its record is forgotten)."""
        record = self.clients.pop(name, None)
        if record is None:
            return
        if self._by_addr.get(record.addr) == name:
            del self._by_addr[record.addr]
        self._leave(name)

    def _leave(self, name: str) -> None:
        """``name`` is not in the table from the version being made."""
        self._touch(name)
        self._pages.drop(name)
        self._removed[name] = self._next
        self._pending = True
        if len(self._removed) > MAX_REMOVED:
            oldest = next(iter(self._removed))
            self._floor = max(self._floor, self._removed.pop(oldest))

    def touch(self) -> None:
        """Make a new version even with no change (a new epoch: every client needs it)."""
        self._pending = True

    def _note(self, record: ClientRecord) -> None:
        self._touch(record.name)
        entry = record.entry()
        self._pages.put(entry)
        self._log_versions.append(self._next)
        self._log.append(entry)
        self._removed.pop(record.name, None)
        self._pending = True

    def close_version(self) -> bool:
        """End the version the changes so far went into; False if there were none."""
        if not self._pending:
            return False
        self._pending = False
        self.version = self._next
        self._next = self.version + 1
        self._whole = None
        self._deltas.clear()
        if len(self._log) > 2 * len(self.clients) + 1024:
            self._compact()
        return True

    def _compact(self) -> None:
        """Keep each name's last entry only (the names that left, none), in log order."""
        self._compactions += 1
        last: dict[str, int] = {entry.name: index for index, entry in enumerate(self._log)}
        keep = sorted(index for name, index in last.items() if name in self.clients)
        self._log_versions = [self._log_versions[index] for index in keep]
        self._log = [self._log[index] for index in keep]

    # --- updates ----------------------------------------------------------------------

    def update_for(self, held: int | None, new_id: Callable[[], str], encode: Encode) -> Update:
        """The parts that bring a client holding version ``held`` of this epoch (None:
        none) to the current version, encoded: a delta, or the whole table when the
        history does not reach back to ``held``. Made once per version and base."""
        if held is not None and held >= self._floor:
            return self._delta(held, new_id, encode)
        return self.whole(new_id, encode)

    def whole(self, new_id: Callable[[], str], encode: Encode) -> Update:
        if self._whole is None:
            parts = self._pages.parts()
            tables = [
                Table(new_id(), self.epoch, self.version, index, len(parts), entries)
                for index, entries in enumerate(parts)
            ]
            self._whole = [(table, encode(table)) for table in tables]
        return self._whole

    def _delta(self, base: int, new_id: Callable[[], str], encode: Encode) -> Update:
        delta = self._deltas.get(base)
        if delta is not None:
            self._deltas.move_to_end(base)
            return delta
        since = self._log[bisect.bisect_right(self._log_versions, base) :]
        gone = _left_since(self._removed, base)
        left = set(gone)  # a name that changed and then left is only gone (in any order)
        last = {entry.name: entry for entry in since}  # each name's last
        entries = [entry for name, entry in last.items() if name not in left]
        parts = _split(entries, gone)
        deltas = [
            TableDelta(new_id(), self.epoch, base, self.version, index, len(parts), *part)
            for index, part in enumerate(parts)
        ]
        delta = [(part, encode(part)) for part in deltas]
        self._deltas[base] = delta
        if len(self._deltas) > CACHED_DELTAS:
            self._deltas.popitem(last=False)
        return delta


def _left_since(removed: dict[str, int], base: int) -> list[str]:
    """The names that left the table after version ``base``, in the order they left (the
    walk back stops at the first older one, so it costs what it finds)."""
    found = []
    for name, version in reversed(removed.items()):
        if version <= base:
            break
        found.append(name)
    return found[::-1]


_encoder = msgspec.json.Encoder()


def _size(item: TableEntry | str) -> int:
    return len(_encoder.encode(item)) + 1  # and its comma


def _split(entries: list[TableEntry], gone: list[str]) -> list[tuple[list[TableEntry], list[str]]]:
    """A delta's entries and names in parts that each fit in one datagram (at least one)."""
    if len(_encoder.encode(entries)) + len(_encoder.encode(gone)) <= PART_BUDGET:
        return [(entries, gone)]
    return [(run, []) for run in _runs(entries)] + [([], run) for run in _runs(gone)]


T = TypeVar("T", TableEntry, str)


def _runs(items: list[T]) -> list[list[T]]:
    """``items`` in runs that each encode within ``PART_BUDGET``: cut evenly by the size
    of the whole (encoding is cheap, measuring item by item is not), and a run that is
    still too big is cut in two."""
    if not items:
        return []
    size = len(_encoder.encode(items))
    if size <= PART_BUDGET or len(items) == 1:
        return [items]
    count = -(-size * 20 // (PART_BUDGET * 19))  # parts filled to about 95 %
    step = -(-len(items) // count)
    if step >= len(items):
        step = len(items) // 2
    return [
        run for start in range(0, len(items), step) for run in _runs(items[start : start + step])
    ]


class _Pages:
    """The whole table as the parts it is sent in. A name keeps its place while its
    entry fits there, so a new version costs encoding the parts, not building them."""

    def __init__(self) -> None:
        self._pages: list[dict[str, TableEntry]] = []
        self._sizes: list[int] = []
        self._page_of: dict[str, int] = {}

    def names(self) -> list[str]:
        return list(self._page_of)

    def entry(self, name: str) -> TableEntry | None:
        index = self._page_of.get(name)
        return None if index is None else self._pages[index][name]

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
