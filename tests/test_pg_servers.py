"""Servers on a PostgreSQL database (real processes, a throwaway cluster): one server,
or two sharing the database. A killed server's clients moving to the other, the
heartbeat timeout and the sweep are checked end to end in ``test_pg_seeds`` (issue
14's check)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import psycopg
import pytest
from _harness import Proc, chatapp_env, free_udp_ports, join, serve

from chatapp import screen
from chatapp.pg_store import HEARTBEAT_TIMEOUT, server_id
from chatapp.testing.postgres import PgServer

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


def test_a_server_stays_up_through_a_database_outage_and_works_at_once_when_it_ends(
    tmp_path: Path, pg_server: PgServer, pg_url: str
) -> None:
    """The database stopped and started again (pg_ctl, -m fast), nothing asked
    meanwhile: the first request goes through (its connection, ended by the database,
    is replaced at BEGIN). The database stopped: a request that needs a write is
    refused with the storage line, a direct message goes on, the server stays up; it
    started again: the first request goes through."""
    env = chatapp_env(tmp_path)
    server_port, x_port, y_port, z_port, w_port = free_udp_ports(5)
    server = serve(server_port, env, db=pg_url)
    procs = [server]
    try:
        x = join("user1", server_port, x_port, env)
        procs.append(x)
        x.expect(screen.TABLE_UPDATED)
        y = join("user2", server_port, y_port, env)
        procs.append(y)
        x.expect(screen.TABLE_UPDATED, count=2)
        z = join("user3", server_port, z_port, env)
        procs.append(z)
        z.expect(screen.TABLE_UPDATED)
        z.type("dereg user3")  # a send_all is stored for it: a write
        z.expect(screen.YOU_ARE_OFFLINE)
        x.expect(screen.TABLE_UPDATED, count=4)
        pg_server.stop()  # nothing asked meanwhile: the server's connections are dead
        pg_server.start(port=pg_server.port)
        w = join("user4", server_port, w_port, env)  # the first request after it
        procs.append(w)
        w.expect(screen.TABLE_UPDATED)
        pg_server.stop()
        try:
            x.type("send_all while the database is down")
            x.expect(screen.CANNOT_STORE, timeout=15)
            x.type("send_all again")
            x.expect(screen.CANNOT_STORE, timeout=15, count=2)
            x.type("send user2 peer to peer")
            y.expect(screen.chat("user1", "peer to peer"))
            assert server.popen.poll() is None, server.output
        finally:
            pg_server.start(port=pg_server.port)
        x.type("send_all the database is back")  # the first request after it
        y.expect(screen.channel_message("user1", "the database is back"))
        w.expect(screen.channel_message("user1", "the database is back"))
        assert server.popen.poll() is None
    finally:
        for proc in procs:
            proc.stop()
    assert "stopping" not in server.output and "Traceback" not in server.output
    assert "back to what it held last" in server.output
    assert not any("while the database is down" in line for line in y.lines())


def test_a_server_restarted_as_another_sweeps_it_keeps_the_client_that_came_back(
    tmp_path: Path, pg_url: str
) -> None:
    """A killed; B sweeps A's client z1 (A's heartbeat is made old in the database, as
    if the timeout had passed) and asks it to come; A is started again at once, and z1
    (given no other server) registers again at A. B's wait for z1 runs out: z1 stays
    online at A (B does not mark it offline), and a send_all reaches it live."""
    env = chatapp_env(tmp_path)
    a_port, b_port, z_port, y_port = free_udp_ports(4)
    a = serve(a_port, env, db=pg_url)
    procs = [a]
    try:
        b = serve(b_port, env, db=pg_url)
        procs.append(b)
        z = join("z1", a_port, z_port, env)  # no --server
        procs.append(z)
        z.expect(screen.TABLE_UPDATED)
        y = join("y1", b_port, y_port, env)
        procs.append(y)
        z.expect(screen.TABLE_UPDATED, count=2)
        a.kill()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE servers SET beat = now() - make_interval(secs => %s) WHERE id = %s",
                (HEARTBEAT_TIMEOUT + 1, server_id(a_port)),
            )
        swept = "marked offline 1 clients of servers whose heartbeat stopped"
        b.wait_for(lambda lines: any(swept in line for line in lines), 5, swept)
        a = serve(a_port, env, db=pg_url)
        procs.append(a)
        a.wait_for(lambda lines: any("registered z1" in line for line in lines), 5, "z1")
        time.sleep(3.0)  # B's wait for z1 (5 tries of 0.5 s) has run out
        with psycopg.connect(pg_url) as conn:
            row = conn.execute("SELECT presence, home FROM clients WHERE name = 'z1'").fetchone()
        assert row == ("online", server_id(a_port))
        y.type("send_all z1 is at A")
        z.expect(screen.channel_message("y1", "z1 is at A"), timeout=5)
    finally:
        for proc in procs:
            proc.stop()
    assert "did not come back" not in b.output
    for proc in procs:
        assert "Traceback" not in proc.output, proc.output
