"""The report of a divergence: what differs, its context, the nearest candidates
(as vcrpy lists the recorded requests nearest to one that matched none)."""

from __future__ import annotations

import difflib
import json
from typing import Any

from chatapp.trace import Event, Recv, Send

from .compare import Comparison, Divergence, Item, normalised
from .describe import describe
from .normalise import Normaliser


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
    anchor = first.recorded.seq if first.recorded else first.order
    recorded = [e for e in comparison.recorded.events if e.node == node]
    lines = ["  recorded:"]
    lines += _marked(_window(recorded, anchor), first.recorded, comparison.recorded_names)
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
    lines.append("  replay:")
    window = _window(replay_events, anchor_new)
    lines += _marked(window, first.replayed, comparison.replayed_names)
    if not window:
        lines.append(f"     ({node} did nothing in the replay)")
    return lines


def _window(events: list[Event], anchor: float) -> list[Event]:
    """The four events before ``anchor`` and two from it on."""
    return [e for e in events if e.seq < anchor][-4:] + [e for e in events if e.seq >= anchor][:2]


def _marked(events: list[Event], marked: Item | None, names: Normaliser) -> list[str]:
    lines = []
    for event in events:
        if normalised(event, names) is None:
            continue
        mark = ">" if marked is not None and event.seq == marked.seq else " "
        lines.append(f"   {mark} {_event_line(event, names)}")
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
