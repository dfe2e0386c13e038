"""Scenarios: who starts, who types what, and what each node must show.

A scenario is a small text file, one step per line (``#`` starts a comment)::

    serve                          start the server (``serve --mailbox-limit 2``: with
                                   room for 2 stored messages per client; ``--join-limit``)
    join user1                     start a client (ports are picked for you)
    type user1 send user2 hello    type a line at user1's prompt
    expect user1 [Client Table Updated]
                                   wait until user1 shows that line (after the
                                   last line matched at user1)
    interrupt user1                Ctrl-C at user1
    stop server                    the server exits (``serve`` again restarts it on
                                   its port, with its database)
    kill user1                     user1 stops without a word (a crash); ``join user1``
                                   again starts it anew (its key and state directory,
                                   a new port; ``join user1 same-port``: the old one;
                                   ``join user1 new-key``: a new key, from a state
                                   directory of its own; ``join user5 port-of user4``:
                                   the port user4 had, once user4 has stopped)
    wait 0.6                       let time pass
    exits user1 1                  wait until user1 exits with that status
    drop user1 -> user2 chat       the next chat datagram user1 sends user2 is lost
    dup server -> * table 2        the next 2 tables the server sends anyone go twice
    delay user1 -> server save 0.7 the next save from user1 goes 0.7 s late
    faults 0.1 0.05 7              from now on lose 10 %, duplicate 5 % of all datagrams
                                   (chosen by a generator seeded with 7)
    attack mallory hellos 6        an attacker (``chatapp.testing.attacker``) sends 6 hellos

The fault steps take ``*`` for any node, peer or message type and an optional
count (``drop user1 -> server * 3``: the next 3 datagrams of any type); the
faults are injected where the node sends (``chatapp.testing.faults``) and
recorded in the trace, where a replay finds them.

A ``Cluster`` plays it in one Trio run, over real UDP on loopback
(``chatapp.net.UDP``) or over the in-memory network in virtual time
(``MemoryNetwork``): the demo, the tests and ``chat-replay record`` all play
scenarios this way.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from chatapp.launch import ClientOptions, ServerOptions, run_node
from chatapp.net import Network
from chatapp.node import Input, Node
from chatapp.protocol.common import Timers
from chatapp.protocol.inputs import Signal
from chatapp.protocol.mailbox import DEFAULT_MAILBOX_LIMIT
from chatapp.store import MemoryStore, Store
from chatapp.testing.attacker import Attacker, attack_args, join_limits
from chatapp.testing.faults import FaultKind, FaultPlan
from chatapp.testing.screen import CapturedScreen
from chatapp.testing.seed import line_matches
from chatapp.trace import NullRecorder, Recorder
from chatapp.wire import Address

SERVER = "server"
FAULT_KINDS = ("drop", "dup", "delay")
STEP_KINDS = (
    "serve", "join", "type", "expect", "interrupt", "hangup", "stop", "kill", "wait", "exits",
    *FAULT_KINDS, "faults", "attack",
)  # fmt: skip
SAME_PORT, NEW_KEY, PORT_OF = "same-port", "new-key", "port-of"
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
            _serve_options(rest, f"{source}:{number}")
            steps.append(Step(kind, SERVER, rest, number))
        elif kind in FAULT_KINDS or kind == "faults":
            _fault_args(kind, rest, f"{source}:{number}")
            steps.append(Step(kind, text=rest, line_no=number))
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
            if kind == "attack":
                _attack_args(arg, f"{source}:{number}")
            if kind == "exits" and arg and not arg.isdigit():
                raise ScenarioError(f"{source}:{number}: exits takes a status, not {arg!r}")
            steps.append(Step(kind, node, arg, number))
    return steps


@dataclass(frozen=True)
class FaultArgs:
    """A fault step's arguments: ``FROM -> TO TYPE [SECONDS] [COUNT]``, or for ``faults``,
    ``LOSS DUP SEED``."""

    node: str = ""
    peer: str = ""
    of: str = ""
    delay: float = 0.0
    count: int = 1
    loss: float = 0.0
    dup: float = 0.0
    seed: int = 0


def _fault_args(kind: str, text: str, where: str) -> FaultArgs:
    words = text.split()
    try:
        if kind == "faults":
            loss, dup, seed = words
            return FaultArgs(loss=float(loss), dup=float(dup), seed=int(seed))
        node, arrow, peer, of, *more = words
        if arrow != "->" or len(more) > 2 or (kind != "delay" and len(more) > 1):
            raise ValueError
        delay = float(more.pop(0)) if kind == "delay" else 0.0
        count = int(more[0]) if more else 1
        return FaultArgs(node, peer, of, delay, count)
    except (ValueError, IndexError):
        shape = "LOSS DUP SEED" if kind == "faults" else "FROM -> TO TYPE [COUNT]"
        shape = "FROM -> TO TYPE SECONDS [COUNT]" if kind == "delay" else shape
        raise ScenarioError(f"{where}: {kind} takes {shape}, not {text!r}") from None


def _serve_options(text: str, where: str) -> tuple[int, int | None]:
    """``serve``'s ``--mailbox-limit N`` and ``--join-limit N`` (None: the default)."""
    words = text.split()
    found: dict[str, int] = {}
    while len(words) >= 2 and words[0] in ("--mailbox-limit", "--join-limit"):
        if not words[1].isdigit() or words[0] in found:
            break
        option, value, *words = words
        found[option] = int(value)
    if words:
        raise ScenarioError(
            f"{where}: serve takes --mailbox-limit N, --join-limit N or nothing, not {text!r}"
        )
    return found.get("--mailbox-limit", DEFAULT_MAILBOX_LIMIT), found.get("--join-limit")


def _attack_args(text: str, where: str) -> tuple[str, list[str]]:
    try:
        return attack_args(text, where)
    except ValueError as exc:
        raise ScenarioError(str(exc)) from None


def load_scenario(path: str | Path) -> list[Step]:
    return parse_scenario(Path(path).read_text(encoding="utf-8"), str(path))


# --- the cluster --------------------------------------------------------------------


@dataclass
class ClientHandle:
    screen: CapturedScreen
    inputs: trio.MemorySendChannel[Input]
    node: Node | None = None  # once it runs
    matched: int = 0
    done: trio.Event = field(default_factory=trio.Event)
    status: int | None = None
    port: int = 0


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
        host: str = "127.0.0.1",
        state_dir: Path | None = None,
    ) -> None:
        """``state_dir``: the clients' state directory (their keys, the pinned server
        keys): one for all, as on one machine. By default a temporary one, removed by
        ``shutdown``."""
        self._nursery = nursery
        self.network = network
        self.host = host
        self.timers = timers
        self.recorder = recorder or NullRecorder()
        self._on_line = on_line
        self._store_factory = store_factory
        self._wall_offset = wall_offset
        self.expect_timeout = expect_timeout
        self.server: Node | None = None
        self.server_addr: Address | None = None
        self.store: Store | None = None  # the server's database, kept across its restarts
        self._shutting_down = False
        #: Faults injected where the nodes send (the fault steps arm them).
        self.faults = FaultPlan()
        self._server_done = trio.Event()
        self.clients: dict[str, ClientHandle] = {}
        self.attackers: dict[str, Attacker] = {}
        self._epoch = 0
        self._own_state_dir = state_dir is None
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="chatapp-cluster-"))

    async def play(self, steps: list[Step]) -> None:
        for step in steps:
            await self.step(step)

    async def step(self, step: Step) -> None:
        action = getattr(self, "_" + step.kind)
        await action(step)

    # --- steps ---------------------------------------------------------------------

    async def _serve(self, step: Step) -> None:
        if self.server is not None and not self._server_done.is_set():
            raise ScenarioError(f"line {step.line_no}: the server is running already")
        self._epoch += 1
        mailbox_limit, joins = _serve_options(step.text, f"line {step.line_no}")
        options = ServerOptions(
            port=self.server_addr[1] if self.server_addr is not None else 0,
            host=self.host,
            timers=self.timers,
            epoch=self._epoch,
            wall_offset=self._wall_offset,
            mailbox_limit=mailbox_limit,
            limits=join_limits(joins),
        )
        self._server_done = trio.Event()
        node = await self._nursery.start(self._run_server, options, self._server_done)
        self.server, self.server_addr = node, node.endpoint.local_address
        self.faults.learn(node.endpoint.local_address, SERVER)

    async def _run_server(
        self, options: ServerOptions, done: trio.Event, task_status: trio.TaskStatus[Node]
    ) -> None:
        if self.store is None:
            self.store = self._store_factory()
        try:
            await run_node(
                options,
                network=self.network,
                store=self.store,
                recorder=self.recorder,
                faults=self.faults,
                task_status=task_status,
            )
        finally:
            if self._shutting_down:
                self.store.close()
            done.set()

    async def _join(self, step: Step) -> None:
        if self.server_addr is None:
            raise ScenarioError(f"line {step.line_no}: join before serve")
        if step.node in self.clients and not self.clients[step.node].done.is_set():
            raise ScenarioError(f"line {step.line_no}: {step.node} has already joined")
        name, again = step.node, self.clients.get(step.node)
        port = self._join_port(step, again)
        state_dir = self.state_dir / f"{NEW_KEY}-{step.line_no}" if step.text == NEW_KEY else None
        report = self._on_line
        on_line = (lambda line: report(name, line)) if report is not None else None
        screen = CapturedScreen(on_line=on_line)
        send_input, receive_input = trio.open_memory_channel[Input](64)
        options = ClientOptions(
            name,
            self.server_addr[0],
            self.server_addr[1],
            port=port,
            host=self.host,
            timers=self.timers,
            state_dir=str(state_dir or self.state_dir),
        )
        handle = ClientHandle(screen, send_input)
        self.clients[name] = handle
        handle.node = await self._nursery.start(self._run_client, options, handle, receive_input)
        handle.port = handle.node.endpoint.local_address[1]
        self.faults.learn(handle.node.endpoint.local_address, name)

    def _join_port(self, step: Step, again: ClientHandle | None) -> int:
        """The port a ``join`` asks for: any (0), its own last one (``same-port``), or the
        last one of another client (``port-of NAME``)."""
        word, _, other = step.text.partition(" ")
        if step.text in ("", NEW_KEY):
            return 0
        if step.text == SAME_PORT and again is not None:
            return again.port
        if word == PORT_OF and other in self.clients and self.clients[other].done.is_set():
            return self.clients[other].port
        raise ScenarioError(
            f"line {step.line_no}: join takes a name (and {SAME_PORT}, {NEW_KEY} or"
            f" {PORT_OF} NAME of a client that has stopped), not {step.text!r}"
        )

    async def _run_client(
        self,
        options: ClientOptions,
        handle: ClientHandle,
        inputs: trio.MemoryReceiveChannel[Input],
        task_status: trio.TaskStatus[Node],
    ) -> None:
        try:
            handle.status = await run_node(
                options,
                network=self.network,
                recorder=self.recorder,
                faults=self.faults,
                screen=handle.screen,
                inputs=inputs,
                task_status=task_status,
            )
        finally:
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

    async def _kill(self, step: Step) -> None:
        """The node stops at once, saying nothing (a crash, a SIGKILL)."""
        if step.node == SERVER:
            await self._stop(step)
            return
        handle = self._client(step)
        if handle.node is not None:
            handle.node.stop()
        await handle.done.wait()

    async def _drop(self, step: Step) -> None:
        self._arm("drop", step)

    async def _dup(self, step: Step) -> None:
        self._arm("dup", step)

    async def _delay(self, step: Step) -> None:
        self._arm("delay", step)

    def _arm(self, what: FaultKind, step: Step) -> None:
        args = _fault_args(what, step.text, f"line {step.line_no}")
        self.faults.arm(args.node, args.peer, args.of, what, args.count, args.delay)

    async def _faults(self, step: Step) -> None:
        args = _fault_args("faults", step.text, f"line {step.line_no}")
        self.faults.at_random(args.loss, args.dup, args.seed)

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

    # --- hostile datagrams (chatapp.testing.attacker) --------------------------------

    async def _attack(self, step: Step) -> None:
        """An attacker node (role ``raw``) sends what the step names."""
        kind, words = _attack_args(step.text, f"line {step.line_no}")
        if step.node not in self.attackers:
            attacker = await Attacker.open(step.node, self.network, self.host, self.recorder)
            self.attackers[step.node] = attacker
            self.faults.learn(attacker.endpoint.local_address, step.node)
            self._nursery.start_soon(attacker.receive_loop)
        try:
            await self.attackers[step.node].play(kind, words, self.server_addr)
        except (ValueError, trio.TooSlowError) as exc:
            raise ScenarioError(f"line {step.line_no}: {step} failed: {exc!r}") from None

    def _client(self, step: Step) -> ClientHandle:
        try:
            return self.clients[step.node]
        except KeyError:
            raise ScenarioError(f"line {step.line_no}: no client named {step.node}") from None

    async def shutdown(self) -> None:
        """Stop every node that is still running (and remove a state directory of its own)."""
        for handle in self.clients.values():
            if handle.node is not None:
                handle.node.stop()
        for attacker in self.attackers.values():
            attacker.close()
        self._shutting_down = True
        if self.server is not None and not self._server_done.is_set():
            self.server.stop()  # its task closes the store as it ends
        elif self.store is not None:
            self.store.close()
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)


async def play_scenario(
    steps: list[Step],
    network: Network,
    **cluster_options: object,
) -> Cluster:
    """Play ``steps`` to the end, then stop every node; the cluster keeps what each showed.
    The clients' keys live in a temporary directory (unless the options give a
    ``state_dir``), removed at the end."""
    async with trio.open_nursery() as nursery:
        cluster = Cluster(nursery, network, **cluster_options)  # type: ignore[arg-type]
        try:
            await cluster.play(steps)
        finally:
            await cluster.shutdown()
    return cluster


def scenario_path(name: str) -> Path:
    """A scenario that ships with chatapp (``test1`` .. ``test3``: the seed's tests)."""
    return Path(__file__).parent.parent / "scenarios" / f"{name}.txt"


__all__ = [
    "Cluster",
    "ScenarioError",
    "Step",
    "load_scenario",
    "parse_scenario",
    "play_scenario",
    "scenario_path",
]
