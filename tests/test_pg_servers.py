"""Servers on a PostgreSQL database (real processes, a throwaway cluster): one server,
or two sharing the database. A killed server's clients moving to the other, the
heartbeat timeout and the sweep are checked end to end in ``test_pg_seeds`` (issue
14's check)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from _harness import Proc, chatapp_env, free_udp_ports, join, serve

from chatapp import screen

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


def test_clients_of_two_servers_see_one_table(tmp_path: Path, pg_url: str) -> None:
    env = chatapp_env(tmp_path)
    a_port, b_port, x_port, y_port = free_udp_ports(4)
    procs: list[Proc] = []
    try:
        a = serve(a_port, env, db=pg_url)
        procs.append(a)
        b = serve(b_port, env, db=pg_url)
        procs.append(b)
        x = join("user1", a_port, x_port, env)
        procs.append(x)
        x.expect(screen.TABLE_UPDATED)
        y = join("user2", b_port, y_port, env)
        procs.append(y)
        y.expect(screen.TABLE_UPDATED)
        x.expect(screen.TABLE_UPDATED, count=2)  # user2 joined at the other server
        x.type("send user2 hello across")
        y.expect("user1 : hello across")
        x.expect(screen.received_by("user2"))
    finally:
        for proc in procs:
            proc.stop()
    for proc in procs:
        assert "Traceback" not in proc.output, proc.output


def test_the_seeds_test_2_on_a_postgresql_server_ends_as_it_always_did(
    tmp_path: Path, pg_url: str
) -> None:
    """One server (on PostgreSQL), clients that know only it: when it stops, the
    client gives up exactly as the seed's Test 2 shows."""
    env = chatapp_env(tmp_path)
    server_port, x_port, y_port = free_udp_ports(3)
    server = serve(server_port, env, db=pg_url)
    x = join("user1", server_port, x_port, env)
    x.expect(screen.TABLE_UPDATED)  # as in the seed: one joins after the other
    y = join("user2", server_port, y_port, env)
    try:
        y.expect(screen.TABLE_UPDATED)
        x.expect(screen.TABLE_UPDATED, count=2)
        y.type("dereg user2")
        y.expect(screen.YOU_ARE_OFFLINE)
        x.expect(screen.TABLE_UPDATED, count=3)
        assert server.stop() == 0
        x.type("send user2 hi")
        x.expect(screen.EXITING, timeout=15)
        assert x.popen.wait(5) == 1
    finally:
        for proc in (x, y, server):
            proc.stop()
    shown = x.lines()
    tail = shown[shown.index(screen.no_ack("user2")) :]
    assert tail == [
        screen.no_ack("user2"),
        screen.SEND_FAILED,
        screen.SERVER_SHUT_DOWN,
        screen.EXITING,
    ]


def test_a_message_saved_on_postgresql_survives_sigkill_and_the_same_key_serves_it(
    tmp_path: Path, pg_url: str
) -> None:
    """Protocol 2 on PostgreSQL: the sealed message a server answered saved is in the
    database; killed and started again, the server has the same key (its clients
    pinned it) and delivers it."""
    env = chatapp_env(tmp_path)
    server_port, x_port, y_port = free_udp_ports(3)
    server = serve(server_port, env, db=pg_url)
    procs = [server]
    try:
        x = join("user1", server_port, x_port, env)
        procs.append(x)
        x.expect(screen.TABLE_UPDATED)
        y = join("user2", server_port, y_port, env)
        procs.append(y)
        x.expect(screen.TABLE_UPDATED, count=2)
        x.type("dereg user1")
        x.expect(screen.YOU_ARE_OFFLINE)
        y.type("send user1 hello? are you still there")
        y.expect(screen.no_ack("user1"))
        y.expect(screen.SAVED_BY_SERVER)
        server.kill()
        assert server.popen.returncode == -9

        server = serve(server_port, env, db=pg_url)
        procs.append(server)
        assert "1 stored message" in server.output  # read back from the database
        x.type("reg user1")
        x.expect(screen.YOU_HAVE_MESSAGE)
        stored = re.compile(r"\(\d+\.\d+\) user2 : hello\? are you still there")
        x.wait_for(lambda lines: any(map(stored.fullmatch, lines)), 10, "the saved message")
        assert y.popen.poll() is None and x.popen.poll() is None  # nobody gave up
    finally:
        for proc in procs:
            proc.stop()
    for proc in procs:
        assert "Traceback" not in proc.output, proc.output
    assert sum("hello? are you still there" in line for line in x.lines()) == 1
