"""The flood benchmark: three real clients chat while one address floods the server.

Three ``chatapp join`` processes take turns at ``send_all`` and direct ``send``, each
waiting for its answer before its next line, against a real ``chatapp serve`` (SQLite).
First they chat undisturbed (the baseline); then a worker process sends (a) junk
datagrams and (b) registrations with distinct names, from one socket each, as fast as it
can. Reported for each flood: the messages lost (a sender was told the message was
received or delivered, and a recipient never showed it; goal 0), the longest stall a
client saw (typing a line to its answer; goal under 1 s) against the longest without a
flood, and the server's resident memory against its memory before the flood.

Bounded: a flood stops at its count or after ``FLOOD_SECONDS``; every process is ended
by its pid. Loopback only.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatapp import screen

from .loadgen import HOST
from .procs import BenchError, Worker, free_port, stop, wait_for_server
from .report import Figure

#: The longest a flood may last, whatever its count.
FLOOD_SECONDS = 60.0
#: Chatting alone before the floods (the baseline's stalls).
QUIET_SECONDS = 3.0
#: After a flood, for stored messages to be delivered before the count.
SETTLE_SECONDS = 3.0
#: The longest a client waits for an answer before it counts the line as unanswered.
ANSWER_TIMEOUT = 8.0
NAMES = ("user1", "user2", "user3")
_PROMPT = re.compile(r"^(>>> )+")
_STORED = re.compile(r"^\([0-9.e+-]+\) ")


@dataclass
class _Client:
    """A real ``chatapp join`` process, its lines read with the moment each arrived."""

    name: str
    proc: subprocess.Popen[bytes]
    lines: list[tuple[float, str]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = _PROMPT.sub("", raw.decode("utf-8", "replace").rstrip("\n"))
            with self.changed:
                if line.strip():
                    self.lines.append((time.monotonic(), line))
                self.changed.notify_all()

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def mark(self) -> int:
        """Where the lines shown from now on will start."""
        with self.changed:
            return len(self.lines)

    def wait(
        self, predicate: Any, timeout: float, start: int | None = None
    ) -> tuple[float, str] | None:
        """The first line from ``start`` (default: now) on that ``predicate`` takes, or None
        after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self.changed:
            start = len(self.lines) if start is None else start
            while True:
                for when, line in self.lines[start:]:
                    if predicate(line):
                        return when, line
                start = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.changed.wait(left)

    def shown(self) -> list[str]:
        with self.changed:
            return [_STORED.sub("", line) for _, line in self.lines]


@dataclass
class _Tally:
    """What the chat went through in one phase."""

    stalls: list[float] = field(default_factory=list)
    slowest: str = ""  # the line that waited longest for its answer, and the answer
    confirmed: list[tuple[str, str, tuple[str, ...]]] = field(default_factory=list)
    unanswered: int = 0

    @property
    def longest(self) -> float:
        return max(self.stalls, default=0.0)


def _confirmations(to: str | None) -> tuple[str, ...]:
    """The lines that tell a sender its message was received (by the server or the peer)."""
    if to is None:
        return (screen.CHANNEL_ACKED,)
    return (screen.received_by(to), screen.SAVED_BY_SERVER)


def _is_answer(to: str | None) -> Any:
    """The lines that answer a ``send_all`` (``to`` None) or a ``send``: a confirmation,
    or a line that says it failed."""
    ends = (*_confirmations(to), screen.SERVER_NOT_RESPONDING_CHANNEL, screen.SEND_FAILED)
    return lambda line: line in ends or line.startswith("[The server")


def _chat(clients: list[_Client], until: threading.Event, tally: _Tally, tag: str) -> None:
    """Each client, in a thread of its own: a ``send_all``, then a ``send`` to the next
    one, each answered before the next, until ``until`` is set."""

    def one(index: int) -> None:
        me, peer = clients[index], clients[(index + 1) % len(clients)]
        others = tuple(c.name for c in clients if c is not me)
        n = 0
        while not until.is_set():
            n += 1
            to = None if n % 2 else peer.name
            text = f"{tag}-{me.name}-{n}"
            mark, started = me.mark(), time.monotonic()
            try:
                me.type(f"send_all {text}" if to is None else f"send {to} {text}")
            except OSError:  # the client exited (it gave up on the server)
                tally.unanswered += 1
                return
            answer = me.wait(_is_answer(to), ANSWER_TIMEOUT, mark)
            # A line unanswered, or answered with a failure, stalled its sender too.
            when, line = answer or (time.monotonic(), "(no answer)")
            if when - started > tally.longest:
                tally.slowest = f"{me.name}: {text} -> {line}"
            tally.stalls.append(when - started)
            if line not in _confirmations(to):
                tally.unanswered += 1
                continue
            recipients = others if to is None else (to,)
            tally.confirmed.append((me.name, text, recipients))
            time.sleep(0.05)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(ANSWER_TIMEOUT + 30)


def _lost(clients: list[_Client], tally: _Tally) -> tuple[int, int]:
    """(messages confirmed to their sender that a recipient never showed, messages shown
    twice)."""
    shown = {client.name: client.shown() for client in clients}
    lost = twice = 0
    for sender, text, recipients in tally.confirmed:
        for recipient in recipients:
            lines = shown[recipient]
            count = lines.count(f"{sender} : {text}") + lines.count(
                f"Channel_Message {sender} : {text}"
            )
            lost += count == 0
            twice += count > 1
    return lost, twice


def _socket_drops(port: int) -> int | None:
    """Datagrams the kernel dropped at the UDP socket bound to ``port`` (its buffer was
    full), from /proc/net/udp; None where that is missing."""
    suffix = f":{port:04X}"
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/net/udp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(suffix):
                return int(fields[-1])
    return None


def _rss_kib(server: subprocess.Popen[bytes]) -> tuple[int, int] | None:
    """(resident memory now, its peak) of the server, in KiB; None if it is no longer
    running (or /proc is missing)."""
    if server.poll() is not None:
        return None
    found = {"VmRSS": 0, "VmHWM": 0}
    try:
        with open(f"/proc/{server.pid}/status", encoding="ascii") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in found:
                    found[key] = int(value.split()[0])
    except OSError:
        return None
    return found["VmRSS"], found["VmHWM"]


@contextlib.contextmanager
def _server_and_clients(
    scratch: Path,
) -> Iterator[tuple[int, subprocess.Popen[bytes], list[_Client], Path]]:
    port = free_port()
    log = scratch / "server.log"
    # The clients' keys, pins and delivery marks in the scratch directory, never the
    # user's own state directory.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_STATE_HOME": str(scratch / "state")}
    env.pop("CHATAPP_TRACE", None)
    command = [sys.executable, "-m", "chatapp", "serve", str(port), "--host", HOST]
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [*command, "--db", str(scratch / "server.sqlite3")],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    clients: list[_Client] = []
    try:
        wait_for_server(port)
        for name in NAMES:
            proc = subprocess.Popen(
                [sys.executable, "-m", "chatapp", "join", name, HOST, str(port), str(free_port())],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
            )
            client = _Client(name, proc)
            threading.Thread(target=client.read, daemon=True).start()
            clients.append(client)
            if client.wait(lambda line: line == screen.TABLE_UPDATED, 15) is None:
                raise BenchError(f"{name} did not join")
        time.sleep(0.5)  # the last table reaches everyone
        yield port, server, clients, log
    finally:
        for client in clients:
            stop(client.proc)
        stop(server)


def _phase(
    clients: list[_Client], tag: str, flood: dict[str, Any] | None, port: int, quiet: float
) -> tuple[_Tally, dict[str, Any]]:
    """Chat while the flood runs (or for ``quiet`` seconds); what the chat saw, and what
    the flood worker reports (with the datagrams the kernel dropped at the server)."""
    drops = _socket_drops(port)
    tally = _Tally()
    until = threading.Event()
    chat = threading.Thread(target=_chat, args=(clients, until, tally, tag), daemon=True)
    chat.start()
    report: dict[str, Any] = {}
    if flood is None:
        time.sleep(quiet)
    else:
        time.sleep(0.5)  # the chat is going
        with Worker("flood", max_seconds=FLOOD_SECONDS + 10) as flooder:
            report = flooder.command(
                f'{{"port": {port}, "kind": "{flood["kind"]}", "count": {flood["count"]},'
                f' "seconds": {FLOOD_SECONDS}}}'
            )
        time.sleep(1.0)  # the chat goes on past the flood's end
    until.set()
    chat.join(ANSWER_TIMEOUT + 35)
    after = _socket_drops(port)
    if drops is not None and after is not None:
        report["kernel_drops_at_server"] = after - drops
    return tally, report


def _handshakes(report: dict[str, Any]) -> dict[str, Any]:
    """A registration flood's handshakes: hellos sent, registers sent for the challenges
    that came back, registrations the server answered."""
    return {key: report[key] for key in ("hellos", "registers", "registered") if key in report}


def _figures(
    kind: str,
    label: str,
    measured: tuple[_Tally, _Tally, dict[str, Any]],
    rss: tuple[tuple[int, int] | None, int],
    lost: tuple[int, int],
) -> list[Figure]:
    """``measured``: the flood's tally, the quiet one, the flood worker's report; ``rss``:
    the server's memory after the flood and its peak (None: the server is gone), and its
    memory before the floods (KiB)."""
    tally, quiet, report = measured
    extra = {
        "datagrams_sent": report.get("sent"),
        "flood_seconds": report.get("seconds"),
        "messages_confirmed": len(tally.confirmed),
        "unanswered": tally.unanswered,
        "shown_twice": lost[1],
        "kernel_drops_at_server": report.get("kernel_drops_at_server"),
        **_handshakes(report),
    }
    return [
        Figure(
            f"flood_{kind}_lost",
            f"{label}: messages lost",
            lost[0],
            "messages",
            max(len(tally.confirmed), 1),
            "messages confirmed to their senders",
            "lower",
            goal="0",
            goal_on="value",
            goal_limit=0,
            extra=extra,
        ),
        Figure(
            f"flood_{kind}_stall",
            f"{label}: longest stall of a client",
            tally.longest,
            "s",
            quiet.longest,
            "longest stall without a flood",
            "lower",
            goal="< 1 s",
            goal_on="value",
            goal_limit=1.0,
            extra={"answers": len(tally.stalls), "slowest": tally.slowest},
        ),
        Figure(
            f"flood_{kind}_rss",
            f"{label}: server memory (RSS)",
            None if rss[0] is None else rss[0][0] / 1024,
            "MiB",
            rss[1] / 1024,
            "server RSS before the floods",
            "lower",
            note="" if rss[0] is not None else "the server was no longer running",
            extra={"peak_mib": None if rss[0] is None else rss[0][1] / 1024},
        ),
    ]


def bench_flood(
    junk: int, registrations: int, scratch: Path, *, short: bool = False
) -> list[Figure]:
    """The figures of both floods; ``short``: less time around them (a smoke test)."""
    figures: list[Figure] = []
    settle = 1.5 if short else SETTLE_SECONDS
    with _server_and_clients(scratch) as (port, server, clients, log):
        quiet, _ = _phase(clients, "quiet", None, port, 1.0 if short else QUIET_SECONDS)
        before = (_rss_kib(server) or (0, 0))[0]
        for kind, label, count in (
            ("junk", f"{junk:,} junk datagrams from one address", junk),
            ("registrations", f"{registrations:,} registrations from one address", registrations),
        ):
            tally, report = _phase(clients, kind, {"kind": kind, "count": count}, port, 0)
            time.sleep(settle)
            rss = _rss_kib(server)
            lost = _lost(clients, tally)
            figures += _figures(kind, label, (tally, quiet, report), (rss, before), lost)
    dropped = re.findall(rb"(\d+) since start", log.read_bytes())
    if dropped:
        figures[-1].extra["dropped_by_admission_in_all"] = int(dropped[-1])
    return figures


__all__ = ["bench_flood"]
