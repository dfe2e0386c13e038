"""The ``registrations`` benchmark: what one registration costs a server with N clients
online, and how long a storm of N registrations takes to settle.

A real ``chatapp serve`` process; a crowd of simulated clients in this one
(``crowd.py``: raw sockets, one epoll; each registering through the whole
handshake and answering in its session, as a client does). For
each N the crowd fills the server up to N online clients (``FILL_WINDOW``
registrations unanswered at a time), then ``samples`` more clients register one
at a time, each once the change before it has reached every client: for each of
those, the time until every online client holds the version with the newcomer in
it, and the datagrams and bytes the server sent meanwhile. Then a fresh server
gets N registrations at once (a storm): the time until every client holds the
same, last version. Kernel drops (``/proc/net/snmp``) and the server's RSS are
read around each phase.

Baselines, measured in the same run with the same crowd: a bare Trio fan-out of
one delta-sized datagram to the N clients (the floor for telling N clients one
thing and hearing back), and of the final whole table to every one of them (the
floor for a storm: each client must get every entry once).
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from chatapp.protocol.changes import NO_TAG, ClientRecord
from chatapp.protocol.roster import Roster
from chatapp.wire import Chat, encode

from .crowd import Crowd, Member, kernel_udp_drops, rss_bytes
from .loadgen import HOST
from .procs import BenchError, Worker, chatapp_servers
from .report import Figure, median

#: How many registrations are unanswered at once while a server is filled up to N (one
#: at a time would cost N^2/2 deltas: minutes at N = 10,000).
FILL_WINDOW = 200
#: No phase of the benchmark waits longer than this for the server.
PHASE_LIMIT = 120.0
#: Bytes a registration may cost per other online client (the goal: 300 N bytes and
#: the newcomer's whole table).
BYTES_PER_CLIENT = 300


@dataclass
class Sample:
    """One registration at N online: the time until every one of them held it, and what
    the server sent meanwhile."""

    seconds: float
    datagrams: int
    bytes: int
    newcomer_bytes: int  # its answer and its whole table, each datagram once
    newcomer_datagrams: int
    repeats: int


@dataclass
class Level:
    """The samples at one N, and the server around them."""

    online: int
    samples: list[Sample] = field(default_factory=list)
    floor: float = 0.0  # the bare fan-out to the same N
    rss: int | None = None
    rss_empty: int | None = None
    drops: int = 0
    fill_seconds: float = 0.0
    restarts: int = 0  # registrations given up and started again (filling, and the samples)


@contextmanager
def _server() -> Iterator[tuple[tuple[str, int], int]]:
    # Ten thousand registrations from 127.0.0.1: the join limit would take 250 a minute.
    with chatapp_servers({"db": ":memory:", "unlimited": True}) as [(port, pid)]:
        yield (HOST, port), pid


def _wait(crowd: Crowd, done: Callable[[], bool], limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not done():
        if time.monotonic() > deadline:
            raise BenchError(f"registrations: {what} did not happen within {limit:g} s")
        crowd.pump(0.01)
        crowd.retry_registrations(time.monotonic())


def _settled(members: list[Member]) -> bool:
    """Every member registered and holding one same version."""
    first = members[0]
    return all(
        m.registered and (m.epoch, m.version) == (first.epoch, first.version) for m in members
    )


def _fill(crowd: Crowd, members: list[Member]) -> None:
    """Register ``members``, ``FILL_WINDOW`` unanswered at a time, until every online
    client holds the same version."""
    pending = list(reversed(members))
    in_flight: list[Member] = []
    deadline = time.monotonic() + PHASE_LIMIT
    while pending or in_flight:
        if time.monotonic() > deadline:
            raise BenchError("registrations: filling the server took too long")
        now = time.monotonic()
        in_flight = [m for m in in_flight if m.name in crowd.unanswered]
        while pending and len(in_flight) < FILL_WINDOW:
            member = pending.pop()
            crowd.register(member, now)
            in_flight.append(member)
        crowd.pump(0.01)
        crowd.retry_registrations(now)
    if not all(m.registered for m in members):
        raise BenchError("registrations: the server did not answer some registrations")
    online = [m for m in crowd.members if m.registered]
    _wait(crowd, lambda: _settled(online), PHASE_LIMIT, "the table settling")


def _one_registration(crowd: Crowd, newcomer: Member, online: list[Member]) -> Sample:
    crowd.quiet(0.05, 2.0)
    crowd.counts.reset(focus=crowd.members.index(newcomer))
    start = time.monotonic()
    crowd.register(newcomer, start)
    _wait(crowd, lambda: bool(newcomer.whole_at), 10.0, "a newcomer's whole table")
    target = (newcomer.epoch, newcomer.version)
    behind = {id(m) for m in online if (m.epoch, m.version) < target}

    def moved(member: Member) -> None:
        if (member.epoch, member.version) >= target:
            behind.discard(id(member))

    crowd.moved = moved
    try:
        _wait(crowd, lambda: not behind, 20.0, "a registration reaching every client")
    finally:
        crowd.moved = None
    seconds = time.monotonic() - start
    crowd.quiet(0.05, 2.0)  # what follows late (a retry) counts too
    counts = crowd.counts
    return Sample(
        seconds,
        counts.datagrams,
        counts.bytes,
        counts.focus_bytes,
        counts.focus_datagrams,
        counts.repeats,
    )


def _fanout_floor(
    crowd: Crowd, members: list[Member], datagrams: list[bytes], tries: int = 3
) -> float:
    """Seconds for a bare Trio fan-out to get ``datagrams`` to every one of ``members``
    (each ACKs them, as it would the server's): the best of ``tries``."""
    ports = [m.sock.getsockname()[1] for m in members]
    with Worker("fanout") as worker:
        worker.command(f'{{"targets": {ports}}}')
        target = (HOST, worker.ready["port"])
        best = float("inf")
        for _ in range(tries):
            crowd.quiet(0.05, 2.0)
            crowd.counts.reset()
            start = time.monotonic()
            for data in datagrams:
                crowd.members[-1].sock.sendto(data, target)  # not a target: it is sent on
            expected = len(members) * len(datagrams)

            def arrived(expected: int = expected) -> bool:
                return crowd.counts.datagrams >= expected

            _wait(crowd, arrived, 30.0, "the fan-out floor")
            best = min(best, time.monotonic() - start)
    return best


def measure_levels(levels: tuple[int, ...], samples: int) -> list[Level]:
    """Fill one server up to each N in turn; at each, ``samples`` registrations one by one
    (they stay online: the next N counts them)."""
    measured: list[Level] = []
    delta_sized = encode(Chat("bench.fanout.1", "x" * 100, NO_TAG))
    with _server() as (address, pid):
        crowd = Crowd(max(levels) + samples + 1, address)  # the last one sends the floor's
        try:
            rss_empty = rss_bytes(pid)
            used = 0
            for online in levels:
                level = Level(online, rss_empty=rss_empty)
                drops, restarts = kernel_udp_drops(), crowd.restarts
                began = time.monotonic()
                _fill(crowd, crowd.members[used:online])
                level.fill_seconds = time.monotonic() - began
                used = online
                for _ in range(samples):
                    current = [m for m in crowd.members[:used] if m.registered]
                    level.samples.append(_one_registration(crowd, crowd.members[used], current))
                    used += 1
                level.drops = kernel_udp_drops() - drops
                level.restarts = crowd.restarts - restarts
                level.rss = rss_bytes(pid)
                level.floor = _fanout_floor(crowd, crowd.members[:online], [delta_sized])
                measured.append(level)
        finally:
            crowd.close()
    return measured


@dataclass
class Storm:
    clients: int
    seconds: float
    datagrams: int
    bytes: int
    repeats: int
    drops: int
    rss: int | None
    rss_empty: int | None
    version: int
    registered_seconds: float
    floor: float
    table_parts: int
    restarts: int  # registrations given up (a step's 5 tries unanswered) and started again


def _whole_table(count: int) -> list[bytes]:
    """The whole table of ``count`` clients as a server sends it (its parts)."""
    roster = Roster(epoch=1)
    roster.restore(
        ClientRecord(f"s{i}", (HOST, 20000 + i % 40000), i.to_bytes(32, "big"), bytes(8))
        for i in range(count)
    )
    ids = iter(range(1_000_000))
    return [data for _, data in roster.whole(lambda: f"floor.{next(ids)}", encode)]


def measure_storm(count: int) -> Storm:
    """``count`` registrations sent at once to a fresh server: the time until every
    client holds the same, last version."""
    table = _whole_table(count)
    with _server() as (address, pid):
        crowd = Crowd(count + 1, address, prefix="s")
        members = crowd.members[:count]
        try:
            floor = _fanout_floor(crowd, members, table, tries=2)
            for member in members:  # the floor's table is not the server's
                member.epoch, member.version, member.whole_at, member.parts = -1, -1, 0.0, {}
            rss_empty, drops = rss_bytes(pid), kernel_udp_drops()
            crowd.counts.reset()
            crowd.restarts = 0
            start = time.monotonic()
            for member in members:
                crowd.register(member, start)
            _wait(crowd, lambda: all(m.registered for m in members), PHASE_LIMIT, "the storm")
            registered = time.monotonic() - start
            _wait(crowd, lambda: _settled(members), PHASE_LIMIT, "the storm settling")
            seconds = time.monotonic() - start
            crowd.quiet(0.2, 5.0)
            counts = crowd.counts
            return Storm(
                count,
                seconds,
                counts.datagrams,
                counts.bytes,
                counts.repeats,
                kernel_udp_drops() - drops,
                rss_bytes(pid),
                rss_empty,
                members[0].version,
                registered,
                floor,
                len(table),
                crowd.restarts,
            )
        finally:
            crowd.close()


# --- figures -------------------------------------------------------------------------------


def _per_client(rss: int | None, empty: int | None, clients: int) -> float | None:
    return None if rss is None or empty is None else (rss - empty) / clients


def _plain_bytes_per_client(count: int) -> float:
    """Python memory per client of a plain dict name -> (address, key): the floor the
    memory benchmark uses too."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = {f"m{i}": ((HOST, 20000 + i), i.to_bytes(32, "big")) for i in range(count)}
        used = tracemalloc.get_traced_memory()[0] - before
        del kept
    finally:
        tracemalloc.stop()
    return used / count


def memory_figure(level: Level) -> Figure:
    """RSS grown per client: the state (the memory benchmark measures it alone) and all a
    running server keeps besides (the recent answers it repeats to retries, allocator
    slack after the bursts)."""
    n = level.online
    return Figure(
        f"registration_memory_n{n}",
        f"server RSS grown per client, {n:,} online",
        _per_client(level.rss, level.rss_empty, n),
        "B",
        _plain_bytes_per_client(n),
        "dict name -> (addr, key)",
        "lower",
    )


def level_figures(level: Level) -> list[Figure]:
    n, samples = level.online, level.samples
    extra = {
        "online": n,
        "samples": len(samples),
        "seconds": [round(s.seconds, 5) for s in samples],
        "datagrams": [s.datagrams for s in samples],
        "bytes": [s.bytes for s in samples],
        "newcomer_bytes": [s.newcomer_bytes for s in samples],
        "repeats": [s.repeats for s in samples],
        "kernel_drops": level.drops,
        "server_rss_bytes": level.rss,
        "server_rss_empty_bytes": level.rss_empty,
        "server_rss_per_client_bytes": _per_client(level.rss, level.rss_empty, n),
        "fill_seconds": round(level.fill_seconds, 2),
        "registrations_started_again": level.restarts,
    }
    strict = n >= 10_000  # the bounds are for N = 10,000
    return [
        Figure(
            f"registration_n{n}",
            f"registration, {n:,} online: until every one holds it (median)",
            median([s.seconds for s in samples]),
            "s",
            level.floor,
            f"Trio fan-out of 1 datagram to the {n:,}, ACKed",
            "lower",
            goal="< 150 ms" if strict else "",
            goal_on="value" if strict else "",
            goal_limit=0.150 if strict else None,
            extra=extra,
        ),
        Figure(
            f"registration_bytes_n{n}",
            f"registration, {n:,} online: bytes to each other client",
            median([(s.bytes - s.newcomer_bytes) / n for s in samples]),
            "B",
            median([s.newcomer_bytes for s in samples]),
            "the whole table (what each got before)",
            "lower",
            goal=f"<= {BYTES_PER_CLIENT} B",
            goal_on="value",
            goal_limit=BYTES_PER_CLIENT,
        ),
        Figure(
            f"registration_datagrams_n{n}",
            f"registration, {n:,} online: datagrams sent",
            median([s.datagrams for s in samples]),
            "",
            median([s.newcomer_datagrams + n for s in samples]),
            "loss-free: challenge, answer, whole table, a delta each",
            "lower",
            goal="<= 1.2x",
            goal_on="ratio",
            goal_limit=1.2,
        ),
    ]


def storm_figures(storm: Storm) -> list[Figure]:
    n = storm.clients
    strict = n >= 10_000
    extra = {
        "clients": n,
        "all_registered_s": round(storm.registered_seconds, 3),
        "datagrams": storm.datagrams,
        "bytes": storm.bytes,
        "repeats": storm.repeats,
        "kernel_drops": storm.drops,
        "server_rss_bytes": storm.rss,
        "server_rss_per_client_bytes": _per_client(storm.rss, storm.rss_empty, n),
        "final_version": storm.version,
        "registrations_started_again": storm.restarts,
        "whole_table_parts": storm.table_parts,
    }
    return [
        Figure(
            f"storm_n{n}",
            f"storm of {n:,} registrations: until all hold the last version",
            storm.seconds,
            "s",
            storm.floor,
            f"Trio fan-out of the whole table ({storm.table_parts} parts) to the {n:,}",
            "lower",
            goal="< 60 s" if strict else "",
            goal_on="value" if strict else "",
            goal_limit=60.0 if strict else None,
            extra=extra,
        ),
        Figure(
            f"storm_datagrams_n{n}",
            f"storm of {n:,}: datagrams sent",
            storm.datagrams,
            "",
            storm.datagrams - storm.repeats,
            "the same, each id to each client once",
            "lower",
            goal="<= 1.2x",
            goal_on="ratio",
            goal_limit=1.2,
        ),
        Figure(
            f"storm_rss_n{n}",
            f"storm of {n:,}: server RSS",
            None if storm.rss is None else storm.rss / 1e6,
            "MB",
            None if storm.rss_empty is None else storm.rss_empty / 1e6,
            "the same server before the storm",
            "lower",
            goal="< 200 MB",
            goal_on="value",
            goal_limit=200,
        ),
    ]
