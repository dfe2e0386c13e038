"""Scenarios: who starts, who types what, and what each node must show.

A scenario is a small text file, one step per line (``#`` starts a comment)::

    serve                          start the server
    join user1                     start a client (ports are picked for you)
    type user1 send user2 hello    type a line at user1's prompt
    expect user1 [Client Table Updated]
                                   wait until user1 shows that line (after the
                                   last line matched at user1)
    interrupt user1                Ctrl-C at user1
    stop server                    the server exits
    wait 0.6                       let time pass
    exits user1 1                  wait until user1 exits with that status

A ``Cluster`` plays it in one Trio run, over real UDP on loopback or over the
in-memory network in virtual time: the demo, the tests and ``chat-replay
record`` all play scenarios this way.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from chatapp.net import Endpoint, MemoryNetwork, UdpEndpoint
from chatapp.node import CapturedScreen, Input, Node, Signal
from chatapp.protocol.client import ClientProtocol
from chatapp.protocol.common import Timers
from chatapp.protocol.server import ServerProtocol
from chatapp.store import MemoryStore, Store
from chatapp.trace import NullRecorder, Recorder
from chatapp.wire import Address

SERVER = "server"
STEP_KINDS = ("serve", "join", "type", "expect", "interrupt", "hangup", "stop", "wait", "exits")
#: How long an ``expect`` or ``exits`` waits before the scenario fails.
EXPECT_TIMEOUT = 10.0


class ScenarioError(Exception):
    """A scenario that cannot be read, or a step whose expectation was not met."""


@dataclass(frozen=True)
class Step:
    kind: str
    node: str = ""
    text: str = ""
    line_no: int = 0

    def __str__(self) -> str:
        return " ".join(part for part in (self.kind, self.node, self.text) if part)


def parse_scenario(text: str, source: str = "<scenario>") -> list[Step]:
    steps: list[Step] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kind, _, rest = line.partition(" ")
        rest = rest.strip()
        if kind not in STEP_KINDS:
            raise ScenarioError(
                f"{source}:{number}: unknown step {kind!r} (steps: {', '.join(STEP_KINDS)})"
            )
        if kind == "serve":
            steps.append(Step(kind, SERVER, line_no=number))
        elif kind == "wait":
            try:
                float(rest)
            except ValueError:
                raise ScenarioError(
                    f"{source}:{number}: wait takes seconds, not {rest!r}"
                ) from None
            steps.append(Step(kind, text=rest, line_no=number))
        else:
            node, _, arg = rest.partition(" ")
            if not node:
                raise ScenarioError(f"{source}:{number}: {kind} needs a node name")
            if kind in ("type", "expect") and not arg:
                raise ScenarioError(f"{source}:{number}: {kind} needs a line")
            if kind == "exits" and arg and not arg.isdigit():
                raise ScenarioError(f"{source}:{number}: exits takes a status, not {arg!r}")
            steps.append(Step(kind, node, arg, number))
    return steps


def load_scenario(path: str | Path) -> list[Step]:
    return parse_scenario(Path(path).read_text(encoding="utf-8"), str(path))


# --- networks ------------------------------------------------------------------------


class Network:
    """Where a cluster's endpoints come from."""

    async def bind(self, port: int) -> Endpoint:
        raise NotImplementedError


@dataclass
class LoopbackNetwork(Network):
    """Real UDP sockets on 127.0.0.1, on ports the kernel picks."""

    host: str = "127.0.0.1"

    async def bind(self, port: int) -> Endpoint:
        return await UdpEndpoint.bind(self.host, port)


@dataclass
class VirtualNetwork(Network):
    """The in-memory network (use it under a MockClock for virtual time)."""

    network: MemoryNetwork = field(default_factory=MemoryNetwork)
    host: str = "127.0.0.1"
    _next_port: int = 40000

    async def bind(self, port: int) -> Endpoint:
        if port == 0:
            self._next_port += 1
            port = self._next_port
        return self.network.bind((self.host, port))


# --- the cluster --------------------------------------------------------------------


@dataclass
class ClientHandle:
    node: Node
    screen: CapturedScreen
    inputs: trio.MemorySendChannel[Input]
    matched: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    status: int | None = None


class Cluster:
    """A server and clients in one Trio run, driven step by step."""

    def __init__(
        self,
        nursery: trio.Nursery,
        network: Network,
        *,
        timers: Timers = Timers(),
        recorder: Recorder | None = None,
        on_line: Callable[[str, str], None] | None = None,
        store_factory: Callable[[], Store] = MemoryStore,
        wall_offset: float = 1_648_153_596.0,
        expect_timeout: float = EXPECT_TIMEOUT,
    ) -> None:
        self._nursery = nursery
        self.network = network
        self.timers = timers
        self.recorder = recorder or NullRecorder()
        self._on_line = on_line
        self._store_factory = store_factory
        self._wall_offset = wall_offset
        self.expect_timeout = expect_timeout
        self.server: Node | None = None
        self.server_addr: Address | None = None
        self._server_done = trio.Event()
        self.clients: dict[str, ClientHandle] = {}
        self._epoch = 0

    async def play(self, steps: list[Step]) -> None:
        for step in steps:
            await self.step(step)

    async def step(self, step: Step) -> None:
        action = getattr(self, "_" + step.kind)
        await action(step)

    # --- steps ---------------------------------------------------------------------

    async def _serve(self, step: Step) -> None:
        endpoint = await self.network.bind(0)
        self._epoch += 1
        protocol = ServerProtocol(
            timers=self.timers,
            id_prefix=f"s{self._epoch}",
            epoch=self._epoch,
            wall_offset=self._wall_offset,
            token_factory=_counter_tokens(f"t{self._epoch}"),
        )
        store = self._store_factory()
        clients, mailbox = store.load()
        protocol.restore(clients, mailbox)
        self.recorder.restored(SERVER, clients, mailbox)
        node = Node(SERVER, protocol, endpoint, recorder=self.recorder, store=store)
        self.server, self.server_addr = node, endpoint.local_address
        self._server_done = trio.Event()
        await self._nursery.start(self._run_server, node, endpoint, self._server_done)

    async def _run_server(
        self, node: Node, endpoint: Endpoint, done: trio.Event, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            argv = ["chatapp", "serve", str(endpoint.local_address[1])]
            await node.run(argv=argv, task_status=task_status)
        finally:
            endpoint.close()
            node.store.close()
            done.set()

    async def _join(self, step: Step) -> None:
        if self.server_addr is None:
            raise ScenarioError(f"line {step.line_no}: join before serve")
        if step.node in self.clients and self.clients[step.node].status is None:
            raise ScenarioError(f"line {step.line_no}: {step.node} has already joined")
        endpoint = await self.network.bind(0)
        port = endpoint.local_address[1]
        protocol = ClientProtocol(
            step.node, self.server_addr, port, timers=self.timers, id_prefix=step.node
        )
        name = step.node
        report = self._on_line
        on_line = (lambda line: report(name, line)) if report is not None else None
        screen = CapturedScreen(on_line=on_line)
        node = Node(name, protocol, endpoint, screen=screen, recorder=self.recorder)
        send_input, receive_input = trio.open_memory_channel[Input](64)
        handle = ClientHandle(node, screen, send_input)
        self.clients[name] = handle
        argv = ["chatapp", "join", name, self.server_addr[0], str(self.server_addr[1]), str(port)]
        await self._nursery.start(self._run_client, handle, receive_input, argv)

    async def _run_client(
        self,
        handle: ClientHandle,
        inputs: trio.MemoryReceiveChannel[Input],
        argv: list[str],
        task_status: trio.TaskStatus[None],
    ) -> None:
        try:
            handle.status = await handle.node.run(inputs, argv=argv, task_status=task_status)
        finally:
            handle.node.endpoint.close()
            handle.done.set()

    async def _type(self, step: Step) -> None:
        if self._on_line is not None:
            self._on_line(step.node, "<typed> " + step.text)
        await self._client(step).inputs.send(step.text)

    async def _interrupt(self, step: Step) -> None:
        await self._client(step).inputs.send(Signal.INTERRUPT)

    async def _hangup(self, step: Step) -> None:
        await self._client(step).inputs.send(Signal.HANG_UP)

    async def _stop(self, step: Step) -> None:
        if step.node == SERVER:
            if self.server is not None:
                self.server.stop()
                await self._server_done.wait()
            return
        await self._interrupt(step)

    async def _wait(self, step: Step) -> None:
        await trio.sleep(float(step.text))

    async def _expect(self, step: Step) -> None:
        handle = self._client(step)
        with trio.move_on_after(self.expect_timeout):
            while True:
                lines = handle.screen.lines
                for index in range(handle.matched, len(lines)):
                    if line_matches(step.text, lines[index]):
                        handle.matched = index + 1
                        return
                await handle.screen.changed.wait()
        raise ScenarioError(
            f"line {step.line_no}: {step.node} did not show {step.text!r} within"
            f" {self.expect_timeout:g} s; it showed {handle.screen.lines[handle.matched :]!r}"
        )

    async def _exits(self, step: Step) -> None:
        handle = self._client(step)
        with trio.move_on_after(self.expect_timeout):
            await handle.done.wait()
        if not handle.done.is_set():
            raise ScenarioError(f"line {step.line_no}: {step.node} did not exit")
        if step.text and handle.status != int(step.text):
            raise ScenarioError(
                f"line {step.line_no}: {step.node} exited with status {handle.status},"
                f" not {step.text}"
            )

    def _client(self, step: Step) -> ClientHandle:
        try:
            return self.clients[step.node]
        except KeyError:
            raise ScenarioError(f"line {step.line_no}: no client named {step.node}") from None

    async def shutdown(self) -> None:
        """Stop every node that is still running."""
        for handle in self.clients.values():
            handle.node.stop()
        if self.server is not None:
            self.server.stop()


TIME_PLACEHOLDER = "{time}"


def line_matches(expected: str, line: str) -> bool:
    """``expected`` equals ``line``, where ``{time}`` stands for a Unix time (seconds)."""
    if TIME_PLACEHOLDER not in expected:
        return expected == line
    pattern = r"\d+(?:\.\d+)?".join(re.escape(part) for part in expected.split(TIME_PLACEHOLDER))
    return re.fullmatch(pattern, line) is not None


def _counter_tokens(prefix: str) -> Callable[[], str]:
    counter = iter(range(1, 1 << 62))
    return lambda: f"{prefix}.{next(counter)}"


async def play_scenario(
    steps: list[Step],
    network: Network,
    **cluster_options: object,
) -> Cluster:
    """Play ``steps`` to the end, then stop every node; the cluster keeps what each showed."""
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, network, **cluster_options)  # type: ignore[arg-type]
        try:
            await cluster.play(steps)
        finally:
            await cluster.shutdown()
    return cluster


def scenario_path(name: str) -> Path:
    """A scenario that ships with chatapp (``test1`` .. ``test3``: the seed's tests)."""
    return Path(__file__).with_name("scenarios") / f"{name}.txt"


__all__ = [
    "Cluster",
    "LoopbackNetwork",
    "Network",
    "ScenarioError",
    "Step",
    "VirtualNetwork",
    "line_matches",
    "load_scenario",
    "parse_scenario",
    "play_scenario",
    "scenario_path",
]
