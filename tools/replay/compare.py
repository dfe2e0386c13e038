"""Comparing a replay with its recording, node by node.

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
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from chatapp import screen
from chatapp.trace import (
    Event,
    Exited,
    Input,
    Normaliser,
    Recv,
    Send,
    Shown,
    Start,
    Trace,
    describe,
)

#: Messages that answer a request (sent again for each retry of it): not retries themselves.
ANSWERS = {"ack", "registered", "refused", "saved", "lookup_result"}

#: The prefix of a stored message's line, once normalised (``Normaliser.text``).
_STORED_PREFIX = re.compile(r"^\(\{time\}\) ")


def is_content(line: str) -> bool:
    """Whether a shown line is a content line: what a person typed to another, as the
    receiver shows it (``screen.chat``, ``screen.channel_message``), not a bracketed
    status line."""
    return " : " in line and not line.startswith("[")


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
    kind: str  # send | recv | show | input | exit | start
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
        }[self.kind]


@dataclass
class Divergence:
    stream: StreamKey
    index: int  # position in the stream
    recorded: Item | None
    replayed: Item | None
    reason: str
    order: float  # where it falls in the recording (a seq), for "first"


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
        return "show", "", names.text(event.line)
    if isinstance(event, Input):
        return "input", "", event.line
    if isinstance(event, Exited):
        return "exit", "", event.status
    if isinstance(event, Start):
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
            answer = (key, _key(value))
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
    scoped = under_test if black_box and under_test else ""
    recorded_names = Normaliser.of(recorded.events, scoped=scoped)
    replayed_names = Normaliser(scoped=scoped)
    if under_test is not None:
        issues_tokens = recorded.nodes().get(under_test, None)
        replayed_names.adopt(
            recorded_names,
            except_issuer=under_test,
            tokens=issues_tokens is None or issues_tokens.role != "server",
        )
    if black_box and under_test is not None:
        # The node under test is not in the replay's trace: it is wherever the played
        # nodes heard from that none of them is.
        played = {event.local for event in replayed.events if isinstance(event, Start)}
        for event in replayed.events:
            if isinstance(event, Recv) and event.peer not in played:
                replayed_names.add_address(event.peer, under_test)
    for event in replayed.events:
        replayed_names.learn(event)
    timers = recorded.header.timers
    tolerance = (
        timing_tolerance if timing_tolerance is not None else 0.05 + 0.2 * timers.ack_timeout
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
        compared += min(len(before), len(after))
        if divergence is None and key.kind == "send":
            divergence = _timing_difference(key, before, after, old_times, new_times, tolerance)
        if divergence is None and key.kind in ("show", "exit") and not black_box:
            divergence = _reaction_difference(
                key, before, after, result, old_times, new_times, tolerance
            )
        if divergence is not None:
            divergences.append(divergence)
    divergences.sort(key=lambda d: d.order)
    result.divergences = divergences
    result.compared = compared
    return result


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
    if sorted(_key(item.value) for item in old) != sorted(_key(item.value) for item in new):
        return 0
    return len(old)


def _key(value: Any) -> str:
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

    def since_first_send(self, node: str) -> dict[int, float]:
        if node not in self._since_first_send:
            self._since_first_send[node] = _since_first_send(self.trace, node)
        return self._since_first_send[node]

    def reactions(self, node: str) -> dict[int, tuple[float, Event]]:
        if node not in self._reactions:
            self._reactions[node] = _reaction_times(self.trace, node)
        return self._reactions[node]

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
    for index, (old, new) in enumerate(zip(before, after, strict=False)):
        old_gap, new_gap = old_gaps.get(old.seq), new_gaps.get(new.seq)
        if old_gap is None or new_gap is None or old.value != new.value:
            continue
        if abs(old_gap - new_gap) > tolerance:
            reason = (
                f"timing: {new_gap:.3f} s after {key.node} first sent this message id,"
                f" recorded {old_gap:.3f} s (tolerance {tolerance:.3f} s)"
            )
            return Divergence(key, index, old, new, reason, old.seq)
    return None


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
    for index, (old, new) in enumerate(zip(before, after, strict=False)):
        old_time, new_time = old_times.get(old.seq), new_times.get(new.seq)
        if old_time is None or new_time is None or old.value != new.value:
            continue
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
            return Divergence(key, index, old, new, reason, old.seq)
    return None


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
        if event.msg.get("t") == "ack":
            continue  # an ACK answers a repeat, whenever it comes; it is not one
        msg_id = event.msg.get("id")
        if not isinstance(msg_id, str):
            continue
        gaps[event.seq] = event.t - first.setdefault(msg_id, event.t)
    return gaps


# --- with faults: the messages, not the datagrams ------------------------------------


def content_lines(lines: Iterable[str]) -> list[str]:
    """The chat and channel lines among shown lines, stored ones in their live form."""
    found = []
    for line in lines:
        plain = _STORED_PREFIX.sub("", line)
        if is_content(plain):
            found.append(plain)
    return found


def compare_messages(recorded: Trace, replayed: Trace) -> tuple[list[str], list[str]]:
    """Under loss and duplication the datagrams differ by design. What must not happen:
    a message shown more often than recorded, or one missing although its sender was
    told it had been received. A message that is missing because it was stored, or
    because its sender was told it failed, is a note, not a failure.

    Returns (problems, notes)."""
    recorded_names = Normaliser.of(recorded.events)
    replayed_names = Normaliser.of(replayed.events)
    confirmed = _confirmed_messages(replayed, replayed_names)
    problems: list[str] = []
    notes: list[str] = []
    for node in sorted(recorded.nodes()):
        before = content_lines(
            recorded_names.text(e.line)
            for e in recorded.events
            if isinstance(e, Shown) and e.node == node
        )
        after = content_lines(
            replayed_names.text(e.line)
            for e in replayed.events
            if isinstance(e, Shown) and e.node == node
        )
        for line in sorted(set(before) | set(after)):
            want, got = before.count(line), after.count(line)
            if got > want:
                problems.append(f"{node} showed {line!r} {got}x (recorded {want}x)")
            elif got < want:
                if (node, line) in confirmed:
                    problems.append(
                        f"{node} did not show {line!r}, yet its sender was told it was received"
                    )
                else:
                    notes.append(
                        f"{node} did not show {line!r}: with these faults it was stored, or never"
                        " confirmed to its sender"
                    )
    return problems, notes


def _confirmed_messages(trace: Trace, names: Normaliser) -> set[tuple[str, str]]:
    """(receiver, line as it shows it, normalised by ``names``) of every message whose
    sender had an ACK from the receiver itself (direct), the server's word that it
    delivered it, or (channel) whose receiver ACKed it to the server."""
    sent: dict[str, tuple[str, str, str]] = {}  # id -> (kind, sender, text)
    to: dict[str, str] = {}
    confirmed: set[tuple[str, str]] = set()
    for event in trace.events:
        if not isinstance(event, Send | Recv) or not event.msg:
            continue
        msg = event.msg
        kind = msg.get("t")
        if isinstance(event, Send) and kind in ("chat", "save", "channel"):
            sender = str(msg.get("sender"))
            sent.setdefault(str(msg["id"]), (kind, sender, str(msg.get("text"))))
            if kind in ("chat", "channel"):
                to[f"{msg['id']}>{names.address(event.peer)}"] = names.address(event.peer)
        if isinstance(event, Recv) and kind in ("ack", "saved") and str(msg.get("id")) in sent:
            if kind == "saved" and msg.get("outcome") != "delivered":
                continue
            what, sender, text = sent[str(msg["id"])]
            if kind == "saved":
                receiver = next(
                    (
                        r
                        for key, r in to.items()
                        if key.startswith(f"{msg['id']}>") and r != event.node
                    ),
                    "",
                )
            else:
                receiver = names.address(event.peer)
            line = (
                screen.channel_message(sender, text)
                if what == "channel"
                else screen.chat(sender, text)
            )
            if receiver:
                confirmed.add((receiver, names.text(line)))
    return confirmed


# --- the report ---------------------------------------------------------------------------


def render_value(item: Item) -> str:
    event = item.event
    if isinstance(event, Send | Recv):
        return f"{describe(event.msg)} {_compact(item.value)}"
    return repr(item.value)


def _compact(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= 160 else text[:157] + "..."


def _where(item: Item) -> str:
    return f"seq {item.seq}, t={item.event.t:.3f}"


def field_report(old: Any, new: Any) -> tuple[list[str], list[str]]:
    """(fields that match, fields that differ) of two normalised values."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return ([], ["value"]) if old != new else (["value"], [])
    same, different = [], []
    for key in list(dict.fromkeys([*old, *new])):
        if old.get(key, _MISSING) == new.get(key, _MISSING):
            same.append(key)
        else:
            different.append(
                f"{key}: recorded {_compact(old.get(key, '(none)'))}, replay"
                f" {_compact(new.get(key, '(none)'))}"
            )
    return same, different


_MISSING = object()


def _event_line(event: Event, names: Normaliser) -> str:
    value = normalised(event, names)
    if value is None:
        return ""
    kind, peer, shown = value
    if isinstance(event, Send | Recv):
        arrow = "->" if isinstance(event, Send) else "<-"
        what = describe(event.msg)
        return f"seq {event.seq:>4} t={event.t:7.3f} {event.node} {arrow} {peer}: {what}"
    return f"seq {event.seq:>4} t={event.t:7.3f} {event.node} {kind}: {shown!r}"


def report(comparison: Comparison, *, limit: int = 5) -> str:
    lines: list[str] = []
    first = comparison.divergences[0]
    key = first.stream
    lines.append(f"First divergence: {key} (item {first.index + 1} of that stream)")
    lines.append(f"  {first.reason}")
    if first.recorded is not None:
        lines.append(f"  recorded ({_where(first.recorded)}): {render_value(first.recorded)}")
    else:
        lines.append("  recorded: (nothing more)")
    if first.replayed is not None:
        lines.append(f"  replay   ({_where(first.replayed)}): {render_value(first.replayed)}")
    else:
        lines.append("  replay:   (nothing more)")
    if (
        first.recorded is not None
        and first.replayed is not None
        and isinstance(first.recorded.value, dict)
    ):
        same, different = field_report(first.recorded.value, first.replayed.value)
        if different:
            if same:
                lines.append(f"  fields that match: {', '.join(same)}")
            lines.append("  fields that differ:")
            lines += [f"    {entry}" for entry in different]

    lines.append("")
    lines.append(f"Context at {key.node}:")
    lines += _context(comparison, first)

    candidates = _candidates(comparison, first)
    if candidates:
        lines.append("")
        lines += candidates

    if len(comparison.divergences) > 1:
        lines.append("")
        lines.append(
            f"{len(comparison.divergences)} streams diverge in all; the first"
            f" {min(limit, len(comparison.divergences))}:"
        )
        for divergence in comparison.divergences[:limit]:
            at = divergence.recorded or divergence.replayed
            where = f" at {_where(at)}" if at else ""
            lines.append(
                f"  - {divergence.stream}, item {divergence.index + 1}{where}: {divergence.reason}"
            )
    return "\n".join(lines)


def _context(comparison: Comparison, first: Divergence) -> list[str]:
    node = first.stream.node
    lines = []
    anchor = first.recorded.seq if first.recorded else first.order
    before = [e for e in comparison.recorded.events if e.node == node and e.seq < anchor][-4:]
    after = [e for e in comparison.recorded.events if e.node == node and e.seq >= anchor][:2]
    lines.append("  recorded:")
    for event in [*before, *after]:
        if normalised(event, comparison.recorded_names) is None:
            continue
        mark = ">" if first.recorded is not None and event.seq == first.recorded.seq else " "
        lines.append(f"   {mark} {_event_line(event, comparison.recorded_names)}")
    if first.replayed is not None:
        anchor_new: float = first.replayed.seq
    else:  # just after the last event of the stream that the replay did produce
        matched = comparison.streams[first.stream][1][: first.index]
        anchor_new = (matched[-1].seq + 0.5) if matched else 0
    replay_events = [
        event
        for event in comparison.replayed.events
        if event.node == node
        or (
            comparison.black_box
            and isinstance(event, Recv | Send)
            and comparison.replayed_names.address(event.peer) == node
        )
    ]
    before = [e for e in replay_events if e.seq < anchor_new][-4:]
    after = [e for e in replay_events if e.seq >= anchor_new][:2]
    lines.append("  replay:")
    for event in [*before, *after]:
        if normalised(event, comparison.replayed_names) is None:
            continue
        mark = ">" if first.replayed is not None and event.seq == first.replayed.seq else " "
        lines.append(f"   {mark} {_event_line(event, comparison.replayed_names)}")
    if not before and not after:
        lines.append(f"     ({node} did nothing in the replay)")
    return lines


def _candidates(comparison: Comparison, first: Divergence) -> list[str]:
    """The recorded events nearest to what the replay did (vcrpy style): which fields
    matched, which did not."""
    if first.replayed is None:
        return []
    if first.recorded is not None and first.recorded.value == first.replayed.value:
        return []  # the same event at another time: there is nothing nearer to show
    key = first.stream
    pool: list[Item] = []
    for other_key, (before, _) in comparison.streams.items():
        if other_key.node == key.node and other_key.kind == key.kind:
            pool += before
    if not pool:
        return []
    target = first.replayed.value
    lines = ["Nearest recorded candidates for the replay's event:"]
    if not isinstance(target, dict):
        # a line or a status: the most alike, by text
        def likeness(item: Item) -> tuple[float, int]:
            ratio = difflib.SequenceMatcher(None, str(item.value), str(target)).ratio()
            return (-ratio, abs(item.seq - int(first.order)))

        for item in sorted(pool, key=likeness)[:3]:
            ratio = -likeness(item)[0]
            lines.append(f"  {_where(item)}: {render_value(item)} ({ratio:.0%} alike)")
        return lines

    def score(item: Item) -> tuple[int, int]:
        same, _ = field_report(item.value, target)
        return (-len(same), abs(item.seq - int(first.order)))

    best = sorted(pool, key=score)[:3]
    for item in best:
        same, different = field_report(item.value, target)
        stream = next(k for k, (b, _) in comparison.streams.items() if item in b)
        lines.append(f"  {_where(item)} in {stream}: {render_value(item)}")
        lines.append(f"    matched: {', '.join(same) or '(nothing)'}")
        if different:
            lines.append(f"    differed: {'; '.join(different)}")
    return lines
