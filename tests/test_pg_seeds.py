"""The seed's tests with the clients spread over two servers that share one PostgreSQL
database: real processes in real terminals, every screen line for line as the seed
shows it (the same checks as ``test_e2e``'s single-server runs), each played for
several placements of the clients (``"ABA"``: user1 at server A, user2 at B, user3
at A). Then issue 14's own check: Test 1 across the two servers, a ``send_all``
from one server's client reaching the other's, one server killed, and its clients
moving to the other and getting what was stored for them meanwhile."""

from __future__ import annotations

import time
from collections.abc import Collection

import pytest
from _harness import TEST_1_SCREENS, TEST_3_SCREENS, free_udp_ports, join_args, serve_args
from test_e2e import (
    INTERRUPTED,
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

from chatapp import screen
from chatapp.pg_store import HEARTBEAT_TIMEOUT
from chatapp.testing import line_matches

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

__all__ = ["env", "start"]  # the fixtures, used by name

NAMES = ("user1", "user2", "user3")


class Cluster:
    """Two servers, A and B, sharing one database, and the clients joined to them."""

    def __init__(self, start: Start, url: str, *b_options: str) -> None:
        self.start = start
        a_port, b_port = free_udp_ports(2)
        self.ports = {"A": a_port, "B": b_port}
        self.servers = {
            "A": self._serve(a_port, url),
            "B": self._serve(b_port, url, *b_options),
        }

    def _serve(self, port: int, url: str, *options: str) -> Terminal:
        server = self.start(*serve_args(port, *options, db=url))
        server.shows_pattern(r"listening on UDP 127\.0\.0\.1:\d+")
        return server

    def address(self, where: str) -> str:
        return f"127.0.0.1:{self.ports[where]}"

    def join(self, name: str, where: str, port: int, *, fallback: bool = False) -> Terminal:
        """``name`` joins server ``where`` (the seed's ``-c``); ``fallback``: given the
        other server too (``--server``)."""
        other = "B" if where == "A" else "A"
        options = ("--server", self.address(other)) if fallback else ()
        return self.start("-c", *join_args(name, self.ports[where], port, *options)[1:])

    def join_all(self, placement: str, *, fallback: Collection[str] = ()) -> list[Terminal]:
        """user1, user2, user3 join one after the other as the seed does, each at the
        server ``placement`` names (those named in ``fallback`` given the other server
        too); every table update shown as the seed shows it."""
        ports = free_udp_ports(len(placement))
        clients: list[Terminal] = []
        for name, where, port in zip(NAMES, placement, ports, strict=False):
            clients.append(self.join(name, where, port, fallback=name in fallback))
            for client in clients:
                client.shows(TABLE)
        return clients

    def stop(self) -> None:
        for server in self.servers.values():
            stop_server(server)


# --- the seed's Test 1 ---------------------------------------------------------------------


def play_seed_test_1(
    cluster: Cluster, placement: str, *, fallback: Collection[str] = ()
) -> list[Terminal]:
    """The seed's Test 1, up to its last table update (the Ctrl-Cs are the caller's)."""
    x, y, z = cluster.join_all(placement, fallback=fallback)
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
    for sender, text in ((y, "hello?"), (z, "are you still there?")):
        sender.type(f"send user1 {text}")
        sender.shows("[No ACK from user1, message sent to server.]")
        sender.shows("[Messages received by the server and saved.]")

    x.type("reg user1")
    x.shows("[You have message]")
    x.shows_pattern(r"\(\d+\.\d+\) user2 : hello\?\r\n")
    x.shows_pattern(r"\(\d+\.\d+\) user3 : are you still there\?\r\n")
    for client in (x, y, z):
        client.shows(TABLE)
    for name, client in zip(NAMES, (x, y, z), strict=True):
        client.drain()
        assert_screen_begins(client, TEST_1_SCREENS[name])
    return [x, y, z]


def assert_screen_begins(terminal: Terminal, expected: str) -> None:
    """The screen's first lines are ``expected``, line for line (more may follow)."""
    want = [line.rstrip() for line in expected.strip("\n").splitlines()]
    got = terminal.screen()[: len(want)]
    assert len(got) == len(want) and all(map(line_matches, want, got)), "\n".join(got)


@pytest.mark.parametrize("placement", ["ABA", "ABB"])
def test_seed_test_1_across_two_servers(start: Start, pg_url: str, placement: str) -> None:
    cluster = Cluster(start, pg_url)
    x, y, z = play_seed_test_1(cluster, placement)
    for client in (x, y, z):
        client.interrupt()
        client.shows(INTERRUPTED)
        assert client.exit_status() == 0
    cluster.stop()
    for name, client in zip(NAMES, (x, y, z), strict=True):
        assert_screen(client, TEST_1_SCREENS[name] + f">>> {INTERRUPTED}\n")
    assert_seed_lines(1, {"user1": x, "user2": y, "user3": z})
    assert_no_noise(*cluster.servers.values(), x, y, z)


# --- the seed's Test 2 ---------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["AB"])
def test_seed_test_2_across_two_servers(start: Start, pg_url: str, placement: str) -> None:
    """user1's server stops and user1 knows no other: it gives up as the seed shows."""
    cluster = Cluster(start, pg_url)
    x, y = cluster.join_all(placement)
    y.type("dereg user2")
    y.shows("[You are now offline. Bye.]")
    x.shows(TABLE)
    stop_server(cluster.servers[placement[0]])

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
    stop_server(cluster.servers[placement[1]])
    assert_no_noise(*cluster.servers.values(), x, y)


# --- the seed's Test 3 ---------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["ABA", "AAB"])
def test_seed_test_3_across_two_servers(start: Start, pg_url: str, placement: str) -> None:
    cluster = Cluster(start, pg_url, "--verbose")
    x, y, z = cluster.join_all(placement)
    x.type("send_all hello guys")
    x.shows("[Message received by the server.]")
    y.shows("Channel_Message user1 : hello guys")
    z.shows("Channel_Message user1 : hello guys")
    y.interrupt()
    y.shows(INTERRUPTED)
    assert y.exit_status() == 0

    x.type("send_all hi")
    x.shows("[Message received by the server.]")
    z.shows("Channel_Message user1 : hi")
    # user2's server waits 500 ms for its ACK and marks it offline; the other server
    # learns it and tells its own clients
    x.shows(TABLE)
    z.shows(TABLE)
    cluster.servers[placement[1]].shows_pattern(r"no ACK from user2.*marked offline")

    x.drain()
    z.drain()
    for name, client in (("user1", x), ("user2", y), ("user3", z)):
        assert_screen(client, TEST_3_SCREENS[name])
    assert_seed_lines(3, {"user1": x, "user2": y, "user3": z})
    for client in (x, z):
        client.interrupt()
        client.shows(INTERRUPTED)
        assert client.exit_status() == 0
    cluster.stop()
    assert_no_noise(*cluster.servers.values(), x, y, z)


# --- issue 14's check ----------------------------------------------------------------------


def test_test_1_across_servers_then_send_all_across_then_a_killed_servers_clients_move(
    start: Start, pg_url: str
) -> None:
    """Two servers on one database, clients at each: the seed's Test 1 line for line; a
    ``send_all`` from B's client reaching A's; A killed (SIGKILL); what is posted
    meanwhile is stored for A's clients, and delivered to them once they move to B:
    user1 (given B with ``--server``) because a request of its own went unanswered;
    user3 (idle, given no other server) because B, marking it offline after the
    heartbeat timeout, asked it to register again (a rekey signed with the key every
    server shares), and its own server did not answer the hello."""
    cluster = Cluster(start, pg_url)
    x, y, z = play_seed_test_1(cluster, "ABA", fallback={"user1", "user2"})

    y.type("send_all hello from server B")
    y.shows(screen.CHANNEL_ACKED)
    for client in (x, z):
        client.shows(screen.channel_message("user2", "hello from server B"))

    cluster.servers["A"].kill()
    killed = time.monotonic()
    y.type("send_all while A is down")
    y.shows(screen.CHANNEL_ACKED)  # B stores it for user1 and user3: A served them

    moved = screen.moving_server(cluster.address("A"), cluster.address("B"))
    x.type("send_all user1 moved")  # A does not answer: user1 moves to B
    x.shows(moved)
    x.shows(screen.YOU_HAVE_MESSAGE)  # B delivers what it stored as it registers user1
    x.shows_pattern(r"\(\d+\.\d+\) Channel_Message user2 : while A is down\r\n")
    x.shows(screen.CHANNEL_ACKED)  # then the post, sent again in the new session
    y.shows(screen.channel_message("user1", "user1 moved"))

    # idle: asked by B after the sweep; A does not answer its hello (5 tries of 0.5 s)
    z.child.expect_exact(moved + "\r\n", timeout=HEARTBEAT_TIMEOUT + 15)
    waited = time.monotonic() - killed
    assert HEARTBEAT_TIMEOUT + 1.5 <= waited <= HEARTBEAT_TIMEOUT + 8, waited
    swept = "marked offline 1 clients of servers whose heartbeat stopped"
    cluster.servers["B"].shows_pattern(swept)  # user1 had moved already: only user3
    z.shows(screen.YOU_HAVE_MESSAGE)
    z.shows_pattern(r"\(\d+\.\d+\) Channel_Message user2 : while A is down\r\n")
    z.shows_pattern(r"\(\d+\.\d+\) Channel_Message user1 : user1 moved\r\n")

    z.type("send_all user3 is back")  # at B now: it reaches everyone live
    z.shows(screen.CHANNEL_ACKED)
    for client in (x, y):
        client.shows(screen.channel_message("user3", "user3 is back"))
    x.type("send user3 still peer to peer")
    z.shows("user1 : still peer to peer")
    x.shows(screen.received_by("user3"))

    for client in (x, y, z):
        client.interrupt()
        client.shows(INTERRUPTED)
        assert client.exit_status() == 0
    stop_server(cluster.servers["B"])
    for client, once in ((x, "while A is down"), (z, "while A is down"), (z, "user1 moved")):
        assert sum(once in line for line in client.shown_lines()) == 1, client.shown_lines()
    assert_no_noise(cluster.servers["B"], x, y, z)
