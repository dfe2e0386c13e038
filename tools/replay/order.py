"""The order of what a node did in one handling, across its streams.

Each stream (the datagrams to one peer, the lines shown, the commits) is compared in
order by ``compare.py``, but not how they interleave: a batch ACKed before its lines
are shown, a table shown before it is ACKed, the no-ACK line after the save it
announces instead of before. Those happen in one handling, at one instant, so timing
cannot tell them apart either. Here each node's events are cut into handlings, each
beginning at what the node read (a datagram, a typed line, its start) or at a timer
that fired (a ``timer`` event) and holding what it did next (commits, datagrams sent,
lines shown, its exit). A recorded handling is matched with the
replay's first unmatched one of the same cause; when the two did the same things in
another order, that is a divergence. (When they did different things, the streams'
comparison says so already.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from chatapp.trace import (
    Commit,
    Event,
    Exited,
    Input,
    Recv,
    Send,
    Shown,
    Start,
    TimerFired,
    Trace,
)

if TYPE_CHECKING:
    from .compare import Comparison, Divergence
    from .normalise import Normaliser

_CAUSES = (Recv, Input, Start)
_EFFECTS = (Commit, Send, Shown, Exited)


@dataclass
class Handling:
    cause: Event | None  # None: a timer
    cause_key: str
    effects: list[tuple[Event, str]] = field(default_factory=list)  # (event, its key)

    @property
    def keys(self) -> list[str]:
        """The effects in order, but each run of datagrams sent to others than the cause's
        sender as a set: the order among the peers of one broadcast is not behaviour (and
        the order of the sends to one peer is its stream's, compared there)."""
        asker = self.cause.peer if isinstance(self.cause, Recv) else None
        keys: list[str] = []
        run: list[str] = []
        for event, key in self.effects:
            if isinstance(event, Send) and event.peer != asker:
                run.append(key)
                continue
            keys += [*sorted(run), key]
            run = []
        return keys + sorted(run)

    def event_at(self, index: int) -> Event:
        """The effect at ``index`` of ``keys``."""
        key = self.keys[index]
        return next(event for event, k in self.effects if k == key)


def _key(event: Event, comparison: Comparison, recorded: bool) -> str | None:
    from .compare import normalised, value_key

    names = comparison.recorded_names if recorded else comparison.replayed_names
    value = normalised(event, names)
    if value is None:
        return None
    kind, peer, shown = value
    return f"{kind}|{peer}|{value_key(shown)}"


def handlings(trace: Trace, node: str, comparison: Comparison, recorded: bool) -> list[Handling]:
    found: list[Handling] = []
    for event in trace.events:
        if event.node != node:
            continue
        if isinstance(event, TimerFired):
            found.append(Handling(None, "timer"))
            continue
        key = _key(event, comparison, recorded)
        if key is None:
            continue
        if isinstance(event, _CAUSES):
            found.append(Handling(event, key))
        elif isinstance(event, _EFFECTS) and found:
            found[-1].effects.append((event, key))
    return found


def order_differences(comparison: Comparison, nodes: set[str]) -> list[Divergence]:
    """For each node, the first handling whose effects came in another order."""
    from .compare import Divergence, Item, StreamKey, normalised

    divergences: list[Divergence] = []
    if comparison.recorded.header.version < 3:
        return divergences  # a trace of format 2 says not what a timer caused: not compared
    for node in sorted(nodes):
        old = handlings(comparison.recorded, node, comparison, True)
        new = handlings(comparison.replayed, node, comparison, False)
        unmatched: dict[str, list[Handling]] = {}
        for handling in new:
            unmatched.setdefault(handling.cause_key, []).append(handling)
        found = []
        for handling in old:
            candidates = unmatched.get(handling.cause_key)
            if not candidates:
                continue
            other = candidates.pop(0)
            if handling.keys == other.keys or sorted(handling.keys) != sorted(other.keys):
                continue
            at = next(
                i for i, (a, b) in enumerate(zip(handling.keys, other.keys, strict=True)) if a != b
            )
            old_event, new_event = handling.effects[at][0], other.effects[at][0]
            old_value = normalised(old_event, comparison.recorded_names)
            new_value = normalised(new_event, comparison.replayed_names)
            assert old_value is not None and new_value is not None
            names = comparison.recorded_names
            cause = "a timer" if handling.cause is None else _what(handling.cause, names)
            reason = (
                f"order: after {cause}, {node} did the same things in another"
                f" order: the recording's effect {at + 1} was {_what(old_event, names)}, the"
                f" replay's {_what(new_event, comparison.replayed_names)}"
            )
            found.append(
                Divergence(
                    StreamKey(node, "order"),
                    at,
                    Item(old_event, old_value[2]),
                    Item(new_event, new_value[2]),
                    reason,
                    old_event.seq,
                )
            )
        if found:
            found[0].count = len(found)
            divergences.append(found[0])
    return divergences


def _what(event: Event, names: Normaliser | None = None) -> str:
    if isinstance(event, Send | Recv):
        kind = event.msg.get("t", "?") if event.msg else "an undecodable datagram"
        peer = names.address(event.peer) if names is not None else event.peer
        where = f"{'to' if isinstance(event, Send) else 'from'} {peer}"
        return f"{'sending' if isinstance(event, Send) else 'receiving'} {kind} {where}"
    if isinstance(event, Shown):
        return f"showing {event.line!r}"
    if isinstance(event, Input):
        return f"the typed line {event.line!r}"
    if isinstance(event, Commit):
        return "a commit"
    if isinstance(event, Exited):
        return f"exiting with {event.status}"
    return "its start"
