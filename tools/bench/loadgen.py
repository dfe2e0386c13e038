"""A closed-loop load generator: many raw UDP sockets, each with a few requests in flight.

Plain non-blocking sockets and epoll, no Trio, so that one core of generator
can keep a server on the other core busy. Bounded by time: it stops sending
at the deadline and waits at most a moment for the last answers.
"""

from __future__ import annotations

import resource
import selectors
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgspec

from chatapp.protocol.sealing import Session
from chatapp.testing.raw import RawClient
from chatapp.wire import (
    Challenge,
    ChannelDelivery,
    Hello,
    Mailbox,
    NotStored,
    Registered,
    Rekey,
    Relay,
    Table,
    TableAck,
    TableDelta,
    encode,
    tag_of,
)

#: Every socket of the suite (servers, baselines, simulated clients) is on loopback.
HOST = "127.0.0.1"
#: A request unanswered for this long is written off and replaced (the datagram was lost).
LOST_AFTER = 0.25


class Head(msgspec.Struct):
    """The fields of a plaintext datagram a simulated client needs (the echo baseline
    reflects plaintext requests)."""

    t: str
    id: str = ""


decode_head = msgspec.json.Decoder(Head).decode


@dataclass
class SimClient:
    """One simulated client: its socket and, when it talks to a chatapp server, its
    keys and session (``raw``); without them it speaks plaintext to a baseline."""

    sock: socket.socket
    name: str
    raw: RawClient | None = None
    outstanding: dict[str, float] = field(default_factory=dict)
    counter: int = 0
    sealed: bytes = b""  # a direct message sealed by this client, for its saves
    datagrams: int = 0  # exchanged with the server, both ways (requests, answers, ACKs)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def next_id(self) -> str:
        self.counter += 1
        return f"{self.name}.{self.counter}"


#: A request for a simulated client: its message id (made and kept by the load loop) -> datagram.
Request = Callable[[SimClient, str], bytes]


def register_request(client: SimClient, msg_id: str) -> bytes:
    """A registration: a hello now, the register when the challenge comes (``_answers``)."""
    assert client.raw is not None
    return encode(Hello(msg_id, client.name, client.port, client.raw.identity.public))


@dataclass
class LoadResult:
    completed: int
    elapsed: float
    lost: int
    cpu: float  # the generator's own CPU seconds over ``elapsed``
    refused: int = 0  # answered "refused": not counted as done (a broken setup, not a rate)

    @property
    def rate(self) -> float:
        return self.completed / self.elapsed if self.elapsed else 0.0


def open_clients(count: int, prefix: str, *, keys: bool = True) -> list[SimClient]:
    """``count`` simulated clients on 127.0.0.1 (``keys``: each with a key pair of its
    own, to talk to a chatapp server; without, plaintext to a baseline)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(count + 256, hard), hard))
    clients = []
    for index in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((HOST, 0))
        s.setblocking(False)
        client = SimClient(s, f"{prefix}{index}")
        if keys:
            client.raw = RawClient(client.name, client.port)
        clients.append(client)
    return clients


def close_clients(clients: list[SimClient]) -> None:
    for client in clients:
        client.sock.close()


def register_all(clients: list[SimClient], server: tuple[str, int], timeout: float = 20.0) -> float:
    """Register every client at once (each with its key: hello, challenge, register,
    registered) and ACK the tables that follow; returns the seconds until the last one
    was registered."""
    for client in clients:
        assert client.raw is not None
        client.raw.codec.session = None
    result = run_closed_loop(
        clients,
        server,
        register_request,
        window=1,
        duration=timeout,
        repeat=False,
    )
    missing = [c.name for c in clients if c.raw is None or not c.raw.registered]
    if missing:
        raise RuntimeError(f"{len(missing)} simulated clients were not registered")
    settle(clients, 0.15)
    return result.elapsed


def settle(clients: list[SimClient], seconds: float) -> None:
    """ACK whatever the server sends (tables, mailbox batches) for ``seconds``."""
    run_closed_loop(
        clients,
        ("0.0.0.0", 9),
        lambda c, i: b"",
        window=0,
        duration=seconds,
        repeat=False,
        until_done=False,
    )


#: What a client must ACK whenever it comes, as a real client does.
_ACKED = (Mailbox, Relay, ChannelDelivery, NotStored)


def _answers(client: SimClient, server: tuple[str, int]) -> Iterator[Head]:
    """Read all that waits on a client's socket: go on with a handshake, ACK what a
    client must ACK, and yield the answers to its outstanding requests (removed from
    ``outstanding``)."""
    sock = client.sock
    while True:
        try:
            data, addr = sock.recvfrom(65536)
        except BlockingIOError:
            return
        client.datagrams += 1
        head = _read(client, data, addr, server)
        if head is not None and client.outstanding.pop(head.id, None) is not None:
            yield head


def _read(
    client: SimClient, data: bytes, addr: tuple[str, int], server: tuple[str, int]
) -> Head | None:
    raw = client.raw
    if raw is None:
        try:
            return decode_head(data)
        except msgspec.DecodeError:
            return None
    message = raw.open(data)
    if isinstance(message, Challenge):  # the handshake goes on, under the register's id
        register = raw.register_for(message)
        started = client.outstanding.pop(message.id, None)
        if started is not None:
            client.outstanding[register.id] = started
            client.sock.sendto(encode(register), server)
        return None
    if isinstance(message, Registered):
        raw.codec.session = Session(message.sid, message.session_key)
    elif isinstance(message, Table | TableDelta):
        # A simulated client keeps no table: it says it holds what each part brings.
        version = message.version if isinstance(message, Table) else message.to
        client.sock.sendto(raw.seal(TableAck(message.id, message.epoch, version)), addr)
        client.datagrams += 1
        return None
    elif isinstance(message, _ACKED):
        client.sock.sendto(raw.ack(message.id), addr)
        client.datagrams += 1
        return None
    if message is None or isinstance(message, Rekey):
        return None
    return Head(tag_of(message), message.id)


def _send(client: SimClient, server: tuple[str, int], request: Request, now: float) -> None:
    msg_id = client.next_id()
    client.outstanding[msg_id] = now
    client.sock.sendto(request(client, msg_id), server)
    client.datagrams += 1


def run_closed_loop(
    clients: list[SimClient],
    server: tuple[str, int],
    request: Request,
    *,
    window: int,
    duration: float,
    warmup: float = 0.0,
    repeat: bool = True,
    until_done: bool = True,
) -> LoadResult:
    """Keep ``window`` requests in flight per client for ``duration`` seconds.

    A request is done when a datagram of any type but ``table`` or ``mailbox``
    comes back with its id; those two are ACKed, as a client must. Completions during the
    first ``warmup`` seconds are not counted. Without ``repeat`` each client
    sends only its first ``window`` requests, and (``until_done``) the run
    ends when they are all answered.
    """
    selector = selectors.DefaultSelector()
    for client in clients:
        selector.register(client.sock, selectors.EVENT_READ, client)
    start = time.monotonic()
    cpu_start = time.process_time()
    measure_from = start + warmup
    deadline = start + duration
    completed = lost = refused = 0
    next_sweep = start + LOST_AFTER
    for client in clients:
        for _ in range(window):
            _send(client, server, request, start)
    now = start
    try:
        while now < deadline:
            for key, _ in selector.select(0.05):
                for head in _answers(key.data, server):
                    now = time.monotonic()
                    if head.t == "refused":
                        refused += 1
                    elif now >= measure_from:
                        completed += 1
                    if repeat:
                        _send(key.data, server, request, now)
                    elif until_done and not any(c.outstanding for c in clients):
                        cpu = time.process_time() - cpu_start
                        return LoadResult(completed, now - measure_from, lost, cpu, refused)
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + LOST_AFTER
                lost += _resend_lost(clients, server, request, now)
    finally:
        selector.close()
        for client in clients:
            client.outstanding.clear()
    return LoadResult(completed, now - measure_from, lost, time.process_time() - cpu_start, refused)


def _resend_lost(
    clients: list[SimClient], server: tuple[str, int], request: Request, now: float
) -> int:
    """Count as lost, and replace, the requests unanswered for ``LOST_AFTER`` seconds."""
    lost = 0
    for client in clients:
        stale = [i for i, t in client.outstanding.items() if now - t > LOST_AFTER]
        for msg_id in stale:
            del client.outstanding[msg_id]
            lost += 1
            _send(client, server, request, now)
    return lost


def run_bursts(
    clients: list[SimClient],
    server: tuple[str, int],
    request: Request,
    *,
    bursts: int,
    size: int,
    timeout: float = 2.0,
) -> LoadResult:
    """Send ``size`` requests at once, wait for their answers, ``bursts`` times over.

    The server always has a queue to work through, so (unlike the closed loop,
    which also measures how fast two processes wake each other) its CPU per
    request here is its cost at saturation. The server's socket buffer must
    hold a burst.
    """
    selector = selectors.DefaultSelector()
    for client in clients:
        selector.register(client.sock, selectors.EVENT_READ, client)
    start = time.monotonic()
    cpu_start = time.process_time()
    completed = lost = refused = 0
    try:
        for _ in range(bursts):
            for index in range(size):
                _send(clients[index % len(clients)], server, request, 0.0)
            waiting = size
            deadline = time.monotonic() + timeout
            while waiting and time.monotonic() < deadline:
                for key, _ in selector.select(0.05):
                    for head in _answers(key.data, server):
                        waiting -= 1
                        if head.t == "refused":
                            refused += 1
                        else:
                            completed += 1
            lost += waiting
            for client in clients:
                client.outstanding.clear()
    finally:
        selector.close()
    elapsed = time.monotonic() - start
    return LoadResult(completed, elapsed, lost, time.process_time() - cpu_start, refused)
