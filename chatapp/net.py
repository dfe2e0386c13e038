"""Datagram endpoints: what a node sends and receives through, and where it gets one.

A node only needs ``send``, ``receive`` and ``local_address``; a ``Network``
gives it an endpoint bound where it asks. ``UDP`` is the real one; the
in-memory network of ``chatapp.testing`` is the other.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import socket as _stdlib_socket
import struct
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal, Protocol

import trio

from chatapp.wire import MAX_DATAGRAM, Address, Message

#: Read buffer: larger than any datagram we accept, so oversized ones are seen whole and dropped.
RECEIVE_BUFFER = 65536
#: Bytes the kernel may queue for a socket before it drops datagrams (SO_RCVBUF): asked
#: for, and granted up to the kernel's limit (Linux: net.core.rmem_max) unless the process
#: may go past it (SO_RCVBUFFORCE, with CAP_NET_ADMIN). A flood is drained at a few
#: microseconds a datagram, so even a full buffer is a short wait for the others.
RECEIVE_SOCKET_BUFFER = 16 * 1024 * 1024

#: ``admit(data, source, now)``: whether a datagram just read is handled or dropped.
Admit = Callable[[bytes, Address, float], bool]


class Endpoint(Protocol):
    @property
    def local_address(self) -> Address: ...

    async def send(self, data: bytes, addr: Address) -> None: ...

    async def receive(self) -> tuple[bytes, Address]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Fault:
    """What the sender's network layer does to one datagram instead of sending it once:
    ``drop`` it, send it twice (``dup``), or send it ``delay`` seconds later. ``of`` is the
    message's type and ``n`` says which datagram of that type from this node to that
    peer it is (1, 2, ...): a replay applies the fault again at the same one."""

    what: Literal["drop", "dup", "delay"]
    of: str
    n: int
    delay: float = 0.0


class SendFaults(Protocol):
    """Faults injected where a node sends (a scenario's, or a replay's from the trace)."""

    def decide(self, node: str, addr: Address, message: Message | None) -> Fault | None:
        """What happens to the datagram ``node`` sends to ``addr`` (None: it goes once)."""
        ...


class Network(Protocol):
    async def listen(self, host: str, port: int) -> Endpoint:
        """An endpoint bound to ``host``:``port`` (port 0: any free port); OSError if it
        cannot be had."""
        ...


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
        #: What the kernel granted for SO_RCVBUF (Linux reports twice what it counts as
        #: room for data, for its own bookkeeping).
        self.receive_buffer: int = sock.getsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF)

    @classmethod
    async def bind(cls, host: str, port: int) -> UdpEndpoint:
        raw = _stdlib_socket.socket(_stdlib_socket.AF_INET, _stdlib_socket.SOCK_DGRAM)
        sock = trio.socket.from_stdlib_socket(raw)
        try:
            # A fan-out to a thousand clients brings a thousand ACKs back at once, and a
            # flood from one sender should not push others' datagrams out: with the
            # default buffer (~200 datagrams) the kernel drops most of them. The kernel
            # caps this at net.core.rmem_max (what an operator can raise).
            _ask_for_receive_buffer(raw)
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

    async def receive_batch(self, admit: Admit, limit: int) -> list[tuple[bytes, Address]]:
        """Wait until a datagram is queued, then read up to ``limit`` of those queued
        without waiting again, keeping those that ``admit`` takes: a flood is dropped as
        fast as the system call returns, and the caller yields once per batch (so that
        timers and input still run). May return none (all dropped)."""
        raw = self._raw
        if raw is None or raw.fileno() == -1:
            data, addr = await self.receive()
            return [(data, addr)] if admit(data, addr, trio.current_time()) else []
        batch: list[tuple[bytes, Address]] = []
        now = trio.current_time()
        waited = False
        read = 0
        while read < limit:
            try:
                data, addr = raw.recvfrom(RECEIVE_BUFFER)
            except BlockingIOError:
                if read:
                    break
                await trio.lowlevel.wait_readable(raw)
                waited = True
                now = trio.current_time()
                continue
            except OSError:  # e.g. an ICMP "port unreachable" reported on a later read
                read += 1
                continue
            read += 1
            if admit(data, addr, now):
                batch.append((data, addr))
        if not waited:
            await trio.lowlevel.checkpoint()
        return batch

    def shut_out(self, addresses: Collection[Address]) -> None:
        """Have the kernel drop, unread, every datagram from ``addresses`` (replacing the
        addresses given before; none: every datagram is let through again). OSError where
        that cannot be done (not Linux)."""
        if self._raw is None or not sys.platform.startswith("linux"):
            raise OSError("socket filters are a Linux feature")
        if not addresses:
            with contextlib.suppress(OSError):  # none attached: nothing to take off
                self._raw.setsockopt(_stdlib_socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)
            return
        program = _drop_from(sorted(addresses))
        code = ctypes.create_string_buffer(program)
        fprog = struct.pack("HP", len(program) // 8, ctypes.addressof(code))
        self._raw.setsockopt(_stdlib_socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)

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


def _ask_for_receive_buffer(raw: _stdlib_socket.socket) -> None:
    force = getattr(_stdlib_socket, "SO_RCVBUFFORCE", None)
    if force is not None:
        try:
            raw.setsockopt(_stdlib_socket.SOL_SOCKET, force, RECEIVE_SOCKET_BUFFER)
            return
        except OSError:  # not allowed: as much as net.core.rmem_max allows
            pass
    raw.setsockopt(_stdlib_socket.SOL_SOCKET, _stdlib_socket.SO_RCVBUF, RECEIVE_SOCKET_BUFFER)


# Classic BPF, as Linux runs it on a socket (linux/filter.h): for a UDP socket the
# packet starts at the UDP header, and the IP header is reached at SKF_NET_OFF.
_SO_ATTACH_FILTER, _SO_DETACH_FILTER = 26, 27
_SKF_NET_OFF = -0x100000
_LD_HALF, _LD_WORD = 0x28, 0x20  # BPF_LD | BPF_H / BPF_W | BPF_ABS
_JEQ, _RET = 0x15, 0x06  # BPF_JMP | BPF_JEQ | BPF_K; BPF_RET | BPF_K


def _instruction(code: int, true: int, false: int, k: int) -> bytes:
    return struct.pack("HBBI", code, true, false, k & 0xFFFFFFFF)


def _drop_from(addresses: list[Address]) -> bytes:
    """A program that drops a datagram from any of ``addresses`` and keeps the rest: for
    each address, compare the source port, then the source IP; a match jumps to the end."""
    program = b""
    for index, (ip, port) in enumerate(addresses):
        to_drop = 4 * (len(addresses) - 1 - index) + 1  # past the blocks after, and "keep"
        program += _instruction(_LD_HALF, 0, 0, 0)  # the UDP source port
        program += _instruction(_JEQ, 0, 2, port)
        program += _instruction(_LD_WORD, 0, 0, _SKF_NET_OFF + 12)  # the IPv4 source
        program += _instruction(_JEQ, to_drop, 0, int(ipaddress.IPv4Address(ip)))
    return program + _instruction(_RET, 0, 0, 0xFFFFFFFF) + _instruction(_RET, 0, 0, 0)


class UdpNetwork:
    """Real UDP sockets."""

    async def listen(self, host: str, port: int) -> Endpoint:
        return await UdpEndpoint.bind(host, port)


UDP = UdpNetwork()


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


__all__ = [
    "MAX_DATAGRAM",
    "UDP",
    "Endpoint",
    "Network",
    "UdpEndpoint",
    "UdpNetwork",
    "resolve_ipv4",
]
