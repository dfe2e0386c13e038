"""Who is heard: bounded work per sender, decided before a datagram is decoded.

Every source address (IP and port) has a token bucket: a datagram takes a token, and
one without a token is dropped at once (the cost of a dictionary lookup). The steps of
a handshake (``hello``, then ``register``: the plaintext datagrams, known by their first
byte), whose registrations cost the server the most (a record, a commit, a table to
every online client), also take a token from a bucket of their source IP, so that one
machine cannot register names without end from many ports; that bucket holds enough
for a class of 200 people joining within a minute from behind one NAT address (two
steps each, with room for retries).

An address that floods (dropped at more than ``shut_out_rate`` a second) is shut out
for a while: the node has the kernel drop its datagrams at the socket (a filter), so
that a flood from one address costs the node nothing, and other clients' datagrams
are not pushed out of the socket's buffer while the node is busy or descheduled.

Pure: no Trio, no socket, time passed in. The node asks ``admit`` for each datagram it
reads, logs ``report`` (at most once a second) and applies ``shut_out_changed``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from chatapp.protocol.sealing import is_handshake
from chatapp.wire import Address, fmt_addr


@dataclass(frozen=True, slots=True)
class Limits:
    """A rate in datagrams per second, and how many may come at once."""

    #: Any datagram, per source (IP, port). A person types far slower; what a client sends
    #: in bursts is ACKs (of table parts, mailbox batches, channel messages). The burst is
    #: also what a flood gets read and decoded before it is found and shut out.
    per_address_rate: float = 500.0
    per_address_burst: float = 500.0
    #: Handshake steps (a ``hello`` and a ``register`` per registration) per source IP:
    #: 500 at once (a class of 200 joining together, and room for retries and stale
    #: cookies), then 500 a minute: 250 registrations. Each costs every online client a
    #: table, so this also bounds how long a storm of them keeps the server busy.
    handshakes_per_ip_rate: float = 500 / 60
    handshakes_per_ip_burst: float = 500.0
    #: Sources remembered; past that the oldest is forgotten (and starts again full).
    tracked_sources: int = 65536
    #: An address whose datagrams are dropped faster than this (over a second) is a
    #: flood: it is shut out at the socket for ``shut_out_seconds``, where the kernel drops
    #: its datagrams before they cost the node anything (at most ``shut_out_most`` at once).
    shut_out_rate: float = 1000.0
    shut_out_seconds: float = 10.0
    shut_out_most: int = 32


class Buckets:
    """Token buckets by key: ``rate`` tokens a second, at most ``burst`` kept (an infinite
    rate: no limit). At most ``capacity`` buckets are kept; past that the one made first
    goes."""

    def __init__(self, rate: float, burst: float, capacity: int) -> None:
        self.rate = rate
        self.burst = burst
        self.capacity = capacity
        self.unlimited = math.isinf(rate)
        #: key -> [tokens, when they were counted]
        self._buckets: dict[object, list[float]] = {}

    def take(self, key: object, now: float) -> bool:
        """One token from ``key``'s bucket: True if it had one."""
        if self.unlimited:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.capacity:
                del self._buckets[next(iter(self._buckets))]
            self._buckets[key] = [self.burst - 1, now]
            return True
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1
        return True

    def __len__(self) -> int:
        return len(self._buckets)


class Admission:
    """The admission policy of one node (see the module's doc)."""

    #: Seconds between two reports of what was dropped.
    REPORT_INTERVAL = 1.0
    #: Seconds between two looks for floods (a flood fills a socket's buffer in less).
    FLOOD_CHECK_INTERVAL = 0.1

    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self._per_address = Buckets(
            limits.per_address_rate, limits.per_address_burst, limits.tracked_sources
        )
        self._handshakes = Buckets(
            limits.handshakes_per_ip_rate, limits.handshakes_per_ip_burst, limits.tracked_sources
        )
        #: Datagrams dropped since the node started.
        self.dropped = 0
        self._unreported = 0
        self._counts: dict[Address, int] = {}
        self._next_report = 0.0
        self._recent: dict[Address, int] = {}  # dropped since the last look for floods
        self._looked_at = 0.0
        self._floods_unreported: list[Address] = []
        #: address -> until when it is shut out at the socket
        self.shut_out: dict[Address, float] = {}
        self._shut_out_said: frozenset[Address] = frozenset()
        self._next_change = math.inf  # when the set shut out changes next

    def admit(self, data: bytes, addr: Address, now: float) -> bool:
        """Whether the datagram ``data`` from ``addr`` is handled (else it is dropped)."""
        if self._per_address.take(addr, now) and (
            not is_handshake(data) or self._handshakes.take(addr[0], now)
        ):
            return True
        self.dropped += 1
        self._unreported += 1
        if len(self._counts) < 64 or addr in self._counts:  # bounded: the first few senders
            self._counts[addr] = self._counts.get(addr, 0) + 1
            if not self._recent:
                self._looked_at = now  # a rate counts from the first drop
            self._recent[addr] = self._recent.get(addr, 0) + 1
        return False

    def report(self, now: float) -> str | None:
        """A line about what was dropped since the last one, if any and if a second has
        passed since then."""
        if not self._unreported or now < self._next_report:
            return None
        top, count = max(self._counts.items(), key=lambda item: item[1])
        others = "" if len(self._counts) == 1 else f"; {len(self._counts)} senders"
        line = (
            f"over the rate limit: dropped {self._unreported} datagrams"
            f" (most from {fmt_addr(top)}: {count}{others}); {self.dropped} since start"
        )
        if self._floods_unreported:
            floods = ", ".join(map(fmt_addr, self._floods_unreported))
            line += f"; shut out for {self.limits.shut_out_seconds:g} s: {floods}"
            self._floods_unreported = []
        self._unreported = 0
        self._counts = {}
        self._next_report = now + self.REPORT_INTERVAL
        return line

    def _look_for_floods(self, now: float) -> None:
        """Shut out (or for longer) the addresses dropped faster than ``shut_out_rate``
        since the last look."""
        limits = self.limits
        seconds = max(now - self._looked_at, self.FLOOD_CHECK_INTERVAL)
        for addr, count in self._recent.items():
            if count / seconds <= limits.shut_out_rate:
                continue
            if addr in self.shut_out or len(self.shut_out) < limits.shut_out_most:
                if addr not in self.shut_out:
                    self._floods_unreported.append(addr)
                self.shut_out[addr] = now + limits.shut_out_seconds
                self._next_change = now
        self._recent = {}
        self._looked_at = now

    def shut_out_changed(self, now: float) -> frozenset[Address] | None:
        """The addresses to shut out at the socket from now on, if that changed since the
        last call (a flood was found, or the time of one ran out); else None."""
        if self._recent and now >= self._looked_at + self.FLOOD_CHECK_INTERVAL:
            self._look_for_floods(now)
        if now < self._next_change:
            return None
        self.shut_out = {addr: until for addr, until in self.shut_out.items() if until > now}
        self._next_change = min(self.shut_out.values(), default=math.inf)
        current = frozenset(self.shut_out)
        if current == self._shut_out_said:
            return None
        self._shut_out_said = current
        return current
