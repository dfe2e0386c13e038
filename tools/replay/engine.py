"""Running a recorded trace again: fresh nodes, the recorded inputs, a new trace.

The recording is turned into a plan of *actions*: things that came from
outside the protocol (a node starts, a line is typed, a node is stopped) and,
with ``--node``, the datagrams the other nodes sent. An action is carried out
once every event that preceded it in the recording has been reproduced
(counting events per stream, see ``Counting``), then as long after the last
of them as in the recording, up to one ACK timeout: cause and effect keep
their order, a line typed while a timer ran keeps its place in that timer,
and a person's think time is cut. When the run diverges and an awaited event
never comes, the action goes ahead after ``quiet`` seconds without progress,
and the comparison reports the divergence.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio
import trio.testing

from chatapp import screen
from chatapp.net import Endpoint, Faults, MemoryNetwork, UdpEndpoint
from chatapp.node import BadInput, CapturedScreen, Input, Node, Signal
from chatapp.protocol.client import ClientProtocol
from chatapp.protocol.common import Persist, Timers
from chatapp.protocol.server import ClientRecord, Presence, ServerProtocol
from chatapp.scenario import _counter_tokens  # the scenario player's tokens, the same form
from chatapp.trace import (
    Event,
    Exited,
    MemoryRecorder,
    Normaliser,
    Recv,
    Restored,
    Send,
    Shown,
    Start,
    Trace,
    parse_addr,
)
from chatapp.trace import Input as Typed
from chatapp.wire import Address, Message, StoredItem, WireError, decode, encode, fmt_addr
from tools.replay.compare import ANSWERS

#: Seconds a datagram spends on the in-memory network: the recording's typical
#: time on the wire, within these bounds.
TRANSIT = (0.0001, 0.05)

#: Lines after which a client exits by itself: its recorded exit needs no stop.
_EXIT_LINES = {screen.KEYBOARD_INTERRUPT, screen.EXITING}
_EXIT_INPUTS = {"<interrupt>", "<hang_up>"}


class ReplayError(Exception):
    """A trace that cannot be replayed the way it was asked (one line for the user)."""


@dataclass(frozen=True)
class ReplayOptions:
    virtual: bool = True
    node: str | None = None  # the one node under test; the others are played from the trace
    target: Address | None = None  # a running server to test black-box (with node="server")
    loss: float = 0.0
    dup: float = 0.0
    seed: int = 0
    quiet: float | None = None  # no progress for this long: the next action goes ahead anyway

    @property
    def faults(self) -> bool:
        return self.loss > 0 or self.dup > 0


@dataclass
class Action:
    event: Event  # the recorded event this action reproduces
    kind: str  # start | input | stop | puppet_send
    delay: float = 0.0  # protocol time to let pass first (a puppet's retry, say)
    need: Counter[str] = field(default_factory=Counter)
    restored: Restored | None = None  # a server's start: what it read from its database
    # The latest counted event before this one, as (node, its index among that node's
    # counted events), and how long after it this one came in the recording.
    anchor: tuple[str, int] | None = None
    gap: float = 0.0
    # A played node's datagram that its own timer or a datagram caused: what caused it,
    # ("recv", k) its k-th datagram from the node under test or ("sent", seq) its own
    # earlier datagram, and ``delay`` after that cause.
    cause: tuple[str, int] | None = None


def recorded_transit(trace: Trace, names: Normaliser) -> float:
    """The median time between a datagram's send and its receipt in the recording."""
    sent: dict[tuple[str, str, bytes], list[float]] = {}
    for event in trace.events:
        if isinstance(event, Send):
            sent.setdefault((event.node, names.address(event.peer), event.data), []).append(event.t)
    times: list[float] = []
    for event in trace.events:
        if isinstance(event, Recv):
            waiting = sent.get((names.address(event.peer), event.node, event.data))
            if waiting:
                times.append(event.t - waiting.pop(0))
    if not times:
        return TRANSIT[0]
    times.sort()
    return min(max(times[len(times) // 2], TRANSIT[0]), TRANSIT[1])


def server_name(trace: Trace) -> str:
    servers = [name for name, info in trace.nodes().items() if info.role == "server"]
    if len(servers) != 1:
        raise ReplayError(f"the trace has {len(servers)} servers; replay needs exactly one")
    return servers[0]


def external_exits(events: list[Event]) -> set[int]:
    """The seqs of exit events that came from outside the protocol (a stop, not an Exit)."""
    external: set[int] = set()
    previous: dict[str, Event] = {}
    roles: dict[str, str] = {}
    for event in events:
        if isinstance(event, Start):
            roles[event.node] = event.role
        if isinstance(event, Exited):
            before = previous.get(event.node)
            natural = (
                event.status != 0
                or (isinstance(before, Typed) and before.line in _EXIT_INPUTS)
                or (isinstance(before, Shown) and before.line in _EXIT_LINES)
            )
            if roles.get(event.node) == "server" or not natural:
                external.add(event.seq)
        previous[event.node] = event
    return external


class Counting:
    """Which events count as progress in one replay mode, and in which stream: an action
    waits until each stream (a node's datagrams to one peer, from one peer, its shown
    lines, ...) has as many events as it had before the action in the recording.

    One instance per trace: it remembers the answers already seen, since an answer
    repeated for a retried request is left out (how many retries cross an answer is a
    race of the moment), as the comparison leaves it out."""

    def __init__(self, under_test: str | None, target: bool) -> None:
        self.under_test = under_test
        self.target = target
        self._answers: set[tuple[str, bytes]] = set()

    def key(self, event: Event, normaliser: Normaliser) -> str | None:
        if isinstance(event, Restored):
            return None  # part of its server's start, not something to wait for
        if self.target:
            if isinstance(event, Recv) and normaliser.address(event.peer) == self.under_test:
                return self._stream(f"{self.under_test}|send|{event.node}", event)
            return None
        if self.under_test is not None and event.node != self.under_test:
            return None
        if isinstance(event, Send | Recv):
            kind = "send" if isinstance(event, Send) else "recv"
            return self._stream(f"{event.node}|{kind}|{normaliser.address(event.peer)}", event)
        return f"{event.node}|{type(event).__name__}"

    def _stream(self, stream: str, event: Send | Recv) -> str | None:
        if event.msg is not None and event.msg.get("t") in ANSWERS:
            answer = (stream, event.data)
            if answer in self._answers:
                return None
            self._answers.add(answer)
        return stream


def make_plan(recorded: Trace, options: ReplayOptions, normaliser: Normaliser) -> list[Action]:
    timers = recorded.header.timers.timers()
    external = external_exits(recorded.events)
    counting = Counting(options.node, options.target is not None)
    seen: Counter[str] = Counter()
    last_cause: dict[str, Event] = {}
    plan: list[Action] = []
    under_test = options.node
    restored: dict[str, Restored] = {}
    latest: tuple[str, int, float] | None = None
    heard: Counter[str] = Counter()  # datagrams each played node had from the node under test
    for event in recorded.events:
        action: Action | None = None
        if isinstance(event, Restored):
            restored[event.node] = event
        mine = under_test is None or event.node == under_test
        if mine and not (options.target and event.node == under_test):
            if isinstance(event, Start):
                action = Action(event, "start", restored=restored.pop(event.node, None))
            elif isinstance(event, Typed):
                action = Action(event, "input")
            elif isinstance(event, Exited) and event.seq in external:
                action = Action(event, "stop")
        elif not mine and isinstance(event, Send) and normaliser.address(event.peer) == under_test:
            action = Action(event, "puppet_send")
            before = last_cause.get(event.node)
            cause: tuple[str, int] | None = None
            if isinstance(before, Recv) and normaliser.address(before.peer) == under_test:
                cause = ("recv", heard[event.node] - 1)
            elif isinstance(before, Send) and normaliser.address(before.peer) == under_test:
                cause = ("sent", before.seq)
            if before is not None and cause is not None:
                action.cause = cause
                action.delay = min(event.t - before.t, timers.ack_timeout * (timers.tries + 1))
        if isinstance(event, Recv) and not mine and normaliser.address(event.peer) == under_test:
            heard[event.node] += 1
        if action is not None:
            action.need = Counter(seen)
            if latest is not None and action.cause is None:
                node, index, at = latest
                action.anchor, action.gap = (node, index), max(0.0, event.t - at)
            plan.append(action)
        key = counting.key(event, normaliser)
        if key is not None:
            latest = (key, seen[key], event.t)
            seen[key] += 1
        if not isinstance(event, Shown | Exited):  # a line shown is an effect, never a cause
            last_cause[event.node] = event
    plan.append(Action(recorded.events[-1], "end", need=Counter(seen)))
    return plan


class KeepingStore:
    """The server's database, in memory: at each start it holds what the recorded server
    read from its own, then takes the run's changes (a real database would need a
    worker thread, which virtual time must not wait on)."""

    def __init__(self) -> None:
        self.clients: dict[str, ClientRecord] = {}
        self.mailbox: dict[str, list[StoredItem]] = {}

    def reset(self, restored: Restored | None, address: Callable[[Address], Address]) -> None:
        """Hold what the recorded server read from its database when it started (nothing
        when the recording says nothing)."""
        self.clients, self.mailbox = {}, {}
        if restored is None:
            return
        for name, ip, port, token, presence in restored.clients:
            self.clients[name] = ClientRecord(name, address((ip, port)), token, presence)
        for recipient, items in restored.mailbox.items():
            self.mailbox[recipient] = list(items)

    def load(self) -> tuple[list[ClientRecord], dict[str, list[StoredItem]]]:
        clients = [ClientRecord(r.name, r.addr, r.token, r.presence) for r in self.clients.values()]
        return clients, {name: list(items) for name, items in self.mailbox.items()}

    async def commit(self, changes: list[Persist]) -> None:
        for change in changes:
            if change.op == "client":
                name, ip, port, token, presence = change.args
                self.clients.pop(str(name), None)  # re-inserted last: the table's order
                self.clients[str(name)] = ClientRecord(
                    str(name),
                    (str(ip), int(str(port))),
                    str(token),
                    Presence(presence),
                )
            elif change.op == "store":
                recipient, item = change.args
                assert isinstance(item, StoredItem)
                box = self.mailbox.setdefault(str(recipient), [])
                if all(stored.id != item.id for stored in box):
                    box.append(item)
            elif change.op == "remove":
                recipient, ids = change.args
                assert isinstance(ids, tuple)
                box = self.mailbox.get(str(recipient), [])
                self.mailbox[str(recipient)] = [item for item in box if item.id not in ids]
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        pass


@dataclass
class _Running:
    node: Node
    done: trio.Event
    inputs: trio.MemorySendChannel[Input] | None = None
    exited: bool = False


class _Puppet:
    """A node played from the recording: it only sends what it is told and records what it gets."""

    def __init__(self, name: str, endpoint: Endpoint, recorder: MemoryRecorder) -> None:
        self.name = name
        self.endpoint = endpoint
        self.recorder = recorder

    async def receive_loop(self) -> None:
        local = self.endpoint.local_address
        while True:
            try:
                data, addr = await self.endpoint.receive()
            except OSError:
                continue
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            try:
                message: Message | None = decode(data)
                error = None
            except WireError as exc:
                message, error = None, str(exc)
            self.recorder.datagram(self.name, "recv", local, addr, data, message, error)

    async def send(self, data: bytes, message: Message | None, addr: Address) -> None:
        self.recorder.datagram(self.name, "send", self.endpoint.local_address, addr, data, message)
        with contextlib.suppress(OSError):
            await self.endpoint.send(data, addr)


class Replay:
    """One replay run; ``trace()`` is what it recorded."""

    def __init__(self, recorded: Trace, options: ReplayOptions) -> None:
        self.recorded = recorded
        self.options = options
        self.timers: Timers = recorded.header.timers.timers()
        if not recorded.events:
            raise ReplayError("the trace has no events")
        self.nodes = recorded.nodes()
        self.server = server_name(recorded)
        unplaced = [name for name, info in self.nodes.items() if not info.address]
        if unplaced:
            raise ReplayError(f"the trace does not say where {', '.join(unplaced)} listened")
        if options.node is not None and options.node not in self.nodes:
            raise ReplayError(
                f"no node named {options.node} in the trace (nodes: {', '.join(self.nodes)})"
            )
        if options.target is not None and options.node != self.server:
            raise ReplayError(f"--target tests a running server: use it with --node {self.server}")
        if options.faults and not options.virtual:
            raise ReplayError("--loss and --dup work on the in-memory network: add --virtual")
        scoped = options.node if options.target is not None and options.node else ""
        self.recorded_names = Normaliser.of(recorded.events, scoped=scoped)
        self.plan = make_plan(recorded, options, self.recorded_names)
        self.counting = Counting(options.node, options.target is not None)
        self.quiet = (
            options.quiet
            if options.quiet is not None
            else (self.timers.ack_timeout * (self.timers.tries + 2))
        )
        self.live_names = Normaliser(scoped=scoped)
        if options.node is not None:
            self.live_names.adopt(
                self.recorded_names,
                except_issuer=options.node,
                tokens=self.nodes[options.node].role != "server",
            )
        if options.target is not None:
            self.live_names.add_address(fmt_addr(options.target), self.server)
        self.counts: Counter[str] = Counter()
        self.times: dict[str, list[float]] = {}  # when each counted event happened, by node
        self.done_at: dict[int, float] = {}  # when each action was carried out, by recorded seq
        self.heard: dict[str, list[float]] = {}  # when each played node heard the tested one
        self._progress = trio.Event()
        # Each datagram takes as long as it typically took in the recording: a timer a
        # node starts on receipt ends after the sender's, as on the wire (never in a tie
        # with it), and a line typed while an answer was on its way is typed before it.
        transit = recorded_transit(recorded, self.recorded_names)
        self.network = MemoryNetwork(
            Faults(options.loss, options.dup, min_delay=transit, max_delay=transit),
            seed=options.seed,
        )
        self.running: dict[str, _Running] = {}
        self.puppets: dict[str, _Puppet] = {}
        self.new_addresses: dict[str, Address] = {}
        self.store = KeepingStore()
        self._epochs = itertools.count(1)
        self.stalls: list[str] = []

    # --- progress -----------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        self.live_names.learn(event)
        if (
            event.node in self.puppets
            and isinstance(event, Recv)
            and self.live_names.address(event.peer) == self.options.node
        ):
            self.heard.setdefault(event.node, []).append(trio.current_time())
        key = self.counting.key(event, self.live_names)
        if key is not None:
            self.counts[key] += 1
            self.times.setdefault(key, []).append(trio.current_time())
        self._progress.set()
        self._progress = trio.Event()

    async def _wait_for(self, need: Counter[str]) -> bool:
        while True:
            if all(self.counts[node] >= count for node, count in need.items()):
                return True
            progress = self._progress
            with trio.move_on_after(self.quiet):
                await progress.wait()
                continue
            return False

    async def _keep_gap(self, action: Action) -> None:
        """Let as much time pass after the event that preceded the action as did in the
        recording, up to one ACK timeout: a line typed while a timer ran elsewhere is
        then typed at the same point of that timer. Beyond the timeout every timer
        armed by then has fired, and the events it caused were waited for already,
        so longer gaps (think time) are cut."""
        if action.anchor is None:
            return
        node, index = action.anchor
        times = self.times.get(node, [])
        if index >= len(times):
            return
        gap = min(action.gap, self.timers.ack_timeout + 0.05)
        await trio.sleep_until(times[index] + gap)

    async def _after_cause(self, action: Action) -> None:
        """A played node's datagram goes as long after its cause as it did in the
        recording (a retry after the ACK timeout, an answer at once)."""
        assert action.cause is not None
        kind, ref = action.cause
        if kind == "sent":
            at = self.done_at.get(ref)
        else:
            arrivals = self.heard.get(action.event.node, [])
            at = arrivals[ref] if ref < len(arrivals) else None
        if at is None:
            await trio.sleep(action.delay)
        else:
            await trio.sleep_until(at + action.delay)

    def _settled(self) -> bool:
        for running in self.running.values():
            if not running.done.is_set() and running.node.protocol.next_deadline() is not None:
                return False
        return True

    async def _settle(self) -> None:
        # The in-memory network delivers without delay: after a step of virtual time
        # every datagram sent before it has been handled.
        step = self.timers.ack_timeout / 10
        calm = 0
        while calm < 2:
            await trio.sleep(step)
            calm = calm + 1 if self._settled() else 0

    # --- addresses ----------------------------------------------------------------

    def _recorded_address(self, node: str) -> Address:
        """Where the others reached ``node`` in the recording (a 0.0.0.0 bind is reached
        at the address they sent to)."""
        host, port = parse_addr(self.nodes[node].address)
        if host not in ("0.0.0.0", ""):
            return (host, port)
        for event in self.recorded.events:
            if isinstance(event, Send) and parse_addr(event.peer)[1] == port:
                peer = parse_addr(event.peer)
                if peer[0] != "0.0.0.0" and self.recorded_names.address(event.peer) == node:
                    return peer
        return ("127.0.0.1", port)

    async def _bind(self, node: str) -> Endpoint:
        if self.options.virtual:
            endpoint: Endpoint = self.network.bind(self._recorded_address(node))
        else:
            # The recorded port if it is free: a server that read its clients from a
            # database knows them by address. Any port does otherwise.
            try:
                endpoint = await UdpEndpoint.bind("127.0.0.1", self._recorded_address(node)[1])
            except OSError:
                endpoint = await UdpEndpoint.bind("127.0.0.1", 0)
        self.new_addresses[node] = endpoint.local_address
        return endpoint

    def _new_address(self, recorded: Address) -> Address:
        """Where the node recorded at ``recorded`` is in this run (if it has started)."""
        node = self.recorded_names.address(fmt_addr(recorded))
        return self.new_addresses.get(node, recorded)

    def _server_address(self) -> Address:
        if self.options.target is not None:
            return self.options.target
        return self.new_addresses.get(self.server) or self._recorded_address(self.server)

    # --- running ---------------------------------------------------------------------

    async def run(self) -> Trace:
        self._recorder = MemoryRecorder(
            timers=self.timers,
            on_event=self._on_event,
            started=self.recorded.header.started,
            clock="virtual" if self.options.virtual else "real",
            source="chat-replay",
        )
        async with trio.open_nursery() as nursery:
            if self.options.node is not None:
                for name in self.nodes:
                    if name != self.options.node:
                        await self._start_puppet(nursery, name)
            for action in self.plan:
                if self.options.faults:
                    # Lost and repeated datagrams change how many events a step takes:
                    # wait instead until the nodes have nothing left to do.
                    await self._settle()
                elif not await self._wait_for(action.need):
                    self.stalls.append(
                        f"before recorded seq {action.event.seq}: waited {self.quiet:g} s for"
                        f" events that did not come"
                    )
                    # The run has diverged and will fail; later steps need not wait as long.
                    self.quiet = min(self.quiet, 2 * self.timers.ack_timeout)
                elif action.cause is not None:
                    await self._after_cause(action)
                else:
                    await self._keep_gap(action)
                await self._carry_out(nursery, action)
                self.done_at[action.event.seq] = trio.current_time()
            muted = _Muted()
            for running in self.running.values():
                running.node.recorder = muted
                running.node.stop()
            for puppet in self.puppets.values():
                puppet.recorder = muted  # type: ignore[assignment]
                puppet.endpoint.close()
            nursery.cancel_scope.cancel()
        return self.trace()

    def trace(self) -> Trace:
        return self._recorder.trace()

    async def _carry_out(self, nursery: trio.Nursery, action: Action) -> None:
        event = action.event
        if action.kind == "start":
            assert isinstance(event, Start)
            if event.role == "server":
                await self._start_server(nursery, event.node, action.restored)
            else:
                await self._start_client(nursery, event.node)
        elif action.kind == "input":
            assert isinstance(event, Typed)
            running = self.running.get(event.node)
            if running is not None and running.inputs is not None and not running.done.is_set():
                await running.inputs.send(_as_input(event.line))
        elif action.kind == "stop":
            running = self.running.get(event.node)
            if running is not None and not running.done.is_set():
                running.node.stop()
                await running.done.wait()
        elif action.kind == "puppet_send":
            assert isinstance(event, Send)
            await self._puppet_send(event)

    async def _start_server(
        self, nursery: trio.Nursery, name: str, restored: Restored | None
    ) -> None:
        endpoint = await self._bind(name)
        epoch = next(self._epochs)
        protocol = ServerProtocol(
            timers=self.timers,
            id_prefix=f"s{epoch}",
            epoch=epoch,
            wall_offset=self.recorded.header.started,
            token_factory=_counter_tokens(f"t{epoch}"),
        )
        self.store.reset(restored, self._new_address)
        clients, mailbox = self.store.load()
        protocol.restore(clients, mailbox)
        self._recorder.restored(name, clients, mailbox)
        node = Node(name, protocol, endpoint, recorder=self._recorder, store=self.store)
        await self._launch(nursery, name, node, None)

    async def _start_client(self, nursery: trio.Nursery, name: str) -> None:
        endpoint = await self._bind(name)
        protocol = ClientProtocol(
            name,
            self._server_address(),
            endpoint.local_address[1],
            timers=self.timers,
            id_prefix=name,
        )
        node = Node(name, protocol, endpoint, screen=CapturedScreen(), recorder=self._recorder)
        send_input, receive_input = trio.open_memory_channel[Input](64)
        await self._launch(nursery, name, node, (send_input, receive_input))

    async def _launch(
        self,
        nursery: trio.Nursery,
        name: str,
        node: Node,
        channel: tuple[trio.MemorySendChannel[Input], trio.MemoryReceiveChannel[Input]] | None,
    ) -> None:
        running = _Running(node, trio.Event(), channel[0] if channel else None)
        self.running[name] = running
        argv = self._argv(name, node.endpoint.local_address)

        async def run(task_status: trio.TaskStatus[None]) -> None:
            try:
                await node.run(channel[1] if channel else None, argv=argv, task_status=task_status)
            finally:
                node.endpoint.close()
                running.done.set()

        await nursery.start(run)

    def _argv(self, name: str, local: Address) -> list[str]:
        if name == self.server:
            return ["chatapp", "serve", str(local[1])]
        server = self._server_address()
        return ["chatapp", "join", name, server[0], str(server[1]), str(local[1])]

    async def _start_puppet(self, nursery: trio.Nursery, name: str) -> None:
        endpoint = await self._bind(name)
        puppet = _Puppet(name, endpoint, self._recorder)
        self.puppets[name] = puppet
        self._recorder.node_started(
            name,
            self.nodes[name].role,
            self._argv(name, endpoint.local_address),
            endpoint.local_address,
        )
        nursery.start_soon(puppet.receive_loop)

    async def _puppet_send(self, event: Send) -> None:
        puppet = self.puppets[event.node]
        under_test = self.options.node
        assert under_test is not None
        destination = self.options.target or self.new_addresses.get(under_test)
        if destination is None:
            return  # the node under test is not running: nothing to answer
        data = event.data
        message: Message | None = None
        if event.msg is not None:
            rewritten = self._rewrite(event.msg, event.node)
            try:
                message = msgspec.convert(rewritten, Message)
                data = encode(message)
            except msgspec.ValidationError:
                message = None
        await puppet.send(data, message, destination)

    def _rewrite(self, msg: dict[str, Any], puppet: str) -> dict[str, Any]:
        """A recorded datagram, with the values the node under test chose in this run
        (its ids, its tokens) and the addresses of this run."""
        under_test = self.options.node
        recorded, live = self.recorded_names, self.live_names

        def new_id(value: Any) -> Any:
            label = recorded.label(value, puppet)
            if label.partition("#")[0] != under_test:
                return value
            return live.id_values.get(label, value)

        result: dict[str, Any] = {}
        for key, value in msg.items():
            if key in ("id", "delivery"):
                result[key] = new_id(value)
            elif key == "token" and under_test == self.server:
                label = recorded.token_labels.get(value)
                result[key] = live.token_values.get(label, value) if label else value
            elif key == "port" and isinstance(value, int):
                node = recorded.ports.get(value)
                result[key] = self.new_addresses[node][1] if node in self.new_addresses else value
            elif key == "entries" and isinstance(value, list):
                result[key] = [self._rewrite_entry(entry) for entry in value]
            elif key == "entry" and value is not None:
                result[key] = self._rewrite_entry(value)
            elif key == "items" and isinstance(value, list):
                result[key] = [{**item, "id": new_id(item.get("id"))} for item in value]
            else:
                result[key] = value
        return result

    def _rewrite_entry(self, entry: Any) -> Any:
        if not isinstance(entry, list) or len(entry) != 4:
            return entry
        name, ip, port, online = entry
        node = self.recorded_names.address(f"{ip}:{port}")
        if node in self.new_addresses:
            ip, port = self.new_addresses[node]
        return [name, ip, port, online]


class _Muted:
    """The recorder once the plan is done: the nodes are stopped without adding to the trace."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def _as_input(line: str) -> Input:
    if line == "<interrupt>":
        return Signal.INTERRUPT
    if line == "<hang_up>":
        return Signal.HANG_UP
    if line.startswith("<bad input: ") and line.endswith(">"):
        return BadInput(line[len("<bad input: ") : -1])
    return line


def run_replay(recorded: Trace, options: ReplayOptions) -> tuple[Trace, Replay]:
    """Replay ``recorded``; returns the new trace and the run (for its notes)."""
    replay = Replay(recorded, options)
    clock = trio.testing.MockClock(autojump_threshold=0) if options.virtual else None
    trace = trio.run(replay.run, clock=clock)
    return trace, replay


__all__ = ["ReplayError", "ReplayOptions", "external_exits", "run_replay"]
