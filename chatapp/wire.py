"""The messages chatapp exchanges, as msgspec types (validated at decode).

A datagram is one of three kinds, told apart by its first byte (the formats
are in ``chatapp.protocol.sealing``):

- ``{``: a plaintext JSON handshake message (``hello``, ``challenge``,
  ``register``, ``rekey``, and the boxed answers ``registered`` and ``refused``);
- ``0x01``: a session datagram between a client and the server, holding one
  message sealed with the session's key;
- ``0x02``: a peer datagram from one client to another, holding a ``chat`` or
  its ``ack`` in a NaCl ``Box``.

The message types below are what the state machines handle and what traces
show (for a sealed datagram, the message inside). Binary fields (keys,
signatures, sealed datagrams) are base64 in JSON. Everything that is
acknowledged carries an ``id``: 12 random bytes in base64url, the same on
every retry, deduplicated per authenticated sender.
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
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_DATAGRAM)]
Key = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Signature = Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]
Sid = Annotated[bytes, msgspec.Meta(min_length=8, max_length=8)]
Tag = Annotated[bytes, msgspec.Meta(max_length=8)]  # a sid, or empty (offline)
Cookie = Annotated[bytes, msgspec.Meta(min_length=16, max_length=16)]
Nonce = Annotated[bytes, msgspec.Meta(min_length=24, max_length=24)]
Sealed = Annotated[bytes, msgspec.Meta(max_length=MAX_DATAGRAM)]
StoreOrigin = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
Address = tuple[str, int]
#: The most names a ``not_stored`` notice lists (the rest are counted).
NOT_STORED_NAMES = 20


def fmt_addr(addr: Address) -> str:
    """``127.0.0.1:9001``."""
    return f"{addr[0]}:{addr[1]}"


class _Message(msgspec.Struct, frozen=True, tag_field="t", forbid_unknown_fields=True):
    pass


# --- the handshake (plaintext) ----------------------------------------------------------


class Hello(_Message, tag="hello", frozen=True):
    """A client asks to register: the server answers with a challenge and keeps nothing."""

    id: MsgId
    name: Name
    port: Port
    key: Key  # the client's Ed25519 public key


class Challenge(_Message, tag="challenge", frozen=True):
    """The server's key and a cookie bound to the client's address, name, key and port."""

    id: MsgId  # the hello's (or a register's with a stale cookie)
    server_key: Key
    cookie: Cookie


class Register(_Message, tag="register", frozen=True):
    """The hello again, with the cookie and the client's signature over the server's key,
    the cookie, the name and the port."""

    id: MsgId
    name: Name
    port: Port
    key: Key
    cookie: Cookie
    sig: Signature


class Rekey(_Message, tag="rekey", frozen=True):
    """The server does not know session ``sid`` (it restarted): register again. Signed by
    the server's key over (sid, boot)."""

    id: MsgId
    sid: Sid
    boot: Sid
    sig: Signature


# --- the server's answers to a registration (boxed to the client's key) ------------------


class Registered(_Message, tag="registered", frozen=True):
    """A session: its id, its key, and the server's boot id. Travels in a ``Box`` from
    the server's key to the client's, so it also proves the server's key."""

    id: MsgId
    sid: Sid
    session_key: Key
    boot: Sid


class Refused(_Message, tag="refused", frozen=True, omit_defaults=True):
    """Answer to any request the server will not carry out; ``reason`` is for people.
    Boxed to the client's key before there is a session, sealed in it after. ``cause``
    ``storage``: the server could not store the change the request asked for (its
    database failed); nothing was done, and the same request may succeed later."""

    id: MsgId
    reason: Annotated[str, msgspec.Meta(max_length=512)]
    cause: Literal["storage"] | None = None


# --- client -> server, in the session ---------------------------------------------------


class Deregister(_Message, tag="dereg", frozen=True):
    id: MsgId
    name: Name


class Reregister(_Message, tag="reg", frozen=True):
    id: MsgId
    name: Name


class SaveMessage(_Message, tag="save", frozen=True):
    """A direct message the peer did not ACK: the peer datagram as it was sent (sealed
    for the peer; the server cannot read it), to deliver or store."""

    id: MsgId  # the chat's id
    to: Name
    sealed: Sealed


class ChannelPost(_Message, tag="send_all", frozen=True):
    """A channel message, signed by its sender over (name, id, text)."""

    id: MsgId
    text: Text
    sig: Signature


class Lookup(_Message, tag="lookup", frozen=True):
    id: MsgId
    name: Name


# --- server -> client, in the session ---------------------------------------------------


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
    key: Key  # the key the name is bound to
    tag: Tag  # the client's current session id (whether or not it is online)


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
    """A channel message relayed by the server (``id`` is the server's), as its sender
    posted it (``post``: the sender's id) and signed it. ``key``: the sender's, as the
    server has it bound (for a receiver whose table does not have the sender yet)."""

    id: MsgId
    sender: Name
    post: MsgId
    text: Text
    sig: Signature
    key: Key


class Seq(msgspec.Struct, frozen=True, array_like=True):
    """A stored item's place in its recipient's delivery stream: ``n`` of ``origin``
    (the store that kept it), never reused."""

    origin: StoreOrigin
    n: Annotated[int, msgspec.Meta(ge=1)]


class StoredItem(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """A message kept for a recipient: a direct one as its sealed peer datagram, a
    channel one as its text and signature."""

    seq: Seq
    id: MsgId
    kind: Literal["direct", "channel"]
    sender: Name
    stored_at: float
    text: Text = ""  # channel
    sig: bytes = b""  # channel
    sealed: Sealed = b""  # direct


class Relay(_Message, tag="relay", frozen=True):
    """A direct message saved for a client that is online, delivered at once: shown as a
    live line. It is stored (``seq``) until the client ACKs it. ``key``: its sender's."""

    id: MsgId
    seq: Seq
    sealed: Sealed
    key: Key


class Mailbox(_Message, tag="mailbox", frozen=True):
    """A batch of stored messages, oldest first; the batches of one delivery share
    ``delivery``. ``keys``: each sender's key as the server has it bound (a sender may
    have joined while the recipient was offline, and be in no table it has)."""

    id: MsgId
    delivery: MsgId
    items: list[StoredItem]
    keys: dict[Name, Key] = {}


class NotStored(_Message, tag="not_stored", frozen=True):
    """The sender's channel message ``post`` could not be stored for these recipients
    (their mailboxes are full): they will not see it. ``more``: how many besides."""

    id: MsgId
    post: MsgId
    names: Annotated[list[Name], msgspec.Meta(max_length=NOT_STORED_NAMES)]
    more: Annotated[int, msgspec.Meta(ge=0)] = 0


class LookupResult(_Message, tag="lookup_result", frozen=True):
    id: MsgId
    entry: TableEntry | None


# --- peer <-> peer (in a Box), and every ACK --------------------------------------------


class Chat(_Message, tag="chat", frozen=True):
    """A direct message; ``tag`` is the recipient's session id as the sender's table has
    it (a datagram from an earlier session of the recipient is not taken)."""

    id: MsgId
    text: Text
    tag: Sid


class Ack(_Message, tag="ack", frozen=True):
    """An ACK. Between peers it carries the session id of the client it goes to."""

    id: MsgId
    tag: Tag = b""


class TableAck(_Message, tag="table_ack", frozen=True):
    """A client's answer to a table part or a delta: the version it holds now (after
    applying it, or not: a delta it cannot place is answered with what it has, and the
    server sends what brings it from there)."""

    id: MsgId
    epoch: int
    version: int  # -1: it holds no table yet


Message = (
    Hello
    | Challenge
    | Register
    | Rekey
    | Registered
    | Refused
    | Deregister
    | Reregister
    | SaveMessage
    | ChannelPost
    | Lookup
    | Saved
    | Table
    | TableDelta
    | ChannelDelivery
    | Relay
    | Mailbox
    | NotStored
    | LookupResult
    | Chat
    | Ack
    | TableAck
)

#: What a plaintext datagram may be (the boxed answers in their envelopes).
Handshake = Hello | Challenge | Register | Rekey


class WireError(ValueError):
    """A datagram that is not a chatapp message."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Message)


def encode(message: Message) -> bytes:
    """A message as JSON (a handshake datagram's bytes; what sealed datagrams seal)."""
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    """The message in ``data`` (JSON); ``WireError`` for anything else, whatever the bytes."""
    if len(data) > MAX_DATAGRAM:
        raise WireError(f"{len(data)} bytes is over the {MAX_DATAGRAM}-byte limit")
    try:
        message: Message = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise WireError(str(exc)) from None
    except RecursionError:
        # msgspec bounds nesting by Python's recursion limit: JSON nested that deep (a
        # value it skips while it looks for the tag) is no message of ours, whose deepest
        # field is four levels down.
        raise WireError("JSON nested too deeply") from None
    except Exception as exc:  # MemoryError on hostile input: never a crash
        raise WireError(f"undecodable ({type(exc).__name__})") from None
    return message


def tag_of(message_type: type[Message] | Message) -> str:
    """A message type's name on the wire (its ``t``: ``chat``, ``ack``, ...)."""
    cls = message_type if isinstance(message_type, type) else type(message_type)
    return cls.__struct_config__.tag  # type: ignore[return-value]


def to_builtins(message: Message) -> dict[str, object]:
    """The message as plain JSON values (for traces)."""
    result = msgspec.to_builtins(message)
    assert isinstance(result, dict)
    return result
