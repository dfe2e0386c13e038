"""Helpers the tests share.

Rules and lines: ``first_only`` (a loss or duplication rule that fires once) and
``shown_messages`` (the message lines among what a client showed).

Virtual nodes: a server and clients on a ``MemoryNetwork``, started with
``run_node`` as every node is (not through ``Cluster``) so that a server can be
stopped and started again at the same address with the same store.

Real processes: ``chatapp`` started with ``python -m chatapp`` (``serve`` and
``join``), its output read by a thread, so a test can wait for a line without a
terminal; ``free_udp_ports`` for their ports, all chosen at once so that none is
handed out twice; ``chatapp_command``, ``chatapp_env``, ``serve_args`` and
``join_args`` for tests that start the installed command their own way.
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
from typing import ParamSpec

import pytest
import trio
from chatapp_tools.replay.cli import main as chat_replay_main

from chatapp.launch import ClientOptions, ServerOptions, run_node
from chatapp.node import Input, Node
from chatapp.protocol.client import ClientProtocol, ClientState
from chatapp.protocol.common import Log, Timers
from chatapp.protocol.server import ServerProtocol
from chatapp.store import MemoryStore, Store
from chatapp.testing import CapturedScreen, MemoryNetwork
from chatapp.wire import Address, Hello, encode

WALL_OFFSET = 1_648_153_596.0

P = ParamSpec("P")

#: Each client's screen in the seed's Test 1 up to the end (Ctrl-C), line for line.
TEST_1_SCREENS = {
    "user1": """
>>> [Client Table Updated]
>>> [Client Table Updated]
>>> [Client Table Updated]
>>> send user2 hello nice to meet you.
>>> [Message has been received by user2.]
>>> send user3 hi!
>>> [Message has been received by user3.]
>>> user2 : hello, nice to meet you, too!
>>> user3 : hi~
>>> dereg user1
>>> [You are now offline. Bye.]
>>> reg user1
>>> [You have message]
>>> ({time}) user2 : hello?
>>> ({time}) user3 : are you still there?
>>> [Client Table Updated]
""",
    "user2": """
>>> [Client Table Updated]
>>> [Client Table Updated]
>>> user1 : hello nice to meet you.
>>> send user1 hello, nice to meet you, too!
>>> [Message has been received by user1.]
>>> send user3 hello
>>> [Message has been received by user3.]
>>> user3 : hello!
>>> [Client Table Updated]
>>> send user1 hello?
>>> [No ACK from user1, message sent to server.]
>>> [Messages received by the server and saved.]
>>> [Client Table Updated]
""",
    "user3": """
>>> [Client Table Updated]
>>> user1 : hi!
>>> user2 : hello
>>> send user1 hi~
>>> [Message has been received by user1.]
>>> send user2 hello!
>>> [Message has been received by user2.]
>>> [Client Table Updated]
>>> send user1 are you still there?
>>> [No ACK from user1, message sent to server.]
>>> [Messages received by the server and saved.]
>>> [Client Table Updated]
""",
}

#: Each client's screen in the seed's Test 3 before user1 and user3 are interrupted (user2's
#: ends with its own Ctrl-C), line for line.
TEST_3_SCREENS = {
    "user1": """
>>> [Client Table Updated]
>>> [Client Table Updated]
>>> [Client Table Updated]
>>> send_all hello guys
>>> [Message received by the server.]
>>> send_all hi
>>> [Message received by the server.]
>>> [Client Table Updated]
>>>
""",
    "user2": """
>>> [Client Table Updated]
>>> [Client Table Updated]
>>> Channel_Message user1 : hello guys
>>> Caught keyboard interrupt. Exiting
""",
    "user3": """
>>> [Client Table Updated]
>>> Channel_Message user1 : hello guys
>>> Channel_Message user1 : hi
>>> [Client Table Updated]
>>>
""",
}


def chat_replay(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    """``chat-replay ARGS`` in this process: its exit status and everything it printed."""
    with pytest.raises(SystemExit) as done:
        chat_replay_main([str(arg) for arg in args])
    captured = capsys.readouterr()
    code = done.value.code
    return (code if isinstance(code, int) else 0), captured.out + captured.err


def first_only(rule: Callable[P, bool]) -> Callable[P, bool]:
    """A rule that matches only the first datagram ``rule`` matches (whatever the
    rule's arguments: a ``Sim`` rule or a ``Tap`` rule)."""
    fired = False

    def once(*args: P.args, **kwargs: P.kwargs) -> bool:
        nonlocal fired
        if fired or not rule(*args, **kwargs):
            return False
        fired = True
        return True

    return once


#: A message line, live or stored: ``[(TIME) ][Channel_Message ]SENDER : TEXT``.
MESSAGE_LINE = re.compile(r"^(?:\([0-9.e+-]+\) )?(?:Channel_Message )?(\S+) : (.+)$")


def shown_messages(lines: Sequence[str]) -> list[tuple[str, str]]:
    """(sender, text) of every chat, channel or stored message line among ``lines``."""
    return [(m.group(1), m.group(2)) for m in map(MESSAGE_LINE.match, lines) if m]


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
    exit_statuses: list[int] = field(default_factory=list)

    @property
    def status(self) -> int | None:
        """Its exit status, once it has exited."""
        return self.exit_statuses[0] if self.exit_statuses else None

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
    """A server at ``addr``; ``store`` is closed when it stops (a new one: a ``MemoryStore``)."""
    store = store or MemoryStore()
    options = ServerOptions(
        addr[1],
        host=addr[0],
        timers=timers,
        mailbox_limit=mailbox_limit,
        epoch=epoch,
        wall_offset=WALL_OFFSET,
    )
    logs: list[Log] = []
    done = trio.Event()

    async def run(task_status: trio.TaskStatus[Node]) -> None:
        try:
            await run_node(
                options, network=network, store=store, log=logs.append, task_status=task_status
            )
        finally:
            store.close()
            done.set()

    node = await nursery.start(run)
    assert isinstance(node.protocol, ServerProtocol)
    return VirtualServer(node, node.protocol, logs, done)


async def start_client(
    nursery: trio.Nursery,
    network: MemoryNetwork,
    name: str,
    addr: Address,
    server: Address,
    *,
    timers: Timers = Timers(),
    state_dir: str | None = None,
) -> VirtualClient:
    """A client at ``addr``; its keys in ``state_dir`` (by default the test's
    ``$XDG_STATE_HOME``, a directory of its own: see ``conftest.py``)."""
    options = ClientOptions(
        name, server[0], server[1], addr[1], host=addr[0], timers=timers, state_dir=state_dir
    )
    screen = CapturedScreen()
    send_input, receive_input = trio.open_memory_channel[Input](0)
    done = trio.Event()
    status: list[int] = []

    async def run(task_status: trio.TaskStatus[Node]) -> None:
        try:
            status.append(
                await run_node(
                    options,
                    network=network,
                    screen=screen,
                    inputs=receive_input,
                    task_status=task_status,
                )
            )
        finally:
            done.set()

    node = await nursery.start(run)
    assert isinstance(node.protocol, ClientProtocol)
    client = VirtualClient(name, node, node.protocol, screen, send_input, done)
    client.exit_statuses = status
    return client


# --- real processes --------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def free_udp_ports(count: int) -> list[int]:
    """``count`` different UDP ports on 127.0.0.1 that nothing is bound to right now.
    Every socket is held until all are chosen, so no port is handed out twice."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def chatapp_command() -> list[str]:
    """The installed console script beside this interpreter, else the module."""
    script = Path(sys.executable).with_name("chatapp")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "chatapp"]


def chatapp_env(
    data_home: Path, *, show_warnings: bool = False, term: str = "dumb"
) -> dict[str, str]:
    """The environment for a chatapp process: its data and state directories (the
    database, the input line's history) inside the test's, never the user's, and no
    ``CHATAPP_*`` setting (a trace, say) from outside. ``term``: what a terminal says it
    is (the seed's tests run on ``dumb`` ones). ``show_warnings``: every warning Python
    would otherwise keep quiet is shown, so that a check for noise sees it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATAPP_")}
    env["XDG_DATA_HOME"] = str(data_home)
    env["XDG_STATE_HOME"] = str(data_home.with_name(data_home.name + "-state"))
    env["TERM"] = term
    env["PYTHONUNBUFFERED"] = "1"
    if show_warnings:
        env["PYTHONWARNINGS"] = "default"
    return env


def serve_args(port: int, *options: str, db: str | Path | None = ":memory:") -> list[str]:
    """``chatapp serve`` on 127.0.0.1 (``db=None``: the default database)."""
    args = ["serve", str(port), "--host", "127.0.0.1"]
    if db is not None:
        args += ["--db", str(db)]
    return [*args, *options]


def join_args(
    name: str, server_port: int, port: int, *options: str, command: str = "join"
) -> list[str]:
    """``chatapp join`` (or the seed's ``-c``) on 127.0.0.1, to a server there."""
    return [
        command,
        name,
        "127.0.0.1",
        str(server_port),
        str(port),
        "--host",
        "127.0.0.1",
        *options,
    ]


class Proc:
    """A ``chatapp`` process with its stdin a pipe and its output collected by a thread."""

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str],
        *,
        prefix: Sequence[str] = (),
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        """``prefix``: a command that runs chatapp (``nsenter ...``); ``preexec_fn``: run
        in the child before chatapp starts (a resource limit, say)."""
        self.args = list(args)
        self.popen = subprocess.Popen(
            [*prefix, sys.executable, "-m", "chatapp", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a Ctrl-C meant for pytest does not reach it
            preexec_fn=preexec_fn,
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


def serve(
    port: int, env: dict[str, str], *options: str, db: str | Path | None = ":memory:"
) -> Proc:
    """A ``chatapp serve`` process, returned once it answers on ``port``."""
    server = Proc(serve_args(port, *options, db=db), env)
    try:
        wait_until_serving(port)
    except AssertionError as exc:
        server.kill()
        raise AssertionError(f"{exc}; its output:\n{server.output}") from None
    return server


def join(name: str, server_port: int, port: int, env: dict[str, str], *options: str) -> Proc:
    """A ``chatapp join`` process (returned at once: wait for its lines)."""
    return Proc(join_args(name, server_port, port, *options), env)


def wait_until_serving(server_port: int, timeout: float = 20.0) -> int:
    """Wait until a chatapp server answers on ``server_port``: a hello draws a
    challenge, and changes nothing (the server keeps no state for it). The port the
    probes came from."""
    probe = encode(Hello("probe.1", "probe", 1024, bytes(32)))
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.1)
        while time.monotonic() < deadline:
            sock.sendto(probe, ("127.0.0.1", server_port))
            try:
                sock.recvfrom(65536)
                return int(sock.getsockname()[1])
            except (TimeoutError, ConnectionRefusedError):
                continue
    raise AssertionError(f"no chatapp server answered on UDP port {server_port} in {timeout} s")
