"""The plan of a replay: what to do, in which order, waiting for what.

The recording is turned into a plan of *actions*: things that came from
outside the protocol (a node starts, a line is typed, a node is stopped) and,
with ``--node``, the datagrams the other nodes sent. An action is carried out
once every event that preceded it in the recording has been reproduced
(counting events per stream, see ``Counting``), then as long after the last
of them as in the recording, up to one ACK timeout: cause and effect keep
their order, a line typed while a timer ran keeps its place in that timer,
and a person's think time is cut.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from chatapp import screen
from chatapp.protocol.inputs import Signal
from chatapp.protocol.waits import answer_tags, longest_wait
from chatapp.trace import (
    Event,
    Exited,
    Input,
    NodeInfo,
    Recv,
    Restored,
    Send,
    Shown,
    Start,
    Trace,
    input_line,
)
from chatapp.wire import Address

from .normalise import Normaliser

#: Seconds a datagram spends on the in-memory network: the recording's typical
#: time on the wire, within these bounds.
TRANSIT = (0.0001, 0.05)

#: Lines after which a client exits by itself: its recorded exit needs no stop.
_EXIT_LINES = {screen.KEYBOARD_INTERRUPT, screen.EXITING}
_EXIT_INPUTS = {input_line(Signal.INTERRUPT), input_line(Signal.HANG_UP)}

#: The messages that answer a request (from the protocol's table of waits).
ANSWERS = answer_tags()


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
    kind: str  # start | input | stop | puppet_send | end
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


def server_name(trace: Trace) -> str:
    servers = [name for name, info in trace.nodes().items() if info.role == "server"]
    if len(servers) != 1:
        raise ReplayError(f"the trace has {len(servers)} servers; replay needs exactly one")
    return servers[0]


def check_replayable(recorded: Trace, options: ReplayOptions) -> tuple[dict[str, NodeInfo], str]:
    """The trace's nodes and its server, if it can be replayed as ``options`` ask."""
    if not recorded.events:
        raise ReplayError("the trace has no events")
    nodes = recorded.nodes()
    server = server_name(recorded)
    unplaced = [name for name, info in nodes.items() if not info.address]
    if unplaced:
        raise ReplayError(f"the trace does not say where {', '.join(unplaced)} listened")
    if options.node is not None and options.node not in nodes:
        raise ReplayError(f"no node named {options.node} in the trace (nodes: {', '.join(nodes)})")
    if options.target is not None and options.node != server:
        raise ReplayError(f"--target tests a running server: use it with --node {server}")
    if options.faults and not options.virtual:
        raise ReplayError("--loss and --dup work on the in-memory network: add --virtual")
    return nodes, server


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
                or (isinstance(before, Input) and before.line in _EXIT_INPUTS)
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
        self._answers: set[tuple[str, bytes]] = set()  # (stream, the answer's message)

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
            # by the message, not the bytes: an answer sent again is sealed afresh
            answer = (stream, json.dumps(event.msg, sort_keys=True).encode())
            if answer in self._answers:
                return None
            self._answers.add(answer)
        return stream


class _Planner:
    """Walks the recording once, turning the events that came from outside into actions."""

    def __init__(self, recorded: Trace, options: ReplayOptions, names: Normaliser) -> None:
        timers = recorded.header.timers.timers()
        # A played node's datagram comes at most this long after its cause: the longest
        # wait, after the one try that handed over to it (a direct chat, then its save).
        self.longest_delay = longest_wait(timers) + timers.ack_timeout
        self.options = options
        self.names = names
        self.external = external_exits(recorded.events)
        self.counting = Counting(options.node, options.target is not None)
        self.seen: Counter[str] = Counter()
        self.last_cause: dict[str, Event] = {}
        self.restored: dict[str, Restored] = {}
        self.latest: tuple[str, int, float] | None = None
        self.heard: Counter[str] = Counter()  # datagrams each played node had from the tested
        self.plan: list[Action] = []
        #: Attackers (role ``raw``): always played from the recording, by their bytes.
        self.raw = {name for name, info in recorded.nodes().items() if info.role == "raw"}

    def add(self, event: Event) -> None:
        if isinstance(event, Restored):
            self.restored[event.node] = event
        action = self._action(event)
        if self._heard_from_tested(event):
            self.heard[event.node] += 1
        if action is not None:
            action.need = Counter(self.seen)
            if self.latest is not None and action.cause is None:
                node, index, at = self.latest
                action.anchor, action.gap = (node, index), max(0.0, event.t - at)
            self.plan.append(action)
        key = self.counting.key(event, self.names)
        if key is not None:
            self.latest = (key, self.seen[key], event.t)
            self.seen[key] += 1
        if not isinstance(event, Shown | Exited):  # a line shown is an effect, never a cause
            self.last_cause[event.node] = event

    def _mine(self, event: Event) -> bool:
        return self.options.node is None or event.node == self.options.node

    def _to_tested(self, event: Send | Recv) -> bool:
        return self.names.address(event.peer) == self.options.node

    def _heard_from_tested(self, event: Event) -> bool:
        return isinstance(event, Recv) and not self._mine(event) and self._to_tested(event)

    def _action(self, event: Event) -> Action | None:
        if event.node in self.raw and self.options.node is None:
            # played in every replay: what it sent is sent again, the rest is its own
            return Action(event, "puppet_send") if isinstance(event, Send) else None
        if self._mine(event):
            if self.options.target and event.node == self.options.node:
                return None  # the running server under test does this itself
            if isinstance(event, Start):
                return Action(event, "start", restored=self.restored.pop(event.node, None))
            if isinstance(event, Input):
                return Action(event, "input")
            if isinstance(event, Exited) and event.seq in self.external:
                return Action(event, "stop")
            return None
        if isinstance(event, Send) and self._to_tested(event):
            return self._puppet_send(event)
        return None

    def _puppet_send(self, event: Send) -> Action:
        action = Action(event, "puppet_send")
        before = self.last_cause.get(event.node)
        if isinstance(before, Recv) and self._to_tested(before):
            action.cause = ("recv", self.heard[event.node] - 1)
        elif isinstance(before, Send) and self._to_tested(before):
            action.cause = ("sent", before.seq)
        if before is not None and action.cause is not None:
            action.delay = min(event.t - before.t, self.longest_delay)
        return action


def make_plan(recorded: Trace, options: ReplayOptions, normaliser: Normaliser) -> list[Action]:
    planner = _Planner(recorded, options, normaliser)
    for event in recorded.events:
        planner.add(event)
    planner.plan.append(Action(recorded.events[-1], "end", need=Counter(planner.seen)))
    return planner.plan
