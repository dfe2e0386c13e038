"""Recorders: where a node reports what it does, and the ones that write traces.

``NullRecorder`` when not tracing; ``JsonlRecorder`` writes a file without
making the event loop wait on the disk; ``MemoryRecorder`` keeps the trace in
memory (the replay records its run with it).
"""

from __future__ import annotations

import atexit
import collections
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import trio

from chatapp.protocol.changes import (
    Change,
    ClientRemoved,
    ClientSaved,
    DeliveryMarked,
    MessagesRemoved,
    MessageStored,
    ServerPinned,
)
from chatapp.protocol.common import Received, Timers
from chatapp.protocol.crypto import b64
from chatapp.protocol.inputs import ClientInput
from chatapp.trace.format import (
    FORMAT,
    VERSION,
    Event,
    Header,
    Trace,
    dump_line,
    input_line,
    raw_text,
)
from chatapp.wire import Address, Message, fmt_addr

if TYPE_CHECKING:
    from chatapp.net import Fault
    from chatapp.store import ServerDisk


class Recorder(Protocol):
    """Where a node reports what it does (``NullRecorder`` when not tracing)."""

    def node_started(
        self,
        node: str,
        role: str,
        argv: list[str],
        local: Address,
        started: Mapping[str, object] | None = None,
    ) -> None:
        """``started``: the seed of the node's randomness, what a client read from disk."""
        return None

    def sent(
        self, node: str, local: Address, peer: Address, data: bytes, msg: Message | None
    ) -> None:
        """A datagram the node hands to the network (``msg``: the message it is, if any)."""
        return None

    def received(
        self, node: str, local: Address, peer: Address, data: bytes, seen: Received
    ) -> None:
        """A datagram that arrived, and what the node made of it."""
        return None

    def fault(self, node: str, local: Address, peer: Address, fault: Fault) -> None:
        """A fault injected where the node sent its last datagram (tests, replays)."""
        return None

    def typed(self, node: str, item: ClientInput) -> None:
        return None

    def shown(self, node: str, line: str) -> None:
        return None

    def node_exited(self, node: str, status: int) -> None:
        return None

    def restored(self, node: str, disk: ServerDisk) -> None:
        """What a server read from its database before it started."""
        return None

    def timer_fired(self, node: str) -> None:
        """One of the node's timers fired, and what it did follows."""
        return None

    def committed(self, node: str, changes: list[Change], cause: str) -> None:
        """Changes the node committed (its database, a client's state files), before what
        the handling (``cause``: datagram, input, timer, start) sends or shows."""
        return None

    def failure(self) -> str | None:
        """Why recording stopped (a full disk, say), once it has; None while it goes on."""
        return None

    def close(self) -> None:
        return None


class NullRecorder(Recorder):
    """Records nothing."""


def protocol_defaults() -> dict[str, float | int]:
    """The protocol's own defaults (``Timers()``, the mailbox limit), which a node started
    without options (a scenario's, a test's) runs with: a trace's header records them."""
    from chatapp.protocol.mailbox import DEFAULT_MAILBOX_LIMIT

    timers = Timers()
    return {
        "ack_timeout": timers.ack_timeout,
        "tries": timers.tries,
        "mailbox_limit": DEFAULT_MAILBOX_LIMIT,
    }


def public_argv(argv: list[str]) -> list[str]:
    """argv with the program's own path cut to its name: a trace is shared, a home
    directory is not its business."""
    if not argv:
        return []
    # An argument that is not UTF-8 arrives with surrogates that JSON cannot carry.
    text = [arg.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for arg in argv]
    return [os.path.basename(text[0]), *text[1:]]


class TraceRecorder(Recorder):
    """Builds the trace's records and hands each to ``sink``: a dict per line, or a
    line already encoded (``bytes``, ending in a newline: a datagram's).

    The header is handed over with the first event, so that a node recording
    alone has its command line and address in it.
    """

    def __init__(
        self,
        sink: Callable[[dict[str, Any] | bytes], None],
        *,
        timers: Timers,
        nodes: Mapping[str, Mapping[str, object]] | None = None,
        started: float | None = None,
        clock: str = "real",
        source: str = "",
        scenario: str = "",
    ) -> None:
        self._sink = sink
        self._clock = trio.lowlevel.current_clock()  # the run's clock, as _t0 comes from
        self._t0 = trio.current_time()
        self._seq = 0
        self._addresses: dict[Address, str] = {}  # "ip:port" of recent peers, made once
        self.header: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "started": time.time() if started is None else started,
            "timers": {"ack_timeout": timers.ack_timeout, "tries": timers.tries},
            "nodes": {name: dict(info) for name, info in (nodes or {}).items()},
            "clock": clock,
            "defaults": protocol_defaults(),
        }
        if source:
            self.header["source"] = source
        if scenario:
            self.header["scenario"] = scenario
        self._header_written = False

    @property
    def wall_offset(self) -> float:
        """What turns the run's clock into Unix time on this trace's terms: ``started``
        at the trace's t = 0."""
        return float(self.header["started"]) - self._t0

    def _write_header(self) -> None:
        self._header_written = True
        self._sink(self.header)

    def _event(self, node: str, ev: str, **fields: object) -> None:
        if not self._header_written:
            self._write_header()
        self._seq += 1
        t = round(trio.current_time() - self._t0, 6)
        self._sink({"seq": self._seq, "t": t, "node": node, "ev": ev, **fields})

    def node_started(
        self,
        node: str,
        role: str,
        argv: list[str],
        local: Address,
        started: Mapping[str, object] | None = None,
    ) -> None:
        argv = public_argv(argv)
        self.header["nodes"][node] = {"role": role, "argv": argv, "address": fmt_addr(local)}
        extra = {key: value for key, value in (started or {}).items() if value}
        self._event(node, "start", role=role, local=fmt_addr(local), argv=argv, **extra)

    def sent(
        self, node: str, local: Address, peer: Address, data: bytes, msg: Message | None
    ) -> None:
        self._datagram(node, "send", local, peer, data, msg, None)

    def received(
        self, node: str, local: Address, peer: Address, data: bytes, seen: Received
    ) -> None:
        self._datagram(node, "recv", local, peer, data, seen.message, seen.error)

    def _datagram(
        self,
        node: str,
        direction: str,
        local: Address,
        peer: Address,
        data: bytes,
        message: Message | None,
        error: str | None,
    ) -> None:
        # Built as one struct that msgspec encodes with the message inside it: no dicts
        # per datagram. A traced server spent more on building those dicts than on the
        # datagram itself.
        if not self._header_written:
            self._write_header()
        self._seq += 1
        raw, raw_b64 = raw_text(data)
        # To the microsecond, as round(t, 6) (which costs as much as the rest of the time
        # stamp); the two differ at most in a tie's last digit.
        t = int((self._clock.current_time() - self._t0) * 1e6 + 0.5) / 1e6
        local_text, peer_text = self._address(local), self._address(peer)
        line = _DatagramLine(
            self._seq, t, node, direction, local_text, peer_text, message, error, raw, raw_b64
        )
        # Encoded here, not in a writer thread: the thread then needs the GIL only for a
        # moment per write, instead of taking it from the event loop for every record.
        self._sink(dump_line(line))

    def _address(self, addr: Address) -> str:
        text = self._addresses.get(addr)
        if text is None:
            if len(self._addresses) >= 4096:  # bounded: a server may hear from many peers
                self._addresses.clear()
            text = self._addresses[addr] = fmt_addr(addr)
        return text

    def fault(self, node: str, local: Address, peer: Address, fault: Fault) -> None:
        extra = {"delay": fault.delay} if fault.what == "delay" else {}
        self._event(
            node, "fault", local=fmt_addr(local), peer=fmt_addr(peer), what=fault.what,
            of=fault.of, n=fault.n, **extra,
        )  # fmt: skip

    def typed(self, node: str, item: ClientInput) -> None:
        self._event(node, "input", line=input_line(item))

    def shown(self, node: str, line: str) -> None:
        self._event(node, "show", line=line)

    def node_exited(self, node: str, status: int) -> None:
        self._event(node, "exit", status=status)

    def restored(self, node: str, disk: ServerDisk) -> None:
        rows = [
            [r.name, r.addr[0], r.addr[1], b64(r.key), b64(r.sid), r.presence.value]
            for r in disk.clients
        ]
        boxes = {
            name: [msgspec.to_builtins(item) for item in items]
            for name, items in disk.mailbox.items()
            if items
        }
        self._event(
            node, "restore", server_key=b64(disk.key), origin=disk.origin,
            last_n=disk.last_n, clients=rows, mailbox=boxes,
        )  # fmt: skip

    def timer_fired(self, node: str) -> None:
        self._event(node, "timer")

    def committed(self, node: str, changes: list[Change], cause: str) -> None:
        records = [change_record(change) for change in changes]
        self._event(node, "commit", changes=records, cause=cause)

    def close(self) -> None:
        if not self._header_written:
            self._write_header()


def change_record(change: Change) -> dict[str, Any]:
    """A change as a ``commit`` event lists it (``chatapp.trace.format.ChangeRecord``)."""
    if isinstance(change, ClientSaved):
        return {
            "op": "client", "name": change.name, "address": fmt_addr((change.ip, change.port)),
            "key": b64(change.key), "sid": b64(change.sid), "presence": change.presence.value,
        }  # fmt: skip
    if isinstance(change, ClientRemoved):
        return {"op": "client_removed", "name": change.name}
    if isinstance(change, MessageStored):
        return {"op": "stored", "to": change.recipient, "item": msgspec.to_builtins(change.item)}
    if isinstance(change, MessagesRemoved):
        return {"op": "deleted", "to": change.recipient, "seqs": msgspec.to_builtins(change.seqs)}
    if isinstance(change, ServerPinned):
        return {"op": "pinned", "server": fmt_addr(change.address), "key": b64(change.key)}
    if isinstance(change, DeliveryMarked):
        return {"op": "marked", "server_key": b64(change.server_key), "marks": change.marks}
    raise TypeError(f"not a change: {change!r}")


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
        #: Why the file could not be written (then nothing more is kept or written).
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="chatapp-trace", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def __call__(self, record: dict[str, Any] | bytes) -> None:
        """Queue a record, or a line already encoded (``bytes``, ending in a newline)."""
        if not self._closed and self.error is None:
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
            except OSError as exc:
                # A full disk must not stop the node: the trace ends here, and the node
                # says so (``failure``).
                self.error = exc.strerror or str(exc)
                pending.clear()
                return

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

    def failure(self) -> str | None:
        return self._writer.error

    def close(self) -> None:
        super().close()
        self._writer.close()


class _DatagramLine(msgspec.Struct, omit_defaults=True, gc=False):
    """A send or recv event as ``TraceRecorder`` writes it (the fields of the format).
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
        self.events: list[Event] = []
        self._on_event = on_event
        super().__init__(self._keep, timers=timers, **kwargs)

    def _keep(self, record: dict[str, Any] | bytes) -> None:
        if isinstance(record, bytes):
            event: Event = _event_decoder.decode(record)
        elif "seq" in record:
            event = msgspec.convert(record, Event)
        else:
            return  # the header: kept in ``self.header``
        self.events.append(event)
        if self._on_event is not None:
            self._on_event(event)

    def trace(self) -> Trace:
        header = msgspec.convert(self.header, Header)
        return Trace(header, list(self.events))


_event_decoder = msgspec.json.Decoder(Event)
