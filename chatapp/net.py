"""Datagram endpoints: real UDP sockets, and an in-memory network for tests and replay.

A node only needs ``send``, ``receive`` and ``local_address``; the memory
network can drop, duplicate, delay and reorder datagrams from a seeded random
generator, and its delays run on Trio's clock, so under ``MockClock`` a lossy
run is exact and repeatable.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import socket as _stdlib_socket
from dataclasses import dataclass, field
from typing import Protocol

import trio

from chatapp.wire import MAX_DATAGRAM, Address

#: Read buffer: larger than any datagram we accept, so oversized ones are seen whole and dropped.
RECEIVE_BUFFER = 65536
#: Bytes the kernel may queue for a socket before it drops datagrams (SO_RCVBUF).
RECEIVE_SOCKET_BUFFER = 4 * 1024 * 1024


class Endpoint(Protocol):
    @property
    def local_address(self) -> Address: ...

    async def send(self, data: bytes, addr: Address) -> None: ...

    async def receive(self) -> tuple[bytes, Address]: ...

    def close(self) -> None: ...


class UdpEndpoint:
    """A bound UDP socket."""

    def __init__(
        self, sock: trio.socket.SocketType, raw: _stdlib_socket.socket | None = None
    ) -> None:
        """``raw`` is the (non-blocking) stdlib socket under ``sock``, for the fast paths."""
        self._sock = sock
        self._raw = raw
        host, port = sock.getsockname()[:2]
        self._local: Address = (host, port)

    @classmethod
    async def bind(cls, host: str, port: int) -> UdpEndpoint:
        raw = _stdlib_socket.socket(_stdlib_socket.AF_INET, _stdlib_socket.SOCK_DGRAM)
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            # A fan-out to a thousand clients brings a thousand ACKs back at once: with the
            # default buffer (~200 datagrams) the kernel drops most of them and the server
            # marks live clients offline. The kernel caps this at net.core.rmem_max.
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, RECEIVE_SOCKET_BUFFER)
            await sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
        return cls(sock, raw)

    @property
    def local_address(self) -> Address:
        return self._local

    async def send(self, data: bytes, addr: Address) -> None:
        # Trio's sendto costs a trip through the scheduler and an address check per
        # datagram, about as much as the system call; a UDP send almost never blocks, so
        # try it directly and wait only when the socket's buffer is full. Addresses are
        # always numeric here (from recvfrom, the table, or resolve_ipv4), so nothing blocks
        # on a name lookup. Not a checkpoint when it does not block: receive() is.
        if self._raw is not None and self._raw.fileno() != -1:  # closed: Trio says so
            try:
                self._raw.sendto(data, addr)
                return
            except BlockingIOError:
                pass
        await self._sock.sendto(data, addr)

    async def receive(self) -> tuple[bytes, Address]:
        raw = self._raw
        if raw is None or raw.fileno() == -1:  # closed: Trio raises ClosedResourceError
            data, addr = await self._sock.recvfrom(RECEIVE_BUFFER)
            return data, (addr[0], addr[1])
        try:
            data, addr = raw.recvfrom(RECEIVE_BUFFER)
        except BlockingIOError:
            while True:
                await trio.lowlevel.wait_readable(raw)
                try:
                    data, addr = raw.recvfrom(RECEIVE_BUFFER)
                    break
                except BlockingIOError:
                    continue
        else:
            # Data was already queued: still yield once per datagram, so that a flood of
            # datagrams cannot starve the node's timer and input tasks.
            await trio.lowlevel.checkpoint()
        return data, (addr[0], addr[1])

    def receive_nowait(self) -> tuple[bytes, Address]:
        """A datagram that is already queued, without waiting; ``trio.WouldBlock`` if none."""
        raw = self._raw
        if raw is None or raw.fileno() == -1:
            raise trio.WouldBlock
        try:
            data, addr = raw.recvfrom(RECEIVE_BUFFER)
        except BlockingIOError:
            raise trio.WouldBlock from None
        return data, (addr[0], addr[1])

    def close(self) -> None:
        self._sock.close()


def resolve_ipv4(host: str) -> str:
    """``localhost`` or a dotted IPv4 address, as a dotted IPv4 address; OSError for
    anything else (text that is not ASCII included)."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        _stdlib_socket.inet_pton(_stdlib_socket.AF_INET, host)
    except (UnicodeError, ValueError) as exc:
        raise OSError(f"not an IPv4 address: {exc}") from None
    return host


# --- the in-memory network ----------------------------------------------------------


@dataclass
class Faults:
    """What the network does to each datagram: probabilities, and a delay range in seconds."""

    loss: float = 0.0
    duplicate: float = 0.0
    min_delay: float = 0.0
    max_delay: float = 0.0


@dataclass
class MemoryNetwork:
    """Endpoints that exchange datagrams in memory, with seeded faults."""

    faults: Faults = field(default_factory=Faults)
    seed: int = 0
    #: Datagrams from a sender to a destination are dropped while the pair is in here.
    partitions: set[tuple[Address, Address]] = field(default_factory=set)
    sent: int = 0
    dropped: int = 0
    duplicated: int = 0

    def __post_init__(self) -> None:
        self._random = random.Random(self.seed)
        self._endpoints: dict[Address, MemoryEndpoint] = {}
        self._order = itertools.count()

    def bind(self, addr: Address) -> MemoryEndpoint:
        if addr in self._endpoints:
            raise OSError(98, f"address {addr[0]}:{addr[1]} is already in use")
        endpoint = MemoryEndpoint(self, addr)
        self._endpoints[addr] = endpoint
        return endpoint

    def _unbind(self, endpoint: MemoryEndpoint) -> None:
        if self._endpoints.get(endpoint.local_address) is endpoint:
            del self._endpoints[endpoint.local_address]

    def _transmit(self, data: bytes, source: Address, destination: Address) -> None:
        self.sent += 1
        target = self._endpoints.get(destination)
        if target is None or (source, destination) in self.partitions or len(data) > 65507:
            self.dropped += 1
            return
        faults = self.faults
        if self._random.random() < faults.loss:
            self.dropped += 1
            return
        copies = 1
        if self._random.random() < faults.duplicate:
            copies = 2
            self.duplicated += 1
        now = trio.current_time()
        for _ in range(copies):
            delay = self._random.uniform(faults.min_delay, faults.max_delay)
            target._arrive(now + delay, next(self._order), data, source)


class MemoryEndpoint:
    def __init__(self, network: MemoryNetwork, addr: Address) -> None:
        self._network = network
        self._local = addr
        self._inbox: list[tuple[float, int, bytes, Address]] = []
        self._arrived = trio.Event()
        self._closed = False

    @property
    def local_address(self) -> Address:
        return self._local

    async def send(self, data: bytes, addr: Address) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        await trio.lowlevel.checkpoint()
        self._network._transmit(data, self._local, addr)

    async def receive(self) -> tuple[bytes, Address]:
        while True:
            if self._closed:
                raise trio.ClosedResourceError
            deadline = self._inbox[0][0] if self._inbox else math.inf
            if deadline <= trio.current_time():
                _, _, data, source = heapq.heappop(self._inbox)
                await trio.lowlevel.checkpoint()
                return data, source
            with trio.move_on_at(deadline):
                await self._arrived.wait()
            self._arrived = trio.Event()

    def _arrive(self, at: float, order: int, data: bytes, source: Address) -> None:
        heapq.heappush(self._inbox, (at, order, data, source))
        self._arrived.set()

    def close(self) -> None:
        self._closed = True
        self._network._unbind(self)
        self._arrived.set()


__all__ = [
    "MAX_DATAGRAM",
    "Endpoint",
    "Faults",
    "MemoryEndpoint",
    "MemoryNetwork",
    "UdpEndpoint",
    "resolve_ipv4",
]
