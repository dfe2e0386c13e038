"""``chat-replay show``: a trace as a sequence diagram in the terminal (fitted to its width,
a colour per node) or in Mermaid; ``pictures`` draws the files to open (Markdown, SVG,
HTML)."""

from __future__ import annotations

import re
from collections import defaultdict, deque
from dataclasses import dataclass

from chatapp.screen import printable
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
        # A trace is a file from outside: no control character reaches a terminal or a
        # drawing (XML takes none either).
        row.label = printable(row.label)
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


#: The time column: ``"   0.503  "``.
TIME_WIDTH = 10
#: The narrowest column a node gets (a narrower terminal makes the lines longer).
MIN_COLUMN = 6
#: The colours of the nodes on a terminal (ANSI: cyan, yellow, magenta, green, blue, red,
#: then the bright ones), in the order of the columns.
PALETTE = (36, 33, 35, 32, 34, 31, 96, 93, 95, 92, 94, 91)


def message_type(label: str) -> str:
    """The message's type in a datagram's label: its first word (``chat "hi"`` -> chat)."""
    return label.split(" ", 1)[0]


def fit_label(label: str, room: int) -> str:
    """``label`` in ``room`` characters: the fields after the type are cut (``~`` marks
    the cut), the type never is (it may be longer than ``room``)."""
    if len(label) <= room:
        return label
    kind = message_type(label)
    if len(kind) + 3 > room:  # no room for a field's first character and the ~
        return kind
    return label[: room - 1] + "~"


@dataclass
class Canvas:
    """One line of the timeline: its characters and, for each, the node it belongs to."""

    chars: list[str]
    owner: list[str]

    @classmethod
    def blank(cls, width: int) -> Canvas:
        return cls([" "] * width, [""] * width)

    def widen(self, width: int) -> None:
        grow = width - len(self.chars)
        if grow > 0:
            self.chars += [" "] * grow
            self.owner += [""] * grow

    def put(self, x: int, text: str, owner: str) -> None:
        for offset, char in enumerate(text):
            if 0 <= x + offset < len(self.chars):
                self.chars[x + offset] = char
                self.owner[x + offset] = owner

    def render(self, colours: dict[str, int] | None) -> str:
        end = len("".join(self.chars).rstrip())
        if not colours:
            return "".join(self.chars[:end])
        out: list[str] = []
        current = ""
        for char, owner in zip(self.chars[:end], self.owner[:end], strict=True):
            if owner != current:
                out.append("\x1b[0m" if current else "")
                out.append(f"\x1b[{colours[owner]}m" if owner in colours else "")
                current = owner if owner in colours else ""
            out.append(char)
        return "".join(out) + ("\x1b[0m" if current else "")


def node_colours(columns: list[str]) -> dict[str, int]:
    return {name: PALETTE[index % len(PALETTE)] for index, name in enumerate(columns)}


def timeline(trace: Trace, *, width: int = 80, acks: bool = True, colour: bool = False) -> str:
    """The run as text in ``width`` characters: one column per node, time going down;
    with ``colour``, each node's name, arrows and lines in its own colour (ANSI)."""
    columns = participants(trace)
    drawn = rows(trace, acks=acks)
    for row in drawn:
        for name in (row.source, row.target):
            if name and name not in columns:
                columns.append(name)
    column = max(MIN_COLUMN, (width - TIME_WIDTH) // max(len(columns), 1))
    total = max(width - TIME_WIDTH, column * len(columns))
    centre = {name: index * column + column // 2 for index, name in enumerate(columns)}
    colours = node_colours(columns) if colour else None
    header = Canvas.blank(total)
    for index, name in enumerate(columns):
        shown = printable(name)
        shown = shown if len(shown) <= column - 1 else shown[: max(column - 2, 1)] + "~"
        header.put(index * column + (column - len(shown)) // 2, shown, name)
    lines = ["time (s)  " + header.render(colours)]
    for row in drawn:
        canvas = Canvas.blank(total)
        for name, x in centre.items():
            canvas.put(x, "|", name)
        if row.kind == "datagram":
            _arrow(canvas, row, centre[row.source], centre[row.target])
        else:
            _note(canvas, row, centre[row.source])
        lines.append(f"{row.t:8.3f}  " + canvas.render(colours))
    return "\n".join(lines)


def _arrow(canvas: Canvas, row: Row, a: int, b: int) -> None:
    """A datagram from the column at ``a`` to the one at ``b``, its label on it (a lost
    one's arrow ends in an x)."""
    low, high = min(a, b), max(a, b)
    canvas.put(low + 1, "-" * max(high - low - 1, 0), row.source)
    if row.lost:
        canvas.put(b, "x", row.source)
    else:
        canvas.put(b - 1 if b > a else b + 1, ">" if b > a else "<", row.source)
    label = f" {fit_label(row.label, high - low - 6)} "
    start = low + 2 + (high - low - 4 - len(label)) // 2
    # A type longer than the room: centred on the arrow, inside the line (a type longer
    # than the whole line makes this one line longer: the type is never cut).
    canvas.widen(len(label))
    start = max(0, min(start, len(canvas.chars) - len(label)))
    canvas.put(start, label, row.source)


def _note(canvas: Canvas, row: Row, x: int) -> None:
    """A line a node typed or showed: at its column if it fits, else ending at the line's
    end with the node's name in front (cut with ``~`` only if even that does not fit)."""
    text = f"* {row.label}"
    if x + len(text) > len(canvas.chars):
        text = f"[{row.source}] {row.label}"
        if len(text) > len(canvas.chars):
            text = text[: len(canvas.chars) - 1] + "~"
        x = len(canvas.chars) - len(text)
    canvas.put(x, text, row.source)


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
