"""An in-memory network for tests and replay.

The memory network can drop, duplicate, delay and reorder datagrams from a
seeded random generator, and its delays run on Trio's clock, so under
``MockClock`` a lossy run is exact and repeatable.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from dataclasses import dataclass, field

import trio

from chatapp.net import Endpoint
from chatapp.wire import Address


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
        self._free_ports = itertools.count(40001)

    async def listen(self, host: str, port: int) -> Endpoint:
        """The ``chatapp.net.Network`` side: port 0 is the next of 40001, 40002, ..."""
        return self.bind((host, port or next(self._free_ports)))

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
