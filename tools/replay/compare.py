"""Comparing a replay with its recording, node by node (the matching; ``report.py``
says what a mismatch means, ``verdict.py`` judges a run with injected faults).

Each node's behaviour is split into streams that are ordered within
themselves whatever the scheduling: the datagrams it sent to each peer, the
datagrams it received from each peer, the lines it showed, the lines typed
at it, its exit. Both traces are normalised the same way (``Normaliser``),
then each stream is compared in order, so retries of one message match
retries in order. The gap between two sends of the same message id (a retry,
or a direct message handed to the server) is compared too: that is where the
protocol's timers show.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any

from chatapp.protocol.waits import answer_tags
from chatapp.trace import (
    Commit,
    Event,
    Exited,
    Input,
    Recv,
    Restored,
    Send,
    Shown,
    Start,
    Trace,
)
from chatapp.wire import Ack, TableAck, tag_of

from .normalise import Normaliser
from .order import order_differences
from .plan import external_exits

#: Messages that answer a request (sent again for each retry of it): not retries themselves.
ANSWERS = answer_tags()
_ACKS = (tag_of(Ack), tag_of(TableAck))


@dataclass(frozen=True)
class Item:
    event: Event
    value: Any  # the normalised event: what is compared

    @property
    def seq(self) -> int:
        return self.event.seq


@dataclass(frozen=True)
class StreamKey:
    node: str
    kind: str  # send | recv | show | input | exit | start | commit | defaults
    peer: str = ""

    def __str__(self) -> str:
        if self.kind == "send":
            return f"datagrams {self.node} sent to {self.peer}"
        if self.kind == "recv":
            return f"datagrams {self.node} received from {self.peer}"
        return {
            "show": f"lines {self.node} showed",
            "input": f"lines typed at {self.node}",
            "exit": f"{self.node}'s exit",
            "start": f"{self.node}'s start",
            "commit": f"what {self.node} committed (its database or state files)",
            "restore": f"what {self.node} read from its database when it started",
            "order": f"the order of what {self.node} did in one handling",
            "defaults": "the protocol's defaults (chatapp/protocol: Timers, the mailbox limit)",
        }[self.kind]


@dataclass
class Divergence:
    stream: StreamKey
    index: int  # position in the stream
    recorded: Item | None
    replayed: Item | None
    reason: str
    order: float  # where it falls in the recording (a seq), for "first"
    count: int = 1  # how many items of the stream diverge, this one the first


def _first_of(found: list[Divergence]) -> Divergence | None:
    """The first of a stream's divergences, which counts them all."""
    if not found:
        return None
    found[0].count = len(found)
    return found[0]


@dataclass
class Comparison:
    divergences: list[Divergence]
    compared: int
    recorded: Trace
    replayed: Trace
    recorded_names: Normaliser
    replayed_names: Normaliser
    notes: list[str] = field(default_factory=list)
    streams: dict[StreamKey, tuple[list[Item], list[Item]]] = field(default_factory=dict)
    black_box: bool = False

    @property
    def passed(self) -> bool:
        return not self.divergences


def normalised(event: Event, names: Normaliser) -> tuple[str, str, Any] | None:
    """(kind, peer, value) of an event, with every volatile value replaced by its label."""
    if isinstance(event, Send | Recv):
        if event.msg is None:
            value: Any = {"undecodable": event.error}
        else:
            value = names.event_message(event)
        return ("send" if isinstance(event, Send) else "recv"), names.address(event.peer), value
    if isinstance(event, Shown):
        return "show", "", names.text(event.line, event.node)
    if isinstance(event, Commit):
        return ("commit", "", names.commit(event)) if names.strict_times else None
    if isinstance(event, Restored):
        return ("restore", "", names.restore(event)) if names.strict_times else None
    if isinstance(event, Input):
        return "input", "", event.line
    if isinstance(event, Exited):
        return "exit", "", event.status
    if isinstance(event, Start):
        if names.settings:
            return "start", "", {"role": event.role, "settings": event.settings}
        return "start", "", event.role
    return None


def streams_of(
    trace: Trace, names: Normaliser, nodes: set[str] | None, seen_by: str | None = None
) -> dict[StreamKey, list[Item]]:
    """The streams of ``nodes`` (all when None). With ``seen_by`` (black-box mode) the
    node's sends are taken from what the other nodes received from it.

    An answer (an ACK, ``saved``, ``registered``...) repeated in a stream is left out:
    each retry of a request is answered again, and how many retries cross an answer
    on the wire is a race of the moment, not behaviour."""
    streams: dict[StreamKey, list[Item]] = {}
    answered: set[tuple[StreamKey, str]] = set()
    for event in trace.events:
        kind_peer_value = normalised(event, names)
        if kind_peer_value is None:
            continue
        kind, peer, value = kind_peer_value
        if seen_by is not None:
            if kind != "recv" or peer != seen_by:
                continue
            key = StreamKey(seen_by, "send", event.node)
        else:
            if nodes is not None and event.node not in nodes:
                continue
            key = StreamKey(event.node, kind, peer)
        if isinstance(value, dict) and value.get("t") in ANSWERS:
            answer = (key, value_key(value))
            if answer in answered:
                continue
            answered.add(answer)
        streams.setdefault(key, []).append(Item(event, value))
    return streams


def compare(
    recorded: Trace,
    replayed: Trace,
    *,
    under_test: str | None = None,
    black_box: bool = False,
    timing_tolerance: float | None = None,
) -> Comparison:
    recorded_names, replayed_names = _normalisers(recorded, replayed, under_test, black_box)
    tolerance = (
        timing_tolerance
        if timing_tolerance is not None
        else timing_tolerance_of(recorded, replayed)
    )
    nodes = None if under_test is None else {under_test}
    seen_by = under_test if black_box else None
    old = streams_of(recorded, recorded_names, nodes, seen_by)
    new = streams_of(replayed, replayed_names, nodes, seen_by)
    divergences: list[Divergence] = []
    compared = 0
    result = Comparison([], 0, recorded, replayed, recorded_names, replayed_names)
    result.black_box = black_box
    old_times, new_times = _Timings(recorded), _Timings(replayed)
    for key in sorted(set(old) | set(new), key=lambda k: (k.node, k.kind, k.peer)):
        before, after = old.get(key, []), new.get(key, [])
        result.streams[key] = (before, after)
        divergence = _first_difference(key, before, after)
        if divergence is not None:
            divergence.count = _differing_items(before, after)
        if divergence is not None and key.kind == "start":
            divergence.reason = settings_reason(divergence) or divergence.reason
        compared += min(len(before), len(after))
        if divergence is None and key.kind == "send":
            divergence = _timing_difference(key, before, after, old_times, new_times, tolerance)
        if divergence is None and key.kind in ("show", "exit") and not black_box:
            divergence = _reaction_difference(
                key, before, after, result, old_times, new_times, tolerance
            )
        if divergence is not None:
            divergences.append(divergence)
    defaults = _defaults_difference(recorded, replayed)
    if defaults is not None:
        divergences.append(defaults)
    if not black_box:
        nodes_compared = {key.node for key in result.streams}
        divergences += order_differences(result, nodes_compared)
    divergences.sort(key=lambda d: d.order)
    result.divergences = divergences
    result.compared = compared
    return result


#: Timing tolerance (seconds) when the recording and the replay both ran in virtual
#: time: the clock is ours, the same timers fire at the same instants.
VIRTUAL_TOLERANCE = 0.002
#: Timing tolerance for a recording made in real time, replayed in virtual time: the
#: recording's timers fired late by the scheduler's and the machine's delays (a few ms,
#: tens on a loaded machine), the replay's exactly on time. 40 ms lets those pass and
#: still fails an ACK timeout 0.5 s -> 0.6 s or any change to the retry schedule (each a
#: 100 ms difference or more); ``chat-replay record --check-stable`` refuses a recording
#: whose delays were larger.
REAL_RECORDING_TOLERANCE = 0.04


def timing_tolerance_of(recorded: Trace, replayed: Trace) -> float:
    """How far a timing may differ: exact (to the ms) when both ran in virtual time; a
    real-time replay is paced by the machine, as lenient as before."""
    if replayed.header.clock == "virtual":
        return VIRTUAL_TOLERANCE if recorded.header.clock == "virtual" else REAL_RECORDING_TOLERANCE
    return 0.05 + 0.2 * recorded.header.timers.ack_timeout


def _normalisers(
    recorded: Trace, replayed: Trace, under_test: str | None, black_box: bool
) -> tuple[Normaliser, Normaliser]:
    """The normalisers of the recording and of the replay, each having learnt its trace."""
    scoped = under_test if black_box and under_test else ""
    # A trace of format 2 has no commits, a running server tested black-box does not say
    # what it commits: then neither they nor stored times are compared.
    strict = not black_box and any(isinstance(event, Commit) for event in recorded.events)
    # Likewise the settings each node ran with (format 3).
    settings = any(isinstance(event, Start) and event.settings for event in recorded.events)
    recorded_names = Normaliser(
        scoped=scoped, started=recorded.header.started, strict_times=strict, settings=settings
    )
    for event in recorded.events:
        recorded_names.learn(event)
    replayed_names = Normaliser(
        scoped=scoped, started=replayed.header.started, strict_times=strict, settings=settings
    )
    if under_test is not None:
        replayed_names.adopt(recorded_names, except_issuer=under_test)
    if black_box and under_test is not None:
        # The node under test is not in the replay's trace: it is wherever the played
        # nodes heard from that none of them is.
        played = {event.local for event in replayed.events if isinstance(event, Start)}
        for event in replayed.events:
            if isinstance(event, Recv) and event.peer not in played:
                replayed_names.add_address(event.peer, under_test)
    for event in replayed.events:
        replayed_names.learn(event)
    return recorded_names, replayed_names


#: The command line's option behind each setting of a ``start`` event.
SETTING_OPTIONS = {
    "ack_timeout": "--ack-timeout",
    "tries": "--tries",
    "mailbox_limit": "--mailbox-limit",
    "per_address_rate": "--rate-limit",
    "per_address_burst": "--rate-limit",
    "handshakes_per_ip_rate": "--join-limit",
    "handshakes_per_ip_burst": "--join-limit",
}


def _defaults_difference(recorded: Trace, replayed: Trace) -> Divergence | None:
    """The protocol's own defaults (``Timers()``, the mailbox limit) as the recording had
    them and as they are now: nodes started without options run with them."""
    old, new = recorded.header.defaults, replayed.header.defaults
    if not old or not recorded.events or not replayed.events or old == new:
        return None
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    said = "; ".join(
        f"{key} is now {new.get(key, '(none)')}, recorded {old.get(key, '(none)')}"
        for key in changed
    )
    key = StreamKey(recorded.events[0].node, "defaults")
    return Divergence(
        key,
        0,
        Item(recorded.events[0], dict(old)),
        Item(replayed.events[0], dict(new)),
        f"the protocol's own defaults changed (Timers, the mailbox limit): {said}",
        -1.0,
    )


def settings_reason(divergence: Divergence) -> str | None:
    """Which settings a node now runs with that it did not in the recording, built from
    the same command line: "the default of --ack-timeout is now 0.6; the recording ran
    with 0.5"."""
    if divergence.recorded is None or divergence.replayed is None:
        return None
    old, new = divergence.recorded.event, divergence.replayed.event
    if not isinstance(old, Start) or not isinstance(new, Start) or not old.settings:
        return None
    changed: dict[str, list[str]] = {}  # option -> the settings it gives that changed
    for key in sorted(set(old.settings) | set(new.settings)):
        if old.settings.get(key, "(none)") != new.settings.get(key, "(none)"):
            changed.setdefault(SETTING_OPTIONS.get(key, ""), []).append(key)
    said = []
    for option, keys in changed.items():
        was = ", ".join(f"{old.settings.get(key, '(none)')}" for key in keys)
        now = ", ".join(f"{new.settings.get(key, '(none)')}" for key in keys)
        if option.lstrip("-").replace("-", "_") != keys[0] or len(keys) > 1:
            now = ", ".join(f"{key} {new.settings.get(key, '(none)')}" for key in keys)
            was = ", ".join(f"{key} {old.settings.get(key, '(none)')}" for key in keys)
        if not option:
            said.append(f"the settings are now {now}; the recording ran with {was}")
        elif any(arg == option or arg.startswith(option + "=") for arg in old.argv):
            said.append(f"{option} as recorded now gives {now}; the recording ran with {was}")
        elif option.lstrip("-").replace("-", "_") == keys[0] and len(keys) == 1:
            said.append(f"the default of {option} is now {now}; the recording ran with {was}")
        else:
            said.append(f"the default of {option} now gives {now}; the recording ran with {was}")
    if not said:
        return None
    return f"{new.node} runs with other settings: " + "; ".join(said)


#: Events of one stream this close in time came from one moment (or a race within
#: it); their order among themselves is not compared.
BURST = 0.01


def _burst(items: list[Item], start: int) -> list[Item]:
    first = items[start].event.t
    return [item for item in items[start : start + 8] if item.event.t - first <= BURST]


def _same_burst(before: list[Item], after: list[Item], index: int) -> int:
    """How many items from ``index`` on are the same events in another order (0: not)."""
    old, new = _burst(before, index), _burst(after, index)
    if len(old) < 2 or len(old) != len(new):
        return 0
    if sorted(value_key(item.value) for item in old) != sorted(
        value_key(item.value) for item in new
    ):
        return 0
    return len(old)


def value_key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _first_difference(key: StreamKey, before: list[Item], after: list[Item]) -> Divergence | None:
    index = 0
    while index < max(len(before), len(after)):
        old = before[index] if index < len(before) else None
        new = after[index] if index < len(after) else None
        if old is not None and new is not None and old.value == new.value:
            index += 1
            continue
        if old is not None and new is not None:
            reordered = _same_burst(before, after, index)
            if reordered:
                index += reordered
                continue
        if old is None:
            reason = "the replay has an event the recording does not"
            order = (before[-1].seq + 0.5) if before else _order_of_new(new)
        elif new is None:
            reason = "the recording has an event the replay does not"
            order = old.seq
        elif index + 1 < len(after) and after[index + 1].value == old.value:
            reason = "the replay has an event the recording does not (then they agree again)"
            order = old.seq - 0.5
        elif index + 1 < len(before) and before[index + 1].value == new.value:
            reason = "the recording has an event the replay does not (then they agree again)"
            order = old.seq
        else:
            reason = "the event differs"
            order = old.seq
        return Divergence(key, index, old, new, reason, order)
    return None


def _differing_items(before: list[Item], after: list[Item]) -> int:
    """How many items of a stream differ, counted after the first too (as a diff would:
    one for each item changed, missing or extra)."""
    matcher = difflib.SequenceMatcher(
        None, [value_key(item.value) for item in before], [value_key(item.value) for item in after]
    )
    changed = sum(
        max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal"
    )
    return max(changed, 1)


def _order_of_new(item: Item | None) -> float:
    return float(item.seq) if item is not None else 0.0


class _Timings:
    """The timings of one trace's nodes, each worked out once per node (a node has
    several streams) and only for the nodes asked about."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self._since_first_send: dict[str, dict[int, float]] = {}
        self._reactions: dict[str, dict[int, tuple[float, Event]]] = {}
        self._inputs_elsewhere: dict[str, list[float]] = {}
        self._stopped: set[int] | None = None

    def since_first_send(self, node: str) -> dict[int, float]:
        if node not in self._since_first_send:
            self._since_first_send[node] = _since_first_send(self.trace, node)
        return self._since_first_send[node]

    def reactions(self, node: str) -> dict[int, tuple[float, Event]]:
        if node not in self._reactions:
            self._reactions[node] = _reaction_times(self.trace, node)
        return self._reactions[node]

    def stopped(self) -> set[int]:
        """The seqs of the exits that came from outside (a Ctrl-C, a stop)."""
        if self._stopped is None:
            self._stopped = external_exits(self.trace.events)
        return self._stopped

    def inputs_elsewhere(self, node: str) -> list[float]:
        """When lines were typed at (or starts happened at) the other nodes."""
        if node not in self._inputs_elsewhere:
            self._inputs_elsewhere[node] = [
                e.t for e in self.trace.events if isinstance(e, Input | Start) and e.node != node
            ]
        return self._inputs_elsewhere[node]


def _timing_difference(
    key: StreamKey,
    before: list[Item],
    after: list[Item],
    recorded: _Timings,
    replayed: _Timings,
    tolerance: float,
) -> Divergence | None:
    """Each send's time since the node first sent that message id: a retry's place
    in its schedule, a hand-over to the server after the peer's silence, the spread
    of one broadcast. It does not depend on when lines were typed."""
    old_gaps = recorded.since_first_send(key.node)
    new_gaps = replayed.since_first_send(key.node)
    found: list[Divergence] = []
    for index, (old, new) in enumerate(zip(before, after, strict=False)):
        old_gap, new_gap = old_gaps.get(old.seq), new_gaps.get(new.seq)
        if old_gap is None or new_gap is None or old.value != new.value:
            continue
        if abs(old_gap - new_gap) > tolerance:
            reason = (
                f"timing: {new_gap:.3f} s after {key.node} first sent this message id,"
                f" recorded {old_gap:.3f} s (tolerance {tolerance:.3f} s)"
            )
            found.append(Divergence(key, index, old, new, reason, old.seq))
    return _first_of(found)


def _reaction_difference(
    key: StreamKey,
    before: list[Item],
    after: list[Item],
    comparison: Comparison,
    recorded: _Timings,
    replayed: _Timings,
    tolerance: float,
) -> Divergence | None:
    """How long after its cause (the latest line typed at the node, or datagram it
    received) each line was shown and the node exited: where a client's timers show.

    Timed only where the cause is the same event in both runs, and, for an event a
    timer caused, where no line was typed at another node meanwhile (the replay
    keeps no think time, so such a line may fall elsewhere in a running timer)."""
    old_times = recorded.reactions(key.node)
    new_times = replayed.reactions(key.node)
    elsewhere = recorded.inputs_elsewhere(key.node)
    stopped = recorded.stopped()
    found: list[Divergence] = []
    for index, (old, new) in enumerate(zip(before, after, strict=False)):
        old_time, new_time = old_times.get(old.seq), new_times.get(new.seq)
        if old_time is None or new_time is None or old.value != new.value:
            continue
        if old.seq in stopped:
            continue  # stopped from outside (Ctrl-C): when is the person's, not the protocol's
        (old_latency, old_cause), (new_latency, new_cause) = old_time, new_time
        if normalised(old_cause, comparison.recorded_names) != normalised(
            new_cause, comparison.replayed_names
        ):
            continue
        # a datagram that caused it may itself come from a line typed a moment before
        since = old_cause.t - (0.01 if isinstance(old_cause, Recv) else 0.0)
        timer_driven = old_latency > tolerance
        if timer_driven and any(since < t < old.event.t for t in elsewhere):
            continue
        if abs(old_latency - new_latency) > tolerance:
            reason = (
                f"timing: {new_latency:.3f} s after its cause (the latest line typed at or"
                f" datagram received by {key.node}), recorded {old_latency:.3f} s"
                f" (tolerance {tolerance:.3f} s)"
            )
            found.append(Divergence(key, index, old, new, reason, old.seq))
    return _first_of(found)


def _reaction_times(trace: Trace, node: str) -> dict[int, tuple[float, Event]]:
    """seq -> (seconds since the cause, the cause) for the node's reactions."""
    cause: Event | None = None
    times: dict[int, tuple[float, Event]] = {}
    for event in trace.events:
        if event.node != node:
            continue
        if isinstance(event, Input | Recv | Start):
            cause = event
        elif cause is not None:
            times[event.seq] = (event.t - cause.t, cause)
    return times


def _since_first_send(trace: Trace, node: str) -> dict[int, float]:
    """For each send at ``node`` that carries a message id: the time since the node first
    sent that id (0 for the first)."""
    first: dict[str, float] = {}
    gaps: dict[int, float] = {}
    for event in trace.events:
        if not isinstance(event, Send) or event.node != node or not event.msg:
            continue
        if event.msg.get("t") in _ACKS:
            continue  # an ACK answers a repeat, whenever it comes; it is not one
        msg_id = event.msg.get("id")
        if not isinstance(msg_id, str):
            continue
        gaps[event.seq] = event.t - first.setdefault(msg_id, event.t)
    return gaps
