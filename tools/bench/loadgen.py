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

from chatapp.wire import Ack, Register, TableAck, encode

#: Every socket of the suite (servers, baselines, simulated clients) is on loopback.
HOST = "127.0.0.1"
#: A request unanswered for this long is written off and replaced (the datagram was lost).
LOST_AFTER = 0.25


class Head(msgspec.Struct):
    """The fields of any chatapp datagram a simulated client needs."""

    t: str
    id: str = ""
    token: str = ""
    epoch: int = 0
    version: int = 0  # a table part's
    to: int | str = 0  # a delta's version (a save's recipient)


decode_head = msgspec.json.Decoder(Head).decode


def ack_for(head: Head) -> bytes | None:
    """The ACK a client sends for a datagram from the server (None: it needs none). A
    simulated client that keeps no table says it holds what each table part or delta
    brings: the server then sends it what a client that applies everything needs."""
    if head.t == "table":
        return encode(TableAck(head.id, head.epoch, head.version))
    if head.t == "delta":
        return encode(TableAck(head.id, head.epoch, int(head.to)))
    if head.t in ("mailbox", "channel", "chat"):
        return encode(Ack(head.id))
    return None


@dataclass
class SimClient:
    """One simulated client: its socket and, once registered, its name and token."""

    sock: socket.socket
    name: str
    token: str = ""
    outstanding: dict[str, float] = field(default_factory=dict)
    counter: int = 0
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
    return encode(Register(msg_id, client.name, client.port))


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


def open_clients(count: int, prefix: str) -> list[SimClient]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(count + 256, hard), hard))
    clients = []
    for index in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((HOST, 0))
        s.setblocking(False)
        clients.append(SimClient(s, f"{prefix}{index}"))
    return clients


def close_clients(clients: list[SimClient]) -> None:
    for client in clients:
        client.sock.close()


def register_all(clients: list[SimClient], server: tuple[str, int], timeout: float = 20.0) -> float:
    """Register every client at once, keep their tokens, and ACK the tables that follow;
    returns the seconds until the last one was registered."""
    result = run_closed_loop(
        clients,
        server,
        register_request,
        window=1,
        duration=timeout,
        repeat=False,
    )
    missing = [c.name for c in clients if not c.token]
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


def _answers(client: SimClient) -> Iterator[Head]:
    """Read all that waits on a client's socket: ACK tables and mailbox batches, as a client
    must, and yield the answers to its outstanding requests (removed from ``outstanding``;
    a token in an answer is kept)."""
    sock = client.sock
    while True:
        try:
            data, addr = sock.recvfrom(65536)
        except BlockingIOError:
            return
        client.datagrams += 1
        try:
            head = decode_head(data)
        except msgspec.DecodeError:
            continue
        if head.t in ("table", "delta", "mailbox"):
            sock.sendto(ack_for(head) or b"", addr)
            client.datagrams += 1
        elif client.outstanding.pop(head.id, None) is not None:
            if head.token:
                client.token = head.token
            yield head


def _send(client: SimClient, server: tuple[str, int], request: Request, now: float) -> None:
    msg_id = client.next_id()
    client.outstanding[msg_id] = now
    client.datagrams += 1
    client.sock.sendto(request(client, msg_id), server)


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

    A request is done when a datagram of any type but ``table``, ``delta`` or ``mailbox``
    comes back with its id; those are ACKed, as a client must. Completions during the
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
                for head in _answers(key.data):
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
                    for head in _answers(key.data):
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
