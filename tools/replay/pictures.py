"""A run as a picture a person opens: a Markdown file with a Mermaid block (code hosts
render it), and a sequence diagram drawn as SVG, alone or in an HTML page, that needs
nothing but the file (no script, no font or style from the network)."""

from __future__ import annotations

from html import escape as html_escape
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from chatapp.screen import printable
from chatapp.trace import Trace

from .show import Row, mermaid, message_type, participants, rows

#: Colours of the nodes, by column (readable on white).
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
           "#17becf", "#7f7f7f", "#bcbd22")  # fmt: skip
COLUMN = 190  # px between two lifelines
LEFT = 70  # px: the time column
TOP = 50  # px: the node names
ROW = 22  # px per row
#: Characters of a line a node showed drawn at most (the whole line is its tooltip).
NOTE_CHARS = 70
LABEL_CHARS = 30


def markdown(trace: Trace, *, acks: bool = True, title: str = "") -> str:
    """A Markdown document: a heading, what the run is, and its Mermaid diagram."""
    name = title or Path(trace.path or "trace").name
    nodes = ", ".join(participants(trace))
    return (
        f"# {name}\n\n"
        f"A chatapp run recorded in `{name}`: {len(trace.events)} events between {nodes}"
        " (made by `chat-replay show`).\n\n"
        f"```mermaid\n{mermaid(trace, acks=acks)}```\n"
    )


def _columns(trace: Trace, drawn: list[Row]) -> list[str]:
    columns = participants(trace)
    for row in drawn:
        for name in (row.source, row.target):
            if name and name not in columns:
                columns.append(name)
    return columns


def svg(trace: Trace, *, acks: bool = True) -> str:
    """The run as a standalone SVG sequence diagram: one lifeline per node, time going
    down, each datagram an arrow (a lost one dashed, ending in an x), each line a node
    typed or showed a note on its lifeline, in the node's colour."""
    drawn = rows(trace, acks=acks)
    columns = _columns(trace, drawn)
    x = {name: LEFT + COLUMN // 2 + index * COLUMN for index, name in enumerate(columns)}
    colour = {name: COLOURS[index % len(COLOURS)] for index, name in enumerate(columns)}
    notes = [x[row.source] + _note_width(row) for row in drawn if row.kind == "note"]
    width = max([LEFT + COLUMN * len(columns), *notes]) + 10
    height = TOP + ROW * (len(drawn) + 1) + 10
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}"'
        f' viewBox="0 0 {width} {height}" font-family="monospace" font-size="12">',
        "<title>" + escape(Path(trace.path or "trace").name) + "</title>",
        '<rect width="100%" height="100%" fill="white"/>',
        "<defs>",
        *(
            f'<marker id="head{index}" markerWidth="8" markerHeight="8" refX="8" refY="4"'
            f' orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="{colour[name]}"/></marker>'
            for index, name in enumerate(columns)
        ),
        "</defs>",
        f'<text x="4" y="{TOP - 20}" fill="#555">time (s)</text>',
    ]
    bottom = height - 6
    for name in columns:
        parts.append(
            f'<text x="{x[name]}" y="{TOP - 20}" text-anchor="middle" font-weight="bold"'
            f' fill="{colour[name]}">{escape(printable(name))}</text>'
            f'<line x1="{x[name]}" y1="{TOP - 12}" x2="{x[name]}" y2="{bottom}"'
            f' stroke="{colour[name]}" stroke-opacity="0.5"/>'
        )
    for index, row in enumerate(drawn):
        y = TOP + ROW * index + ROW // 2
        parts.append(f'<text x="4" y="{y + 4}" fill="#555">{row.t:.3f}</text>')
        marker = columns.index(row.source)
        if row.kind == "datagram":
            parts.append(_svg_arrow(row, x[row.source], x[row.target], y, colour[row.source],
                                    marker))  # fmt: skip
        else:
            parts.append(_svg_note(row, x[row.source], y, colour[row.source]))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _svg_arrow(row: Row, a: int, b: int, y: int, colour: str, marker: int) -> str:
    label = row.label if len(row.label) <= LABEL_CHARS else row.label[: LABEL_CHARS - 1] + "~"
    if len(label) < len(message_type(row.label)):
        label = message_type(row.label)  # the type is never cut
    dash = ' stroke-dasharray="4 3"' if row.lost else ""
    end = f' marker-end="url(#head{marker})"' if not row.lost else ""
    tip = escape(row.label + (" (lost: nobody received it)" if row.lost else ""))
    cross = ""
    if row.lost:
        cross = (
            f'<path d="M{b - 5},{y - 5} L{b + 5},{y + 5} M{b - 5},{y + 5} L{b + 5},{y - 5}"'
            f' stroke="{colour}" stroke-width="2"/>'
        )
    return (
        f'<g class="datagram"><title>{tip}</title>'
        f'<line x1="{a}" y1="{y}" x2="{b}" y2="{y}" stroke="{colour}"{dash}{end}/>{cross}'
        f'<text x="{(a + b) // 2}" y="{y - 3}" text-anchor="middle" fill="{colour}">'
        f"{escape(label)}</text></g>"
    )


def _note_text(row: Row) -> str:
    return row.label if len(row.label) <= NOTE_CHARS else row.label[: NOTE_CHARS - 1] + "~"


def _note_width(row: Row) -> int:
    """Pixels of a note's box (monospace 12 px: about 7.2 px a character)."""
    return 8 + round(7.3 * len(_note_text(row)))


def _svg_note(row: Row, x: int, y: int, colour: str) -> str:
    text = _note_text(row)
    width = _note_width(row)
    return (
        f'<g class="note"><title>{escape(row.label)}</title>'
        f'<rect x="{x - 4}" y="{y - 9}" width="{width}" height="16" rx="3" fill="white"'
        f" stroke={quoteattr(colour)}/>"
        f'<text x="{x}" y="{y + 3}" fill="{colour}">{escape(text)}</text></g>'
    )


def html(trace: Trace, *, acks: bool = True) -> str:
    """An HTML page holding the SVG diagram: opens offline, in any browser."""
    name = html_escape(Path(trace.path or "trace").name)
    nodes = html_escape(", ".join(participants(trace)))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{name}</title>\n"
        "<style>body { font-family: sans-serif; margin: 1em; }"
        " .diagram { overflow-x: auto; }</style>\n</head>\n<body>\n"
        f"<h1>{name}</h1>\n<p>A chatapp run: {len(trace.events)} events between {nodes}."
        " Hover over an arrow or a note for its whole text; a dashed arrow ending in an x is"
        " a datagram nobody received.</p>\n"
        f'<div class="diagram">\n{svg(trace, acks=acks)}</div>\n</body>\n</html>\n'
    )
