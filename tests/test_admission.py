"""Bounded work per sender: the admission policy alone, then a real server under floods."""

from __future__ import annotations

import random
import re
import socket
import sys
import time
from pathlib import Path

import pytest
from _harness import chatapp_env, free_udp_ports, join, serve, shown_messages

from chatapp import screen
from chatapp.protocol.admission import Admission, Buckets, Limits
from chatapp.protocol.crypto import Identity
from chatapp.protocol.sealing import is_handshake
from chatapp.testing.raw import RawClient
from chatapp.wire import Ack, Challenge, Hello, Register, encode

A = ("10.0.0.7", 40000)
B = ("10.0.0.8", 40000)
JUNK = b"\x00junk"


def _register(n: int, port: int = 5000) -> bytes:
    """A register as the policy sees it (it is not decoded: its cookie and signature
    need not be good)."""
    return encode(Register(f"r{n}", f"name{n}", port, bytes(32), bytes(16), bytes(64)))


def _hello(n: int, port: int = 5000) -> bytes:
    return encode(Hello(f"h{n}", f"name{n}", port, bytes(32)))


def _storm(sock: socket.socket, to: tuple[str, int], names: list[str], seconds: float) -> None:
    """Registrations of ``names`` from ``sock`` for ``seconds``, each through the
    handshake, as an attacker who wants names would send them: hellos a few dozen at a
    time, each challenge answered as it comes (hellos alone would spend the IP's
    handshake tokens on nothing)."""
    identity = Identity.generate()  # one key for all: names are what a storm takes
    port = sock.getsockname()[1]
    sock.settimeout(0.2)  # a server busy with a flood answers late
    deadline = time.monotonic() + seconds
    for start in range(0, len(names), 50):
        waiting = {name: RawClient(name, port, identity) for name in names[start : start + 50]}
        for client in waiting.values():
            sock.sendto(client.hello(), to)
        while waiting and time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break  # the rest were dropped: on to the next few
            for client in list(waiting.values()):
                message = client.open(data)
                if isinstance(message, Challenge):
                    sock.sendto(encode(client.register_for(message)), to)
                    del waiting[client.name]
                    break
        if time.monotonic() >= deadline:
            return


def test_a_bucket_lets_a_burst_through_then_its_rate() -> None:
    bucket = Buckets(rate=10, burst=20, capacity=8)
    assert sum(bucket.take("k", 0.0) for _ in range(100)) == 20
    assert sum(bucket.take("k", 1.0) for _ in range(100)) == 10  # one second: ten more
    assert sum(bucket.take("k", 100.0) for _ in range(100)) == 20  # never more than the burst


def test_the_bucket_table_is_bounded() -> None:
    bucket = Buckets(rate=1, burst=1, capacity=100)
    for port in range(10_000):
        bucket.take(("10.0.0.1", port), 0.0)
    assert len(bucket) == 100


def test_a_flood_from_one_address_leaves_every_other_address_alone() -> None:
    admission = Admission()
    flooded = sum(admission.admit(JUNK, A, i * 1e-6) for i in range(1_000_000))
    limits = Limits()
    assert flooded <= limits.per_address_burst + limits.per_address_rate * 1.0 + 1
    assert admission.dropped == 1_000_000 - flooded
    assert all(admission.admit(encode(Ack(f"a{i}")), B, 1.0) for i in range(100))


def test_a_class_of_200_joining_within_a_minute_from_one_nat_address_passes() -> None:
    """200 people behind one address, each from a port of its own, at random moments of
    one minute, each through the handshake with one retry of each step (a lost answer),
    all registered."""
    admission = Admission()
    rng = random.Random(7)
    joins = sorted((rng.uniform(0, 60), port) for port in range(20000, 20200))
    for when, port in joins:
        addr = ("192.0.2.1", port)
        for step, at in ((_hello, 0.0), (_hello, 0.5), (_register, 0.6), (_register, 1.1)):
            assert admission.admit(step(port), addr, when + at)
    assert admission.dropped == 0


def test_handshakes_from_one_ip_are_bounded_whatever_the_ports() -> None:
    """Hellos and registers alike take from the IP's bucket: neither gets past it, nor
    does one make room for the other."""
    admission = Admission()
    limits = Limits()
    admitted = sum(
        admission.admit((_hello, _register)[n % 2](n), ("192.0.2.9", 1024 + n % 60000), n * 5e-5)
        for n in range(20_000)  # in one second
    )
    assert admitted <= limits.handshakes_per_ip_burst + limits.handshakes_per_ip_rate + 1
    # ...and another machine still registers, and the flooding one still speaks in its
    # sessions (a session datagram is no handshake).
    assert admission.admit(_hello(1), ("192.0.2.10", 5000), 1.0)
    assert admission.admit(b"\x01" + bytes(40), ("192.0.2.9", 999), 1.0)


def test_a_handshake_datagram_is_known_by_its_first_byte() -> None:
    """Every plaintext datagram is a handshake step (the server takes no other), however
    its fields are written; a session (0x01) or peer (0x02) datagram never is, whatever
    bytes it holds."""
    plain = _register(1)
    escaped = plain.replace(b'"register"', b'"\\u0072egister"')
    last = b'{"id":"a","name":"x","port":5000,"key":"","t":"hello"}'
    assert all(map(is_handshake, (plain, escaped, last, _hello(1), b"{junk")))
    assert not is_handshake(b"\x01" + b"\x00" * 16 + b'{"t":"register"}')
    assert not is_handshake(b"\x02" + b'{"t":"hello"}')
    assert not is_handshake(b' {"t":"hello"}') and not is_handshake(b"")


def test_what_is_dropped_is_reported_at_most_once_a_second() -> None:
    admission = Admission(Limits(per_address_rate=1, per_address_burst=1))
    reports = []
    for i in range(30_000):  # three seconds of a flood
        now = i * 1e-4
        admission.admit(JUNK, A, now)
        if (line := admission.report(now)) is not None:
            reports.append(line)
    assert 3 <= len(reports) <= 4
    reports.append(admission.report(4.0) or "")  # the end of the flood: its last second
    assert admission.report(6.0) is None  # nothing more to say
    counts = [int(re.search(r"dropped (\d+) datagrams", line)[1]) for line in reports]  # type: ignore[index]
    assert sum(counts) == admission.dropped
    assert "most from 10.0.0.7:40000" in reports[0]


# --- a real server -------------------------------------------------------------------------


@pytest.mark.e2e
def test_a_class_of_200_registers_at_once_from_one_address(tmp_path: Path) -> None:
    (port,) = free_udp_ports(1)
    server = serve(port, chatapp_env(tmp_path), "--quiet")
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(200)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(5)
        to = ("127.0.0.1", port)
        clients = [RawClient(f"name{n}", s.getsockname()[1]) for n, s in enumerate(sockets)]
        for client, sock in zip(clients, sockets, strict=True):
            sock.sendto(client.hello(), to)
        for client, sock in zip(clients, sockets, strict=True):
            register = client.answer(sock.recvfrom(65536)[0])
            assert register is not None
            sock.sendto(register, to)
        answers = [sock.recvfrom(65536)[0] for sock in sockets]  # one try each: none dropped
    finally:
        for sock in sockets:
            sock.close()
        status = server.stop()
    assert all(answer.startswith(b'{"t":"registered"') for answer in answers)
    assert status == 0 and "rate limit" not in server.output


@pytest.mark.e2e
def test_floods_from_one_address_lose_nothing_and_are_reported(tmp_path: Path) -> None:
    """A real client keeps chatting through junk and a storm of registrations, each from one
    socket: every channel message is acknowledged, nothing is lost, and the server says
    what it dropped."""
    env = chatapp_env(tmp_path)
    server_port, x_port, y_port = free_udp_ports(3)
    server = serve(server_port, env, db=tmp_path / "server.sqlite3")
    procs = [server]
    try:
        x = join("user1", server_port, x_port, env)
        procs.append(x)
        x.expect(screen.TABLE_UPDATED)
        y = join("user2", server_port, y_port, env)
        procs.append(y)
        x.expect(screen.TABLE_UPDATED, count=2)
        to = ("127.0.0.1", server_port)
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as junk,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as joins,
        ):
            for round_ in range(10):
                for _ in range(20_000):
                    junk.sendto(JUNK, to)
                x.type(f"send_all round {round_}")
                _storm(joins, to, [f"name{round_ * 500 + n}" for n in range(500)], 1.0)
            x.expect(screen.CHANNEL_ACKED, count=10, timeout=20)
        # Each message shown once at user2: live, or stored and delivered when user2 was
        # heard from again (a storm of tables, one per registration, can swamp a client
        # and its ACK be late).
        wanted = [("user1", f"round {n}") for n in range(10)]
        y.wait_for(lambda lines: set(wanted) <= set(shown_messages(lines)), 20, "every round")
        time.sleep(1.1)  # the last report of what was dropped
    finally:
        for proc in procs:
            proc.stop()
    for proc in procs:
        assert "Traceback" not in proc.output and "internal error" not in proc.output
    assert screen.SERVER_NOT_RESPONDING_CHANNEL not in x.lines()
    assert sorted(shown_messages(y.lines())) == sorted(wanted)  # nothing twice
    assert "over the rate limit: dropped" in server.output
    registered = len(re.findall(r"registered name\d+ at", server.output))
    assert 0 < registered <= Limits().handshakes_per_ip_burst / 2 + 60  # ~14 s, 2 steps each


def test_the_summary_of_a_flood_is_not_lost_in_the_flood_it_sums_up() -> None:
    """The warnings of a flood are rate-limited by the log; the admission's summary,
    limited at its source to one a second, is always written, and says nothing of the
    warnings left out (they are not like it)."""
    import logging
    from io import StringIO

    from chatapp.logs import LogSink
    from chatapp.protocol.common import Log

    clock = [0.0]
    out = StringIO()
    log = LogSink("chatapp.test.summary", now=lambda: clock[0], handler=logging.StreamHandler(out))
    for _ in range(1000):
        clock[0] += 0.0001
        log(Log("dropped a bad datagram", "warning"))
    log(Log("over the rate limit: dropped 5000 datagrams", "warning", summary=True))
    last = out.getvalue().splitlines()[-1]
    assert last.endswith("over the rate limit: dropped 5000 datagrams")


def test_a_flood_is_shut_out_for_a_while_and_let_in_again() -> None:
    admission = Admission()
    limits = Limits()
    t = 100.0
    assert admission.shut_out_changed(t) is None  # nothing dropped: nothing to do
    for i in range(5000):  # 0.05 s at 100,000 a second: over the burst, then dropped
        admission.admit(JUNK, A, t + i * 1e-5)
    for i in range(20):  # a slow sender over its rate is not a flood
        admission.admit(JUNK, B, t + i * 0.01)
    t += 0.2
    assert admission.shut_out_changed(t) == {A}
    assert admission.shut_out_changed(t + 0.1) is None  # said once
    assert "shut out for 10 s: 10.0.0.7:40000" in (admission.report(t + 1) or "")
    assert admission.shut_out_changed(t + limits.shut_out_seconds + 0.01) == frozenset()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="socket filters are Linux's")
async def test_a_shut_out_address_is_dropped_by_the_kernel_and_let_in_again() -> None:
    import trio

    from chatapp.net import UdpEndpoint

    server = await UdpEndpoint.bind("127.0.0.1", 0)
    flooder, other = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    try:
        for sock in (flooder, other):
            sock.bind(("127.0.0.1", 0))
        to = server.local_address

        async def received(count: int) -> set[bytes]:
            got = set()
            with trio.move_on_after(0.3):
                while len(got) < count:
                    got.add((await server.receive())[0])
            return got

        server.shut_out([flooder.getsockname(), ("127.0.0.9", 40000)])
        flooder.sendto(b"flood", to)
        other.sendto(b"other", to)
        assert await received(2) == {b"other"}
        server.shut_out([])
        flooder.sendto(b"flood again", to)
        assert await received(1) == {b"flood again"}
    finally:
        server.close()
        flooder.close()
        other.close()
