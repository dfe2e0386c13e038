"""Processes the benchmarks start: baselines in bare Trio, and lightweight simulated clients.

``python -m chatapp_tools.bench.worker MODE`` reads one JSON line of settings, answers
one JSON line when ready, then answers each command line with one JSON line.
It exits at end of input or after ``max_seconds``, whichever comes first.

Modes:

* ``echo``: a bare Trio UDP echo server (the floor for a server on this runtime);
  with ``reply_size`` it answers every datagram with that many bytes instead.
* ``fanout``: a bare Trio fan-out: every datagram from a non-target is sent on
  to every target (the floor for a channel broadcast).
* ``flood``: on each command, sends a flood (junk, or registrations with new names) to
  a server from one socket as fast as it goes, and says how many and how long.
* ``receivers``: many raw sockets that act as clients: they ACK whatever the
  server sends (tables, mailbox batches, channel messages) and record when.
  The ``dead`` ones do too until told to ``die``; then they answer nothing
  (a crashed client) until told to ``revive``.
"""

from __future__ import annotations

import json
import os
import resource
import selectors
import socket
import sys
import time
from typing import Any

import msgspec
import trio

from chatapp.net import RECEIVE_SOCKET_BUFFER
from chatapp.wire import Ack, Lookup, Register, encode

from .loadgen import HOST, ack_for, decode_head


def _answer(data: object) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


# --- bare Trio workers -------------------------------------------------------------


async def _until_end_of_input(max_seconds: float, commands: Any = None) -> None:
    """Answer command lines until end of input or the time limit."""
    with trio.move_on_after(max_seconds):
        while True:
            line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
            if not line:
                return
            _answer(commands(json.loads(line)) if commands else {"ok": True})


# The baselines ask for the socket buffer a chatapp node asks for (RECEIVE_SOCKET_BUFFER).


async def _echo(settings: dict[str, Any]) -> None:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, RECEIVE_SOCKET_BUFFER)
    await sock.bind((HOST, 0))
    reply_size = settings.get("reply_size")
    reply = b"x" * int(reply_size) if reply_size else None

    async def serve() -> None:
        while True:
            data, addr = await sock.recvfrom(65536)
            await sock.sendto(reply if reply is not None else data, addr)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        _answer({"port": sock.getsockname()[1]})
        await _until_end_of_input(settings["max_seconds"])
        nursery.cancel_scope.cancel()


async def _fanout(settings: dict[str, Any]) -> None:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, RECEIVE_SOCKET_BUFFER)
    await sock.bind((HOST, 0))
    targets: list[tuple[str, int]] = []
    target_set: set[tuple[str, int]] = set()

    def commands(command: dict[str, Any]) -> dict[str, Any]:
        nonlocal targets, target_set
        targets = [(HOST, int(port)) for port in command["targets"]]
        target_set = set(targets)
        return {"targets": len(targets)}

    async def serve() -> None:
        while True:
            data, addr = await sock.recvfrom(65536)
            if (addr[0], addr[1]) in target_set:
                continue  # a receiver's ACK: counted by the receivers themselves
            for target in targets:
                await sock.sendto(data, target)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        _answer({"port": sock.getsockname()[1]})
        await _until_end_of_input(settings["max_seconds"], commands)
        nursery.cancel_scope.cancel()


# --- simulated clients ---------------------------------------------------------------


class _Receivers:
    def __init__(self, live: int, dead: int) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = live + dead + 64
        if soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
        self.selector = selectors.DefaultSelector()
        self.live = [self._bind(False) for _ in range(live)]
        self.dead = [self._bind(True) for _ in range(dead)]
        self.dying = False  # the dead sockets answer nothing while this is set
        self.reset()

    def _bind(self, dead: bool) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((HOST, 0))
        s.setblocking(False)
        self.selector.register(s, selectors.EVENT_READ, dead)
        return s

    def reset(self) -> None:
        self.acks: dict[str, list[float]] = {}  # id -> [count, first, last]
        self.table_first = 0.0
        self.table_last = 0.0
        self.tables = 0

    def report(self) -> dict[str, Any]:
        return {
            "acks": self.acks,
            "table_first": self.table_first,
            "table_last": self.table_last,
            "tables": self.tables,
        }

    def on_datagram(self, s: socket.socket, dead: bool, data: bytes, addr: Any) -> None:
        if dead and self.dying:
            return
        try:
            head = decode_head(data)
        except msgspec.DecodeError:
            return
        if head.t == "channel":
            s.sendto(encode(Ack(head.id)), addr)
            if dead:
                return
            now = time.monotonic()
            entry = self.acks.get(head.id)
            if entry is None:
                self.acks[head.id] = [1, now, now]
            else:
                entry[0] += 1
                entry[2] = now
            return
        ack = ack_for(head)
        if ack is not None:
            s.sendto(ack, addr)
        if head.t in ("table", "delta") and not dead:
            now = time.monotonic()
            self.table_first = self.table_first or now
            self.table_last = now
            self.tables += 1

    def command(self, command: dict[str, Any]) -> dict[str, Any]:
        if command.get("do") == "report":
            return self.report()
        if command.get("do") == "reset":
            self.reset()
            return {"ok": True}
        if command.get("do") == "die":
            self.dying = True
            return {"ok": True}
        if command.get("do") == "revive":
            # Any word from a client the server marked offline brings it back online.
            self.dying = False
            server = (HOST, int(command["port"]))
            for s in self.dead[: int(command["count"])]:
                s.sendto(encode(Ack("revive")), server)
            return {"ok": True}
        return {"error": f"unknown command {command!r}"}

    def run(self, max_seconds: float) -> None:
        self.selector.register(sys.stdin, selectors.EVENT_READ, None)
        _answer(
            {
                "live": [s.getsockname()[1] for s in self.live],
                "dead": [s.getsockname()[1] for s in self.dead],
            }
        )
        deadline = time.monotonic() + max_seconds
        while time.monotonic() < deadline:
            for key, _ in self.selector.select(0.5):
                if key.data is None:  # standard input: a command
                    line = sys.stdin.readline()
                    if not line:
                        return
                    _answer(self.command(json.loads(line)))
                    continue
                s = key.fileobj
                assert isinstance(s, socket.socket)
                while True:
                    try:
                        data, addr = s.recvfrom(65536)
                    except BlockingIOError:
                        break
                    self.on_datagram(s, key.data, data, addr)


# --- a flood --------------------------------------------------------------------------


def _junk() -> list[bytes]:
    """Datagrams no server takes: random bytes, deep nesting, a lookup with a made-up
    token, an ACK of nothing."""
    return [
        os.urandom(64),
        os.urandom(900),
        b'{"x":' + b"[" * 3000 + b"]" * 3000 + b',"t":"ack","id":"a"}',
        encode(Lookup("flood.1", "nobody", "not-a-token")),
        encode(Ack("flood.2")),
    ]


def _flood(command: dict[str, Any]) -> dict[str, Any]:
    """Send ``count`` datagrams of ``kind`` (``junk`` or ``registrations``, each a new
    name) to ``port`` from one socket, as fast as it goes, for at most ``seconds``."""
    target = (HOST, int(command["port"]))
    count, kind = int(command["count"]), command["kind"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        me = sock.getsockname()[1]
        junk = _junk()
        sent = 0
        start = time.monotonic()
        deadline = start + float(command["seconds"])
        for i in range(count):
            if kind == "junk":
                data = junk[i % len(junk)]
            else:
                data = encode(Register(f"flood.{i}", f"flood{i}", me))
            try:
                sock.sendto(data, target)
                sent += 1
            except OSError:  # no buffer room for a moment: that datagram is not sent
                pass
            if i % 1024 == 0 and time.monotonic() > deadline:
                break
    return {"sent": sent, "seconds": time.monotonic() - start}


def main() -> None:
    mode = sys.argv[1]
    settings = json.loads(sys.stdin.readline())
    if mode == "echo":
        trio.run(_echo, settings)
    elif mode == "fanout":
        trio.run(_fanout, settings)
    elif mode == "flood":
        _answer({"ready": True})
        for line in sys.stdin:
            _answer(_flood(json.loads(line)))
    elif mode == "receivers":
        _Receivers(int(settings["live"]), int(settings["dead"])).run(settings["max_seconds"])
    else:
        raise SystemExit(f"unknown worker mode {mode!r}")


if __name__ == "__main__":
    main()
