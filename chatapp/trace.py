"""JSONL traces: every datagram a node sends or receives, every line typed and shown.

Line 1 is a header; every other line is one event. Times are seconds since
the trace began, read from ``trio.current_time()`` so that virtual time
(``MockClock``) is recorded as it ran. See docs/trace-format.md.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Mapping
from typing import Any, Protocol

import trio

from chatapp.protocol.common import Timers
from chatapp.wire import Address, Message, to_builtins

FORMAT = "chatapp-trace"
VERSION = 1


def fmt_addr(addr: Address) -> str:
    return f"{addr[0]}:{addr[1]}"


def raw_fields(data: bytes) -> dict[str, str]:
    """The datagram as text when it is UTF-8 (it always is for chatapp's own), else base64."""
    try:
        return {"raw": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"raw_b64": base64.b64encode(data).decode("ascii")}


class Recorder(Protocol):
    """Where a node reports what it does. ``NullRecorder`` when not tracing."""

    def node_started(self, node: str, role: str, argv: list[str], local: Address) -> None: ...

    def datagram(
        self, node: str, direction: str, local: Address, peer: Address, data: bytes,
        message: Message | None, error: str | None = None,
    ) -> None: ...

    def typed(self, node: str, line: str) -> None: ...

    def shown(self, node: str, line: str) -> None: ...

    def node_exited(self, node: str, status: int) -> None: ...

    def close(self) -> None: ...


class NullRecorder:
    def node_started(self, node: str, role: str, argv: list[str], local: Address) -> None:
        pass

    def datagram(
        self, node: str, direction: str, local: Address, peer: Address, data: bytes,
        message: Message | None, error: str | None = None,
    ) -> None:
        pass

    def typed(self, node: str, line: str) -> None:
        pass

    def shown(self, node: str, line: str) -> None:
        pass

    def node_exited(self, node: str, status: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlRecorder:
    """Writes a trace as JSON lines; each line is flushed as soon as it is written,
    so a node that crashes leaves every event up to the crash on disk."""

    def __init__(
        self,
        out: io.TextIOBase | Any,
        *,
        timers: Timers,
        nodes: Mapping[str, Mapping[str, object]] | None = None,
        started: float | None = None,
    ) -> None:
        self._out = out
        self._t0 = trio.current_time()
        self._seq = 0
        header = {
            "format": FORMAT,
            "version": VERSION,
            "started": time.time() if started is None else started,
            "timers": {"ack_timeout": timers.ack_timeout, "tries": timers.tries},
            "nodes": dict(nodes or {}),
        }
        self._write(header)

    @classmethod
    def open(cls, path: str, *, timers: Timers, **kwargs: Any) -> JsonlRecorder:
        return cls(open(path, "w", encoding="utf-8", buffering=1), timers=timers, **kwargs)

    def _write(self, record: Mapping[str, object]) -> None:
        self._out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._out.flush()

    def _event(self, node: str, ev: str, **fields: object) -> None:
        self._seq += 1
        t = round(trio.current_time() - self._t0, 6)
        self._write({"seq": self._seq, "t": t, "node": node, "ev": ev, **fields})

    def node_started(self, node: str, role: str, argv: list[str], local: Address) -> None:
        self._event(node, "start", role=role, argv=argv, local=fmt_addr(local))

    def datagram(
        self, node: str, direction: str, local: Address, peer: Address, data: bytes,
        message: Message | None, error: str | None = None,
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

    def close(self) -> None:
        self._out.close()


def read_trace(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The header and the events of a trace file."""
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if not lines or lines[0].get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file")
    return lines[0], lines[1:]
