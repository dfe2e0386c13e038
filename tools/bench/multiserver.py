"""Three servers sharing one PostgreSQL database against one server on its own, the same
load spread over them: registrations, ``send_all`` to done, and saves for a client of
another server.

Both setups run on the same throwaway cluster (PostgreSQL's durable settings), each
on a database of its own, every server a real ``chatapp serve`` process. The simulated
clients are spread round-robin over the servers; the one-server setup has them all.
On two cores the three servers share the machine with the load, so the figures show
what sharing costs (every server applies every other server's changes), not what
three machines would gain.
"""

from __future__ import annotations

import contextlib
import selectors
import threading
import time
from collections.abc import Iterator
from typing import Any

from chatapp.protocol.mailbox import MAX_MAILBOX_LIMIT
from chatapp.testing.postgres import DURABLE_SETTINGS, ServerBinariesMissing, throwaway_server
from chatapp.wire import ChannelPost, Deregister, SaveMessage, encode

from .loadgen import (
    HOST,
    SimClient,
    ack_for,
    close_clients,
    decode_head,
    open_clients,
    register_all,
    run_closed_loop,
    settle,
)
from .procs import BenchError, chatapp_servers
from .report import Figure, median, unavailable

TEXT = "hello nice to meet you."
SERVERS = 3
#: Clients that send saves, in both setups (all at the first server).
SAVERS = 16


class _Setup:
    """Servers on one database, and the simulated clients spread over them."""

    def __init__(self, ports: list[int], clients: int, stack: contextlib.ExitStack) -> None:
        self.ports = ports
        self.clients = open_clients(clients, f"s{len(ports)}-")
        stack.callback(close_clients, self.clients)

    def at(self, index: int) -> list[SimClient]:
        """The clients of server ``index``."""
        return self.clients[index :: len(self.ports)]

    def register(self) -> float:
        """Every client registers, each at its server, all servers at once: the seconds
        until the last one was answered."""
        errors: list[BaseException] = []

        def register_at(index: int) -> None:
            try:
                register_all(self.at(index), (HOST, self.ports[index]), timeout=60.0)
            except BaseException as exc:  # reported below, in the bench's thread
                errors.append(exc)

        threads = [threading.Thread(target=register_at, args=(i,)) for i in range(len(self.ports))]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - start
        if errors:
            raise BenchError(f"registration failed: {errors[0]}")
        settle(self.clients, 1.0)  # every table update ACKed, every server quiet
        return elapsed

    def send_all(self, timeout: float = 10.0) -> float:
        """The first client posts ``send_all``: seconds until every other client has it."""
        poster, receivers = self.clients[0], self.clients[1:]
        msg_id = poster.next_id()
        waiting = {client.name for client in receivers}
        selector = selectors.DefaultSelector()
        for client in self.clients:
            selector.register(client.sock, selectors.EVENT_READ, client)
        try:
            start = time.monotonic()
            post = ChannelPost(msg_id, poster.name, TEXT, poster.token)
            poster.sock.sendto(encode(post), (HOST, self.ports[0]))
            while waiting:
                if time.monotonic() - start > timeout:
                    raise BenchError(f"send_all reached {len(receivers) - len(waiting)} clients")
                for key, _ in selector.select(0.05):
                    if _read_all(key.data, msg_id):
                        waiting.discard(key.data.name)
            return time.monotonic() - start
        finally:
            selector.close()

    def saves(self, seconds: float, sink_server: int) -> float:
        """Saves per second from the first server's clients for ``sink``, an offline client
        of server ``sink_server``."""
        [sink] = open_clients(1, f"sink{len(self.ports)}-")
        try:
            sink_at = (HOST, self.ports[sink_server])
            register_all([sink], sink_at)
            dereg = encode(Deregister(sink.next_id(), sink.name, sink.token))
            run_closed_loop([sink], sink_at, lambda c, i: dereg, window=1, duration=5.0,
                            repeat=False)  # fmt: skip
            savers = self.at(0)[:SAVERS]

            def save(client: SimClient, msg_id: str) -> bytes:
                return encode(SaveMessage(msg_id, client.name, sink.name, TEXT, client.token))

            result = run_closed_loop(savers, (HOST, self.ports[0]), save, window=4,
                                     duration=seconds, warmup=0.1)  # fmt: skip
            if result.refused:
                raise BenchError(f"{result.refused} saves refused")
            settle(self.clients, 0.5)
            return result.rate
        finally:
            close_clients([sink])


def _read_all(client: SimClient, msg_id: str) -> bool:
    """Read and ACK what waits on ``client``'s socket; True if the post ``msg_id`` came."""
    got = False
    while True:
        try:
            data, addr = client.sock.recvfrom(65536)
        except BlockingIOError:
            return got
        try:
            head = decode_head(data)
        except ValueError:
            continue
        ack = ack_for(head)
        if ack is not None:
            client.sock.sendto(ack, addr)
        got = got or (head.t == "channel" and head.id == msg_id)


@contextlib.contextmanager
def _servers(url: str, count: int) -> Iterator[list[int]]:
    options: dict[str, Any] = {"db": url, "mailbox_limit": MAX_MAILBOX_LIMIT, "unlimited": True}
    with chatapp_servers(*([options] * count)) as started:
        yield [port for port, _ in started]


_FIGURES = {
    "servers_registrations": ("3 servers: registrations per second", "/s", "higher"),
    "servers_send_all": ("3 servers: send_all -> every other client has it", "s", "lower"),
    "servers_saves": ("3 servers: saves for a client of another server", "/s", "higher"),
}


def bench_servers(clients: int, trials: int, seconds: float) -> list[Figure]:
    try:
        with throwaway_server(settings=DURABLE_SETTINGS) as cluster:
            measured = {
                count: _measure(cluster.create_database(f"servers{count}"), count, clients,
                                trials, seconds)
                for count in (SERVERS, 1)
            }  # fmt: skip
    except ServerBinariesMissing as missing:
        return [
            unavailable(key, label, unit, "1 server, the same load", f"no PostgreSQL: {missing}")
            for key, (label, unit, _) in _FIGURES.items()
        ]
    figures = []
    extra = {"clients": clients, "trials": trials, "savers": SAVERS}
    for key, (label, unit, better) in _FIGURES.items():
        figures.append(
            Figure(key, f"{label}, {clients} clients", measured[SERVERS][key], unit,
                   measured[1][key], "1 server, the same load", better,  # type: ignore[arg-type]
                   extra=extra)
        )  # fmt: skip
    return figures


def _measure(url: str, count: int, clients: int, trials: int, seconds: float) -> dict[str, float]:
    with contextlib.ExitStack() as stack:
        ports = stack.enter_context(_servers(url, count))
        setup = _Setup(ports, clients, stack)
        registration = setup.register()
        send_all = median([setup.send_all() for _ in range(trials)])
        saves = setup.saves(seconds, sink_server=1 % count)
        return {
            "servers_registrations": clients / registration,
            "servers_send_all": send_all,
            "servers_saves": saves,
        }


__all__ = ["bench_servers"]
