"""A client in a few calls, for tests and benchmarks that talk to a server from a plain
socket (a load generator, an attacker with keys of its own): the handshake, then
messages sealed in its session. Bytes in, bytes out; the caller owns the socket."""

from __future__ import annotations

import trio

from chatapp.net import Endpoint
from chatapp.protocol.codecs import ClientCodec
from chatapp.protocol.crypto import (
    CHANNEL_DOMAIN,
    REGISTER_DOMAIN,
    Entropy,
    Identity,
    SystemEntropy,
    new_message_id,
)
from chatapp.protocol.sealing import Session
from chatapp.wire import (
    Ack,
    Address,
    Challenge,
    ChannelPost,
    Hello,
    Message,
    Refused,
    Register,
    Registered,
    Table,
    TableAck,
    TableDelta,
    TableEntry,
    WireError,
    encode,
)

#: Where a raw client's datagrams come from, as its codec sees them.
_ANYWHERE = ("0.0.0.0", 0)


class RawClient:
    """NAME with its own key (``identity``), listening on ``port``."""

    def __init__(
        self,
        name: str,
        port: int,
        identity: Identity | None = None,
        entropy: Entropy | None = None,
    ) -> None:
        self.name = name
        self.port = port
        self.identity = identity or Identity.generate()
        self.entropy = entropy or SystemEntropy()
        self.keys: dict[str, bytes] = {}  # peers' keys, from the tables it got
        self.codec = ClientCodec(self.identity, name, self.keys.get, self.entropy)
        self.refusal = ""

    @property
    def registered(self) -> bool:
        return self.codec.session is not None

    def new_id(self) -> str:
        return new_message_id(self.entropy)

    def hello(self) -> bytes:
        return encode(Hello(self.new_id(), self.name, self.port, self.identity.public))

    def answer(self, data: bytes) -> bytes | None:
        """What the handshake says to send next for the datagram ``data`` (a register for
        a challenge), or None; a ``registered`` answer makes the session."""
        message = self.open(data)
        if isinstance(message, Challenge):
            return encode(self.register_for(message))
        if isinstance(message, Registered):
            self.codec.session = Session(message.sid, message.session_key)
        elif isinstance(message, Refused):
            self.refusal = message.reason
        return None

    def register_for(self, challenge: Challenge) -> Register:
        self.codec.server_key = challenge.server_key
        port = str(self.port).encode()
        signed = (challenge.server_key, challenge.cookie, self.name.encode(), port)
        sig = self.identity.sign(REGISTER_DOMAIN, *signed)
        return Register(
            self.new_id(), self.name, self.port, self.identity.public, challenge.cookie, sig
        )

    def open(self, data: bytes) -> Message | None:
        """The message in ``data``, if it opens for this client (tables teach it keys)."""
        try:
            message, _ = self.codec.decode(data, _ANYWHERE)
        except WireError:
            return None
        for entry in getattr(message, "entries", ()):
            if isinstance(entry, TableEntry):
                self.keys[entry.name] = entry.key
        return message

    def seal(self, message: Message) -> bytes:
        """``message`` in the session."""
        return self.codec.to_server(message)

    def ack(self, msg_id: str) -> bytes:
        return self.seal(Ack(msg_id))

    def table_ack(self, part: Table | TableDelta) -> bytes:
        """The ACK of a table part or a delta, saying this client holds what it brings
        (it keeps no table of its own, only the keys)."""
        version = part.version if isinstance(part, Table) else part.to
        return self.seal(TableAck(part.id, part.epoch, version))

    def post(self, text: str, msg_id: str | None = None) -> bytes:
        """A signed channel message, sealed."""
        msg_id = msg_id or self.new_id()
        sig = self.identity.sign(CHANNEL_DOMAIN, self.name.encode(), msg_id.encode(), text.encode())
        return self.seal(ChannelPost(msg_id, text, sig))


async def handshake(endpoint: Endpoint, server: Address, client: RawClient) -> None:
    """Register ``client`` through ``endpoint`` (tries every 0.5 s; raises ``RuntimeError``
    on a refusal, ``trio.TooSlowError`` after 5 s)."""
    with trio.fail_after(5):
        while not client.registered:
            await endpoint.send(client.hello(), server)
            with trio.move_on_after(0.5):
                while not client.registered:
                    data, _ = await endpoint.receive()
                    reply = client.answer(data)
                    if client.refusal:
                        raise RuntimeError(f"refused: {client.refusal}")
                    if reply is not None:
                        await endpoint.send(reply, server)
