"""Keeping every client's copy of the table up to date, as roster versioning does
(XMPP's XEP-0237): a client gets the whole table once, and then only what changed.

``Followers`` is the server's side: for each online client, the version of the
table it holds (as its ACKs said), the one update in flight to it, and whether
it needs another. ``TableCopy`` is the client's side: its copy, the version it
holds, and the parts of a table or a delta it is still putting together.

The rules (the server's ``roster`` makes the versions and the messages):

- The table has an epoch (one per server start) and a version (+1 for every
  event that changed it).
- A client with no table of this epoch gets the whole table, in parts; any
  other gets a delta from the version it holds, or the whole table when the
  server's history does not reach back that far.
- One update in flight per client: changes meanwhile wait for its ACK and then
  go together in the next one. And a window of parts unanswered in all (``Window``:
  every part brings an ACK back, and a burst of ACKs larger than the server's
  receive buffer, or than it can read within one ACK timeout, would be dropped or
  late, sent again, and again); clients beyond it wait their turn, in order.
- The client ACKs every part with the version it holds after taking it; one
  that cannot place a delta (a gap, another epoch) says what it has, and the
  server sends what brings it from there.
- A commit that fails drops the updates made since the last checkpoint (none went
  out) and gives back what the handling forgot of a client's copy; what ACKs said
  stands (``Followers.reload``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

from chatapp.protocol.changes import ClientRecord
from chatapp.protocol.roster import Encode, Roster
from chatapp.wire import Table, TableDelta, TableEntry

K = TypeVar("K", tuple[int, int, int], tuple[int, int, int, int])
P = TypeVar("P", Table, TableDelta)

# --- the server's side ------------------------------------------------------------


@dataclass(slots=True)
class _Flight:
    """The update in flight to a client."""

    to: int  # the version it brings
    whole: bool  # the whole table (else a delta)
    waits: dict[Hashable, int] = field(default_factory=dict)  # unanswered part -> its bytes
    held: int | None = None  # the highest version of this epoch its ACKs said, if any


@dataclass(frozen=True, slots=True)
class Window:
    """How much of the table's updates may be unanswered at once, all clients together.
    ``parts``: their ACKs must fit in the server's receive buffer with room to spare;
    ``bytes``: the receivers must be able to take it all and answer well within one
    ACK timeout (a burst that takes longer is sent again, and again). These are the
    most; what is allowed moves as TCP's congestion window does, so that a server
    short of CPU sends no faster than it hears back: it starts at ``least`` parts and
    grows by one for every update ACKed whole (doubling with every window's worth),
    until a part must be sent again because its ACK was late; then it is halved (once
    per ACK timeout: one burst's retries are one signal) and grows by one part per
    window's worth of updates ACKed."""

    parts: int = 4096
    bytes: int = 1 << 20
    least: int = 32  # parts: where it starts, and what halving never goes below


#: A datagram to send: who to, the message, and its bytes (encoded once for everyone).
Outgoing = tuple[ClientRecord, Table | TableDelta, bytes]


class Followers:
    """What the server knows of each client's copy of the table.

    A client is in at most one of: in flight (an update waits for its ACKs), due
    (it needs an update at the next flush) or idle (it holds the current version).
    A client that is offline is in none of them (unless it is sent a probe)."""

    def __init__(self, window: Window = Window()) -> None:
        self.window = window
        self._allowed = float(min(window.least, window.parts))  # parts at once, for now
        self._cut_at = float("-inf")  # when it was last halved (never: it grows fast)
        self._parts_out = 0  # unanswered, all clients together
        self._bytes_out = 0
        self._version = 0  # the roster's version at the last flush
        #: name -> the version of this epoch it holds (absent: none; it needs the whole table)
        self.held: dict[str, int] = {}
        self._flights: dict[str, _Flight] = {}
        self._due: OrderedDict[str, None] = OrderedDict()  # (ordered sets) first come first
        self._idle: dict[str, None] = {}
        #: registered, its first whole table not ACKed yet -> whether the name was new then
        self._joining: dict[str, bool] = {}
        #: What a rollback gives back: each name forgotten since the last checkpoint (by a
        #: registration, a removal, an undone registration), as it was then: (held, joining).
        self._forgotten: dict[str, tuple[int | None, bool | None]] = {}

    def checkpoint(self) -> None:
        """What was sent so far went out: a rollback does not go back before it."""
        self._forgotten.clear()

    def _forget(self, name: str) -> None:
        """``name``'s version held and registration are about to be forgotten: how they
        were at the checkpoint is kept, once, for a rollback."""
        if name not in self._forgotten:
            self._forgotten[name] = (self.held.get(name), self._joining.get(name))

    def joined(self, name: str, *, new: bool) -> set[Hashable]:
        """``name`` registered (again): it holds nothing yet. Returns the waits to end."""
        self._forget(name)
        waits = self.offline(name)
        self.held.pop(name, None)
        self._joining[name] = new
        self._due[name] = None
        return waits

    def online(self, name: str) -> None:
        """``name`` is back online: it gets an update (unless one is in flight)."""
        if name not in self._flights:
            self._idle.pop(name, None)
            self._due[name] = None

    def offline(self, name: str) -> set[Hashable]:
        """``name`` went offline: nothing more is sent to it. Returns the waits to end."""
        self._due.pop(name, None)
        self._idle.pop(name, None)
        return self._land(name)

    def _land(self, name: str) -> set[Hashable]:
        """``name``'s update is over: the waits it still had."""
        flight = self._flights.pop(name, None)
        if flight is None:
            return set()
        self._parts_out -= len(flight.waits)
        self._bytes_out -= sum(flight.waits.values())
        return set(flight.waits)

    def probe(self, name: str) -> None:
        """``name`` was just marked offline for not ACKing: it gets one more update, so
        that a live client whose ACKs were lost comes back by contact."""
        self._due[name] = None

    def removed(self, name: str) -> set[Hashable]:
        """``name`` left the table. Returns the waits to end."""
        self._forget(name)
        self.held.pop(name, None)
        self._joining.pop(name, None)
        return self.offline(name)

    def updates(
        self,
        roster: Roster,
        new_id: Callable[[], str],
        encode: Encode,
        reachable: Callable[[ClientRecord], bool] = lambda record: True,
    ) -> list[Outgoing]:
        """At the end of an event (the roster has made its version): what to send now.
        Each client that needs an update and has none in flight gets what brings it from
        the version it holds to the current one, first come first, while the window has
        room (it may go past by one update); it waits on ``(its name, id)`` of each part.
        A client that cannot be reached now (no session: it has yet to register again)
        stays due."""
        if roster.version != self._version:  # every client that held the last one is behind
            self._version = roster.version
            self._due.update(self._idle)
            self._idle.clear()
        sends: list[Outgoing] = []
        unreachable: list[str] = []
        while self._due and self._parts_out < self._allowed and self._bytes_out < self.window.bytes:
            name, _ = self._due.popitem(last=False)
            record = roster.clients.get(name)
            held = self.held.get(name)
            if record is None or held == self._version:
                if record is not None:
                    self._idle[name] = None
                continue
            if not reachable(record):
                unreachable.append(name)
                continue
            update = roster.update_for(held, new_id, encode)
            flight = _Flight(self._version, isinstance(update[0][0], Table))
            for part, data in update:
                flight.waits[(record.name, part.id)] = len(data)
                sends.append((record, part, data))
            self._flights[name] = flight
            self._parts_out += len(flight.waits)
            self._bytes_out += sum(flight.waits.values())
        self._due.update(dict.fromkeys(unreachable))
        return sends

    def acked(self, name: str, wait: Hashable, version: int | None) -> None:
        """``wait``, a part of ``name``'s update, was ACKed: the client holds ``version``
        of this epoch (None: no table of this epoch). Once every part is answered, the
        client is idle, or due if it is still behind (changes meanwhile, or a delta it
        could not place: it gets what brings it from the version it holds)."""
        flight = self._flights.get(name)
        if flight is None or wait not in flight.waits:
            return  # a late ACK of an update that is over: the next says more
        self._parts_out -= 1
        self._bytes_out -= flight.waits.pop(wait)
        if version is not None and (flight.held is None or version > flight.held):
            flight.held = version
        if flight.waits:
            return
        del self._flights[name]
        growth = 1.0 if self._cut_at == float("-inf") else 1 / self._allowed
        self._allowed = min(self._allowed + growth, self.window.parts)
        if flight.held is None:
            self.held.pop(name, None)
        else:
            self.held[name] = flight.held
            self._joining.pop(name, None)
        refused = flight.whole and (flight.held is None or flight.held < flight.to)
        if self.held.get(name) == self._version or refused:
            # A whole table the client did not take is not sent again at once (that
            # could go on for ever): the next version tries again.
            self._idle[name] = None
        else:
            self._due[name] = None

    @property
    def allowed(self) -> int:
        """The parts that may be unanswered at once, for now."""
        return int(self._allowed)

    def resent(self, now: float, timeout: float) -> None:
        """Parts were sent again (their ACKs were late, or lost): send less at once, by
        half, at most once per ``timeout`` (one burst's retries are one signal)."""
        if now - self._cut_at >= timeout:
            self._cut_at = now
            self._allowed = max(self._allowed / 2, self.window.least)

    def reload(
        self, online: set[str], known: Collection[str], ended: set[Hashable]
    ) -> set[Hashable]:
        """After a rollback (a commit failed; the roster is the database's again): the
        waits ``ended`` never went out (an update left with none is over); a name
        forgotten since the checkpoint and ``known`` again holds what it held and is
        joining as it was; the names not ``known`` are gone; and each client ``online``
        with no update in flight is due (it gets what brings it from the version it
        holds, if anything). What ACKs said meanwhile stands: it is what clients hold.
        Returns the waits to end."""
        for name, flight in list(self._flights.items()):
            for wait in flight.waits.keys() & ended:
                self._parts_out -= 1
                self._bytes_out -= flight.waits.pop(wait)
            if not flight.waits:
                del self._flights[name]
        for name, (held, joining) in self._forgotten.items():
            if name in known:
                _put(self.held, name, held)
                _put(self._joining, name, joining)
        waits: set[Hashable] = set()
        for name in {*self.held, *self._joining, *self._flights, *self._due, *self._idle}:
            if name not in known:
                waits |= self.removed(name)
        self._forgotten.clear()
        self._due = OrderedDict((name, None) for name in self._due if name in online)
        self._idle = {name: None for name in self._idle if name in online}
        for name in online:
            if name not in self._flights and name not in self._idle:
                self._due[name] = None
        # The roster's version went back and may be made again with other changes: the
        # next flush looks at every idle client again.
        self._version = -1
        return waits

    def lost(self, name: str, wait: Hashable) -> set[Hashable]:
        """``wait`` ran out of tries: if it carried ``name``'s update, that is over.
        Returns the waits to end (the update's other parts)."""
        flight = self._flights.get(name)
        if flight is None or wait not in flight.waits:
            return set()
        return self._land(name)

    def is_joining(self, name: str) -> bool:
        return name in self._joining

    def joined_new(self, name: str) -> bool:
        """Whether ``name`` was new at a registration that has not completed."""
        return self._joining.get(name, False)

    def give_up_joining(self, name: str) -> bool:
        """``name``'s registration will not complete: whether the name was new at it."""
        self._forget(name)
        return self._joining.pop(name, False)


V = TypeVar("V")


def _put(values: dict[str, V], name: str, value: V | None) -> None:
    """``values[name] = value``, or no value for ``name`` if ``value`` is None."""
    if value is None:
        values.pop(name, None)
    else:
        values[name] = value


# --- the client's side ------------------------------------------------------------

#: Tables and deltas a client puts together at once (older ones are dropped first).
MAX_ASSEMBLIES = 8


class TableCopy:
    """A client's copy of the server's table and the version it holds."""

    def __init__(self) -> None:
        self.entries: dict[str, TableEntry] = {}
        self.epoch = -1
        self.version = -1  # -1: no table yet
        self._wholes: dict[tuple[int, int, int], dict[int, Table]] = {}
        self._deltas: dict[tuple[int, int, int, int], dict[int, TableDelta]] = {}

    def take(self, message: Table | TableDelta) -> bool:
        """Take one part; True if it completed a table or a delta that was applied
        (the copy moved forward). A repeat, a part of an older version or a delta that
        does not start at or below the version held changes nothing."""
        if message.part >= message.parts:
            return False
        if isinstance(message, Table):
            return self._take_whole(message)
        return self._take_delta(message)

    def _take_whole(self, part: Table) -> bool:
        # Epochs are not ordered (a server's boot id): a table of another epoch always
        # replaces the copy; one of this epoch only if it is newer.
        if part.epoch == self.epoch and part.version <= self.version:
            return False
        parts = _collect(self._wholes, (part.epoch, part.version, part.parts), part)
        if len(parts) < part.parts:
            return False
        self.entries = {entry.name: entry for p in parts.values() for entry in p.entries}
        self._moved_to(part.epoch, part.version)
        return True

    def _take_delta(self, part: TableDelta) -> bool:
        if not self._places(part):
            return False
        key = (part.epoch, part.from_, part.to, part.parts)
        parts = _collect(self._deltas, key, part)
        if len(parts) < part.parts:
            return False
        del self._deltas[key]
        for p in parts.values():
            for entry in p.entries:
                self.entries[entry.name] = entry
            for name in p.gone:
                self.entries.pop(name, None)
        self._moved_to(part.epoch, part.to)
        return True

    def _places(self, delta: TableDelta) -> bool:
        """Whether ``delta`` applies to the version held: same epoch, starting at or below
        it (its entries are their state at ``to``, so taking one again is harmless) and
        ending above it."""
        return delta.epoch == self.epoch and delta.from_ <= self.version < delta.to

    def _moved_to(self, epoch: int, version: int) -> None:
        """Now at ``version`` of ``epoch``: only what could still move it forward is kept."""
        self.epoch, self.version = epoch, version
        self._wholes = {k: v for k, v in self._wholes.items() if k[0] == epoch and k[1] > version}
        self._deltas = {k: v for k, v in self._deltas.items() if k[0] == epoch and k[2] > version}


def _collect(assemblies: dict[K, dict[int, P]], key: K, part: P) -> dict[int, P]:
    """Add ``part`` to the assembly ``key``; its parts so far."""
    parts = assemblies.setdefault(key, {})
    parts[part.part] = part
    while len(assemblies) > MAX_ASSEMBLIES:  # the oldest go first
        del assemblies[min(assemblies)]
    return parts
