"""JSONL traces: every datagram a node sends or receives, every line typed and shown.

Line 1 is a header; every other line is one event. Times are seconds since
the trace began, read from ``trio.current_time()`` so that virtual time
(``MockClock``) is recorded as it ran. The format is documented in
docs/trace-format.md; ``read_trace`` checks every line against the types below.

Volatile values (message ids, tokens, ports, Unix times) differ from run to
run. ``Normaliser`` maps them to stable labels, and the replay tool applies the
same normaliser to the recorded trace and to the new one before comparing.
"""

from __future__ import annotations

import atexit
import base64
import collections
import contextlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

import msgspec
import trio

from chatapp.protocol.common import Timers
from chatapp.protocol.server import ClientRecord, Presence
from chatapp.wire import Address, Message, StoredItem, fmt_addr, to_builtins

FORMAT = "chatapp-trace"
VERSION = 1

#: ``HOST:PORT``, as ``fmt_addr`` writes it; every address in a trace is checked against it.
HostPort = Annotated[str, msgspec.Meta(pattern=r"^[^\s:]*:[0-9]{1,5}$")]
#: A ``HostPort``, or empty (not known).
OptionalHostPort = Annotated[str, msgspec.Meta(pattern=r"^([^\s:]*:[0-9]{1,5})?$")]


def parse_addr(text: str) -> Address:
    """``("127.0.0.1", 9001)`` from ``127.0.0.1:9001`` (a ``HostPort``: ValueError otherwise)."""
    host, _, port = text.rpartition(":")
    return (host, int(port))


def _raw(data: bytes) -> tuple[str | None, str | None]:
    """(raw, raw_b64): the datagram as text when it is UTF-8 (it always is for chatapp's
    own), else base64."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, base64.b64encode(data).decode("ascii")


def raw_fields(data: bytes) -> dict[str, str]:
    """The ``raw`` or ``raw_b64`` field of a datagram's event."""
    raw, raw_b64 = _raw(data)
    return {"raw": raw} if raw is not None else {"raw_b64": raw_b64 or ""}


# --- the format, as types that every line is checked against ---------------------------


class NodeInfo(msgspec.Struct, omit_defaults=True):
    role: Literal["server", "client"]
    argv: list[str] = []
    address: OptionalHostPort = ""


class TimerInfo(msgspec.Struct):
    ack_timeout: Annotated[float, msgspec.Meta(gt=0)]
    tries: Annotated[int, msgspec.Meta(ge=1)]

    def timers(self) -> Timers:
        return Timers(ack_timeout=self.ack_timeout, tries=self.tries)


class Header(msgspec.Struct, omit_defaults=True):
    format: str
    version: int
    started: float  # Unix time of t = 0
    timers: TimerInfo
    nodes: dict[str, NodeInfo] = {}
    clock: Literal["real", "virtual"] = "real"
    source: str = ""  # what recorded it: "chatapp serve", "chat-replay record", ...
    scenario: str = ""  # the scenario file that was played, if any
    notes: list[str] = []


class _Event(msgspec.Struct, tag_field="ev", omit_defaults=True, forbid_unknown_fields=True):
    seq: int
    t: float
    node: str


class Start(_Event, tag="start"):
    role: Literal["server", "client"]
    local: HostPort
    argv: list[str] = []


class Datagram(_Event):
    local: HostPort
    peer: HostPort
    msg: dict[str, Any] | None = None
    raw: str | None = None
    raw_b64: str | None = None
    error: str | None = None

    @property
    def data(self) -> bytes:
        if self.raw is not None:
            return self.raw.encode("utf-8")
        return base64.b64decode(self.raw_b64 or "")

    @property
    def kind(self) -> str:
        return str(self.msg.get("t", "?")) if self.msg else "(undecodable)"


class Send(Datagram, tag="send"):
    pass


class Recv(Datagram, tag="recv"):
    pass


class Input(_Event, tag="input"):
    line: str


class Shown(_Event, tag="show"):
    line: str


class Exited(_Event, tag="exit"):
    status: int


class Restored(_Event, tag="restore"):
    """What a server read from its database before it started: without it, a replay
    could not know the clients and messages a run began with."""

    clients: list[tuple[str, str, int, str, Presence]]  # name, ip, port, token, presence
    mailbox: dict[str, list[StoredItem]] = {}  # recipient -> stored items, oldest first


Event = Start | Send | Recv | Input | Shown | Exited | Restored

_encoder = msgspec.json.Encoder()


class TraceError(ValueError):
    """A file that is not a readable chatapp trace; the message names the line."""


@dataclass
class Trace:
    header: Header
    events: list[Event]
    path: str = ""

    def nodes(self) -> dict[str, NodeInfo]:
        """Every node, from the header and from the start events (the last start wins)."""
        nodes = dict(self.header.nodes)
        for event in self.events:
            if isinstance(event, Start):
                nodes[event.node] = NodeInfo(event.role, event.argv, event.local)
        return nodes

    def at(self, node: str) -> list[Event]:
        return [event for event in self.events if event.node == node]


def dump_line(record: Mapping[str, Any] | msgspec.Struct) -> bytes:
    return _encoder.encode(record) + b"\n"


def parse_trace(text: str, path: str = "<trace>") -> Trace:
    """A trace from its text.

    Several processes may append to one file: each writes its own header, and its
    events may interleave with the others'. An event belongs to the latest header
    that names its node; the segments are then merged by wall clock.
    """
    segments: list[Trace] = []
    last_seq: list[int] = []
    owner: dict[str, int] = {}
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = msgspec.json.decode(line)
        except msgspec.DecodeError as exc:
            if number == len(lines) and not text.endswith("\n"):
                break  # a last line cut short (the writer was killed mid-write): drop it
            raise TraceError(f"{path}:{number}: not JSON: {exc}") from None
        if isinstance(record, dict) and "format" in record:
            header = _read_header(record, path, number)
            for node in header.nodes:
                owner[node] = len(segments)
            segments.append(Trace(header, [], path))
            last_seq.append(0)
            continue
        if not segments:
            raise TraceError(f"{path}:{number}: the first line must be a {FORMAT} header")
        try:
            event = msgspec.convert(record, Event)
            if isinstance(event, Datagram) and event.msg is not None:
                msgspec.convert(event.msg, Message)  # a chatapp message, as chatapp.wire types it
        except msgspec.ValidationError as exc:
            raise TraceError(f"{path}:{number}: not a trace event: {exc}") from None
        segment = owner.get(event.node, len(segments) - 1)
        if event.seq <= last_seq[segment]:
            raise TraceError(
                f"{path}:{number}: seq {event.seq} does not follow {last_seq[segment]}"
            )
        last_seq[segment] = event.seq
        segments[segment].events.append(event)
    if not segments:
        raise TraceError(f"{path}: empty: not a {FORMAT} file")
    if len(segments) == 1:
        return segments[0]
    merged = merge_traces(segments)
    merged.path = path
    return merged


def _read_header(record: dict[str, Any], path: str, number: int) -> Header:
    try:
        header = msgspec.convert(record, Header)
    except msgspec.ValidationError as exc:
        raise TraceError(f"{path}:{number}: not a {FORMAT} header: {exc}") from None
    if header.format != FORMAT:
        raise TraceError(f"{path}:{number}: format {header.format!r}, expected {FORMAT!r}")
    if header.version > VERSION:
        raise TraceError(
            f"{path}: trace format version {header.version} is newer than this chatapp reads"
            f" ({VERSION}); upgrade chatapp"
        )
    if header.version < 1:
        raise TraceError(f"{path}:{number}: bad format version {header.version}")
    return header


def read_trace(path: str) -> Trace:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not UTF-8 text: not a {FORMAT} file") from None
    return parse_trace(text, path)


def write_trace(trace: Trace, path: str) -> None:
    """Write a whole trace (renumbering nothing): to a temporary file, then renamed.
    An OSError (a missing directory, ``path`` a directory) leaves no temporary file."""
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        with open(temporary, "wb") as f:
            f.write(dump_line(trace.header))
            for event in trace.events:
                f.write(dump_line(event))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


# --- merging per-node traces --------------------------------------------------------


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


# --- recording ------------------------------------------------------------------------


class Recorder(Protocol):
    """Where a node reports what it does. ``NullRecorder`` when not tracing."""

    def node_started(self, node: str, role: str, argv: list[str], local: Address) -> None: ...

    def datagram(
        self,
        node: str,
        direction: str,
        local: Address,
        peer: Address,
        data: bytes,
        message: Message | None,
        error: str | None = None,
    ) -> None: ...

    def typed(self, node: str, line: str) -> None: ...

    def shown(self, node: str, line: str) -> None: ...

    def node_exited(self, node: str, status: int) -> None: ...

    def restored(
        self, node: str, clients: list[ClientRecord], mailbox: Mapping[str, list[StoredItem]]
    ) -> None: ...

    def close(self) -> None: ...


class NullRecorder:
    def node_started(self, node: str, role: str, argv: list[str], local: Address) -> None:
        pass

    def datagram(
        self,
        node: str,
        direction: str,
        local: Address,
        peer: Address,
        data: bytes,
        message: Message | None,
        error: str | None = None,
    ) -> None:
        pass

    def typed(self, node: str, line: str) -> None:
        pass

    def shown(self, node: str, line: str) -> None:
        pass

    def node_exited(self, node: str, status: int) -> None:
        pass

    def restored(
        self, node: str, clients: list[ClientRecord], mailbox: Mapping[str, list[StoredItem]]
    ) -> None:
        pass

    def close(self) -> None:
        pass


def public_argv(argv: list[str]) -> list[str]:
    """argv with the program's own path cut to its name: a trace is shared, a home
    directory is not its business."""
    if not argv:
        return []
    # An argument that is not UTF-8 arrives with surrogates that JSON cannot carry.
    text = [arg.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for arg in argv]
    return [os.path.basename(text[0]), *text[1:]]


class TraceRecorder:
    """Builds the trace's records and hands each to ``sink`` (a dict per line).

    The header is handed over with the first event, so that a node recording
    alone has its command line and address in it.
    """

    def __init__(
        self,
        sink: Callable[[dict[str, Any]], None],
        *,
        timers: Timers,
        nodes: Mapping[str, Mapping[str, object]] | None = None,
        started: float | None = None,
        clock: str = "real",
        source: str = "",
        scenario: str = "",
    ) -> None:
        self._sink = sink
        self._t0 = trio.current_time()
        self._seq = 0
        self.header: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "started": time.time() if started is None else started,
            "timers": {"ack_timeout": timers.ack_timeout, "tries": timers.tries},
            "nodes": {name: dict(info) for name, info in (nodes or {}).items()},
            "clock": clock,
        }
        if source:
            self.header["source"] = source
        if scenario:
            self.header["scenario"] = scenario
        self._header_written = False

    def _write_header(self) -> None:
        self._header_written = True
        self._sink(self.header)

    def _event(self, node: str, ev: str, **fields: object) -> None:
        if not self._header_written:
            self._write_header()
        self._seq += 1
        t = round(trio.current_time() - self._t0, 6)
        self._sink({"seq": self._seq, "t": t, "node": node, "ev": ev, **fields})

    def node_started(self, node: str, role: str, argv: list[str], local: Address) -> None:
        argv = public_argv(argv)
        self.header["nodes"][node] = {"role": role, "argv": argv, "address": fmt_addr(local)}
        self._event(node, "start", role=role, local=fmt_addr(local), argv=argv)

    def datagram(
        self,
        node: str,
        direction: str,
        local: Address,
        peer: Address,
        data: bytes,
        message: Message | None,
        error: str | None = None,
    ) -> None:
        fields: dict[str, object] = {"local": fmt_addr(local), "peer": fmt_addr(peer)}
        if message is not None:
            fields["msg"] = to_builtins(message)
        if error is not None:
            fields["error"] = error
        fields.update(raw_fields(data))
        self._event(node, direction, **fields)

    def typed(self, node: str, line: str) -> None:
        self._event(node, "input", line=line)

    def shown(self, node: str, line: str) -> None:
        self._event(node, "show", line=line)

    def node_exited(self, node: str, status: int) -> None:
        self._event(node, "exit", status=status)

    def restored(
        self, node: str, clients: list[ClientRecord], mailbox: Mapping[str, list[StoredItem]]
    ) -> None:
        if not clients and not any(mailbox.values()):
            return  # a fresh database: nothing to say
        rows = [[r.name, r.addr[0], r.addr[1], r.token, r.presence.value] for r in clients]
        boxes = {
            name: [msgspec.to_builtins(item) for item in items]
            for name, items in mailbox.items()
            if items
        }
        self._event(node, "restore", clients=rows, mailbox=boxes)

    def close(self) -> None:
        if not self._header_written:
            self._write_header()


class _FileWriter:
    """Writes lines to a file from a thread, so that the event loop never waits on the disk.

    The event loop only appends a record to a deque; the thread wakes every
    ``FLUSH_INTERVAL`` seconds, encodes what has gathered, and writes it. (Waking
    the thread for each record, as a queue does, costs more than the record: the
    two threads then trade the GIL on every datagram.) ``close`` (also run at
    interpreter exit) writes what is pending, so a node stopped by Ctrl-C, or one that
    crashed with an exception, loses none of its last events. Each batch is one
    ``write`` to a file opened for appending, so several processes can record
    into one file without tearing each other's lines.
    """

    #: Seconds between writes: what a SIGKILL may lose (any other exit loses nothing).
    FLUSH_INTERVAL = 0.01

    def __init__(self, path: str, *, append: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
        self.path = path
        self._fd = os.open(path, flags, 0o644)
        self._pending: collections.deque[dict[str, Any] | bytes] = collections.deque()
        self._closing = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="chatapp-trace", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def __call__(self, record: dict[str, Any] | bytes) -> None:
        """Queue a record, or a line already encoded (``bytes``, ending in a newline)."""
        if not self._closed:
            self._pending.append(record)

    def _run(self) -> None:
        pending = self._pending
        done = False
        while not done:
            done = self._closing.wait(self.FLUSH_INTERVAL)
            batch = []
            while pending:  # deque.popleft is atomic: the event loop may append meanwhile
                batch.append(pending.popleft())
            if not batch:
                continue
            lines = b"".join(
                record if isinstance(record, bytes) else dump_line(record) for record in batch
            )
            try:
                _write_all(self._fd, lines)
            except OSError:
                return  # a full disk must not stop the node; the trace just ends here

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._thread.join(timeout=10)
        os.close(self._fd)
        atexit.unregister(self.close)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class JsonlRecorder(TraceRecorder):
    """A trace written to a JSONL file without blocking the event loop."""

    def __init__(self, writer: _FileWriter, *, timers: Timers, **kwargs: Any) -> None:
        super().__init__(writer, timers=timers, **kwargs)
        self._writer = writer
        self._clock = trio.lowlevel.current_clock()  # the run's clock, as _t0 came from
        self._addresses: dict[Address, str] = {}  # "ip:port" of recent peers, made once

    @classmethod
    def open(
        cls, path: str, *, timers: Timers, append: bool = True, **kwargs: Any
    ) -> JsonlRecorder:
        """Record into ``path``. By default the file is appended to, so that several
        nodes (processes) started with the same ``--trace`` file share it."""
        return cls(_FileWriter(path, append=append), timers=timers, **kwargs)

    @property
    def path(self) -> str:
        return self._writer.path

    def datagram(
        self,
        node: str,
        direction: str,
        local: Address,
        peer: Address,
        data: bytes,
        message: Message | None,
        error: str | None = None,
    ) -> None:
        # The same line as TraceRecorder.datagram writes, built as one struct that msgspec
        # encodes with the message inside it: no dicts per datagram. A traced server
        # spent more on building those dicts than on the datagram itself.
        if not self._header_written:
            self._write_header()
        self._seq += 1
        raw, raw_b64 = _raw(data)
        # To the microsecond, as round(t, 6) (which costs as much as the rest of the time
        # stamp); the two differ at most in a tie's last digit.
        t = int((self._clock.current_time() - self._t0) * 1e6 + 0.5) / 1e6
        # Encoded here, not in the writer thread: the thread then needs the GIL only for a
        # moment per write, instead of taking it from the event loop for every record.
        self._writer(
            dump_line(
                _DatagramLine(
                    self._seq,
                    t,
                    node,
                    direction,
                    self._address(local),
                    self._address(peer),
                    message,
                    error,
                    raw,
                    raw_b64,
                )
            )
        )

    def _address(self, addr: Address) -> str:
        text = self._addresses.get(addr)
        if text is None:
            if len(self._addresses) >= 4096:  # bounded: a server may hear from many peers
                self._addresses.clear()
            text = self._addresses[addr] = fmt_addr(addr)
        return text

    def close(self) -> None:
        super().close()
        self._writer.close()


class _DatagramLine(msgspec.Struct, omit_defaults=True, gc=False):
    """A send or recv event as TraceRecorder.datagram writes it (same fields, same order).
    Encoded as soon as it is made, so never in a cycle: kept out of the GC's counts."""

    seq: int
    t: float
    node: str
    ev: str
    local: str
    peer: str
    msg: Message | None = None
    error: str | None = None
    raw: str | None = None
    raw_b64: str | None = None


class MemoryRecorder(TraceRecorder):
    """A trace kept in memory (replay); ``on_event`` is told of each event as it happens."""

    def __init__(
        self, *, timers: Timers, on_event: Callable[[Event], None] | None = None, **kwargs: Any
    ) -> None:
        self.records: list[dict[str, Any]] = []
        self.events: list[Event] = []
        self._on_event = on_event
        super().__init__(self._keep, timers=timers, **kwargs)

    def _keep(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if "seq" in record:
            event = msgspec.convert(record, Event)
            self.events.append(event)
            if self._on_event is not None:
                self._on_event(event)

    def trace(self) -> Trace:
        header = msgspec.convert(self.header, Header)
        return Trace(header, list(self.events))


def complete_header(path: str) -> Trace:
    """Rewrite a finished trace's header with every node seen in it (a trace recorded
    from one Trio run names only the nodes started before its first event); returns
    the trace."""
    trace = read_trace(path)
    trace.header.nodes = trace.nodes()
    write_trace(trace, path)
    return trace


# --- normalising volatile values --------------------------------------------------------

_TIME_PREFIX = re.compile(r"^\(\d+(?:\.\d+)?(?:e[+-]?\d+)?\) ")
_ADDRESS = re.compile(r"\b(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5})\b")
_ID_FIELDS = ("id", "delivery")


@dataclass
class Normaliser:
    """Stable labels for what changes from run to run.

    - an address becomes the name of the node bound there;
    - a message id becomes ``NODE#k``: the k-th id that NODE was first to send;
    - a token becomes ``token@NODE``, NODE being the client it was issued to;
    - Unix times (stored messages' ``stored_at``, shown as ``(1648153596.77)``)
      and table epochs become placeholders.

    Feed it the events in order (``learn``) before asking for labels.

    With ``scoped`` (a node tested black-box, seen only through what the others
    received), that node's ids are labelled per receiver instead,
    ``NODE#RECEIVER.k``: arrivals at different receivers have no reliable order.
    """

    addresses: dict[str, str] = field(default_factory=dict)
    ports: dict[int, str] = field(default_factory=dict)
    id_labels: dict[str, str] = field(default_factory=dict)
    id_values: dict[str, str] = field(default_factory=dict)  # label -> latest value
    token_labels: dict[str, str] = field(default_factory=dict)
    token_values: dict[str, str] = field(default_factory=dict)
    scoped: str = ""
    _issued: dict[str, int] = field(default_factory=dict)
    _stream_labels: dict[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        events: Iterable[Event],
        extra_addresses: Mapping[str, str] | None = None,
        scoped: str = "",
    ) -> Normaliser:
        normaliser = cls(scoped=scoped)
        for address, node in (extra_addresses or {}).items():
            normaliser.add_address(address, node)
        for event in events:
            normaliser.learn(event)
        return normaliser

    def adopt(self, other: Normaliser, *, except_issuer: str, tokens: bool) -> None:
        """Take ``other``'s labels for every id not issued by ``except_issuer`` (and its
        tokens too when ``tokens``): a node played from a recording sends the recorded
        values, and they keep the recorded labels even where a run shows only part of
        the traffic."""
        for value, label in other.id_labels.items():
            if label.partition("#")[0] != except_issuer:
                self.id_labels.setdefault(value, label)
        if tokens:
            for value, label in other.token_labels.items():
                self.token_labels.setdefault(value, label)

    def add_address(self, address: str, node: str) -> None:
        self.addresses[address] = node
        host, port = parse_addr(address)
        self.ports.setdefault(port, node)
        if host in ("0.0.0.0", "127.0.0.1"):
            self.addresses.setdefault(fmt_addr(("127.0.0.1", port)), node)

    def learn(self, event: Event) -> None:
        if isinstance(event, Restored):
            # clients the server knew from before the run are named by their names
            for name, ip, port, _, _ in event.clients:
                self.addresses.setdefault(fmt_addr((ip, port)), name)
                self.ports.setdefault(port, name)
        elif isinstance(event, Start):
            self.add_address(event.local, event.node)
            self.ports[parse_addr(event.local)[1]] = event.node
        elif isinstance(event, Send | Recv) and event.msg:
            sender = event.node if isinstance(event, Send) else self.address(event.peer)
            receiver = self.address(event.peer) if isinstance(event, Send) else event.node
            self._learn_ids(event.msg, sender, receiver)
            token = event.msg.get("token")
            if isinstance(token, str) and token not in self.token_labels:
                holder = receiver if event.msg.get("t") == "registered" else sender
                self.token_labels[token] = f"token@{holder}"
            if isinstance(token, str):
                self.token_values[self.token_labels[token]] = token

    def _learn_ids(self, msg: Mapping[str, Any], sender: str, receiver: str) -> None:
        for value in _ids_in(msg):
            if self.scoped and sender == self.scoped and value not in self.id_labels:
                key = (receiver, value)
                if key not in self._stream_labels:
                    count = self._issued.get(f"{sender}#{receiver}", 0) + 1
                    self._issued[f"{sender}#{receiver}"] = count
                    self._stream_labels[key] = f"{sender}#{receiver}.{count}"
                self.id_values[self._stream_labels[key]] = value
                continue
            if self.scoped and receiver == self.scoped and (sender, value) in self._stream_labels:
                continue  # an answer to the scoped node, echoing its id
            if value not in self.id_labels:
                count = self._issued.get(sender, 0) + 1
                self._issued[sender] = count
                self.id_labels[value] = f"{sender}#{count}"
            self.id_values[self.id_labels[value]] = value

    def address(self, address: str) -> str:
        node = self.addresses.get(address)
        if node is not None:
            return node
        try:
            port = parse_addr(address)[1]
        except ValueError:
            return address
        return self.ports.get(port, f"?{address}")

    def label(self, value: Any, other_end: str = "") -> str:
        """The label of a message id; ``other_end`` is the node at the far end of the
        datagram from the scoped node."""
        scoped = self._stream_labels.get((other_end, value))
        if scoped is not None:
            return scoped
        return self.id_labels.get(value, f"?{value}")

    def other_end(self, event: Send | Recv) -> str:
        peer = self.address(event.peer)
        return event.node if peer == self.scoped else peer

    def event_message(self, event: Send | Recv) -> dict[str, Any]:
        return self.message(event.msg, self.other_end(event))

    def message(self, msg: Mapping[str, Any] | None, other_end: str = "") -> dict[str, Any]:
        if msg is None:
            return {}
        result: dict[str, Any] = {}
        for key, value in msg.items():
            if key in _ID_FIELDS:
                result[key] = self.label(value, other_end)
            elif key == "token":
                result[key] = self.token_labels.get(value, "token@?")
            elif key == "port" and isinstance(value, int):
                result[key] = self.ports.get(value, "?port")
            elif key == "epoch":
                result[key] = "<epoch>"
            elif key == "entries" and isinstance(value, list):
                result[key] = [self._entry(entry) for entry in value]
            elif key == "entry":
                result[key] = None if value is None else self._entry(value)
            elif key == "items" and isinstance(value, list):
                result[key] = [self._item(item, other_end) for item in value]
            elif key == "reason" and isinstance(value, str):
                result[key] = self.text(value)
            else:
                result[key] = value
        return result

    def _entry(self, entry: Any) -> Any:
        if isinstance(entry, list) and len(entry) == 4:
            name, ip, port, online = entry
            return [name, self.address(fmt_addr((ip, port))), online]
        return entry

    def _item(self, item: Any, other_end: str) -> Any:
        if not isinstance(item, dict):
            return item
        return {
            key: (
                self.label(value, other_end)
                if key == "id"
                else "<time>"
                if key == "stored_at"
                else value
            )
            for key, value in item.items()
        }

    def text(self, line: str) -> str:
        """A shown line (or a refusal's reason) with Unix times and addresses replaced."""
        line = _TIME_PREFIX.sub("({time}) ", line)
        return _ADDRESS.sub(lambda match: "<" + self.address(match.group(0)) + ">", line)


def _ids_in(msg: Mapping[str, Any]) -> list[str]:
    found = [msg[key] for key in _ID_FIELDS if isinstance(msg.get(key), str)]
    items = msg.get("items")
    if isinstance(items, list):
        found += [item["id"] for item in items if isinstance(item, dict) and "id" in item]
    return found


def describe(msg: Mapping[str, Any] | None) -> str:
    """A datagram in a few words, for timelines and diffs: ``table v2``, ``chat "hi"``."""
    if not msg:
        return "(undecodable)"
    kind = str(msg.get("t", "?"))
    if kind == "table":
        return f"table v{msg.get('version')}"
    if kind in ("chat", "channel", "send_all", "save"):
        text = str(msg.get("text", ""))
        if len(text) > 24:
            text = text[:21] + "..."
        to = f" to {msg['to']}" if kind == "save" else ""
        return f'{kind}{to} "{text}"'
    if kind == "mailbox":
        return f"mailbox ({len(msg.get('items', []))} stored)"
    if kind == "saved":
        return f"saved ({msg.get('outcome')})"
    if kind in ("register", "dereg", "reg", "lookup"):
        return f"{kind} {msg.get('name', '')}".rstrip()
    return kind
