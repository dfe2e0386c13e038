"""The channel fan-out benchmark: one ``send_all`` to N live clients and D dead ones.

The receivers are raw sockets in a worker process (``worker.py``), each a client
with a key of its own (derived from its name, so that the bench can bind it in a
prepared database): they register, ACK what they are sent, and record when.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import trio

from chatapp.protocol.changes import Change, ClientSaved, Presence
from chatapp.sqlite_store import SqliteStore
from chatapp.wire import Address, ChannelDelivery, encode

from .loadgen import HOST, SimClient, close_clients, open_clients, register_all, settle
from .procs import BenchError, Worker, chatapp_server
from .report import Figure, median
from .sizes import Sizes, scratch
from .worker import bench_identity

#: The ACK timeout of the servers the suite starts (they run with the default timers).
ACK_TIMEOUT = 0.5
TEXT = "hello nice to meet you."


def _prepare(path: Path, sender: SimClient, live: list[int], dead: list[int]) -> None:
    """A database in which the sender and the receivers are registered and online, as if
    a server had run: a server started on it asks each of them to register again."""
    assert sender.raw is not None
    records = [("sender", sender.port, sender.raw.identity.public)]
    records += [(f"live{i}", p, bench_identity(f"live{i}").public) for i, p in enumerate(live)]
    records += [(f"dead{i}", p, bench_identity(f"dead{i}").public) for i, p in enumerate(dead)]
    changes: list[Change] = [
        ClientSaved(name, HOST, port, key, f"s{index:07d}".encode(), Presence.ONLINE)
        for index, (name, port, key) in enumerate(records)
    ]
    store = SqliteStore(str(path))
    try:
        trio.run(store.commit, changes)
    finally:
        store.close()


def _poll(receivers: Worker, sender: SimClient, done: object, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        report = receivers.command('{"do": "report"}')
        if done(report) or time.monotonic() > deadline:  # type: ignore[operator]
            return report  # type: ignore[no-any-return]
        settle([sender], 0.01)  # the sender is a client too: it ACKs its tables meanwhile


def _wait_quiet(receivers: Worker, sender: SimClient, quiet: float = ACK_TIMEOUT + 0.1) -> int:
    """Until no table has reached a receiver for ``quiet`` s (longer than one retry interval),
    so that a trial starts with no table broadcast or retry in flight; returns the tables seen."""
    receivers.command('{"do": "reset"}')
    start = time.monotonic()
    deadline = start + 15.0
    while time.monotonic() < deadline:
        report = receivers.command('{"do": "report"}')
        if time.monotonic() - max(report["table_last"], start) >= quiet:
            return int(report["tables"])
        settle([sender], 0.05)
    raise BenchError("the server kept sending tables: some clients do not ACK them")


def _fanout_trial(
    receivers: Worker, sender: SimClient, target: Address, n: int, d: int, floor: bool
) -> tuple[float, float]:
    """Seconds from the post to the last live ACK or (with dead clients) the server's give-up,
    and to the last table part that reports the dead offline."""
    receivers.command('{"do": "reset"}')
    msg_id = sender.next_id()
    if floor:
        data = encode(ChannelDelivery(msg_id, sender.name, msg_id, TEXT, bytes(64), bytes(32)))
    else:
        assert sender.raw is not None
        data = sender.raw.post(TEXT, msg_id)
    start = time.monotonic()
    sender.sock.sendto(data, target)

    def done(report: dict[str, object]) -> bool:
        acks = report["acks"].get(msg_id)  # type: ignore[attr-defined]
        live_done = acks is not None and acks[0] >= n
        return live_done and (floor or d == 0 or report["table_first"] > start)  # type: ignore[operator]

    report = _poll(receivers, sender, done, 5.0)
    acks = report["acks"].get(msg_id)  # type: ignore[attr-defined]
    if acks is None or acks[0] < n or not done(report):
        got = 0 if acks is None else acks[0]
        raise BenchError(
            f"fan-out to {n} (+{d} dead{', floor' if floor else ''}) did not complete:"
            f" {got} ACKs, tables {report['tables']}"
        )
    end = acks[2]
    tables = end
    if d and not floor:
        end = max(end, report["table_first"])
        tables = max(end, report["table_last"])
    return end - start, tables - start


def _fanout_figure(
    n: int, d: int, results: list[tuple[float, float]], floor: float, false_offline: int
) -> Figure:
    if d:
        strict = (n, d) == (1000, 100)  # the bound; elsewhere "about one timeout"
        goal = "~1 timeout" + ("; < 0.7 s" if strict else "")
        limit = 0.7 if strict else ACK_TIMEOUT * 1.5
        return Figure(
            f"fanout_n{n}_d{d}",
            f"send_all -> done, N={n} D={d}",
            median([r[0] for r in results]),
            "s",
            floor + ACK_TIMEOUT,
            f"Trio fan-out + 1 ACK timeout, {ACK_TIMEOUT:g} s",
            "lower",
            goal=goal,
            goal_on="value",
            goal_limit=limit,
            extra={
                "trials": len(results),
                "table_settled_s": median([r[1] for r in results]),
                "ack_timeout_s": ACK_TIMEOUT,
            },
        )
    return Figure(
        f"fanout_n{n}_d0",
        f"send_all -> done, N={n} D=0",
        median([r[0] for r in results]),
        "s",
        floor,
        "Trio fan-out",
        "lower",
        goal="~N x 1 datagram",
        note="the server lost ACKs and marked live clients offline" if false_offline else "",
        extra={"trials": len(results), "tables_after": false_offline},
    )


def _floors(
    receivers: Worker, sender: SimClient, worker: Worker, ns: set[int], trials: int
) -> dict[int, float]:
    live = receivers.ready["live"]
    floors: dict[int, float] = {}
    for n in sorted(ns):
        worker.command(f'{{"targets": {live[:n]}}}')
        target = (HOST, worker.ready["port"])
        times = [_fanout_trial(receivers, sender, target, n, 0, True)[0] for _ in range(trials)]
        floors[n] = median(times)
    return floors


def _trials(
    receivers: Worker, sender: SimClient, db: Path, n: int, d: int, count: int
) -> tuple[list[tuple[float, float]], int]:
    """``count`` trials against one server started on ``db``; (their times, the tables
    seen after them: there should be none)."""
    results = []
    with chatapp_server(db=str(db)) as port:
        # The restarted server asks every client to register again, and sends the table
        # once they all have (or 2.5 s passed): the sender first, then the receivers.
        register_all([sender], (HOST, port))
        register = {"do": "register", "port": port, "live": n, "dead": d}
        answer = receivers.command(json.dumps(register))
        if "error" in answer:
            raise BenchError(f"the receivers did not register: {answer['error']}")
        _wait_quiet(receivers, sender)
        if d:
            receivers.command('{"do": "die"}')
        for _ in range(count):
            results.append(_fanout_trial(receivers, sender, (HOST, port), n, d, False))
        receivers.command('{"do": "revive"}')
        # With no dead clients, no table may follow: one would mean that the server missed
        # live ACKs and marked live clients offline.
        false_offline = _wait_quiet(receivers, sender) if not d and count > 3 else 0
    return results, false_offline


def bench_fanout(sizes: Sizes) -> list[Figure]:
    fanout, trials = sizes.fanout, sizes.fanout_trials
    max_n = max(n for n, _ in fanout)
    max_d = max(d for _, d in fanout)
    figures: list[Figure] = []
    with (
        Worker("receivers", live=max_n, dead=max_d) as receivers,
        scratch() as work,
        Worker("fanout") as floor_worker,
    ):
        live, dead = receivers.ready["live"], receivers.ready["dead"]
        [sender] = open_clients(1, "sender")
        assert sender.raw is not None
        sender.name = sender.raw.name = sender.raw.codec.name = "sender"
        try:
            floors = _floors(receivers, sender, floor_worker, {n for n, _ in fanout}, 3 * trials)
            for index, (n, d) in enumerate(fanout):
                results: list[tuple[float, float]] = []
                false_offline = 0
                # With dead clients, each trial has a server of its own: bringing a hundred
                # dead clients back would cost a hundred table broadcasts to everyone.
                for run in range(trials if d else 1):
                    db = work / f"fanout{index}-{run}.sqlite3"
                    _prepare(db, sender, live[:n], dead[:d])
                    got, tables = _trials(receivers, sender, db, n, d, 1 if d else 3 * trials)
                    results += got
                    false_offline = max(false_offline, tables)
                figures.append(_fanout_figure(n, d, results, floors[n], false_offline))
        finally:
            close_clients([sender])
    return figures
