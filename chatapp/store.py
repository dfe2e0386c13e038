"""Where the server keeps what must survive a crash: its key, the client table (each
name's binding to a key), and the delivery streams.

The server's state machine announces every change as an effect
(``chatapp.protocol.changes``); the node commits each run of them in one
transaction before it sends the answer that follows. Every store takes them
through ``apply_changes``. ``MemoryStore`` keeps them in memory (``--db
:memory:``, the tests, the replay); ``chatapp.sqlite_store.SqliteStore`` is the
durable default.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec

from chatapp.protocol.changes import (
    Change,
    ClientRecord,
    ClientRemoved,
    ClientSaved,
    MessagesRemoved,
    MessageStored,
    apply_changes,
)
from chatapp.protocol.crypto import Identity
from chatapp.wire import Seq, StoredItem


def new_origin() -> str:
    """A store's origin: the first part of the sequence numbers it gives."""
    return os.urandom(8).hex()


@dataclass
class ServerDisk:
    """What a server reads from its store when it starts."""

    key: bytes  # the seed of the server's Ed25519 key
    origin: str
    last_n: int  # the highest sequence number ever given (they never go back)
    clients: list[ClientRecord]  # oldest change first
    mailbox: dict[str, list[StoredItem]]  # recipient -> stored items, oldest first
    #: The clients that another server sharing the database serves (PostgreSQL only).
    elsewhere: frozenset[str] = frozenset()


class Store(Protocol):
    #: Whether a commit reaches a disk (worth gathering several changes per commit).
    durable: bool

    def load(self) -> ServerDisk:
        """What was last committed."""
        ...

    async def commit(self, changes: list[Change]) -> None:
        """Apply ``changes`` in one transaction; return only once it is durable."""
        ...

    def close(self) -> None: ...


class MemoryStore:
    """A store in memory: what was committed is there until the process ends (its key
    too: a server restarted on a new ``MemoryStore`` is a server with a new key).

    ``changes`` are applied at once, as a database would hold them when a server
    starts (a replay starts its server from the recorded server's database this way).
    """

    durable = False

    def __init__(
        self,
        changes: Iterable[Change] = (),
        *,
        key: bytes | None = None,
        origin: str | None = None,
        last_n: int = 0,
    ) -> None:
        self.key = key if key is not None else Identity.generate().seed
        self.origin = origin or new_origin()
        self.last_n = last_n
        self._clients: dict[str, ClientSaved] = {}
        self._mailbox: dict[str, dict[Seq, StoredItem]] = {}
        self._kept: dict[str, set[tuple[str, str]]] = {}  # (sender, id) of each stored item
        apply_changes(changes, self)

    def load(self) -> ServerDisk:
        clients = [saved.record() for saved in self._clients.values()]
        mailbox = {
            name: sorted(box.values(), key=lambda item: (item.seq.origin, item.seq.n))
            for name, box in self._mailbox.items()
            if box
        }
        return ServerDisk(self.key, self.origin, self.last_n, clients, mailbox)

    async def commit(self, changes: list[Change]) -> None:
        apply_changes(changes, self)

    def close(self) -> None:
        pass

    # --- the ServerSink side -----------------------------------------------------------

    def save_client(self, change: ClientSaved) -> None:
        self._clients.pop(change.name, None)  # saved last: last in the order of changes
        self._clients[change.name] = change

    def remove_client(self, change: ClientRemoved) -> None:
        self._clients.pop(change.name, None)
        self._mailbox.pop(change.name, None)
        self._kept.pop(change.name, None)
        for recipient, box in self._mailbox.items():  # and what it sent
            for seq in [seq for seq, item in box.items() if item.sender == change.name]:
                item = box.pop(seq)
                self._kept[recipient].discard((item.sender, item.id))

    def store_message(self, change: MessageStored) -> None:
        item = change.item
        kept = self._kept.setdefault(change.recipient, set())
        if (item.sender, item.id) in kept:
            return  # the same message again changes nothing
        kept.add((item.sender, item.id))
        self._mailbox.setdefault(change.recipient, {})[item.seq] = item
        if item.seq.origin == self.origin:
            self.last_n = max(self.last_n, item.seq.n)

    def remove_messages(self, change: MessagesRemoved) -> None:
        box = self._mailbox.get(change.recipient, {})
        kept = self._kept.get(change.recipient, set())
        for seq in change.seqs:
            item = box.pop(seq, None)
            if item is not None:
                kept.discard((item.sender, item.id))


R = TypeVar("R")


def checked_row(values: tuple[Any, ...], kind: type[R], table: str, error: type[Exception]) -> R:
    """A database row (in the order of ``kind``'s fields) as a ``kind``, checked as a
    datagram's fields would be: a file or database is outside input too. ``error`` is
    the store's own error, raised for a row chatapp did not write."""
    fields = msgspec.structs.fields(kind)  # type: ignore[arg-type]
    try:
        return msgspec.convert(dict(zip((f.name for f in fields), values, strict=True)), kind)
    except msgspec.ValidationError as exc:
        raise error(f"a row of {table} is not one chatapp writes: {exc}") from None


def stored_item(row: list[Any] | tuple[Any, ...], error: type[Exception]) -> StoredItem:
    """A mailbox row (origin, n, id, kind, sender, stored_at, text, sig, sealed) as an
    item, checked as a datagram's would be."""
    if len(row) != 9:
        raise error("a row of mailbox is not one chatapp writes: its columns")
    origin, n, msg_id, kind, sender, stored_at, text, sig, sealed = row
    fields = {
        "seq": [origin, n], "id": msg_id, "kind": kind, "sender": sender,
        "stored_at": stored_at, "text": text, "sig": bytes(sig), "sealed": bytes(sealed),
    }  # fmt: skip
    try:
        return msgspec.convert(fields, StoredItem, from_attributes=False)
    except (msgspec.ValidationError, TypeError) as exc:
        raise error(f"a row of mailbox is not one chatapp writes: {exc}") from None
