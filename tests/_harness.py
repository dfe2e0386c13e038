"""Helpers for the durability, property and hostile-input tests.

Virtual nodes: a server and clients as ``Node``s on a ``MemoryNetwork``, built
directly (not through ``Cluster``) so that a server can be stopped and started
again at the same address with the same store.

Real processes: ``chatapp`` started with ``python -m chatapp``, its output read
by a thread, so a test can wait for a line without a terminal.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from chatapp.net import MemoryNetwork
from chatapp.node import CapturedScreen, Input, Node
from chatapp.protocol.client import ClientProtocol, ClientState
from chatapp.protocol.common import Log, Timers
from chatapp.protocol.server import ServerProtocol
from chatapp.store import MemoryStore, Store
from chatapp.wire import Address, Lookup, encode

WALL_OFFSET = 1_648_153_596.0

# --- virtual nodes -------------------------------------------------------------------


@dataclass
class VirtualServer:
    node: Node
    protocol: ServerProtocol
    logs: list[Log]
    done: trio.Event = field(default_factory=trio.Event)

    async def stop(self) -> None:
        self.node.stop()
        await self.done.wait()


@dataclass
class VirtualClient:
    name: str
    node: Node
    protocol: ClientProtocol
    screen: CapturedScreen
    inputs: trio.MemorySendChannel[Input]
    done: trio.Event = field(default_factory=trio.Event)
    status: int | None = None

    @property
    def lines(self) -> list[str]:
        return self.screen.lines

    @property
    def alive(self) -> bool:
        return not self.done.is_set()

    async def type(self, line: str) -> None:
        """Type ``line`` and return once the client has acted on it."""
        await self.inputs.send(line)  # an unbuffered channel: returns once the line is taken
        await trio.sleep(0.001)

    async def idle(self, limit: float = 120.0) -> None:
        """Wait until the client waits for no answer (and has finished joining)."""
        with trio.fail_after(limit):
            while self.alive and (
                self.protocol.next_deadline() is not None
                or self.protocol.state is ClientState.JOINING
            ):
                await trio.sleep(0.05)

    async def expect(self, line: str, start: int = 0, limit: float = 30.0) -> int:
        """Wait until ``line`` is shown at or after index ``start``; its index."""
        with trio.fail_after(limit):
            while True:
                if line in self.lines[start:]:
                    return self.lines.index(line, start)
                await self.screen.changed.wait()


async def start_server(
    nursery: trio.Nursery,
    network: MemoryNetwork,
    addr: Address,
    *,
    store: Store | None = None,
    timers: Timers = Timers(),
    mailbox_limit: int = 1000,
    epoch: int = 1,
) -> VirtualServer:
    store = store or MemoryStore()
    protocol = ServerProtocol(
        timers=timers,
        id_prefix=f"s{epoch}",
        epoch=epoch,
        wall_offset=WALL_OFFSET,
        mailbox_limit=mailbox_limit,
    )
    clients, mailbox = store.load()
    protocol.restore(clients, mailbox)
    logs: list[Log] = []
    endpoint = network.bind(addr)
    node = Node("server", protocol, endpoint, store=store, log=logs.append)
    server = VirtualServer(node, protocol, logs)

    async def run(task_status: trio.TaskStatus[None]) -> None:
        try:
            await node.run(task_status=task_status)
        finally:
            endpoint.close()
            store.close()
            server.done.set()

    await nursery.start(run)
    return server


async def start_client(
    nursery: trio.Nursery,
    network: MemoryNetwork,
    name: str,
    addr: Address,
    server: Address,
    *,
    timers: Timers = Timers(),
) -> VirtualClient:
    protocol = ClientProtocol(name, server, addr[1], timers=timers, id_prefix=name)
    endpoint = network.bind(addr)
    screen = CapturedScreen()
    node = Node(name, protocol, endpoint, screen=screen)
    send_input, receive_input = trio.open_memory_channel[Input](0)
    client = VirtualClient(name, node, protocol, screen, send_input)

    async def run(task_status: trio.TaskStatus[None]) -> None:
        try:
            client.status = await node.run(receive_input, task_status=task_status)
        finally:
            endpoint.close()
            client.done.set()

    await nursery.start(run)
    return client


# --- real processes --------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chatapp_env(data_home: Path) -> dict[str, str]:
    """The environment for a chatapp process: its data directory inside the test's."""
    env = dict(os.environ)
    env["XDG_DATA_HOME"] = str(data_home)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("CHATAPP_TRACE", None)
    return env


class Proc:
    """A ``chatapp`` process with its stdin a pipe and its output collected by a thread."""

    def __init__(self, args: Sequence[str], env: dict[str, str]) -> None:
        self.args = list(args)
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "chatapp", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a Ctrl-C meant for pytest does not reach it
        )
        self._out = bytearray()
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        while chunk := self.popen.stdout.read1(65536):
            with self._changed:
                self._out += chunk
                self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return self._text()

    def _text(self) -> str:
        return _ANSI.sub("", self._out.decode("utf-8", "replace"))

    def lines(self) -> list[str]:
        """The lines shown, with the ``>>> `` prompts taken off."""
        with self._changed:
            return self._lines()

    def _lines(self) -> list[str]:
        result = []
        for raw in self._text().splitlines():
            line = raw
            while line.startswith(">>> "):
                line = line[4:]
            if line.strip() and line.strip() != ">>>":
                result.append(line)
        return result

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout: float, what: str) -> None:
        """Wait until ``predicate(lines)`` holds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self._lines()):
                left = deadline - time.monotonic()
                if left <= 0:
                    output = self._text()
                    raise AssertionError(f"{what}: not seen in {timeout} s; output:\n{output}")
                self._changed.wait(min(left, 0.1))

    def expect(self, line: str, timeout: float = 10.0, count: int = 1) -> None:
        """Wait until ``line`` has been shown ``count`` times (as a whole line)."""
        self.wait_for(lambda lines: lines.count(line) >= count, timeout, f"{line!r} x{count}")

    def type(self, line: str | bytes) -> None:
        assert self.popen.stdin is not None
        data = line if isinstance(line, bytes) else line.encode()
        self.popen.stdin.write(data + b"\n")
        self.popen.stdin.flush()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(5)
        self._close()

    def stop(self, timeout: float = 5.0) -> int:
        """Ctrl-C (SIGINT), then SIGKILL if it does not exit in time; its exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._close()
        return self.popen.returncode

    def _close(self) -> None:
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()
        self._reader.join(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


def wait_until_serving(server_port: int, timeout: float = 10.0) -> None:
    """Wait until a chatapp server answers on ``server_port``: a lookup with a
    made-up token always draws a refusal, and changes nothing."""
    probe = encode(Lookup("probe.1", "nobody", "not-a-token"))
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.1)
        while time.monotonic() < deadline:
            sock.sendto(probe, ("127.0.0.1", server_port))
            try:
                sock.recvfrom(65536)
                return
            except (TimeoutError, ConnectionRefusedError):
                continue
    raise AssertionError(f"no chatapp server answered on UDP port {server_port} in {timeout} s")
