"""Datagram endpoints: what a node sends and receives through, and where it gets one.

A node only needs ``send``, ``receive`` and ``local_address``; a ``Network``
gives it an endpoint bound where it asks. ``UDP`` is the real one; the
in-memory network of ``chatapp.testing`` is the other.
"""

from __future__ import annotations

import socket as _stdlib_socket
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

    @property
    def receive_buffer(self) -> int:
        """The bytes the kernel queues for this socket before it drops datagrams (what
        SO_RCVBUF granted: the kernel doubles the request, capped by net.core.rmem_max)."""
        return int(self._sock.getsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF))

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
