"""What the server must remember across a crash, and the changes it makes to it.

The server's state machine announces every change as one of the effects below,
placed before the answer that depends on it; the runtime commits a run of them
in one transaction before it sends what follows. Every store applies them
through ``apply_changes``: the SQLite store to its tables, the memory store to
its dictionaries.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from chatapp.wire import Address, StoredItem, TableEntry


class Presence(enum.Enum):
    ONLINE = "online"
    DEREGISTERED = "deregistered"  # went offline with dereg: only reg brings it back
    SILENT = "silent"  # stopped ACKing: any word from its address brings it back


@dataclass(slots=True)
class ClientRecord:
    name: str
    addr: Address
    token: str
    presence: Presence = Presence.ONLINE

    @property
    def online(self) -> bool:
        return self.presence is Presence.ONLINE

    def entry(self) -> TableEntry:
        return TableEntry(self.name, self.addr[0], self.addr[1], self.online)


class Change:
    """A change to what the server keeps (the base of the classes below)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ClientSaved(Change):
    """A client's record as it is now, new or replacing the one of that name. The record
    saved last is the newest: when two records name one address, it owns it."""

    name: str
    ip: str
    port: int
    token: str
    presence: Presence

    @classmethod
    def of(cls, record: ClientRecord) -> ClientSaved:
        return cls(record.name, record.addr[0], record.addr[1], record.token, record.presence)

    def record(self) -> ClientRecord:
        return ClientRecord(self.name, (self.ip, self.port), self.token, self.presence)


@dataclass(frozen=True, slots=True)
class ClientRemoved(Change):
    """The record of ``name`` is gone (a registration that never completed is undone)."""

    name: str


@dataclass(frozen=True, slots=True)
class MessageStored(Change):
    """A message kept for ``recipient`` (once: the same id again changes nothing)."""

    recipient: str
    item: StoredItem


@dataclass(frozen=True, slots=True)
class MessagesRemoved(Change):
    """Stored messages that ``recipient`` ACKed."""

    recipient: str
    ids: tuple[str, ...]


class ChangeSink(Protocol):
    """A store's side of ``apply_changes``: one method per kind of change."""

    def save_client(self, change: ClientSaved) -> None: ...

    def remove_client(self, change: ClientRemoved) -> None: ...

    def store_message(self, change: MessageStored) -> None: ...

    def remove_messages(self, change: MessagesRemoved) -> None: ...


def apply_changes(changes: Iterable[Change], sink: ChangeSink) -> None:
    """Carry out ``changes`` in order on ``sink``: the one way any store takes them."""
    for change in changes:
        if isinstance(change, ClientSaved):
            sink.save_client(change)
        elif isinstance(change, ClientRemoved):
            sink.remove_client(change)
        elif isinstance(change, MessageStored):
            sink.store_message(change)
        elif isinstance(change, MessagesRemoved):
            sink.remove_messages(change)
        else:
            raise TypeError(f"not a change a store knows: {change!r}")
