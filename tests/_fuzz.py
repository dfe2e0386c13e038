"""Hypothesis strategies for hostile datagrams: raw bytes, and JSON shaped like ours.

``hostile_json`` builds a datagram from one of our message types: every field may be
left out, kept valid, or given a value of any JSON type (deep nesting, numbers too
large for any integer or float type, strings too long, control characters); the tag
may come first or last, keys may repeat, unknown keys may appear, the text may be cut
short. ``TOKEN`` stands for a session token a test fills in (``with_token``).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
from hypothesis import strategies as st

from chatapp.wire import MAX_DATAGRAM, Message, tag_of

#: What a test replaces with a real session token before sending.
TOKEN = "TOKEN"
MESSAGE_TYPES: list[type[Any]] = list(Message.__args__)  # type: ignore[attr-defined]

#: A plausible value per field name, so that the other fields get past the schema.
_VALID: dict[str, object] = {
    "id": "c.1",
    "name": "user1",
    "port": 9001,
    "token": TOKEN,
    "sender": "user1",
    "to": "user2",
    "text": "hi",
    "reason": "no",
    "outcome": "stored",
    "epoch": 1,
    "version": 1,
    "part": 0,
    "parts": 1,
    "entries": [["user1", "127.0.0.1", 9001, True]],
    "delivery": "d.1",
    "items": [{"id": "m.1", "kind": "direct", "sender": "user2", "text": "hi", "stored_at": 1.5}],
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
    st.sampled_from(["", "x" * 70, "\x00\x1b[2J\n", "é" * 40, "user1", "c.1", TOKEN]),
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


def with_token(data: bytes, token: str) -> bytes:
    """``data`` with the placeholder token replaced by ``token``."""
    return data.replace(json.dumps(TOKEN).encode(), json.dumps(token).encode())
