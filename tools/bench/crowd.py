"""A crowd of simulated clients for the ``registrations`` benchmark: raw non-blocking
UDP sockets and one epoll, no Trio, each socket one client.

Each client speaks protocol 2 with the project's own code (``RawClient``: the
handshake, a session; one key for the whole crowd, a name each): it registers
(hello, challenge, register, registered), opens what the server seals in its
session, and keeps what a real client keeps of the table: the epoch and version
it holds (not the entries; a test checks those), putting parts together as a
client does, and ACKs every part, sealed, with the version it then holds. It
retries each step of its registration as a client does (the same datagram every
500 ms, 5 tries; a late answer to an earlier step is ignored), and one that runs
out of tries starts again from its hello, as a person would, counted in
``restarts``. The crowd counts what the server sends: datagrams, bytes, and how
many were repeats (the same id again to the same client: retries).

What arrives in the clear and is not a handshake (a table, a delta, a chat) is a
baseline's fan-out: counted and ACKed in the clear, as the bare programs expect.
"""

from __future__ import annotations

import resource
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from chatapp.protocol.crypto import Identity
from chatapp.protocol.sealing import SESSION_KIND, TO_CLIENT
from chatapp.testing.raw import RawClient
from chatapp.wire import Ack, TableAck, WireError, encode

from .loadgen import HOST

#: A registration unanswered this long is sent again, as a client does.
RETRY_AFTER = 0.5
TRIES = 5


class Head(msgspec.Struct):
    """The fields of a datagram from the server that a simulated client reads (the
    entries are not decoded: a table's size is all that matters here)."""

    t: str
    id: str = ""
    epoch: int = 0
    version: int = 0
    from_: int = msgspec.field(name="from", default=0)
    to: int | str = 0
    part: int = 0
    parts: int = 1


_decode_head = msgspec.json.Decoder(Head).decode
_ENTRIES = b',"entries":'


def _decode(data: bytes) -> Head:
    """The envelope of a datagram from the server. The entries of a table or a delta come
    last and are not read: parsing 8 KB of them would cost the crowd more than the server
    spends on sending them."""
    cut = data.find(_ENTRIES)
    return _decode_head(data[:cut] + b"}" if cut > 0 else data)


#: What a server sends in the clear to a client that is registering.
_HANDSHAKE = ("challenge", "registered", "refused", "rekey")


@dataclass(slots=True)
class Member:
    sock: socket.socket
    raw: RawClient  # its key, its handshake and its session
    epoch: int = -1
    version: int = -1
    tries: int = 0  # of the handshake's step under way
    sent_at: float = 0.0  # of its last handshake datagram
    last: bytes = b""  # that datagram (a retry sends it again: the same id)
    last_id: str = ""  # its id, which the server's answer carries
    whole_at: float = 0.0  # when its first whole table was complete
    parts: dict[tuple[int, ...], set[int]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.raw.name

    @property
    def registered(self) -> bool:
        return self.raw.registered

    def take(self, head: Head) -> bool:
        """A table part or a delta, taken as a client takes it; True if it moved on."""
        if head.t == "table":
            if head.epoch == self.epoch and head.version <= self.version:
                return False
            key: tuple[int, ...] = (head.epoch, -1, head.version, head.parts)
        else:
            if head.epoch != self.epoch or not head.from_ <= self.version < int(head.to):
                return False
            key = (head.epoch, head.from_, int(head.to), head.parts)
        got = self.parts.setdefault(key, set())
        got.add(head.part)
        if len(got) < head.parts:
            return False
        self.epoch, self.version = key[0], key[2]
        self.parts = {k: v for k, v in self.parts.items() if k[0] == self.epoch and k[2] > key[2]}
        return True


@dataclass
class Counts:
    """What the server sent to the crowd since the last reset."""

    datagrams: int = 0
    bytes: int = 0
    repeats: int = 0  # the same id to the same client again (a retry)
    focus: int = -1  # one member whose share is counted apart (a newcomer)
    focus_datagrams: int = 0
    focus_bytes: int = 0
    seen: set[tuple[int, str]] = field(default_factory=set)

    def reset(self, focus: int = -1) -> None:
        self.datagrams = self.bytes = self.repeats = 0
        self.focus, self.focus_datagrams, self.focus_bytes = focus, 0, 0
        self.seen = set()

    def add(self, member: int, msg_id: str, size: int) -> None:
        self.datagrams += 1
        self.bytes += size
        key = (member, msg_id)
        if key in self.seen:
            self.repeats += 1
            return
        self.seen.add(key)
        if member == self.focus:  # its first copy of each: what a loss-free run sends it
            self.focus_datagrams += 1
            self.focus_bytes += size


class Crowd:
    def __init__(self, count: int, server: tuple[str, int], prefix: str = "m") -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < count + 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(count + 256, hard), hard))
        self.server = server
        self.selector = selectors.EpollSelector()
        self.members: list[Member] = []
        identity = Identity.generate()  # one key for the crowd: a name each is what counts
        for index in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((HOST, 0))
            sock.setblocking(False)
            raw = RawClient(f"{prefix}{index}", sock.getsockname()[1], identity)
            self.members.append(Member(sock, raw))
            self.selector.register(sock, selectors.EVENT_READ, index)
        self.counts = Counts()
        self.unanswered: dict[str, Member] = {}  # registrations not answered yet
        self.restarts = 0  # registrations given up (5 tries of a step) and started again
        self.last_arrival = 0.0
        self.moved: Callable[[Member], None] | None = None  # called when one moves on

    def close(self) -> None:
        self.selector.close()
        for member in self.members:
            member.sock.close()

    def register(self, member: Member, now: float) -> None:
        """Start ``member``'s registration (a ``hello``), or send its last step again."""
        if not member.last:
            member.raw.codec.session, member.tries = None, 0
            member.last = member.raw.hello()
            member.last_id = _decode(member.last).id
        member.tries += 1
        member.sent_at = now
        self.unanswered[member.name] = member
        member.sock.sendto(member.last, self.server)

    def pump(self, timeout: float) -> int:
        """Handle what has arrived (waiting up to ``timeout`` for something); how much."""
        handled = 0
        for key, _ in self.selector.select(timeout):
            index: int = key.data
            member = self.members[index]
            try:
                data, addr = member.sock.recvfrom(16384)
            except BlockingIOError:
                continue
            handled += 1
            self._handle(index, member, data, addr)
        if handled:
            self.last_arrival = time.monotonic()
        return handled

    def _handle(self, index: int, member: Member, data: bytes, addr: tuple[str, int]) -> None:
        session = member.raw.codec.session
        sealed = data[:1] == bytes((SESSION_KIND,)) and session is not None
        try:
            # Opened (the session's counter and MAC checked) and read no further than
            # the envelope: the server's cost is what is measured, not the crowd's.
            head = _decode(session.open_bytes(TO_CLIENT, data) if sealed else data)  # type: ignore[union-attr]
        except (msgspec.DecodeError, WireError):
            return
        self.counts.add(index, head.id, len(data))
        if not sealed and head.t in _HANDSHAKE:
            self._handshake(member, head, data)
            return
        if head.t in ("table", "delta"):
            moved = member.take(head)
            ack = TableAck(head.id, member.epoch, member.version)
            member.sock.sendto(member.raw.seal(ack) if sealed else encode(ack), addr)
            if moved:
                if not member.whole_at:
                    member.whole_at = time.monotonic()
                if self.moved is not None:
                    self.moved(member)
        elif head.t in ("mailbox", "channel", "chat", "relay", "not_stored"):
            ack_ = Ack(head.id)
            member.sock.sendto(member.raw.seal(ack_) if sealed else encode(ack_), addr)

    def _handshake(self, member: Member, head: Head, data: bytes) -> None:
        """The next step of ``member``'s registration (its ``register`` for a challenge);
        a ``registered`` answer makes its session. Only an answer to its last step counts
        (a late answer to a retry is ignored, as a client ignores it)."""
        if member.registered or member.name not in self.unanswered or head.id != member.last_id:
            return
        reply = member.raw.answer(data)
        if member.registered:
            self.unanswered.pop(member.name, None)
            member.last, member.last_id = b"", ""
        elif reply is not None:
            member.last, member.last_id, member.tries = reply, _decode(reply).id, 1
            member.sent_at = time.monotonic()
            member.sock.sendto(reply, self.server)

    def retry_registrations(self, now: float) -> int:
        """Send again each registration step unanswered for ``RETRY_AFTER`` (up to
        ``TRIES``). One that ran out of tries gave up, as a client does, and is started
        again from its ``hello`` (a person joining again): counted in ``restarts``."""
        retried = 0
        for member in list(self.unanswered.values()):
            if now - member.sent_at < RETRY_AFTER:
                continue
            if member.tries >= TRIES:
                self.restarts += 1
                member.last = b""
            self.register(member, now)
            retried += 1
        return retried

    def quiet(self, seconds: float, limit: float) -> None:
        """Handle arrivals until none has come for ``seconds`` (at most ``limit`` s)."""
        deadline = time.monotonic() + limit
        self.last_arrival = time.monotonic()
        while time.monotonic() < deadline:
            self.pump(seconds / 4)
            if time.monotonic() - self.last_arrival >= seconds:
                return


def kernel_udp_drops() -> int:
    """Datagrams the kernel dropped for want of buffer room, machine-wide (``RcvbufErrors``
    of ``/proc/net/snmp``; other programs' drops count too)."""
    try:
        with open("/proc/net/snmp", encoding="ascii") as f:
            rows = [line.split() for line in f if line.startswith("Udp:")]
        names, values = rows[0], rows[1]
        return int(values[names.index("RcvbufErrors")])
    except (OSError, IndexError, ValueError):
        return 0


def rss_bytes(pid: int) -> int | None:
    """A process's resident memory, from ``/proc`` (None where there is none)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
