"""The protocol simulation the protocol tests share: no Trio, no sockets, time passed by hand.

``Sim`` joins a real ``ServerProtocol`` and any number of ``ClientProtocol``s by
carrying each ``Send`` effect's bytes to the node at its address, in order. Loss
is a rule that drops a datagram; time moves only when a test advances it, and
every timer fires at exactly its deadline. Used by ``tests/test_protocol_client.py``
and ``tests/test_protocol_server.py``.

Keys are fixed per label (``key_of``): a client joined again under its label is
the same person (its key, its pinned server key, its delivery marks), one
joined under another label with the same name is an impostor with its own key.
Every node draws from a seeded generator, so a run is the same every time.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from chatapp import screen
from chatapp.protocol.changes import Change, DeliveryMarked, ServerPinned
from chatapp.protocol.client import ClientProtocol
from chatapp.protocol.common import Effect, Exit, Log, Received, Send, Show, Timers
from chatapp.protocol.crypto import Identity, SeededEntropy, blake2b
from chatapp.protocol.server import ServerProtocol
from chatapp.protocol.tables import Window
from chatapp.store import MemoryStore, ServerDisk
from chatapp.wire import (
    MAX_DATAGRAM,
    Address,
    Chat,
    Message,
    Table,
    TableDelta,
    TableEntry,
    encode,
)

SERVER: Address = ("10.0.0.1", 8001)
SERVER_TEXT = "10.0.0.1:8001"
#: Turns the simulation's clock into Unix time, as the real server does.
WALL = 1_648_153_596.0
CLIENT_IP = "10.0.0.2"

TU = screen.TABLE_UPDATED
#: What carries the table: a part of the whole table, or of a delta.
TABLES = (Table, TableDelta)

Rule = Callable[[Address, Send], bool]
#: A message type, or several (``Sim`` has a method named ``type``, so say it here).
Kind = type | tuple[type, ...]


class AnyNode(Protocol):
    def handle_datagram(self, data: bytes, addr: Address, now: float) -> list[Effect]: ...

    def handle_timer(self, now: float) -> list[Effect]: ...

    def next_deadline(self) -> float | None: ...


@dataclass
class Datagram:
    at: float
    src: Address
    send: Send

    @property
    def message(self) -> Message:
        return self.send.message

    @property
    def dst(self) -> Address:
        return self.send.addr


@dataclass
class Sim:
    """A server and its clients, joined by hand-carried datagrams."""

    wall_offset: float = WALL
    timers: Timers = field(default_factory=Timers)
    mailbox_limit: int = 1000
    table_window: Window = field(default_factory=Window)
    now: float = 0.0
    #: A datagram for which any rule returns True is lost.
    drop: list[Rule] = field(default_factory=list)
    #: A datagram for which any rule returns True arrives twice.
    duplicate: list[Rule] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.server = self._new_server(MemoryStore(key=SERVER_KEY.seed, origin=ORIGIN).load())
        self.nodes: dict[Address, AnyNode] = {SERVER: self.server}
        self.addr: dict[str, Address] = {"server": SERVER}
        self.clients: dict[str, ClientProtocol] = {}
        self.screens: dict[str, list[str]] = {}
        self.shown: list[tuple[float, str, str]] = []
        self.exits: dict[str, int] = {}
        self.logs: list[tuple[str, Log]] = []
        self.persisted: list[Change] = []
        #: Every effect the server returned, in order (change-before-ACK checks).
        self.server_effects: list[Effect] = []
        self.sent: list[Datagram] = []
        self.delivered: list[Datagram] = []
        self._queue: deque[Datagram] = deque()
        self._ports = itertools.count(9001, 100)
        self._starts = itertools.count(1)
        #: What each label's client keeps on disk: the server key it pinned, its marks.
        self.pins: dict[str, bytes] = {}
        self.marks: dict[str, dict[bytes, dict[str, int]]] = {}

    def _new_server(self, disk: ServerDisk, epoch: int = 0) -> ServerProtocol:
        server = ServerProtocol(
            identity=Identity(disk.key),
            entropy=SeededEntropy(bytes([epoch]) * 32),
            timers=self.timers,
            epoch=epoch,
            wall_offset=self.wall_offset,
            mailbox_limit=self.mailbox_limit,
            origin=disk.origin,
            table_window=self.table_window,
            last_n=disk.last_n,
        )
        server.restore(disk.clients, disk.mailbox)
        return server

    # --- nodes ---------------------------------------------------------------------

    def join(
        self, name: str, *, label: str | None = None, port: int | None = None
    ) -> ClientProtocol:
        """Start a client; it registers at once and everything it causes is delivered."""
        label = label or name
        port = port or next(self._ports)
        addr = (CLIENT_IP, port)
        client = ClientProtocol(
            name,
            SERVER,
            port,
            identity=key_of(label),
            entropy=SeededEntropy(bytes([next(self._starts)]) * 32),
            pinned=self.pins.get(label),
            marks={key: dict(marks) for key, marks in self.marks.get(label, {}).items()},
            timers=self.timers,
        )
        self.nodes[addr] = client
        self.addr[label] = addr
        self.clients[label] = client
        self.screens[label] = []
        self.apply(addr, client.start(self.now))
        self.pump()
        return client

    def add_node(self, label: str, addr: Address, node: AnyNode) -> None:
        self.nodes[addr] = node
        self.addr[label] = addr
        self.screens[label] = []

    def kill(self, label: str) -> None:
        """The node's process is gone (a silent leave): what is sent to it is lost."""
        self.nodes.pop(self.addr[label], None)

    def restart_server(self, *, from_database: bool = False) -> ServerProtocol:
        """A new server at the same address: with an empty memory, or (``from_database``)
        with what every change committed so far left in a store, as after a crash."""
        store = MemoryStore(
            self.persisted if from_database else (), key=SERVER_KEY.seed, origin=ORIGIN
        )
        self.server = self._new_server(store.load(), epoch=1)
        self.nodes[SERVER] = self.server
        self.apply(SERVER, self.server.start(self.now))
        self.pump()
        return self.server

    def label_of(self, addr: Address) -> str:
        # the latest node at an address is the one there now (a client restarted on its port)
        return next(label for label, a in reversed(self.addr.items()) if a == addr)

    # --- input -------------------------------------------------------------------------

    def type(self, label: str, line: str) -> list[Effect]:
        effects = self.clients[label].handle_input(line, self.now)
        self.apply(self.addr[label], effects)
        self.pump()
        return effects

    def inject(self, src: Address, message: Message, dst: Address) -> list[Effect]:
        """A plaintext datagram from outside the simulation (a forger, a stray packet)."""
        return self.inject_raw(src, encode(message), dst)

    def from_server(self, label: str, message: Message) -> list[Effect]:
        """``message`` sealed in ``label``'s session, from the server (as if it sent it)."""
        record = self.server.clients[self.clients[label].name]
        session = self.server.codec.sessions[record.sid]
        data = self.server.codec.seal(session, message)
        return self.inject_raw(SERVER, data, self.addr[label])

    def from_client(self, label: str, message: Message) -> list[Effect]:
        """``message`` sealed in ``label``'s session (as if the client sent it)."""
        data = self.clients[label].codec.to_server(message)
        return self.inject_raw(self.addr[label], data, SERVER)

    def opened(self, label: str, sealed: bytes) -> tuple[str, str]:
        """(sender, text) of a sealed direct message, as ``label`` opens it."""
        sender, chat = self.clients[label].codec.open_sealed(sealed)
        assert isinstance(chat, Chat)
        return sender, chat.text

    def inject_raw(self, src: Address, data: bytes, dst: Address) -> list[Effect]:
        """Bytes from outside the simulation: a forged, altered or replayed datagram."""
        effects = self.nodes[dst].handle_datagram(data, src, self.now)
        self.apply(dst, effects)
        self.pump()
        return effects

    # --- the network -----------------------------------------------------------------

    def apply(self, addr: Address, effects: list[Effect]) -> None:
        label = self.label_of(addr)
        if addr == SERVER:
            self.server_effects += effects
        for effect in effects:
            if isinstance(effect, Send):
                datagram = Datagram(self.now, addr, effect)
                self.sent.append(datagram)
                assert len(effect.data) <= MAX_DATAGRAM, effect.message
                self._queue.append(datagram)
            elif isinstance(effect, Show):
                self.screens[label].append(effect.line)
                self.shown.append((self.now, label, effect.line))
            elif isinstance(effect, Exit):
                self.exits[label] = effect.status
                self.nodes.pop(addr, None)
            elif isinstance(effect, Log):
                self.logs.append((label, effect))
            elif isinstance(effect, ServerPinned):
                self.pins[label] = effect.key
            elif isinstance(effect, DeliveryMarked):
                self.marks.setdefault(label, {})[effect.server_key] = dict(effect.marks)
            elif isinstance(effect, Change):
                self.persisted.append(effect)
            else:
                assert isinstance(effect, Received), effect
        node = self.nodes.get(addr)
        if node is not None:
            getattr(node, "checkpoint", lambda: None)()  # carried out, as a runtime says

    def pump(self) -> None:
        """Deliver everything in flight, and what that causes, in the order it was sent."""
        for _ in range(1_000_000):
            if not self._queue:
                return
            datagram = self._queue.popleft()
            target = self.nodes.get(datagram.dst)
            if target is None or any(rule(datagram.src, datagram.send) for rule in self.drop):
                continue
            copies = 2 if any(rule(datagram.src, datagram.send) for rule in self.duplicate) else 1
            for _ in range(copies):
                if datagram.dst not in self.nodes:
                    break
                self.delivered.append(Datagram(self.now, datagram.src, datagram.send))
                effects = target.handle_datagram(datagram.send.data, datagram.src, self.now)
                self.apply(datagram.dst, effects)
        raise AssertionError("the nodes never stopped sending")

    # --- time --------------------------------------------------------------------------

    def advance_to(self, until: float) -> None:
        """Fire every timer due by ``until``, each at exactly its deadline."""
        for _ in range(100_000):
            due = [
                (deadline, addr)
                for addr, node in self.nodes.items()
                if (deadline := node.next_deadline()) is not None and deadline <= until
            ]
            if not due:
                self.now = max(self.now, until)
                return
            deadline, addr = min(due)
            self.now = max(self.now, deadline)
            self.apply(addr, self.nodes[addr].handle_timer(self.now))
            self.pump()
        raise AssertionError("the timers never settled")

    def run(self, seconds: float) -> None:
        self.advance_to(self.now + seconds)

    def settle(self) -> None:
        """Let every retry run out (far longer than any wait in the protocol)."""
        self.run(30.0)

    # --- looking at what happened --------------------------------------------------------

    def lines(self, label: str) -> list[str]:
        return self.screens[label]

    def lines_since(self, label: str, mark: int) -> list[str]:
        return self.screens[label][mark:]

    def timed(self, label: str) -> list[tuple[float, str]]:
        return [(at, line) for at, who, line in self.shown if who == label]

    def datagrams(
        self,
        kind: Kind,
        *,
        src: str | None = None,
        dst: str | None = None,
        since: float = -1.0,
        delivered: bool = False,
    ) -> list[Datagram]:
        pool = self.delivered if delivered else self.sent
        return [
            d
            for d in pool
            if isinstance(d.message, kind)
            and (src is None or d.src == self.addr[src])
            and (dst is None or d.dst == self.addr[dst])
            and d.at >= since
        ]


def between(sim: Sim, src: str, dst: str, kind: Kind = object) -> Rule:
    """Datagrams of ``kind`` from ``src`` to ``dst`` (labels, looked up as each datagram passes)."""
    return lambda s, send: (
        s == sim.addr[src] and send.addr == sim.addr[dst] and isinstance(send.message, kind)
    )


def trio_of_clients(**options: object) -> Sim:
    """The seed's set-up: a server and user1, user2, user3, all online, tables settled."""
    sim = Sim(**options)  # type: ignore[arg-type]
    for name in ("user1", "user2", "user3"):
        sim.join(name)
    return sim


def entry(name: str, port: int, online: bool = True) -> Row:
    """A table entry as ``rows`` shows it (its key and session id left out)."""
    return (name, CLIENT_IP, port, online)


Row = tuple[str, str, int, bool]


def rows(table: dict[str, TableEntry]) -> dict[str, Row]:
    """A client's table, each entry without its key and session id."""
    return {name: (e.name, e.ip, e.port, e.online) for name, e in table.items()}


def key_of(label: str) -> Identity:
    """The key of the client joined under ``label`` (the same every run)."""
    return Identity(blake2b(label.encode(), 32, person=b"chatapp-test"))


#: The server's key in every simulation.
SERVER_KEY = Identity(b"S" * 32)
ORIGIN = "o1"
