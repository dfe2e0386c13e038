"""The seed's tests with the clients spread over two servers that share one PostgreSQL
database: real processes in real terminals, every screen line for line as the seed
shows it (the same checks as ``test_e2e``'s single-server runs)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from _harness import free_udp_ports, join_args, serve_args
from test_e2e import (
    TABLE,
    Start,
    Terminal,
    assert_no_noise,
    assert_screen,
    assert_seed_lines,
    chat,
    env,
    start,
    stop_server,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

__all__ = ["env", "start"]  # the fixtures, used by name


def shared_server(start: Start, port: int, url: str) -> Terminal:
    server = start(*serve_args(port, db=url))
    server.shows_pattern(r"listening on UDP 127\.0\.0\.1:\d+")
    return server


def join(start: Start, name: str, server_port: int, port: int) -> Terminal:
    return start("-c", *join_args(name, server_port, port)[1:])


def test_seed_test_1_across_two_servers(start: Start, pg_url: str, tmp_path: Path) -> None:
    a_port, b_port, *ports = free_udp_ports(5)
    a = shared_server(start, a_port, pg_url)
    b = shared_server(start, b_port, pg_url)
    x = join(start, "user1", a_port, ports[0])
    x.shows(TABLE)
    y = join(start, "user2", b_port, ports[1])
    for client in (x, y):
        client.shows(TABLE)
    z = join(start, "user3", a_port, ports[2])
    for client in (x, y, z):
        client.shows(TABLE)

    chat(x, y, "user2", "hello nice to meet you.", "user1")
    chat(x, z, "user3", "hi!", "user1")
    chat(y, x, "user1", "hello, nice to meet you, too!", "user2")
    chat(y, z, "user3", "hello", "user2")
    chat(z, x, "user1", "hi~", "user3")
    chat(z, y, "user2", "hello!", "user3")

    x.type("dereg user1")
    x.shows("[You are now offline. Bye.]")
    y.shows(TABLE)
    z.shows(TABLE)
    for sender, text in ((y, "hello?"), (z, "are you still there?")):  # stored by B, then A
        sender.type(f"send user1 {text}")
        sender.shows("[No ACK from user1, message sent to server.]")
        sender.shows("[Messages received by the server and saved.]")

    x.type("reg user1")
    x.shows("[You have message]")
    x.shows_pattern(r"\(\d+\.\d+\) user2 : hello\?\r\n")
    x.shows_pattern(r"\(\d+\.\d+\) user3 : are you still there\?\r\n")
    for client in (x, y, z):
        client.shows(TABLE)

    for client in (x, y, z):
        client.interrupt()
        client.shows("Caught keyboard interrupt. Exiting")
        assert client.exit_status() == 0
    stop_server(a)
    stop_server(b)
    assert_seed_lines(1, {"user1": x, "user2": y, "user3": z})
    assert x.shown_lines().count(TABLE) == 4
    assert y.shown_lines().count(TABLE) == 4
    assert z.shown_lines().count(TABLE) == 3
    assert_no_noise(a, b, x, y, z)


def test_seed_test_2_across_two_servers(start: Start, pg_url: str) -> None:
    a_port, b_port, *ports = free_udp_ports(4)
    a = shared_server(start, a_port, pg_url)
    b = shared_server(start, b_port, pg_url)
    x = join(start, "user1", a_port, ports[0])
    x.shows(TABLE)
    y = join(start, "user2", b_port, ports[1])
    for client in (x, y):
        client.shows(TABLE)
    y.type("dereg user2")
    y.shows("[You are now offline. Bye.]")
    x.shows(TABLE)
    stop_server(a)  # user1's server: user1 knows no other

    x.type("send user2 hi")
    sent = time.monotonic()
    x.shows("[No ACK from user2, message sent to server.]")
    x.shows("[Exiting]")
    assert x.exit_status() == 1
    assert 2.5 <= time.monotonic() - sent <= 20.0
    y.drain()
    assert_screen(
        x,
        """
>>> [Client Table Updated]
>>> [Client Table Updated]
>>> [Client Table Updated]
>>> send user2 hi
>>> [No ACK from user2, message sent to server.]
>>> [Message sent failed]
>>> [Server is shut down]
>>> [Exiting]
>>>
""",
    )
    assert_screen(
        y,
        """
>>> [Client Table Updated]
>>> dereg user2
>>> [You are now offline. Bye.]
>>>
""",
    )
    assert_seed_lines(2, {"user1": x, "user2": y})
    y.interrupt()
    assert y.exit_status() == 0
    stop_server(b)
    assert_no_noise(a, b, x, y)


def test_seed_test_3_across_two_servers(start: Start, pg_url: str) -> None:
    a_port, b_port, *ports = free_udp_ports(5)
    a = shared_server(start, a_port, pg_url)
    b = start(*serve_args(b_port, "--verbose", db=pg_url))
    b.shows_pattern(r"listening on UDP 127\.0\.0\.1:\d+")
    x = join(start, "user1", a_port, ports[0])
    x.shows(TABLE)
    y = join(start, "user2", b_port, ports[1])  # the other server's client
    for client in (x, y):
        client.shows(TABLE)
    z = join(start, "user3", a_port, ports[2])
    for client in (x, y, z):
        client.shows(TABLE)

    x.type("send_all hello guys")
    x.shows("[Message received by the server.]")
    y.shows("Channel_Message user1 : hello guys")
    z.shows("Channel_Message user1 : hello guys")
    y.interrupt()
    y.shows("Caught keyboard interrupt. Exiting")
    assert y.exit_status() == 0

    x.type("send_all hi")
    x.shows("[Message received by the server.]")
    z.shows("Channel_Message user1 : hi")
    # B waits 500 ms for user2's ACK, marks it offline; A learns it and tells its clients
    x.shows(TABLE)
    z.shows(TABLE)
    b.shows_pattern(r"no ACK from user2.*marked offline")

    x.drain()
    z.drain()
    assert_screen(
        x,
        """
>>> [Client Table Updated]
>>> [Client Table Updated]
>>> [Client Table Updated]
>>> send_all hello guys
>>> [Message received by the server.]
>>> send_all hi
>>> [Message received by the server.]
>>> [Client Table Updated]
>>>
""",
    )
    assert_screen(
        y,
        """
>>> [Client Table Updated]
>>> [Client Table Updated]
>>> Channel_Message user1 : hello guys
>>> Caught keyboard interrupt. Exiting
""",
    )
    assert_screen(
        z,
        """
>>> [Client Table Updated]
>>> Channel_Message user1 : hello guys
>>> Channel_Message user1 : hi
>>> [Client Table Updated]
>>>
""",
    )
    assert_seed_lines(3, {"user1": x, "user2": y, "user3": z})
    for client in (x, z):
        client.interrupt()
        client.shows("Caught keyboard interrupt. Exiting")
        assert client.exit_status() == 0
    stop_server(a)
    stop_server(b)
    assert_no_noise(a, b, x, y, z)
