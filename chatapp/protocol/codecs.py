"""Each role's codec: the one place where a machine turns datagrams into messages (and
says who, as far as it could prove, sent them) and messages into datagrams.

``decode`` returns the message and its ``Sender``; it raises ``WireError`` for
anything that does not parse, open or verify (``UnknownSession`` for a session
the server does not know, which it answers with a ``rekey``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from nacl import bindings as sodium

from chatapp.protocol.crypto import (
    BOX_NONCE_BYTES,
    REKEY_DOMAIN,
    BadKey,
    Entropy,
    Identity,
    SharedKeys,
    box_public_key,
    verify,
)
from chatapp.protocol.sealing import (
    PEER_KIND,
    PLAIN_KIND,
    SESSION_KIND,
    TO_CLIENT,
    TO_SERVER,
    BoxedAnswer,
    Session,
    box_answer,
    decode_plain,
    open_answer,
    open_peer,
    parse_peer,
    seal_peer,
    session_id,
)
from chatapp.wire import (
    Ack,
    Address,
    Challenge,
    Chat,
    Hello,
    Message,
    Refused,
    Register,
    Registered,
    Rekey,
    WireError,
    encode,
    tag_of,
)


class Via(enum.Enum):
    """How a datagram's sender was authenticated."""

    PLAIN = "plain"  # not at all: a handshake message, taken for what it says only
    SERVER = "server"  # (at a client) the server: its session, its Box, its signature
    CLIENT = "client"  # (at the server) a client's session
    PEER = "peer"  # (at a client) another client's Box


@dataclass(frozen=True, slots=True)
class Sender:
    """Who a datagram is from: how that was proven, its source address, and the
    client's name (``CLIENT``, ``PEER``)."""

    via: Via
    addr: Address
    name: str = ""


class UnknownSession(WireError):
    """A session datagram whose session the server does not know (it restarted)."""

    def __init__(self, sid: bytes) -> None:
        super().__init__(f"a session datagram for an unknown session {sid.hex()}")
        self.sid = sid


def _first(data: bytes) -> int:
    return data[0] if data else -1


class ServerCodec:
    """The server's side: its identity, and the sessions by id."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.sessions: dict[bytes, Session] = {}

    def decode(self, data: bytes, addr: Address) -> tuple[Message, Sender]:
        first = _first(data)
        if first == SESSION_KIND:
            sid = session_id(data)
            session = self.sessions.get(sid)
            if session is None:
                raise UnknownSession(sid)
            return session.open(TO_SERVER, data), Sender(Via.CLIENT, addr, session.name)
        if first == PLAIN_KIND:
            message = decode_plain(data)
            if isinstance(message, Hello | Register):
                return message, Sender(Via.PLAIN, addr)
            raise WireError(f"a server takes no {_plain_tag(message)}")
        raise WireError(f"not a datagram a server takes (first byte {first})")

    def seal(self, session: Session, message: Message) -> bytes:
        return session.seal(TO_CLIENT, message)

    def box_answer(self, client_key: bytes, nonce: bytes, answer: Registered | Refused) -> bytes:
        """``answer`` boxed from the server's key to ``client_key`` (a key a register
        datagram carried: ``BadKey`` if it is not one)."""
        shared = sodium.crypto_box_beforenm(box_public_key(client_key), self.identity.box_secret)
        return box_answer(shared, nonce, answer)


def _plain_tag(message: object) -> str:
    if isinstance(message, BoxedAnswer):
        return type(message).__struct_config__.tag  # type: ignore[return-value]
    return tag_of(message)  # type: ignore[arg-type]


class ClientCodec:
    """A client's side: its identity, the server's key (pinned, or offered by the
    challenge it answered), the session, and the peers' keys from its table."""

    def __init__(
        self,
        identity: Identity,
        name: str,
        peer_key: Callable[[str], bytes | None],
        entropy: Entropy,
    ) -> None:
        self.identity = identity
        self.name = name  # the sender name its peer datagrams carry
        self.server_key: bytes | None = None
        self.session: Session | None = None
        self._peer_key = peer_key
        self._entropy = entropy
        self._shared = SharedKeys(identity)

    def decode(self, data: bytes, addr: Address) -> tuple[Message, Sender]:
        first = data[0] if data else -1
        if first == PEER_KIND:
            name, message = self.open_sealed(data)
            if not isinstance(message, Chat | Ack):
                raise WireError(f"a {tag_of(message)} in a peer datagram")
            return message, Sender(Via.PEER, addr, name)
        if first == SESSION_KIND:
            session = self.session
            if session is None or session_id(data) != session.sid:
                raise WireError("a session datagram of a session that is not this client's")
            return session.open(TO_CLIENT, data), Sender(Via.SERVER, addr)
        if first == PLAIN_KIND:
            return self._decode_plain(data, addr)
        raise WireError(f"not a datagram a client takes (first byte {first})")

    def _decode_plain(self, data: bytes, addr: Address) -> tuple[Message, Sender]:
        message = decode_plain(data)
        if isinstance(message, Challenge):
            return message, Sender(Via.PLAIN, addr)  # its key is checked against the pin
        if isinstance(message, Rekey):
            key = self.server_key
            if key is None or not verify(key, message.sig, REKEY_DOMAIN, message.sid, message.boot):
                raise WireError("a rekey not signed by the server's key")
            return message, Sender(Via.SERVER, addr)
        if isinstance(message, BoxedAnswer):
            if self.server_key is None:
                raise WireError("an answer to a registration this client has not sent")
            answer = open_answer(message, self._shared_with(self.server_key))
            return answer, Sender(Via.SERVER, addr)
        raise WireError(f"a client takes no {_plain_tag(message)}")

    def open_sealed(
        self, sealed: bytes, keys: Mapping[str, bytes] | None = None
    ) -> tuple[str, Message]:
        """A peer datagram (received, or delivered by the server with its senders'
        ``keys``): its sender and message."""
        datagram = parse_peer(sealed)
        key = keys.get(datagram.sender) if keys else None
        if key is None:
            key = self._peer_key(datagram.sender)
        if key is None:
            raise WireError(f"a peer datagram from {datagram.sender}, not in the client table")
        return datagram.sender, open_peer(datagram, self._shared_with(key))

    def _shared_with(self, key: bytes) -> bytes:
        try:
            return self._shared.get(key)
        except BadKey as exc:
            raise WireError(f"a key that is not usable: {exc}") from None

    def to_server(self, message: Message) -> bytes:
        assert self.session is not None, "sealing before there is a session"
        return self.session.seal(TO_SERVER, message)

    def to_peer(self, key: bytes, message: Message) -> bytes:
        """``message`` boxed for the peer whose key is ``key`` (``BadKey`` if it is not one)."""
        nonce = self._entropy.token_bytes(BOX_NONCE_BYTES)
        return seal_peer(self._shared.get(key), nonce, self.name, message)

    @staticmethod
    def plain(message: Hello | Register) -> bytes:
        return encode(message)
