"""A trace checked against itself: each datagram's ``msg`` must be what its ``raw`` bytes say.

``raw``/``raw_b64`` is what was on the wire, ``msg`` is for reading; a replay of the
other nodes (``--node``) sends the raw bytes, and the comparison reads ``msg``. An
edited ``msg`` that no longer matches its bytes would be tested by neither. Handshake
datagrams are read as they are; session datagrams are opened with the session keys the
trace's ``registered`` answers carry, and peer datagrams with the clients' recorded keys.
A datagram whose keys the trace does not hold (a boxed answer, a client that recorded no
key) is not checked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgspec

from chatapp.protocol.crypto import Identity, SharedKeys, unb64
from chatapp.protocol.sealing import (
    PEER_KIND,
    PLAIN_KIND,
    SESSION_KIND,
    TO_CLIENT,
    TO_SERVER,
    BoxedAnswer,
    Session,
    decode_plain,
    open_peer,
    parse_peer,
    session_id,
)
from chatapp.trace import Datagram, Recv, Send, Start, Trace
from chatapp.wire import Message, WireError

from .normalise import Normaliser


@dataclass(frozen=True)
class Mismatch:
    event: Send | Recv
    why: str


class _Keys:
    """What the trace holds to open its sealed datagrams."""

    def __init__(self, trace: Trace) -> None:
        self.roles = {name: info.role for name, info in trace.nodes().items()}
        self.sessions: dict[bytes, bytes] = {}  # sid -> session key
        self.identities: dict[str, Identity] = {}
        self.names = Normaliser.of(trace.events)
        for event in trace.events:
            if isinstance(event, Start) and event.key:
                self.identities[event.node] = Identity(unb64(event.key))
            msg = event.msg if isinstance(event, Send | Recv) else None
            if msg and msg.get("t") == "registered":
                sid, key = msg.get("sid"), msg.get("session_key")
                if isinstance(sid, str) and isinstance(key, str):
                    self.sessions[unb64(sid)] = unb64(key)

    def open(self, event: Datagram) -> Message | None:
        """The message in ``event``'s bytes; None if the trace holds no key to open them."""
        data = event.data
        kind = data[0] if data else -1
        if kind == PLAIN_KIND:
            plain = decode_plain(data)
            # a boxed answer: the client's Box key with the server is not in the trace
            return None if isinstance(plain, BoxedAnswer) else plain
        if kind == SESSION_KIND:
            key = self.sessions.get(session_id(data))
            if key is None:
                return None
            from_client = (self.roles.get(event.node) in ("client", "raw")) == isinstance(
                event, Send
            )
            return Session(session_id(data), key).open(
                TO_SERVER if from_client else TO_CLIENT, data
            )
        if kind == PEER_KIND:
            return self._open_peer(event)
        return None

    def _open_peer(self, event: Datagram) -> Message | None:
        datagram = parse_peer(event.data)
        own = self.identities.get(event.node)
        other = datagram.sender if isinstance(event, Recv) else self.names.address(event.peer)
        theirs = self.identities.get(other)
        if own is None or theirs is None:
            return None
        return open_peer(datagram, SharedKeys(own).get(theirs.public))


def mismatches(trace: Trace) -> Iterator[Mismatch]:
    """Every datagram event whose ``msg`` is not what its bytes say."""
    keys = _Keys(trace)
    for event in trace.events:
        if not isinstance(event, Send | Recv) or event.msg is None:
            continue
        try:
            message = keys.open(event)
        except (WireError, ValueError) as exc:
            yield Mismatch(event, f"its bytes do not open as its msg says ({exc})")
            continue
        if message is None:
            continue
        opened: dict[str, Any] = msgspec.to_builtins(message)
        if opened != event.msg:
            yield Mismatch(event, _difference(event.msg, opened))


def _difference(msg: dict[str, Any], opened: dict[str, Any]) -> str:
    fields = [key for key in dict.fromkeys([*msg, *opened]) if msg.get(key) != opened.get(key)]
    said = "; ".join(
        f"{key}: msg {msg.get(key, '(none)')!r}, bytes {opened.get(key, '(none)')!r}"
        for key in fields[:4]
    )
    return f"its msg is not what its bytes say ({said})"
