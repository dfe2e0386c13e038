"""Where the server keeps what must survive a crash: the client table and the mailbox.

The server's state machine announces every change as an effect
(``chatapp.protocol.changes``); the node commits each run of them in one
transaction before it sends the answer that follows. Every store takes them
through ``apply_changes``. ``MemoryStore`` keeps them in memory (``--db
:memory:``, the tests, the replay); ``chatapp.sqlite_store.SqliteStore`` is the
durable default.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from chatapp.protocol.changes import (
    Change,
    ClientRecord,
    ClientRemoved,
    ClientSaved,
    MessagesRemoved,
    MessageStored,
    apply_changes,
)
from chatapp.wire import StoredItem


class Store(Protocol):
    #: Whether a commit reaches a disk (worth gathering several changes per commit).
    durable: bool

    def load(self) -> tuple[list[ClientRecord], dict[str, list[StoredItem]]]:
        """The clients (oldest change first) and the stored messages (oldest first) as
        last committed."""
        ...

    async def commit(self, changes: list[Change]) -> None:
        """Apply ``changes`` in one transaction; return only once it is durable."""
        ...

    def close(self) -> None: ...


class MemoryStore:
    """A store in memory: what was committed is there until the process ends.

    ``changes`` are applied at once, as a database would hold them when a server
    starts (a replay starts its server from the recorded server's database this way).
    """

    durable = False

    def __init__(self, changes: Iterable[Change] = ()) -> None:
        self._clients: dict[str, ClientSaved] = {}
        self._mailbox: dict[str, dict[str, StoredItem]] = {}
        apply_changes(changes, self)

    def load(self) -> tuple[list[ClientRecord], dict[str, list[StoredItem]]]:
        clients = [saved.record() for saved in self._clients.values()]
        mailbox = {name: list(box.values()) for name, box in self._mailbox.items() if box}
        return clients, mailbox

    async def commit(self, changes: list[Change]) -> None:
        apply_changes(changes, self)

    def close(self) -> None:
        pass

    # --- the ChangeSink side -----------------------------------------------------------

    def save_client(self, change: ClientSaved) -> None:
        self._clients.pop(change.name, None)  # saved last: last in the order of changes
        self._clients[change.name] = change

    def remove_client(self, change: ClientRemoved) -> None:
        self._clients.pop(change.name, None)

    def store_message(self, change: MessageStored) -> None:
        self._mailbox.setdefault(change.recipient, {}).setdefault(change.item.id, change.item)

    def remove_messages(self, change: MessagesRemoved) -> None:
        box = self._mailbox.get(change.recipient, {})
        for msg_id in change.ids:
            box.pop(msg_id, None)
