"""Reading traces for the replay tool: several segments of one file, or per-node
files, become one trace ordered by wall clock."""

from __future__ import annotations

import msgspec

from chatapp.trace import (
    FORMAT,
    VERSION,
    Event,
    Header,
    NodeInfo,
    Recv,
    Send,
    Trace,
    TraceError,
    parse_addr,
    parse_segments,
    read_segments,
)


def parse_trace(text: str, path: str = "<trace>") -> Trace:
    """A trace from its text; the segments of several writers are merged by wall clock."""
    return _one(parse_segments(text, path), path)


def read_trace(path: str) -> Trace:
    """The trace in the file at ``path``; the segments of several writers are merged."""
    return _one(read_segments(path), path)


def _one(segments: list[Trace], path: str) -> Trace:
    if len(segments) == 1:
        return segments[0]
    merged = merge_traces(segments)
    merged.path = path
    return merged


def merge_traces(traces: list[Trace]) -> Trace:
    """One trace from several, ordered by wall clock (``started + t``).

    When a datagram is received before it was sent by the wall clocks, those
    clocks disagree: the later trace is shifted so that every datagram arrives
    after it left, and a note in the header says by how much.
    """
    if not traces:
        raise TraceError("nothing to merge")
    notes: list[str] = []
    offsets = [trace.header.started for trace in traces]
    for index in range(1, len(traces)):
        shift = _clock_correction(traces[:index], offsets[:index], traces[index], offsets[index])
        if shift:
            offsets[index] += shift
            notes.append(
                f"clocks disagree: {traces[index].path or f'trace {index + 1}'} shifted by"
                f" {shift:+.6f} s so that every datagram arrives after it was sent"
            )
    for trace in traces[1:]:
        if trace.header.timers != traces[0].header.timers:
            notes.append(
                f"timer settings differ: {msgspec.to_builtins(trace.header.timers)} in"
                f" {trace.path or 'a later trace'}"
            )
    start = min(offsets)
    timed: list[tuple[float, int, int, Event]] = []
    for index, (trace, offset) in enumerate(zip(traces, offsets, strict=False)):
        for event in trace.events:
            timed.append((offset + event.t - start, index, event.seq, event))
    timed.sort(key=lambda item: (item[0], item[1], item[2]))
    events = [
        msgspec.structs.replace(event, seq=seq, t=round(wall, 6))
        for seq, (wall, _, _, event) in enumerate(timed, 1)
    ]
    nodes: dict[str, NodeInfo] = {}
    for trace in traces:
        nodes.update(trace.header.nodes)
    first = traces[0].header
    header = Header(
        FORMAT,
        VERSION,
        start,
        first.timers,
        nodes,
        clock=first.clock,
        source="merged",
        scenario=first.scenario,
        notes=[*(note for trace in traces for note in trace.header.notes), *notes],
    )
    merged = Trace(header, events)
    merged.header.nodes = merged.nodes()
    if len({trace.path for trace in traces}) == 1:  # the segments of one file: its lines
        merged.lines = {
            seq: line
            for seq, (_, index, old_seq, _) in enumerate(timed, 1)
            if (line := traces[index].lines.get(old_seq)) is not None
        }
    return merged


def _clock_correction(
    earlier: list[Trace], earlier_offsets: list[float], later: Trace, later_offset: float
) -> float:
    sent: dict[tuple[int, bytes], float] = {}
    for trace, offset in zip(earlier, earlier_offsets, strict=False):
        for event in trace.events:
            if isinstance(event, Send):
                sent.setdefault((parse_addr(event.peer)[1], event.data), offset + event.t)
    needed = 0.0
    for event in later.events:
        if isinstance(event, Recv):
            at = sent.get((parse_addr(event.local)[1], event.data))
            if at is not None:
                needed = max(needed, at - (later_offset + event.t))
    return round(needed + 1e-6, 6) if needed > 0 else 0.0
