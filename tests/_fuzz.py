"""Hypothesis strategies for hostile datagrams: raw bytes, and JSON shaped like ours.

``hostile_json`` builds a datagram from one of our message types: every field may be
left out, kept valid, or given a value of any JSON type (deep nesting, numbers too
large for any integer or float type, strings too long, control characters); the tag
may come first or last, keys may repeat, unknown keys may appear, the text may be cut
short. A test sends it as it is (a handshake datagram) or sealed, in a session or a
peer's box (``sealings``), so that it reaches the rules behind the cryptography too,
or sealed and then spoiled in the binary format's own ways (``Spoiled``): cut short,
a bad MAC, a forged counter (the largest ones too), session id or sender name, or an
earlier datagram replayed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from hypothesis import strategies as st

from chatapp.protocol.crypto import BOX_NONCE_BYTES, SID_BYTES
from chatapp.wire import MAX_DATAGRAM, Message, tag_of

MESSAGE_TYPES: list[type[Any]] = list(Message.__args__)  # type: ignore[attr-defined]


def _b64(size: int) -> str:
    return base64.b64encode(bytes(range(size))).decode()


def _big_endian(counter: int) -> bytes:
    return counter.to_bytes(8, "big")


#: A plausible value per field name, so that the other fields get past the schema.
_VALID: dict[str, object] = {
    "id": "c.1",
    "name": "user1",
    "port": 9001,
    "sender": "user1",
    "to": "user2",
    "text": "hi",
    "reason": "no",
    "outcome": "stored",
    "epoch": 1,
    "version": 1,
    "part": 0,
    "parts": 1,
    "key": _b64(32),
    "server_key": _b64(32),
    "session_key": _b64(32),
    "cookie": _b64(16),
    "sig": _b64(64),
    "sid": _b64(8),
    "boot": _b64(8),
    "tag": _b64(8),
    "sealed": _b64(80),
    "seq": ["o1", 1],
    "post": "c.1",
    "keys": {"user2": _b64(32)},
    "names": ["user2"],
    "more": 0,
    "entries": [["user1", "127.0.0.1", 9001, True, _b64(32), _b64(8)]],
    "delivery": "d.1",
    "items": [
        {
            "seq": ["o1", 1],
            "id": "m.1",
            "kind": "channel",
            "sender": "user2",
            "stored_at": 1.5,
            "text": "hi",
            "sig": _b64(64),
        }
    ],
    "entry": None,
}

#: Number tokens no JSON library turns into a Python int or float as they are.
_RAW_NUMBERS = [
    b"1e999",
    b"-1e999",
    b"9" * 400,
    b"-" + b"9" * 30,
    b"18446744073709551616",
    b"-9223372036854775809",
    b"1E+308",
    b"4.9e-324",
    b"-0",
    b"0.0000000000000000000001",
]


def _nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["", "x" * 70, "\x00\x1b[2J\n", "é" * 40, "user1", "c.1", _b64(32)]),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def _raw_value(draw: st.DrawFn) -> bytes:
    """A value written as raw JSON: deep nesting or a number out of every range."""
    if draw(st.booleans()):
        return draw(st.sampled_from(_RAW_NUMBERS))
    depth = draw(st.sampled_from([2, 50, 500, 1500, 3000]))
    return _nested(depth, draw(st.sampled_from(["list", "object"])))


@st.composite
def hostile_json(draw: st.DrawFn) -> bytes:
    """One of our message types with any of its fields spoiled (see the module's doc)."""
    cls = draw(st.sampled_from(MESSAGE_TYPES))
    fields: list[tuple[str, object]] = []
    raws: dict[str, bytes] = {}
    for field in msgspec.structs.fields(cls):
        choice = draw(st.sampled_from(["valid", "valid", "any", "raw", "missing"]))
        if choice == "missing":
            continue
        if choice == "valid":
            fields.append((field.name, _VALID.get(field.name, "x")))
        elif choice == "any":
            fields.append((field.name, draw(json_values)))
        else:
            placeholder = f"@raw{len(raws)}@"
            raws[placeholder] = draw(_raw_value())
            fields.append((field.name, placeholder))
    for _ in range(draw(st.integers(0, 2))):  # unknown and repeated keys
        fields.append((draw(st.sampled_from(["x", "t", "id", "entries"])), draw(json_values)))
    tag: object = draw(st.sampled_from([tag_of(cls), tag_of(cls), 3, None, "nope"]))
    if draw(st.booleans()):
        fields.insert(0, ("t", tag))
    else:
        fields.append(("t", tag))  # msgspec must look past every other value for it
    data = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in fields) + "}"
    encoded = data.encode()
    for placeholder, raw in raws.items():
        encoded = encoded.replace(json.dumps(placeholder).encode(), raw)
    if draw(st.integers(0, 9)) == 0:
        encoded = encoded[: draw(st.integers(0, len(encoded)))]  # cut short
    return encoded


hostile_datagrams = st.one_of(
    st.binary(max_size=300),
    hostile_json(),
    hostile_json(),
    st.sampled_from(
        [
            b"",
            b"\x00" * 9000,
            b" " * (MAX_DATAGRAM + 1),
            b"[" * MAX_DATAGRAM,
            b'{"x":' + _nested(4000, "list") + b',"t":"ack","id":"a"}',
            b'{"t":"ack","id":"a","id":"b"}',
            b"\xff\xfe{",
            b'{"t":"ack","id":"\\ud800"}',
        ]
    ),
)


# --- sealed datagrams, spoiled on the way ------------------------------------------------


@dataclass(frozen=True)
class Spoiled:
    """A session or peer datagram its sender sealed right, then spoiled on the way
    (``spoil``): cut short, a bit flipped (a bad MAC), its counter or session id or
    sender name rewritten, bytes added, or an earlier datagram sent again instead."""

    how: str
    at: int
    value: bytes


#: Counters a forger writes into a session datagram: none, the first, and the largest.
_COUNTERS = [0, 1, 2, 2**32, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1]

spoilers = st.one_of(
    st.builds(Spoiled, st.just("truncate"), st.integers(0, 200), st.just(b"")),
    st.builds(Spoiled, st.just("flip"), st.integers(0, 10**6), st.just(b"")),
    st.builds(Spoiled, st.just("counter"), st.just(0), st.sampled_from(_COUNTERS).map(_big_endian)),
    st.builds(Spoiled, st.just("sid"), st.just(0), st.binary(min_size=8, max_size=8)),
    st.builds(Spoiled, st.just("length"), st.just(0), st.binary(min_size=1, max_size=1)),
    st.builds(
        Spoiled,
        st.just("name"),
        st.just(0),
        st.sampled_from([b"", b"user1", b"user2", b"nobody", b"\xff\xfe", b"x" * 40]),
    ),
    st.builds(Spoiled, st.just("append"), st.just(0), st.binary(min_size=1, max_size=40)),
    st.builds(Spoiled, st.just("replay"), st.integers(0, 10**6), st.just(b"")),
)


def spoil(data: bytes, spoiled: Spoiled, earlier: Sequence[bytes]) -> bytes:
    """``data`` (a sealed datagram) spoiled as ``spoiled`` says; ``earlier``: datagrams
    the same sender sent before, one of which a replay sends again."""
    how, at, value = spoiled.how, spoiled.at, spoiled.value
    if how == "replay":
        return earlier[at % len(earlier)] if earlier else data
    if how == "truncate":
        return data[: at % (len(data) + 1)]
    if how == "flip" and data:
        i = at % len(data)
        return data[:i] + bytes((data[i] ^ (1 << at % 8),)) + data[i + 1 :]
    if how == "append":
        return data + value
    kind = data[:1]
    if kind == b"\x01" and how == "counter":
        return data[: 1 + SID_BYTES] + value + data[1 + SID_BYTES + 8 :]
    if kind == b"\x01" and how == "sid":
        return data[:1] + value + data[1 + SID_BYTES :]
    name_at = 1 + BOX_NONCE_BYTES
    if kind == b"\x02" and how == "length":
        return data[:name_at] + value + data[name_at + 1 :]
    if kind == b"\x02" and how == "name" and len(data) > name_at:
        old = data[name_at]
        rest = data[name_at + 1 + old :]
        return data[:name_at] + bytes((len(value) % 256,)) + value + rest
    return data


#: How a test sends a hostile datagram: as it is; in a session or a peer's box; sealed
#: right with a counter far ahead (as only the key's holder could); or sealed and then
#: spoiled on the way.
sealings: st.SearchStrategy[str | Spoiled] = st.one_of(
    st.sampled_from(["as it is", "sealed", "sealed", "ahead"]), spoilers, spoilers
)
