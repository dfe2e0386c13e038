"""JSONL traces: every datagram a node sends or receives, every line typed and shown.

- ``chatapp.trace.format``: the header and the events, reading and writing them;
- ``chatapp.trace.recorders``: where a node reports what it does (a file, memory,
  nowhere).

What only the replay tool needs (merging per-node traces, normalising volatile
values, describing datagrams) is in ``tools/replay``.
"""

from chatapp.trace.format import (
    FORMAT,
    VERSION,
    Datagram,
    Event,
    Exited,
    Fault,
    Header,
    Input,
    NodeInfo,
    Recv,
    Restored,
    Send,
    Shown,
    Start,
    TimerInfo,
    Trace,
    TraceError,
    complete_header,
    dump_line,
    input_line,
    parse_addr,
    parse_input_line,
    parse_segments,
    read_segments,
    write_trace,
)
from chatapp.trace.recorders import (
    JsonlRecorder,
    MemoryRecorder,
    NullRecorder,
    Recorder,
    TraceRecorder,
    public_argv,
)

__all__ = [
    "FORMAT",
    "VERSION",
    "Datagram",
    "Event",
    "Exited",
    "Fault",
    "Header",
    "Input",
    "JsonlRecorder",
    "MemoryRecorder",
    "NodeInfo",
    "NullRecorder",
    "Recorder",
    "Recv",
    "Restored",
    "Send",
    "Shown",
    "Start",
    "TimerInfo",
    "Trace",
    "TraceError",
    "TraceRecorder",
    "complete_header",
    "dump_line",
    "input_line",
    "parse_addr",
    "parse_input_line",
    "parse_segments",
    "public_argv",
    "read_segments",
    "write_trace",
]
