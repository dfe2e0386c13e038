"""What each start of a replayed node starts from: its recorded address, the state it
read (a client's key, pins and marks; a server's database), and the faults injected
where it sent.

A trace may start a node several times (a client that comes back under its name
from a new process, a server restarted on its database): each start is replayed
from its own ``start`` event (its address, its seed, what it read), and a
server's from the ``restore`` event before it.
"""

from __future__ import annotations

from collections.abc import Callable

from chatapp.launch import ClientStart
from chatapp.protocol.changes import Change, ClientSaved, MessageStored
from chatapp.protocol.crypto import unb64
from chatapp.testing.faults import FaultPlan
from chatapp.testing.stores import InlineSqliteStore
from chatapp.trace import Fault, Restored, Start, Trace
from chatapp.wire import Address

from .normalise import Normaliser


def client_start(started: Start) -> ClientStart | None:
    """What the recorded client read from its state directory (None: not recorded)."""
    if not started.key:
        return None
    marks = {unb64(key): dict(marks) for key, marks in started.marks.items()}
    return ClientStart(unb64(started.key), unb64(started.pinned) or None, marks)


def restored_store(
    restored: Restored | None, new_address: Callable[[Address], Address]
) -> InlineSqliteStore:
    """What the recorded server read from its database, as a SQLite database (in memory)
    made by the changes that made it, with the addresses of this run: the replayed
    server reads and writes it with the real database code (``InlineSqliteStore``: no
    worker thread, which virtual time would jump over)."""
    store = InlineSqliteStore()
    if restored is None:
        return store
    changes: list[Change] = []
    for name, ip, port, client_key, sid, presence in restored.clients:
        ip, port = new_address((ip, port))
        changes.append(ClientSaved(name, ip, port, unb64(client_key), unb64(sid), presence))
    for recipient, items in restored.mailbox.items():
        changes += [MessageStored(recipient, item) for item in items]
    store.start_from(unb64(restored.server_key), restored.origin, restored.last_n, changes)
    return store


def recorded_faults(recorded: Trace, names: Normaliser) -> FaultPlan:
    """The faults injected in the recording, each placed at the same datagram (the same
    node, peer, message type and occurrence) for the replay's nodes."""
    plan = FaultPlan()
    for event in recorded.events:
        if isinstance(event, Fault):
            peer = names.address(event.peer)
            peer = event.peer if peer.startswith("?") else peer
            plan.place(event.node, peer, event.of, event.n, event.what, event.delay)
    return plan
