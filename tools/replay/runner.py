"""Running a recorded trace again: fresh nodes, the recorded inputs, a new trace.

The ``Runner`` carries out the plan (``plan.py``): it starts each node with
``chatapp.launch.run_node``, as the command line does, on the in-memory
network in virtual time or on real UDP sockets; types the recorded lines;
stops nodes; and, with ``--node``, has the other nodes played by puppets
(``puppets.py``). ``Progress`` tells it when the events an action waits for have
been reproduced. When the run diverges and an awaited event never comes, the
action goes ahead after ``quiet`` seconds without progress, and the comparison
reports the divergence.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import trio
import trio.testing

from chatapp.argv import options_from_argv
from chatapp.launch import (
    ClientOptions,
    Options,
    ServerOptions,
    StartupError,
    run_node,
)
from chatapp.net import UDP, Network
from chatapp.node import Input, Node
from chatapp.protocol.crypto import Identity, unb64
from chatapp.protocol.waits import longest_wait
from chatapp.testing import CapturedScreen, Faults, MemoryNetwork
from chatapp.testing.determinism import deterministic_scheduling
from chatapp.testing.stores import InlineSqliteStore
from chatapp.trace import (
    Event,
    MemoryRecorder,
    Recv,
    Restored,
    Send,
    Start,
    Trace,
    parse_addr,
    parse_input_line,
)
from chatapp.trace import (
    Input as Typed,
)
from chatapp.typer_support import UsageError, usage_error_line
from chatapp.wire import Address, Message, fmt_addr

from .normalise import Normaliser
from .plan import (
    Action,
    Counting,
    ReplayError,
    ReplayOptions,
    check_replayable,
    make_plan,
    recorded_transit,
)
from .puppets import LiveKeys, Puppet, Rewriter
from .starts import client_start, recorded_faults, restored_store

OptionsT = TypeVar("OptionsT", ServerOptions, ClientOptions)


class Progress:
    """What the replay has reproduced so far: the counted events of each stream, and
    when each happened (and when each played node heard from the node under test)."""

    def __init__(self, counting: Counting, names: Normaliser, under_test: str | None) -> None:
        self.counting = counting
        self.names = names
        self.under_test = under_test
        self.puppets: set[str] = set()
        self.counts: Counter[str] = Counter()
        self.times: dict[str, list[float]] = {}  # when each counted event happened, by stream
        self.heard: dict[str, list[float]] = {}  # when each played node heard the tested one
        self._changed = trio.Event()

    def on_event(self, event: Event) -> None:
        self.names.learn(event)
        if (
            event.node in self.puppets
            and isinstance(event, Recv)
            and self.names.address(event.peer) == self.under_test
        ):
            self.heard.setdefault(event.node, []).append(trio.current_time())
        key = self.counting.key(event, self.names)
        if key is not None:
            self.counts[key] += 1
            self.times.setdefault(key, []).append(trio.current_time())
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, need: Counter[str], quiet: float) -> bool:
        """Until every stream has its count (True), or nothing happened for ``quiet`` s."""
        while True:
            if all(self.counts[node] >= count for node, count in need.items()):
                return True
            changed = self._changed
            with trio.move_on_after(quiet):
                await changed.wait()
                continue
            return False

    async def keep_gap(self, action: Action, longest: float) -> None:
        """Let as much time pass after the event that preceded the action as did in the
        recording, up to ``longest``: a line typed while a timer ran elsewhere is then
        typed at the same point of that timer. On real sockets that is one ACK timeout:
        beyond it every timer armed by then has fired, and the events it caused were
        waited for already, so longer gaps (think time) are cut. In virtual time no gap
        is cut (waiting costs nothing): every step comes when it came."""
        if action.anchor is None:
            return
        node, index = action.anchor
        times = self.times.get(node, [])
        if index >= len(times):
            return
        await trio.sleep_until(times[index] + min(action.gap, longest))

    async def after_cause(self, action: Action, done_at: dict[int, float]) -> None:
        """A played node's datagram goes as long after its cause as it did in the
        recording (a retry after the ACK timeout, an answer at once)."""
        assert action.cause is not None
        kind, ref = action.cause
        if kind == "sent":
            at = done_at.get(ref)
        else:
            arrivals = self.heard.get(action.event.node, [])
            at = arrivals[ref] if ref < len(arrivals) else None
        if at is None:
            await trio.sleep(action.delay)
        else:
            await trio.sleep_until(at + action.delay)


@dataclass
class _Running:
    done: trio.Event
    inputs: trio.MemorySendChannel[Input] | None = None
    node: Node | None = None


class Runner:
    """One replay run; ``trace()`` is what it recorded."""

    def __init__(self, recorded: Trace, options: ReplayOptions) -> None:
        self.recorded = recorded
        self.options = options
        self.timers = recorded.header.timers.timers()
        self.nodes, self.server = check_replayable(recorded, options)
        scoped = options.node if options.target is not None and options.node else ""
        self.recorded_names = Normaliser.of(recorded.events, scoped=scoped)
        self.plan = make_plan(recorded, options, self.recorded_names)
        self.quiet = (
            options.quiet
            if options.quiet is not None
            else longest_wait(self.timers) + 2 * self.timers.ack_timeout
        )
        live_names = Normaliser(scoped=scoped)
        if options.node is not None:
            live_names.adopt(self.recorded_names, except_issuer=options.node)
        if options.target is not None:
            live_names.add_address(fmt_addr(options.target), self.server)
        counting = Counting(options.node, options.target is not None)
        self.progress = Progress(counting, live_names, options.node)
        self.done_at: dict[int, float] = {}  # when each action was carried out, by recorded seq
        # Each datagram takes as long as it typically took in the recording: a timer a
        # node starts on receipt ends after the sender's, as on the wire (never in a tie
        # with it), and a line typed while an answer was on its way is typed before it.
        transit = recorded_transit(recorded, self.recorded_names)
        faults = Faults(options.loss, options.dup, min_delay=transit, max_delay=transit)
        self.network = MemoryNetwork(faults, seed=options.seed)
        self.running: dict[str, _Running] = {}
        self.puppets: dict[str, Puppet] = {}
        self.new_addresses: dict[str, Address] = {}  # where each node is now
        self.moved: dict[Address, Address] = {}  # each start's recorded address -> its new one
        self.faults = recorded_faults(recorded, self.recorded_names)
        self.stores: dict[str, InlineSqliteStore] = {}  # each server's database
        self._epochs = itertools.count(1)
        self.stalls: list[str] = []
        self._recorder: MemoryRecorder  # made in run(): it reads the run's clock
        self._state_dir = ""

    def trace(self) -> Trace:
        return self._recorder.trace()

    async def run(self) -> Trace:
        self._recorder = MemoryRecorder(
            timers=self.timers,
            on_event=self.progress.on_event,
            started=self.recorded.header.started,
            clock="virtual" if self.options.virtual else "real",
            source="chat-replay",
        )
        # The replayed clients start from their recorded state; what they write (marks,
        # pins) goes to a temporary directory, never to the user's.
        with tempfile.TemporaryDirectory(prefix="chat-replay-") as state_dir:
            self._state_dir = state_dir
            try:
                return await self._run_plan()
            finally:
                for store in self.stores.values():
                    store.close()

    async def _run_plan(self) -> Trace:
        async with trio.open_nursery() as nursery:
            for name, info in self.nodes.items():
                tested = self.options.node
                if name != tested and (tested is not None or info.role == "raw"):
                    await self._start_puppet(nursery, name)
            for action in self.plan:
                await self._pace(action)
                await self._carry_out(nursery, action)
                self.done_at[action.event.seq] = trio.current_time()
            self._stop_all()
            nursery.cancel_scope.cancel()
        return self.trace()

    # --- pacing ----------------------------------------------------------------------

    async def _pace(self, action: Action) -> None:
        """Wait until ``action`` may be carried out."""
        if self.options.faults:
            # Lost and repeated datagrams change how many events a step takes:
            # wait instead until the nodes have nothing left to do.
            await self._settle()
        elif not await self.progress.wait_for(action.need, self.quiet):
            self.stalls.append(
                f"before recorded seq {action.event.seq}: waited {self.quiet:g} s for"
                f" events that did not come"
            )
            # The run has diverged and will fail; later steps need not wait as long.
            self.quiet = min(self.quiet, 2 * self.timers.ack_timeout)
        elif action.cause is not None:
            await self.progress.after_cause(action, self.done_at)
        else:
            longest = math.inf if self.options.virtual else self.timers.ack_timeout + 0.05
            await self.progress.keep_gap(action, longest)

    def _settled(self) -> bool:
        return all(
            running.node is None
            or running.done.is_set()
            or running.node.protocol.next_deadline() is None
            for running in self.running.values()
        )

    async def _settle(self) -> None:
        # The in-memory network delivers without delay: after a step of virtual time
        # every datagram sent before it has been handled.
        step = self.timers.ack_timeout / 10
        calm = 0
        while calm < 2:
            await trio.sleep(step)
            calm = calm + 1 if self._settled() else 0

    def _stop_all(self) -> None:
        """Stop every node without adding to the trace."""
        muted = _Muted()
        for running in self.running.values():
            if running.node is not None:
                running.node.recorder = muted
                running.node.stop()
        for puppet in self.puppets.values():
            puppet.recorder = muted
            puppet.endpoint.close()

    # --- carrying out actions --------------------------------------------------------

    async def _carry_out(self, nursery: trio.Nursery, action: Action) -> None:
        event = action.event
        if action.kind == "start":
            assert isinstance(event, Start)
            if event.role == "server":
                await self._start_server(nursery, event, action.restored)
            else:
                await self._start_client(nursery, event)
        elif action.kind == "input":
            assert isinstance(event, Typed)
            running = self.running.get(event.node)
            if running is not None and running.inputs is not None and not running.done.is_set():
                await running.inputs.send(parse_input_line(event.line))
        elif action.kind == "stop":
            running = self.running.get(event.node)
            if running is not None and running.node is not None and not running.done.is_set():
                running.node.stop()
                await running.done.wait()
        elif action.kind == "puppet_send":
            assert isinstance(event, Send)
            await self._puppet_send(event)

    # --- nodes -----------------------------------------------------------------------

    async def _start_server(
        self, nursery: trio.Nursery, started: Start, restored: Restored | None
    ) -> None:
        epoch = self._recorded_epoch(started)
        name = started.node
        host, port = self._listen_at(name, started.local)
        options = dataclasses.replace(
            self._options_of(started, ServerOptions),
            port=port,
            host=host,
            db=":memory:",
            trace=None,
            name=name,
            epoch=epoch,
            wall_offset=self._recorder.wall_offset,
            entropy_seed=unb64(started.seed) if started.seed else None,
        )
        # A restart goes on from the database the replayed server left (as the recorded
        # one did from its own); a first start from what the recording's server read.
        store = self.stores.get(name) or restored_store(restored, self._new_address)
        self.stores[name] = store
        await self._launch(nursery, name, options, store=store, at=started.local)

    def _recorded_epoch(self, started: Start) -> int:
        """The table epoch the server had in the recording from ``started`` on (the first
        one it sent), so that the tables' ACKs recorded by played clients, which name
        it, fit the replayed server; a new one if it sent no table."""
        after = False
        for event in self.recorded.events:
            if event is started:
                after = True
            elif after and isinstance(event, Start) and event.node == started.node:
                break
            elif after and isinstance(event, Send) and event.node == started.node and event.msg:
                epoch = event.msg.get("epoch")
                if isinstance(epoch, int) and not isinstance(epoch, bool):
                    return epoch
        return next(self._epochs)

    async def _start_client(self, nursery: trio.Nursery, started: Start) -> None:
        name = started.node
        host, port = self._listen_at(name, started.local)
        server = self._server_address()
        options = dataclasses.replace(
            self._options_of(started, ClientOptions),
            name=name,
            server_ip=server[0],
            server_port=server[1],
            port=port,
            host=host,
            trace=None,
            state_dir=self._state_dir,
            entropy_seed=unb64(started.seed) if started.seed else None,
            start_from=client_start(started),
        )
        send_input, receive_input = trio.open_memory_channel[Input](64)
        inputs = (send_input, receive_input)
        await self._launch(
            nursery, name, options, inputs=inputs, screen=CapturedScreen(), at=started.local
        )

    def _options_of(self, started: Start, kind: type[OptionsT]) -> OptionsT:
        """The options the node's recorded command line gives now, read by ``chatapp``'s
        own command definitions (``options_from_argv``): a changed default of
        ``chatapp serve`` or ``join`` is a changed node (the comparison of the start
        events' settings says which). A trace that names no command line: the one that
        starts the node where it listened."""
        argv = started.argv or self._argv(started.node, parse_addr(started.local))
        try:
            options = options_from_argv(argv)
        except UsageError as exc:
            line = usage_error_line(exc, "chatapp")
            raise ReplayError(f"{started.node}'s recorded command line: {line}") from None
        if not isinstance(options, kind):
            raise ReplayError(f"{started.node}'s recorded command line starts no {started.role}")
        return options

    async def _launch(
        self,
        nursery: trio.Nursery,
        name: str,
        options: Options,
        *,
        inputs: tuple[trio.MemorySendChannel[Input], trio.MemoryReceiveChannel[Input]]
        | None = None,
        at: str,
        **node_options: Any,
    ) -> None:
        """Start the node recorded at ``at`` (this start's address)."""
        running = _Running(trio.Event(), inputs[0] if inputs else None)
        node_options.update(
            network=self.network if self.options.virtual else UDP,
            recorder=self._recorder,
            inputs=inputs[1] if inputs else None,
            faults=self.faults,
        )

        async def run(task_status: trio.TaskStatus[Node]) -> None:
            try:
                await _run_node_anywhere(options, node_options, task_status)
            finally:
                running.done.set()

        running.node = await nursery.start(run)
        self.running[name] = running
        local = running.node.endpoint.local_address
        self.new_addresses[name] = self.moved[parse_addr(at)] = local
        self.faults.learn(local, name)

    async def _start_puppet(self, nursery: trio.Nursery, name: str) -> None:
        network: Network = self.network if self.options.virtual else UDP
        host, port = self._listen_at(name)
        try:
            endpoint = await network.listen(host, port)
        except OSError:
            endpoint = await network.listen(host, 0)
        self.new_addresses[name] = endpoint.local_address
        puppet = Puppet(name, endpoint, self._recorder, self._live_keys(name))
        self.puppets[name] = puppet
        self.progress.puppets.add(name)
        self._recorder.node_started(
            name,
            self.nodes[name].role,
            self._argv(name, endpoint.local_address),
            endpoint.local_address,
        )
        nursery.start_soon(puppet.receive_loop)

    async def _puppet_send(self, event: Send) -> None:
        under_test = self.options.node
        if under_test is None:
            await self._raw_send(event)
            return
        destination = self.options.target or self.new_addresses.get(under_test)
        if destination is None:
            return  # the node under test is not running: nothing to answer
        rewriter = Rewriter(
            self.recorded_names, self.progress.names, under_test, self.new_addresses
        )
        puppet = self.puppets[event.node]
        message = rewriter.message_of(event.msg, event.node)
        await puppet.send(puppet.bytes_for(message, event.data), message, destination)

    async def _raw_send(self, event: Send) -> None:
        """An attacker's datagram in a whole replay: its recorded bytes, to where the
        node it went to is now."""
        puppet = self.puppets[event.node]
        try:
            message = msgspec.convert(event.msg, Message) if event.msg is not None else None
        except msgspec.ValidationError:
            message = None
        await puppet.send(event.data, message, self._new_address(parse_addr(event.peer)))

    def _live_keys(self, name: str) -> LiveKeys | None:
        """A client played against a running server speaks the protocol with its recorded
        key; against a replayed node, the recorded bytes fit as they are."""
        if self.options.target is None or self.nodes[name].role != "client":
            return None
        started = next(
            (e for e in self.recorded.events if isinstance(e, Start) and e.node == name), None
        )
        if started is None or not started.key:
            return None
        return LiveKeys(name, Identity(unb64(started.key)))

    # --- addresses -------------------------------------------------------------------

    def _listen_at(self, node: str, local: str = "") -> Address:
        """Where ``node`` listens in this run: where it was reached in the recording
        (on real UDP, 127.0.0.1 and the recorded port, if it is free). ``local``: the
        address of the start replayed (a node may start several times)."""
        recorded = self._recorded_address(node, local)
        return recorded if self.options.virtual else ("127.0.0.1", recorded[1])

    def _recorded_address(self, node: str, local: str = "") -> Address:
        """Where the others reached ``node`` (at its start at ``local``; by default its
        last) in the recording (a 0.0.0.0 bind is reached at the address they sent to)."""
        host, port = parse_addr(local or self.nodes[node].address)
        if host not in ("0.0.0.0", ""):
            return (host, port)
        for event in self.recorded.events:
            if isinstance(event, Send) and parse_addr(event.peer)[1] == port:
                peer = parse_addr(event.peer)
                if peer[0] != "0.0.0.0" and self.recorded_names.address(event.peer) == node:
                    return peer
        return ("127.0.0.1", port)

    def _new_address(self, recorded: Address) -> Address:
        """Where the node recorded at ``recorded`` is in this run (if it has started)."""
        if recorded in self.moved:
            return self.moved[recorded]
        node = self.recorded_names.address(fmt_addr(recorded))
        return self.new_addresses.get(node, recorded)

    def _server_address(self) -> Address:
        if self.options.target is not None:
            return self.options.target
        return self.new_addresses.get(self.server) or self._recorded_address(self.server)

    def _argv(self, name: str, local: Address) -> list[str]:
        if name == self.server:
            return ["chatapp", "serve", str(local[1])]
        server = self._server_address()
        return ["chatapp", "join", name, server[0], str(server[1]), str(local[1])]


async def _run_node_anywhere(
    options: Options, node_options: dict[str, Any], task_status: trio.TaskStatus[Node]
) -> None:
    """``run_node`` where ``options`` say, or on any free port if that one is taken (a
    real replay takes the recorded ports when it can)."""
    try:
        await run_node(options, task_status=task_status, **node_options)
    except StartupError:
        if options.port == 0 or isinstance(node_options.get("network"), MemoryNetwork):
            raise
        anywhere = dataclasses.replace(options, port=0)
        await run_node(anywhere, task_status=task_status, **node_options)


class _Muted:
    """The recorder once the plan is done: the nodes are stopped without adding to the trace."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def run_replay(recorded: Trace, options: ReplayOptions) -> tuple[Trace, Runner]:
    """Replay ``recorded``; returns the new trace and the run (for its notes)."""
    runner = Runner(recorded, options)
    clock = trio.testing.MockClock(autojump_threshold=0) if options.virtual else None
    if options.virtual:
        with deterministic_scheduling():
            trace = trio.run(runner.run, clock=clock)
    else:
        trace = trio.run(runner.run, clock=clock)
    return trace, runner
