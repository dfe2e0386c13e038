"""What a node must remember across a crash, and the changes it makes to it.

The state machines announce every change as one of the effects below, placed
before the answer (or the line) that depends on it; the runtime commits a run
of them before it sends or shows what follows. The server's changes go to its
database; a client's to its state files (the server's pinned key, the marks
of the stored messages it has shown). Every store applies them through
``apply_changes``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from chatapp.wire import Address, Seq, StoredItem, TableEntry

#: The tag of a client that has no session (offline): eight zero bytes in a chat.
NO_TAG = bytes(8)


class Presence(enum.Enum):
    ONLINE = "online"
    DEREGISTERED = "deregistered"  # went offline with dereg: only reg brings it back
    SILENT = "silent"  # stopped ACKing: any word from its session brings it back


@dataclass(slots=True)
class ClientRecord:
    """A registered name: bound to ``key`` for good, at ``addr``, with its session ``sid``
    (kept across a restart, so that the server can ask the client to rekey; the
    session's key is never kept)."""

    name: str
    addr: Address
    key: bytes
    sid: bytes = b""
    presence: Presence = Presence.ONLINE

    @property
    def online(self) -> bool:
        return self.presence is Presence.ONLINE

    def entry(self) -> TableEntry:
        # The session id even while offline: a client marked offline for silence may be
        # alive after all, and its peers still reach it directly.
        return TableEntry(self.name, self.addr[0], self.addr[1], self.online, self.key, self.sid)


class Change:
    """A change to what a node keeps (the base of the classes below)."""

    __slots__ = ()


# --- the server's --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientSaved(Change):
    """A client's record as it is now, new or replacing the one of that name. The record
    saved last is the newest: when two records name one address, it owns it."""

    name: str
    ip: str
    port: int
    key: bytes
    sid: bytes
    presence: Presence

    @classmethod
    def of(cls, record: ClientRecord) -> ClientSaved:
        ip, port = record.addr
        return cls(record.name, ip, port, record.key, record.sid, record.presence)

    def record(self) -> ClientRecord:
        return ClientRecord(self.name, (self.ip, self.port), self.key, self.sid, self.presence)


@dataclass(frozen=True, slots=True)
class ClientRemoved(Change):
    """A name leaves the table: released by an operator, or bound by a registration that
    never completed. Its binding and record go, and what was stored for it and what it
    sent that is still stored (its key is gone: no one could verify it any more)."""

    name: str


@dataclass(frozen=True, slots=True)
class MessageStored(Change):
    """A message kept for ``recipient`` (once: the same sender and id again change
    nothing), with its place ``item.seq`` in the delivery stream."""

    recipient: str
    item: StoredItem


@dataclass(frozen=True, slots=True)
class MessagesRemoved(Change):
    """Stored messages that ``recipient`` ACKed."""

    recipient: str
    seqs: tuple[Seq, ...]


# --- a client's -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerPinned(Change):
    """The key of the server at ``address``, pinned on first use (``known_servers``)."""

    address: Address
    key: bytes


@dataclass(frozen=True, slots=True)
class DeliveryMarked(Change):
    """The highest stored message shown, per origin, for the server whose key is
    ``server_key`` (written before the lines that depend on it are shown)."""

    server_key: bytes
    marks: tuple[tuple[str, int], ...]


class ServerSink(Protocol):
    """A server store's side of ``apply_changes``."""

    def save_client(self, change: ClientSaved) -> None: ...

    def remove_client(self, change: ClientRemoved) -> None: ...

    def store_message(self, change: MessageStored) -> None: ...

    def remove_messages(self, change: MessagesRemoved) -> None: ...


class ClientSink(Protocol):
    """A client's state files' side of ``apply_changes``."""

    def pin_server(self, change: ServerPinned) -> None: ...

    def mark_delivered(self, change: DeliveryMarked) -> None: ...


#: Which method of a sink carries out each kind of change.
_METHODS: dict[type[Change], str] = {
    ClientSaved: "save_client",
    ClientRemoved: "remove_client",
    MessageStored: "store_message",
    MessagesRemoved: "remove_messages",
    ServerPinned: "pin_server",
    DeliveryMarked: "mark_delivered",
}


def apply_changes(changes: Iterable[Change], sink: ServerSink | ClientSink) -> None:
    """Carry out ``changes`` in order on ``sink``: the one way any store takes them."""
    for change in changes:
        method = _METHODS.get(type(change))
        if method is None or not hasattr(sink, method):
            raise TypeError(f"not a change {type(sink).__name__} takes: {change!r}")
        getattr(sink, method)(change)
