"""Processes the benchmarks start: baselines in bare Trio, and lightweight simulated clients.

``python -m chatapp_tools.bench.worker MODE`` reads one JSON line of settings, answers
one JSON line when ready, then answers each command line with one JSON line.
It exits at end of input or after ``max_seconds``, whichever comes first.

Modes:

* ``echo``: a bare Trio UDP echo server (the floor for a server on this runtime);
  with ``reply_size`` it answers every datagram with that many bytes instead.
* ``fanout``: a bare Trio fan-out: every datagram from a non-target is sent on
  to every target (the floor for a channel broadcast).
* ``flood``: on each command, sends a flood (junk, or registrations with new names,
  each through the whole handshake) to a server from one socket as fast as it goes,
  and says how many and how long.
* ``receivers``: many raw sockets that act as clients, each with a key of its
  own (``bench_identity``): told to ``register``, they do the handshake; they
  ACK whatever the server sends (tables, mailbox batches, channel messages) and
  record when. The ``dead`` ones do too until told to ``die``; then they answer
  nothing (a crashed client) until told to ``revive``.
"""

from __future__ import annotations

import contextlib
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
from chatapp.protocol.crypto import Identity, blake2b
from chatapp.protocol.sealing import TO_CLIENT
from chatapp.testing.raw import RawClient
from chatapp.wire import Ack, Challenge, Lookup, Rekey, TableAck, WireError, encode

from .loadgen import HOST, decode_head


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


class InnerHead(msgspec.Struct):
    """The fields of a sealed message a receiver needs."""

    t: str
    id: str = ""
    post: str = ""
    epoch: int = 0  # a table part's or a delta's
    version: int = 0  # a table part's
    to: int | str = 0  # a delta's version (a save's recipient)


decode_inner_head = msgspec.json.Decoder(InnerHead).decode


def bench_identity(name: str) -> Identity:
    """A simulated client's key, from its name: the bench binds it in the databases it
    prepares, and the receivers register with it."""
    return Identity(blake2b(name.encode(), 32, person=b"chatapp-bench"))


class _Receiver:
    """One receiving client: its socket, and its keys and session."""

    def __init__(self, sock: socket.socket, name: str, dead: bool) -> None:
        self.sock = sock
        self.dead = dead
        self.raw = RawClient(name, int(sock.getsockname()[1]), bench_identity(name))
        self.server: tuple[str, int] | None = None  # set when it registers
        self.last = b""  # its last step of the handshake under way (sent again as it is)

    def register(self) -> None:
        """Start its handshake, or send its last step again (the same bytes, so that one
        registration is made)."""
        if not self.last:
            self.raw.codec.session = None
            self.last = self.raw.hello()
        assert self.server is not None
        self.sock.sendto(self.last, self.server)


class _Receivers:
    def __init__(self, live: int, dead: int) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = live + dead + 64
        if soft < wanted:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
        self.selector = selectors.DefaultSelector()
        self.live = [self._bind(f"live{i}", False) for i in range(live)]
        self.dead = [self._bind(f"dead{i}", True) for i in range(dead)]
        self.dying = False  # the dead sockets answer nothing while this is set
        self.reset()

    def _bind(self, name: str, dead: bool) -> _Receiver:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((HOST, 0))
        s.setblocking(False)
        receiver = _Receiver(s, name, dead)
        self.selector.register(s, selectors.EVENT_READ, receiver)
        return receiver

    def reset(self) -> None:
        self.acks: dict[str, list[float]] = {}  # post id -> [count, first, last]
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

    def _counted(self, post: str) -> None:
        now = time.monotonic()
        entry = self.acks.get(post)
        if entry is None:
            self.acks[post] = [1, now, now]
        else:
            entry[0] += 1
            entry[2] = now

    def on_datagram(self, receiver: _Receiver, data: bytes, addr: Any) -> None:
        if receiver.dead and self.dying:
            return
        if data[:1] == b"{" and b'"channel"' in data:  # the bare fan-out's plaintext
            with contextlib.suppress(msgspec.DecodeError):
                head = decode_head(data)
                receiver.sock.sendto(encode(Ack(head.id)), addr)
                if not receiver.dead:
                    self._counted(head.id)
            return
        raw = receiver.raw
        session = raw.codec.session
        if data[:1] == b"\x01" and session is not None:
            # In the session: opened, and read no further than a client must to ACK it
            # (a table of a thousand entries, a thousand times over, is the server's
            # cost to measure, not the receivers').
            with contextlib.suppress(WireError, msgspec.DecodeError):
                inner = decode_inner_head(session.open_bytes(TO_CLIENT, data))
                self._sealed(receiver, inner, addr)
            return
        if b'"t":"rekey"' in data[:16]:
            rekey = raw.open(data)
            ours = session is not None and isinstance(rekey, Rekey) and rekey.sid == session.sid
            if ours and receiver.server is not None:
                receiver.last = b""  # the server forgot this session: register again
                receiver.register()
            return
        if raw.registered or not receiver.last:
            return  # a handshake's answer it is not waiting for
        reply = raw.answer(data)
        if reply is not None and receiver.server is not None:
            receiver.last = reply
            receiver.sock.sendto(reply, receiver.server)
        if raw.registered:
            receiver.last = b""

    def _sealed(self, receiver: _Receiver, head: InnerHead, addr: Any) -> None:
        if head.t not in ("channel", "table", "delta", "mailbox", "not_stored", "relay"):
            return
        if head.t in ("table", "delta"):
            # A receiver keeps no table: it says it holds what each part brings, and the
            # server sends it what a client that applies everything needs.
            version = head.version if head.t == "table" else int(head.to)
            ack = receiver.raw.seal(TableAck(head.id, head.epoch, version))
        else:
            ack = receiver.raw.ack(head.id)
        receiver.sock.sendto(ack, addr)
        if receiver.dead:
            return
        if head.t == "channel":
            self._counted(head.post)
        elif head.t in ("table", "delta"):
            now = time.monotonic()
            self.table_first = self.table_first or now
            self.table_last = now
            self.tables += 1

    def register(self, port: int, live: int, dead: int) -> dict[str, Any]:
        """The first ``live`` and ``dead`` receivers register (the rest stay quiet)."""
        chosen = self.live[:live] + self.dead[:dead]
        for receiver in chosen:
            receiver.server = (HOST, port)
            receiver.raw.codec.session = None
            receiver.last = b""
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            waiting = [r for r in chosen if not r.raw.registered]
            if not waiting:
                return {"registered": len(chosen)}
            for receiver in waiting:  # its last step again until it is registered
                receiver.register()
            # A second for each thousand waiting (a server takes about that), at least the
            # client's own ACK timeout: tries sooner would only pile up on the server.
            self._serve(time.monotonic() + max(0.5, len(waiting) / 1000), stdin=False)
        return {"error": f"{sum(not r.raw.registered for r in chosen)} did not register"}

    def command(self, command: dict[str, Any]) -> dict[str, Any]:
        do = command.get("do")
        if do == "report":
            return self.report()
        if do == "reset":
            self.reset()
            return {"ok": True}
        if do == "die":
            self.dying = True
            return {"ok": True}
        if do == "revive":
            self.dying = False
            return {"ok": True}
        if do == "register":
            return self.register(int(command["port"]), int(command["live"]), int(command["dead"]))
        return {"error": f"unknown command {command!r}"}

    def _serve(self, until: float, stdin: bool = True) -> bool:
        """Answer datagrams (and, with ``stdin``, commands) until ``until``; False at the
        end of input."""
        while time.monotonic() < until:
            for key, _ in self.selector.select(min(0.5, max(until - time.monotonic(), 0))):
                if key.data is None:  # standard input: a command
                    if not stdin:
                        continue
                    line = sys.stdin.readline()
                    if not line:
                        return False
                    _answer(self.command(json.loads(line)))
                    continue
                receiver = key.data
                while True:
                    try:
                        data, addr = receiver.sock.recvfrom(65536)
                    except BlockingIOError:
                        break
                    self.on_datagram(receiver, data, addr)
        return True

    def run(self, max_seconds: float) -> None:
        self.selector.register(sys.stdin, selectors.EVENT_READ, None)
        _answer(
            {
                "live": [r.raw.port for r in self.live],
                "dead": [r.raw.port for r in self.dead],
            }
        )
        self._serve(time.monotonic() + max_seconds)


# --- a flood --------------------------------------------------------------------------


def _junk() -> list[bytes]:
    """Datagrams no server takes: random bytes, deep nesting, a session datagram of a
    session nobody has, a lookup and an ACK in the clear (no session)."""
    return [
        os.urandom(64),
        os.urandom(900),
        b'{"x":' + b"[" * 3000 + b"]" * 3000 + b',"t":"ack","id":"a"}',
        b"\x01" + os.urandom(120),
        encode(Lookup("flood.1", "nobody")),
        encode(Ack("flood.2")),
    ]


class _Registrations:
    """A flood of registrations with new names from one socket, each through the whole
    handshake (a hello, then a register for its challenge), pipelined: the hellos go
    out as fast as they can, and each challenge is answered as it comes. One key for
    all the names, as an attacker would (a key costs nothing, a name is what it takes)."""

    def __init__(self, sock: socket.socket, target: tuple[str, int]) -> None:
        self.sock = sock
        self.target = target
        self.identity = Identity.generate()
        self.port = int(sock.getsockname()[1])
        self.waiting: dict[str, RawClient] = {}  # hello id -> the name's client
        self.hellos = self.registers = self.registered = 0

    def hello(self, i: int) -> None:
        client = RawClient(f"flood{i}", self.port, self.identity)
        data = client.hello()
        self.waiting[decode_head(data).id] = client
        self.hellos += 1
        self.sock.sendto(data, self.target)

    def answer(self) -> None:
        """Answer the challenges that came (a burst); count the registrations made."""
        for _ in range(256):
            try:
                data = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            if data[:1] != b"{":
                continue  # in a session (a table): an attacker need not answer
            with contextlib.suppress(msgspec.DecodeError):
                head = decode_head(data)
                if head.t == "registered":
                    self.registered += 1
                client = self.waiting.pop(head.id, None)
                if client is not None and head.t == "challenge":
                    message = client.open(data)
                    if isinstance(message, Challenge):
                        self.sock.sendto(encode(client.register_for(message)), self.target)
                        self.registers += 1


def _flood(command: dict[str, Any]) -> dict[str, Any]:
    """Send ``count`` datagrams of ``kind`` (``junk``, or ``registrations``: ``count``
    hellos of new names, each challenge answered) to ``port`` from one socket, as fast as
    it goes, for at most ``seconds``."""
    target = (HOST, int(command["port"]))
    count, kind = int(command["count"]), command["kind"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.setblocking(False)
        junk = _junk()
        flood = _Registrations(sock, target)
        sent = 0
        start = time.monotonic()
        deadline = start + float(command["seconds"])
        for i in range(count):
            try:
                if kind == "junk":
                    sock.sendto(junk[i % len(junk)], target)
                else:
                    flood.hello(i)
                    flood.answer()
                sent += 1
            except OSError:  # no buffer room for a moment: that datagram is not sent
                pass
            if i % 1024 == 0 and time.monotonic() > deadline:
                break
        seconds = time.monotonic() - start
        if kind != "junk":  # the last challenges
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                flood.answer()
                time.sleep(0.01)
    report: dict[str, Any] = {"sent": sent, "seconds": seconds}
    if kind != "junk":
        report.update(registers=flood.registers, registered=flood.registered, hellos=flood.hellos)
    return report


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
