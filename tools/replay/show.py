"""``chat-replay show``: a trace as a sequence diagram, in the terminal or in Mermaid."""

from __future__ import annotations

import re
from collections import defaultdict, deque
from dataclasses import dataclass

from chatapp.trace import Event, Exited, Input, Recv, Send, Shown, Start, Trace

from .describe import describe
from .normalise import Normaliser


@dataclass
class Row:
    t: float
    kind: str  # datagram | note
    source: str
    target: str = ""
    label: str = ""
    lost: bool = False


def participants(trace: Trace) -> list[str]:
    nodes = trace.nodes()
    servers = [name for name, info in nodes.items() if info.role == "server"]
    return servers + [name for name in nodes if name not in servers]


def rows(trace: Trace, *, acks: bool = True) -> list[Row]:
    """One row per datagram (a send paired with its receipt) and per typed or shown line."""
    names = Normaliser.of(trace.events)
    arrivals: dict[tuple[str, str, bytes], deque[Recv]] = defaultdict(deque)
    for event in trace.events:
        if isinstance(event, Recv):
            arrivals[(event.node, names.address(event.peer), event.data)].append(event)
    delivered: set[int] = set()
    result: list[Row] = []
    for event in trace.events:
        row = _row(event, names, arrivals, delivered)
        if row is None:
            continue
        if not acks and row.kind == "datagram" and row.label == "ack":
            continue
        result.append(row)
    return result


def _row(
    event: Event,
    names: Normaliser,
    arrivals: dict[tuple[str, str, bytes], deque[Recv]],
    delivered: set[int],
) -> Row | None:
    if isinstance(event, Send):
        target = names.address(event.peer)
        queue = arrivals.get((target, event.node, event.data))
        lost = True
        while queue:
            arrival = queue.popleft()
            if arrival.seq > event.seq:
                delivered.add(arrival.seq)
                lost = False
                break
        return Row(event.t, "datagram", event.node, target, describe(event.msg), lost)
    if isinstance(event, Recv):
        if event.seq in delivered:
            return None
        source = names.address(event.peer)
        return Row(event.t, "datagram", source, event.node, describe(event.msg))
    if isinstance(event, Shown):
        return Row(event.t, "note", event.node, label=event.line)
    if isinstance(event, Input):
        return Row(event.t, "note", event.node, label=f">>> {event.line}")
    if isinstance(event, Start):
        return Row(event.t, "note", event.node, label=f"(starts: {' '.join(event.argv)})")
    if isinstance(event, Exited):
        return Row(event.t, "note", event.node, label=f"(exits, status {event.status})")
    return None


def timeline(trace: Trace, *, width: int = 24, acks: bool = True) -> str:
    """The run as text: one column per node, time going down."""
    columns = participants(trace)
    drawn = rows(trace, acks=acks)
    for row in drawn:
        for name in (row.source, row.target):
            if name and name not in columns:
                columns.append(name)
    centre = {name: index * width + width // 2 for index, name in enumerate(columns)}
    total = len(columns) * width
    lines = ["time (s)  " + "".join(name.center(width) for name in columns)]
    for row in drawn:
        canvas = [" "] * total
        for x in centre.values():
            canvas[x] = "|"
        if row.kind == "datagram":
            a, b = centre[row.source], centre[row.target]
            low, high = min(a, b), max(a, b)
            for x in range(low + 1, high):
                canvas[x] = "-"
            if row.lost:
                canvas[b] = "x"
            else:
                canvas[b - 1 if b > a else b + 1] = ">" if b > a else "<"
            label = f" {row.label} "  # a lost datagram's arrow ends in an x instead
            room = high - low - 4
            if len(label) > room:
                label = label[: max(room - 1, 0)] + "~" if room > 1 else ""
            start = low + 2 + (room - len(label)) // 2
            canvas[start : start + len(label)] = list(label)
        else:
            x = centre[row.source]
            text = row.label
            canvas[x : x + len(text) + 2] = list("* " + text)
        lines.append(f"{row.t:8.3f}  " + "".join(canvas).rstrip())
    return "\n".join(lines)


def _mermaid_text(text: str) -> str:
    # '#' starts an entity and ';' ends a statement in Mermaid: write both as entities.
    return text.replace("#", "#35;").replace(";", "#59;")


def _mermaid_id(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def mermaid(trace: Trace, *, acks: bool = True) -> str:
    lines = ["sequenceDiagram"]
    for name in participants(trace):
        ident = _mermaid_id(name)
        lines.append(f"    participant {ident}" + (f" as {name}" if ident != name else ""))
    for row in rows(trace, acks=acks):
        source = _mermaid_id(row.source)
        if row.kind == "datagram":
            arrow = "-x" if row.lost else "->>"
            label = row.label + (" (lost)" if row.lost else "")
            lines.append(f"    {source}{arrow}{_mermaid_id(row.target)}: {_mermaid_text(label)}")
        else:
            lines.append(f"    Note over {source}: {_mermaid_text(row.label)}")
    return "\n".join(lines) + "\n"
