"""The datagrams chatapp sends, and their encoding.

Every datagram is one JSON object whose field ``t`` names its type. JSON keeps
traces readable; msgspec validates untrusted bytes against these types at C
speed, so a malformed datagram becomes one ``WireError`` and nothing else.

Everything that is acknowledged carries an ``id``. Ids are unique across nodes
(a random per-process prefix and a counter), stay the same on every retry, and
are what receivers deduplicate on.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

#: Largest datagram chatapp sends or accepts. Well under the 65,507-byte UDP
#: limit so that a LAN's fragment reassembly is not stressed.
MAX_DATAGRAM = 8192

#: A nickname: what the command line, the prompt and the wire all accept.
NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,32}$"

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=NAME_PATTERN)]
MsgId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_DATAGRAM)]
Address = tuple[str, int]


def fmt_addr(addr: Address) -> str:
    """``127.0.0.1:9001``."""
    return f"{addr[0]}:{addr[1]}"


class _Message(msgspec.Struct, frozen=True, tag_field="t", forbid_unknown_fields=True):
    pass


# --- client -> server -------------------------------------------------------


class Register(_Message, tag="register", frozen=True):
    id: MsgId
    name: Name
    port: Port


class Deregister(_Message, tag="dereg", frozen=True):
    id: MsgId
    name: Name
    token: Token


class Reregister(_Message, tag="reg", frozen=True):
    id: MsgId
    name: Name
    token: Token


class SaveMessage(_Message, tag="save", frozen=True):
    """A direct message the peer did not ACK: deliver it or store it."""

    id: MsgId
    sender: Name
    to: Name
    text: Text
    token: Token


class ChannelPost(_Message, tag="send_all", frozen=True):
    id: MsgId
    sender: Name
    text: Text
    token: Token


class Lookup(_Message, tag="lookup", frozen=True):
    id: MsgId
    name: Name
    token: Token


# --- server -> client -------------------------------------------------------


class Registered(_Message, tag="registered", frozen=True):
    id: MsgId
    token: Token


class Refused(_Message, tag="refused", frozen=True, omit_defaults=True):
    """Answer to any request the server will not carry out; ``reason`` is for people.
    ``cause`` ``storage``: the server could not store the change the request asked for
    (its database failed); nothing was done, and the same request may succeed later."""

    id: MsgId
    reason: Annotated[str, msgspec.Meta(max_length=512)]
    cause: Literal["storage"] | None = None


class Saved(_Message, tag="saved", frozen=True):
    """The server took responsibility for a message: ``delivered`` or ``stored``."""

    id: MsgId
    outcome: Literal["delivered", "stored"]


class TableEntry(msgspec.Struct, frozen=True, array_like=True):
    """One client, as the table shows it (a JSON array: new fields go at the end)."""

    name: Name
    ip: Annotated[str, msgspec.Meta(max_length=64)]
    port: Port
    online: bool


Part = Annotated[int, msgspec.Meta(ge=0)]
Parts = Annotated[int, msgspec.Meta(ge=1)]
Version = Annotated[int, msgspec.Meta(ge=0)]


class Table(_Message, tag="table", frozen=True):
    """One part of the whole client table, version ``(epoch, version)``."""

    id: MsgId
    epoch: int
    version: Version
    part: Part
    parts: Parts
    entries: list[TableEntry]


class TableDelta(_Message, tag="delta", frozen=True):
    """One part of what changed in the table from version ``from_`` to ``to`` of
    ``epoch``: the entries of the names that changed, as they are at ``to``, and the
    names that left the table (``gone``)."""

    id: MsgId
    epoch: int
    from_: Version = msgspec.field(name="from")
    to: Version
    part: Part
    parts: Parts
    entries: list[TableEntry]
    gone: list[Name]


class ChannelDelivery(_Message, tag="channel", frozen=True):
    id: MsgId
    sender: Name
    text: Text


class StoredItem(msgspec.Struct, frozen=True):
    id: MsgId
    kind: Literal["direct", "channel"]
    sender: Name
    text: Text
    stored_at: float


class Mailbox(_Message, tag="mailbox", frozen=True):
    """A batch of stored messages, oldest first; the batches of one ``reg`` share ``delivery``."""

    id: MsgId
    delivery: MsgId
    items: list[StoredItem]


class LookupResult(_Message, tag="lookup_result", frozen=True):
    id: MsgId
    entry: TableEntry | None


# --- peer <-> peer, and every ACK --------------------------------------------


class Chat(_Message, tag="chat", frozen=True):
    """A direct message; the server re-sends it with the same id when it delivers it itself."""

    id: MsgId
    sender: Name
    text: Text


class Ack(_Message, tag="ack", frozen=True):
    id: MsgId


class TableAck(_Message, tag="table_ack", frozen=True):
    """A client's answer to a table part or a delta: the version it holds now (after
    applying it, or not: a delta it cannot place is answered with what it has, and the
    server sends what brings it from there)."""

    id: MsgId
    epoch: int
    version: int  # -1: it holds no table yet


Message = (
    Register
    | Deregister
    | Reregister
    | SaveMessage
    | ChannelPost
    | Lookup
    | Registered
    | Refused
    | Saved
    | Table
    | TableDelta
    | ChannelDelivery
    | Mailbox
    | LookupResult
    | Chat
    | Ack
    | TableAck
)


class WireError(ValueError):
    """A datagram that is not a chatapp message."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Message)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    if len(data) > MAX_DATAGRAM:
        raise WireError(f"datagram of {len(data)} bytes is over the {MAX_DATAGRAM}-byte limit")
    try:
        message: Message = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise WireError(str(exc)) from None
    except RecursionError:
        # msgspec bounds nesting by Python's recursion limit: JSON nested that deep (a
        # value it skips while it looks for the tag) is no message of ours, whose deepest
        # field is four levels down.
        raise WireError("JSON nested too deeply") from None
    return message


_REGISTRATION_TAG = b'"register"'
_ESCAPE = b"\\u"


def may_be_registration(data: bytes) -> bool:
    """Whether ``data`` could be a ``register``, judged before decoding and cheaply (two
    searches in C). Never wrong about a registration: its tag is a JSON string wherever
    it stands, written plainly (inside another string the quotes would be escaped) or
    with ``\\u`` escapes. Seldom wrong the other way: a name ``register``, or a text
    with a control character, in some other message."""
    return _REGISTRATION_TAG in data or _ESCAPE in data


def tag_of(message_type: type[Message] | Message) -> str:
    """A message type's name on the wire (its ``t``: ``chat``, ``ack``, ...)."""
    cls = message_type if isinstance(message_type, type) else type(message_type)
    return cls.__struct_config__.tag  # type: ignore[return-value]


def to_builtins(message: Message) -> dict[str, object]:
    """The message as plain JSON values (for traces)."""
    result = msgspec.to_builtins(message)
    assert isinstance(result, dict)
    return result
