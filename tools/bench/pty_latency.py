"""What a person waits for: from Enter on a typed ``send`` line to the ACK line on the
screen, through a real pseudo-terminal (``TERM=xterm-256color``, so chatapp runs its
full input line).

The baseline is the floor for a Python program on the same path: a minimal
thread-based prompt loop (``python -m chatapp_tools.bench.pty_latency floor``): ``input()``
in one thread, a receiving thread that prints the ACK line. Both send the same
direct message, boxed for the peer's key, to the same peer (a real chatapp client,
user2, fed from a pipe), which ACKs it (the floor joins the server as a client of
its own first, so that user2 has its key); the two take turns in blocks, so a
neighbour's burst on a shared machine lands on both alike.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from chatapp import screen
from chatapp.testing.raw import RawClient
from chatapp.wire import Chat, Table, TableDelta

from .loadgen import HOST
from .procs import (
    MAX_PROCESS_SECONDS,
    BenchError,
    chatapp_client,
    chatapp_server,
    free_port,
    wait_for_file_text,
)
from .report import Figure, median, percentile

TEXT = "hello nice to meet you."
ACK_LINE = screen.received_by("user2").encode()
#: Rounds alternate between the two programs in blocks of this many.
BLOCK = 20
#: Between rounds: the screen settles (chatapp draws its prompt again after the answer).
SETTLE = 0.03


class PtyProgram:
    """A program on the slave side of a fresh pty; the bench types on the master side."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.seen = bytearray()

    def read_until(self, marker: bytes, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.master], [], [], max(left, 0))
            if not ready:
                tail = bytes(self.seen[-300:])
                raise BenchError(f"{marker!r} did not appear within {timeout:g} s: {tail!r}")
            try:
                self.seen += os.read(self.master, 65536)
            except OSError:  # the program has exited
                raise BenchError(f"the program exited before {marker!r} appeared") from None

    def drain(self) -> None:
        while select.select([self.master], [], [], 0)[0]:
            try:
                if not os.read(self.master, 65536):
                    return
            except OSError:
                return
        self.seen.clear()

    def round(self, index: int) -> float:
        """Type a send line, then time Enter -> the ACK line on the screen."""
        self.drain()
        typed = f"send user2 {TEXT} {index}".encode()
        os.write(self.master, typed)
        self.read_until(typed)  # echoed: the line is typed, as by a person
        self.seen.clear()
        start = time.perf_counter()
        os.write(self.master, b"\r")
        self.read_until(ACK_LINE)
        elapsed = time.perf_counter() - start
        time.sleep(SETTLE)
        return elapsed

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.master, b"\x04")  # Ctrl-D: both leave on it
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self.master)


@contextlib.contextmanager
def _programs(server_port: int, peer_port: int) -> Iterator[tuple[PtyProgram, PtyProgram]]:
    with tempfile.TemporaryDirectory(prefix="chatapp-bench-pty-") as home:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHATAPP_")}
        env.update(TERM="xterm-256color", XDG_STATE_HOME=str(Path(home) / "state"))
        env["XDG_DATA_HOME"] = str(Path(home) / "data")
        programs: list[PtyProgram] = []
        try:
            join = ["join", "user1", HOST, str(server_port), str(free_port()), "--host", HOST]
            chatapp = PtyProgram([sys.executable, "-m", "chatapp", *join], env)
            programs.append(chatapp)
            chatapp.read_until(screen.TABLE_UPDATED.encode())
            floor = PtyProgram(
                [
                    sys.executable,
                    "-m",
                    "chatapp_tools.bench.pty_latency",
                    "floor",
                    str(peer_port),
                    str(server_port),
                ],
                env,
            )
            programs.append(floor)
            floor.read_until(screen.PROMPT.encode())
            yield chatapp, floor
        finally:
            for program in programs:
                program.close()


def bench_pty_latency(rounds: int) -> list[Figure]:
    peer_port = free_port()
    with (
        chatapp_server() as server_port,
        chatapp_client("user2", server_port, peer_port) as (_, screen_file),
    ):
        wait_for_file_text(screen_file, screen.TABLE_UPDATED)
        with _programs(server_port, peer_port) as (chatapp, floor):
            for index in range(max(3, rounds // 10)):  # warm up both
                chatapp.round(index)
                floor.round(index)
            ours: list[float] = []
            theirs: list[float] = []
            while len(ours) < rounds:
                block = range(len(ours), min(rounds, len(ours) + BLOCK))
                ours += [chatapp.round(index) for index in block]
                theirs += [floor.round(index) for index in block]
    label = "typed send -> ACK line, through a pty"
    baseline = "thread + input() prompt loop, same pty path"
    return [
        Figure(
            "pty_median",
            f"{label}, median",
            median(ours),
            "s",
            median(theirs),
            baseline,
            "lower",
            goal="<= 1.2x",
            goal_on="ratio",
            goal_limit=1.2,
            extra={"rounds": rounds},
        ),
        Figure(
            "pty_p90",
            f"{label}, p90",
            percentile(ours, 90),
            "s",
            percentile(theirs, 90),
            baseline,
            "lower",
            extra={"rounds": rounds},
        ),
    ]


# --- the floor: a minimal thread-based prompt loop ----------------------------------------


def _join(sock: socket.socket, server: tuple[str, int], me: RawClient) -> None:
    """The handshake, from a plain socket: a hello (again each half second) until the
    session is made."""
    sock.settimeout(0.5)
    deadline = time.monotonic() + 10
    while not me.registered and time.monotonic() < deadline:
        sock.sendto(me.hello(), server)
        with contextlib.suppress(TimeoutError):
            while not me.registered:
                reply = me.answer(sock.recv(65536))
                if reply is not None:
                    sock.sendto(reply, server)
    sock.settimeout(None)
    if not me.registered:
        raise SystemExit("the floor could not join")


def floor(peer_port: int, server_port: int) -> None:
    """Join as ``floor`` (a client of its own, from a plain socket), then read a line and
    send it to the peer as a direct message, boxed for the peer's key as chatapp's are;
    a thread ACKs the server's tables and prints the ACK line when the peer answers.
    Leaves at end of input or after the bench's time limit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    me = RawClient("floor", sock.getsockname()[1])
    server, peer = (HOST, server_port), (HOST, peer_port)
    _join(sock, server, me)
    acked = f"{screen.PROMPT}{screen.received_by('user2')}"
    tags: dict[str, bytes] = {}

    def receive() -> None:
        while True:
            data, addr = sock.recvfrom(65536)
            if addr == peer:
                print(acked, flush=True)
                continue
            message = me.open(data)  # a table teaches it the peers' keys
            if isinstance(message, Table | TableDelta):
                tags.update((entry.name, entry.tag) for entry in message.entries)
                sock.sendto(me.table_ack(message), server)

    threading.Thread(target=receive, daemon=True).start()
    threading.Timer(MAX_PROCESS_SECONDS, os._exit, (0,)).start()
    while True:
        try:
            line = input(screen.PROMPT)
        except EOFError:
            os._exit(0)
        text = line.partition(" ")[2].partition(" ")[2]
        key, tag = me.keys.get("user2"), tags.get("user2")
        if key is not None and tag is not None:
            sock.sendto(me.codec.to_peer(key, Chat(me.new_id(), text, tag)), peer)


if __name__ == "__main__":
    if sys.argv[1:2] == ["floor"]:
        floor(int(sys.argv[2]), int(sys.argv[3]))
