"""The report of a divergence: what differs, its context, the nearest candidates
(as vcrpy lists the recorded requests nearest to one that matched none)."""

from __future__ import annotations

import difflib
import json
from typing import Any

from chatapp.trace import Event, Recv, Send, Trace

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
    first = comparison.divergences[0]
    key = first.stream
    lines = [f"First divergence: {key} (item {first.index + 1} of that stream)"]
    lines.append(f"  {first.reason}")
    lines += _first_values(comparison, first)
    lines.append("")
    lines.append(f"Context at {key.node}:")
    lines += _context(comparison, first)

    candidates = _candidates(comparison, first)
    if candidates:
        lines.append("")
        lines += candidates
    lines.append("")
    lines += _all_divergences(comparison, limit)
    lines.append("")
    lines += accept_hint(comparison.recorded)
    return "\n".join(lines)


def _first_values(comparison: Comparison, first: Divergence) -> list[str]:
    """The recorded and the replayed event, and where they differ (marked with ``^``)."""
    lines = []
    old, new = first.recorded, first.replayed
    if old is not None:
        where = where_recorded(comparison.recorded, old.event)
        lines.append(f"  recorded ({where}): {render_value(old)}")
    else:
        lines.append("  recorded: (nothing more)")
    if new is not None:
        lines.append(f"  replay   ({_where(new)}): {render_value(new)}")
    else:
        lines.append("  replay:   (nothing more)")
    if old is None or new is None or old.value == new.value:
        return lines
    if isinstance(old.value, str) and isinstance(new.value, str):
        lines += marked_difference(old.value, new.value, "    ")
    elif isinstance(old.value, dict) and isinstance(new.value, dict):
        same, _ = field_report(old.value, new.value)
        if same:
            lines.append(f"  fields that match: {', '.join(same)}")
        lines.append("  fields that differ:")
        for name in different_fields(old.value, new.value):
            lines.append(f"    {name}:")
            lines += marked_difference(
                _full(old.value.get(name, "(none)")), _full(new.value.get(name, "(none)")), "      "
            )
    return lines


def _full(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def different_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [
        key
        for key in dict.fromkeys([*old, *new])
        if old.get(key, _MISSING) != new.get(key, _MISSING)
    ]


#: Characters of a long text shown around the first difference.
_CONTEXT_CHARS = 48


def marked_difference(old: str, new: str, indent: str) -> list[str]:
    """Two texts one above the other, recorded (``-``) then replayed (``+``), with a ``^``
    under the first character where they differ (as pytest and difflib mark it); a long
    text is cut to the part around it."""
    at = next(
        (i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b),
        min(len(old), len(new)),
    )
    start = max(0, at - _CONTEXT_CHARS)
    cut = "..." if start else ""
    end = at + _CONTEXT_CHARS

    def shown(text: str) -> str:
        return cut + text[start:end] + ("..." if len(text) > end else "")

    return [
        f"{indent}- {shown(old)}",
        f"{indent}+ {shown(new)}",
        f"{indent}  {' ' * (len(cut) + at - start)}^",
    ]


def where_recorded(trace: Trace, event: Event) -> str:
    """``traces/test1.jsonl:57, seq 56, t=0.503``: the file and line of a recorded event."""
    line = trace.lines.get(event.seq)
    place = f"{trace.path}:{line}, " if trace.path and line is not None else ""
    return f"{place}seq {event.seq}, t={event.t:.3f}"


def _all_divergences(comparison: Comparison, limit: int) -> list[str]:
    """How many divergences there are in all (each stream compared to its end), and the
    first of each stream."""
    divergences = comparison.divergences
    total = sum(divergence.count for divergence in divergences)
    if total == 1:
        return ["1 divergence in all: this one."]
    lines = [
        f"{total} divergences in all, in {len(divergences)}"
        f" stream{'s' if len(divergences) > 1 else ''}: this one and"
        f" {total - 1} more. The first of each stream"
        + (f" (the first {limit} streams):" if len(divergences) > limit else ":")
    ]
    for divergence in divergences[:limit]:
        at = divergence.recorded or divergence.replayed
        where = ""
        if divergence.recorded is not None:
            where = f" at {where_recorded(comparison.recorded, divergence.recorded.event)}"
        elif at is not None:
            where = f" at replay {_where(at)}"
        more = f" ({divergence.count} in this stream)" if divergence.count > 1 else ""
        lines.append(
            f"  - {divergence.stream}, item {divergence.index + 1}{where}:"
            f" {divergence.reason}{more}"
        )
    return lines


def accept_hint(recorded: Trace) -> list[str]:
    """How to accept the change if it is intended: record the trace again."""
    trace = recorded.path or "TRACE"
    if recorded.header.scenario:
        command = (
            f"chat-replay record {recorded.header.scenario} -o {trace}"
            + (" --virtual" if recorded.header.clock == "virtual" else "")
            + " --check-stable 20"
        )
        return [
            "If the change is intended, record the trace again and review its diff:",
            f"  {command}",
        ]
    return [
        "If the change is intended, record the run again (chatapp serve/join --trace FILE,"
        f" as {trace} was) and review its diff.",
    ]


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
