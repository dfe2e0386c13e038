"""Real processes on a lossy path: a server and three ``chatapp join`` clients whose every
datagram (client to server, server to client, and peer to peer) crosses a UDP relay in
this test that drops about 10% of them.

The relay gives each real node an alias address (its own socket on 127.0.0.1) and
forwards a datagram sent to the alias of B, from A, on to B from the alias of A;
so each node sees only aliases, replies go back through the relay, and nothing
in chatapp knows it is there (the clients are pointed at the server's alias, and
the server hands out the aliases it sees in its table). Which datagrams are lost
comes from a seeded RNG, with two bounds that keep the test's outcome fixed:
the same datagram (same bytes, same way) is lost at most twice, so a request
tried 5 times always gets through and is answered (no client may give up while
the server is up), and never more than 20 datagrams pass in a row (some loss
always happens). A registration takes several datagrams (the handshake's steps), and
on a loaded machine answers also come late, so that bound alone does not keep every
request answered within 5 tries: every node is given ``TRIES`` tries instead, which
makes a request lost (or late) on every try too rare to happen.
A message whose direct datagram or ACK is lost takes the
protocol's longer ways (the server delivers it, or stores it until the
recipient is heard from again), which is what this test is for.
"""

from __future__ import annotations

import contextlib
import random
import selectors
import socket
import threading
import time
from collections import Counter
from pathlib import Path

from _harness import Proc, chatapp_env, free_udp_ports, join, serve, shown_messages

from chatapp import screen

Addr = tuple[str, int]
LOSS = 0.10
TRIES = "10"


class LossyRelay:
    """Forwards datagrams between real addresses through per-node alias sockets."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)
        self._selector = selectors.DefaultSelector()
        self._alias_of: dict[Addr, socket.socket] = {}
        self._real_of: dict[socket.socket, Addr] = {}
        self._losses: Counter[tuple[Addr, Addr, bytes]] = Counter()
        self._passed_in_a_row = 0
        self.forwarded = 0
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def alias(self, real: Addr) -> Addr:
        """The address that stands for ``real`` (made on first use)."""
        with self._lock:
            sock = self._alias_of.get(real)
            if sock is None:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind(("127.0.0.1", 0))
                sock.setblocking(False)
                self._alias_of[real] = sock
                self._real_of[sock] = real
                self._selector.register(sock, selectors.EVENT_READ)
            host, port = sock.getsockname()
            return (host, port)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self._real_of:
            sock.close()
        self._selector.close()

    def _lose(self, source: Addr, destination: Addr, data: bytes) -> bool:
        key = (source, destination, data)
        lose = self._random.random() < LOSS and self._losses[key] < 2
        if not lose and self._passed_in_a_row >= 20 and self._losses[key] < 2:
            lose = True
        if lose:
            self._losses[key] += 1
            self._passed_in_a_row = 0
        else:
            self._passed_in_a_row += 1
        return lose

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.05):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                while True:
                    try:
                        data, source = sock.recvfrom(65536)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    destination = self._real_of[sock]
                    if self._lose(source, destination, data):
                        self.dropped += 1
                        continue
                    self.forwarded += 1
                    self.alias(source)
                    # a destination that is gone loses it, as on a real network
                    with contextlib.suppress(OSError):
                        self._alias_of[source].sendto(data, destination)


def test_every_message_is_shown_exactly_once_across_a_lossy_relay(tmp_path: Path) -> None:
    env = chatapp_env(tmp_path)
    relay = LossyRelay(seed=10)
    names = ("user1", "user2", "user3")
    server_port, *client_ports = free_udp_ports(1 + len(names))
    server_alias = relay.alias(("127.0.0.1", server_port))
    ports = dict(zip(names, client_ports, strict=True))
    for port in ports.values():
        relay.alias(("127.0.0.1", port))
    relay.start()

    server = serve(server_port, env, "--tries", TRIES)
    procs = [server]
    clients: dict[str, Proc] = {}
    try:
        for count, name in enumerate(names, 1):
            clients[name] = join(name, server_alias[1], ports[name], env, "--tries", TRIES)
            procs.append(clients[name])
            for position, joined in enumerate(names[:count], 1):
                # every one so far has a table from each join since its own
                tables = count - position + 1
                clients[joined].wait_for(
                    lambda lines, tables=tables: lines.count(screen.TABLE_UPDATED) >= tables,
                    15,
                    f"{joined}'s table with {count} clients",
                )

        expected: dict[str, list[str]] = {name: [] for name in names}  # texts to be shown

        def send(sender: str, to: str) -> None:
            text = f"{sender}-to-{to}"
            proc = clients[sender]
            told = (screen.received_by(to), screen.SAVED_BY_SERVER, screen.STILL_JOINING)
            while True:
                before = Counter(line for line in proc.lines() if line in told)
                proc.type(f"send {to} {text}")
                proc.wait_for(
                    lambda lines, before=before: Counter(x for x in lines if x in told) != before,
                    15,
                    f"{sender} told that {text} arrived",
                )
                after = Counter(line for line in proc.lines() if line in told)
                if after[screen.STILL_JOINING] == before[screen.STILL_JOINING]:
                    break
                time.sleep(0.2)  # typed while reg was still unanswered: nothing sent; again
            expected[to].append(text)

        def send_all(sender: str, text: str) -> None:
            proc = clients[sender]
            before = proc.lines().count(screen.CHANNEL_ACKED)
            proc.type(f"send_all {text}")
            proc.expect(screen.CHANNEL_ACKED, count=before + 1, timeout=15)
            for name in names:
                if name != sender:
                    expected[name].append(text)

        for sender in names:
            for to in names:
                if to != sender:
                    send(sender, to)
        for sender in names:
            send_all(sender, f"hello from {sender}")

        clients["user1"].type("dereg user1")
        clients["user1"].expect(screen.YOU_ARE_OFFLINE, timeout=15)
        send("user2", "user1")  # kept by the server: user1 is offline
        send_all("user3", "while user1 was away")
        clients["user1"].type("reg user1")
        send("user1", "user1")  # also brings user1 back if the server lost sight of it

        for name, texts in expected.items():
            clients[name].wait_for(
                lambda lines, texts=texts: all(_shown(lines).count(t) >= 1 for t in texts),
                30,
                f"{name} shows {texts}",
            )
        time.sleep(1.5)  # time for a duplicate to show, if one were going to
        for name, texts in expected.items():
            shown = Counter(_shown(clients[name].lines()))
            assert shown == Counter(texts), f"{name}: shown {shown}, expected {texts}"
        for name, proc in clients.items():
            assert proc.popen.poll() is None, f"{name} gave up: {proc.output}"
            assert screen.SEND_FAILED not in proc.lines()
            assert screen.SERVER_NOT_RESPONDING not in proc.lines()
    finally:
        statuses = [proc.stop() for proc in procs]
        relay.close()
    assert statuses == [0, 0, 0, 0]
    for proc in procs:
        assert "Traceback" not in proc.output, proc.output
    total = relay.forwarded + relay.dropped
    assert relay.dropped >= total // 21 > 0, (relay.dropped, total)


def _shown(lines: list[str]) -> list[str]:
    """The text of every message line, live or stored."""
    return [text for _, text in shown_messages(lines)]
