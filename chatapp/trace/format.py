"""The trace format: a header, then one event a line (JSONL), as the types below.

Line 1 is a header; every other line is one event. Times are seconds since
the trace began, read from ``trio.current_time()`` so that virtual time
(``MockClock``) is recorded as it ran. The format is documented in
docs/trace-format.md; ``parse_segments`` checks every line against these types.
Several processes may append to one file, each with its own header: a file is
read as its segments (the replay tool merges them).
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import msgspec

from chatapp.protocol.changes import Presence
from chatapp.protocol.common import Timers
from chatapp.protocol.inputs import BadInput, ClientInput, Signal
from chatapp.wire import Address, Message, Name, Seq, StoredItem

FORMAT = "chatapp-trace"
VERSION = 3
#: The oldest version read: version 2 traces have no ``commit`` events and no settings
#: (then nothing is compared there).
OLDEST_VERSION = 2

#: ``HOST:PORT``, as ``fmt_addr`` writes it; every address in a trace is checked against it.
HostPort = Annotated[str, msgspec.Meta(pattern=r"^[^\s:]*:[0-9]{1,5}$")]
#: A ``HostPort``, or empty (not known).
OptionalHostPort = Annotated[str, msgspec.Meta(pattern=r"^([^\s:]*:[0-9]{1,5})?$")]


def parse_addr(text: str) -> Address:
    """``("127.0.0.1", 9001)`` from ``127.0.0.1:9001`` (a ``HostPort``: ValueError otherwise)."""
    host, _, port = text.rpartition(":")
    return (host, int(port))


def raw_text(data: bytes) -> tuple[str | None, str | None]:
    """(raw, raw_b64): the datagram as text when it is UTF-8 (it always is for chatapp's
    own), else base64."""
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, base64.b64encode(data).decode("ascii")


def raw_fields(data: bytes) -> dict[str, str]:
    """The ``raw`` or ``raw_b64`` field of a datagram's event."""
    raw, raw_b64 = raw_text(data)
    return {"raw": raw} if raw is not None else {"raw_b64": raw_b64 or ""}


# --- the format, as types that every line is checked against ---------------------------


class NodeInfo(msgspec.Struct, omit_defaults=True):
    role: Literal["server", "client", "raw"]
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
    #: The protocol's own defaults when it was recorded (``protocol_defaults``), beside
    #: what each node ran with (its start event's ``settings``).
    defaults: dict[str, float | int] = {}


class _Event(msgspec.Struct, tag_field="ev", omit_defaults=True, forbid_unknown_fields=True):
    seq: int
    t: float
    node: str


Base64 = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9+/]*={0,2}$")]


class Start(_Event, tag="start"):
    """A node starts. A node that records draws its randomness from a generator whose
    ``seed`` is here; a client also writes what it read from disk: its ``key`` (the seed
    of its Ed25519 key: a secret), the server's key it had ``pinned``, and its ``marks``
    (by the server's key, per origin, the highest stored message shown)."""

    role: Literal["server", "client", "raw"]
    local: HostPort
    argv: list[str] = []
    seed: Base64 = ""
    key: Base64 = ""
    pinned: Base64 = ""
    marks: dict[Base64, dict[str, int]] = {}
    #: What the node ran with (the timers, a server's limits), as its command line's
    #: options name them: ``{"ack_timeout": 0.5, "tries": 5, "mailbox_limit": 1000, ...}``.
    settings: dict[str, float | int | None] = {}


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
    """What a server read from its database before it started: its key (a secret), the
    counter of its sequence numbers, the clients and the stored messages. Without it,
    a replay could not start from the state a run began with."""

    server_key: Base64
    origin: str
    last_n: int
    # name, ip, port, key, sid (base64), presence
    clients: list[tuple[str, str, int, Base64, Base64, Presence]] = []
    mailbox: dict[str, list[StoredItem]] = {}  # recipient -> stored items, oldest first


# --- a node's commits: what it wrote to its database or state files ---------------------


class _Change(msgspec.Struct, tag_field="op", forbid_unknown_fields=True, omit_defaults=True):
    pass


class ClientPut(_Change, tag="client"):
    """A client's row saved (new, or replacing the one of that name)."""

    name: Name
    address: HostPort
    key: Base64
    sid: Base64
    presence: Presence


class ClientDropped(_Change, tag="client_removed"):
    """A name left the table, with what was stored for it and what it sent."""

    name: Name


class ItemStored(_Change, tag="stored"):
    """A message kept for ``to`` (its place ``item.seq``: origin and n)."""

    to: Name
    item: StoredItem


class ItemsDeleted(_Change, tag="deleted"):
    """Stored messages of ``to`` deleted (ACKed), by their places (origin, n)."""

    to: Name
    seqs: list[Seq]


class KeyPinned(_Change, tag="pinned"):
    """A client pinned the key of the server at ``server``."""

    server: HostPort
    key: Base64


class Marked(_Change, tag="marked"):
    """A client's delivery marks for the server whose key is ``server_key``: per origin,
    the highest stored message shown."""

    server_key: Base64
    marks: list[tuple[str, int]]


ChangeRecord = ClientPut | ClientDropped | ItemStored | ItemsDeleted | KeyPinned | Marked


class Commit(_Event, tag="commit"):
    """A node committed changes (one transaction), before anything that handling sent or
    showed. ``cause``: what the node was handling (a datagram, a typed line, a timer, its
    start, or other servers' changes to a shared database: ``outside``)."""

    changes: list[ChangeRecord]
    cause: Literal["datagram", "input", "timer", "start", "outside", ""] = ""


class TimerFired(_Event, tag="timer"):
    """One of the node's timers fired and the node did something (sent, showed,
    committed or exited): what follows, up to the next event the node read, is its."""


class Fault(_Event, tag="fault"):
    """A fault injected where ``node`` sent a datagram to ``peer`` (just after its
    ``send`` event): ``what`` (``drop``: it was lost; ``dup``: it went twice; ``delay``:
    it went ``delay`` seconds later) happened to the ``n``-th datagram of type ``of``
    from that node to that peer. A replay injects it again at the same datagram."""

    local: HostPort
    peer: HostPort
    what: Literal["drop", "dup", "delay"]
    of: str
    n: Annotated[int, msgspec.Meta(ge=1)]
    delay: Annotated[float, msgspec.Meta(ge=0)] = 0.0


Event = Start | Send | Recv | Input | Shown | Exited | Restored | Commit | TimerFired | Fault

_encoder = msgspec.json.Encoder()


class TraceError(ValueError):
    """A file that is not a readable chatapp trace; the message names the line."""


@dataclass
class Trace:
    header: Header
    events: list[Event]
    path: str = ""
    #: The line of ``path`` each event was read from, by its seq (a report names it).
    lines: dict[int, int] = field(default_factory=dict)

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


def parse_segments(text: str, path: str = "<trace>") -> list[Trace]:
    """The trace in ``text``, as one ``Trace`` per header.

    Several processes may append to one file: each writes its own header, and its
    events may interleave with the others'. An event belongs to the latest header
    that names its node.
    """
    segments: list[Trace] = []
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
            owner.update((node, len(segments)) for node in header.nodes)
            segments.append(Trace(header, [], path))
        elif not segments:
            raise TraceError(f"{path}:{number}: the first line must be a {FORMAT} header")
        else:
            event = _read_event(record, path, number)
            segment = segments[owner.get(event.node, len(segments) - 1)]
            last = segment.events[-1].seq if segment.events else 0
            if event.seq <= last:
                raise TraceError(f"{path}:{number}: seq {event.seq} does not follow {last}")
            segment.events.append(event)
            segment.lines[event.seq] = number
    if not segments:
        raise TraceError(f"{path}: empty: not a {FORMAT} file")
    return segments


def _read_event(record: Any, path: str, number: int) -> Event:
    try:
        event: Event = msgspec.convert(record, Event)
        if isinstance(event, Datagram) and event.msg is not None:
            msgspec.convert(event.msg, Message)  # a chatapp message, as chatapp.wire types it
    except msgspec.ValidationError as exc:
        raise TraceError(f"{path}:{number}: not a trace event: {exc}") from None
    return event


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
    if header.version == 1:
        raise TraceError(
            f"{path}: recorded by chatapp 1 (trace format 1, protocol 1), whose datagrams"
            " this chatapp does not speak; record it again"
        )
    if header.version < 1:
        raise TraceError(f"{path}:{number}: bad format version {header.version}")
    return header


def read_segments(path: str) -> list[Trace]:
    """The segments of the trace file at ``path`` (one per process that wrote to it)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not UTF-8 text: not a {FORMAT} file") from None
    return parse_segments(text, path)


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


def complete_header(path: str) -> Trace:
    """Rewrite a finished trace's header with every node seen in it (a trace recorded
    from one Trio run names only the nodes started before its first event); returns
    the trace. For a file that one recorder wrote, from its start."""
    segments = read_segments(path)
    if len(segments) != 1:
        raise TraceError(f"{path}: {len(segments)} recorders wrote to it; expected one")
    trace = segments[0]
    trace.header.nodes = trace.nodes()
    write_trace(trace, path)
    return trace


# --- inputs: how a trace writes what was typed ------------------------------------------

_BAD_INPUT = ("<bad input: ", ">")


def input_line(item: ClientInput) -> str:
    """An input as an ``input`` event's line: the line itself, ``<interrupt>``,
    ``<hang_up>`` or ``<bad input: DETAIL>``."""
    if isinstance(item, Signal):
        return f"<{item.value}>"
    if isinstance(item, BadInput):
        return f"{_BAD_INPUT[0]}{item.detail}{_BAD_INPUT[1]}"
    return item


def parse_input_line(line: str) -> ClientInput:
    """The input an ``input`` event's line stands for (``input_line`` read back)."""
    for signal in Signal:
        if line == f"<{signal.value}>":
            return signal
    start, end = _BAD_INPUT
    if line.startswith(start) and line.endswith(end):
        return BadInput(line[len(start) : -len(end)])
    return line
