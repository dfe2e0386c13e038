"""An attacker in a scenario: a node of role ``raw`` with a socket of its own, sending
datagrams no honest client would (``attack NAME KIND ...`` steps).

Its sends are recorded as ordinary ``send`` events with their bytes, and what it
receives as ``recv`` events; a replay plays it from the recording, sending the
recorded bytes as they are, so what is compared is what the other nodes do with
them. The attacks, and what each models:

``attack NAME hellos N``
    a handshake flood: N ``hello`` datagrams from one socket (one IP), each a new
    registration of NAME with a key of its own. The server's admission limit
    (``serve --join-limit J``: J registrations, 2J handshake datagrams, at once)
    answers the first 2J and drops the rest unread.
``attack NAME register``
    NAME registers with a key of its own, as a malicious client would (it then
    ACKs what the server sends it, and sends what the steps below say, sealed in
    its own session).
``attack NAME dereg OTHER``
    a registered client asks to deregister another name: refused.
``attack NAME reg``
    a ``reg`` from a client that is online: answered, nothing stored or logged.
``attack NAME reg-as OTHER``
    a ``reg`` of another name: refused.
``attack NAME badsig``
    a channel message whose signature has a byte flipped: not posted.
``attack NAME chat-tag TO``
    a direct message to TO, boxed for it, but tagged with a session id TO does not
    have (as a message sealed for another session): not shown.
``attack NAME save-as OTHER TO``
    a ``save`` to TO whose peer datagram names OTHER as its sender (sealed with a
    key the attacker made up): not stored, not relayed.
"""

from __future__ import annotations

import dataclasses
import math

import msgspec
import trio

from chatapp.net import Endpoint, Network
from chatapp.protocol.admission import Limits
from chatapp.protocol.common import Received
from chatapp.protocol.crypto import CHANNEL_DOMAIN, Identity
from chatapp.protocol.sealing import PLAIN_KIND, Session, decode_plain, seal_peer_bytes
from chatapp.testing.raw import RawClient
from chatapp.trace import Recorder
from chatapp.wire import (
    Address,
    Challenge,
    ChannelDelivery,
    ChannelPost,
    Chat,
    Deregister,
    Hello,
    Mailbox,
    Message,
    NotStored,
    Register,
    Registered,
    Relay,
    Reregister,
    SaveMessage,
    Table,
    TableDelta,
    TableEntry,
    WireError,
    encode,
)

#: The attacks an ``attack`` step names, and the words each takes after its kind.
ATTACKS = {
    "hellos": 1, "register": 0, "dereg": 1, "reg": 0, "reg-as": 1, "badsig": 0,
    "save-as": 2, "chat-tag": 1,
}  # fmt: skip
RAW = "raw"
#: How long ``attack NAME register`` waits for the server's answer.
REGISTER_WAIT = 5.0


def join_limits(joins: int | None) -> Limits:
    """The admission limits of ``chatapp serve --join-limit N`` (the default without)."""
    if joins is None:
        return Limits()
    return dataclasses.replace(
        Limits(),
        handshakes_per_ip_rate=joins * 2 / 60 or math.inf,
        handshakes_per_ip_burst=joins * 2 or math.inf,
    )


def attack_args(text: str, where: str) -> tuple[str, list[str]]:
    """An ``attack`` step's kind and words (after the node's name)."""
    kind, *words = text.split() or [""]
    if (
        kind not in ATTACKS
        or len(words) != ATTACKS[kind]
        or (kind == "hellos" and not words[0].isdigit())
    ):
        shapes = ", ".join(f"{k} {' '.join(['X'] * n)}".strip() for k, n in ATTACKS.items())
        raise ValueError(f"{where}: attack takes NAME and one of: {shapes}; not {text!r}")
    return kind, words


class Attacker:
    """NAME's socket: every datagram it sends or gets goes into the trace."""

    def __init__(self, name: str, endpoint: Endpoint, recorder: Recorder) -> None:
        self.name = name
        self.endpoint = endpoint
        self.recorder = recorder
        self.server: Address = ("127.0.0.1", 0)
        self.client: RawClient | None = None  # once it registers
        self.registered = trio.Event()
        self.peers: dict[str, Address] = {}  # where each client is, from the tables

    @classmethod
    async def open(cls, name: str, network: Network, host: str, recorder: Recorder) -> Attacker:
        endpoint = await network.listen(host, 0)
        local = endpoint.local_address
        recorder.node_started(name, RAW, ["chatapp-attacker", name], local)
        return cls(name, endpoint, recorder)

    async def receive_loop(self) -> None:
        local = self.endpoint.local_address
        while True:
            try:
                data, addr = await self.endpoint.receive()
            except OSError:
                continue
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            recorded, opened = self._read(data)
            self.recorder.received(self.name, local, addr, data, recorded)
            if opened is not None:
                await self._answer(opened)

    def _read(self, data: bytes) -> tuple[Received, Message | None]:
        """What goes in the trace (what a replay's played node can read too: a sealed
        datagram is recorded undecodable), and what the attacker opened."""
        recorded = read_unkeyed(data)
        if self.client is None:
            return recorded, None
        return recorded, self.client.open(data)

    async def _answer(self, message: Message) -> None:
        """What a registered client answers: a register for a challenge, ACKs."""
        client = self.client
        if client is None:
            return
        if isinstance(message, Challenge):
            await self.send(encode(register := client.register_for(message)), register)
        elif isinstance(message, Registered):
            client.codec.session = Session(message.sid, message.session_key)
            self.registered.set()
        elif isinstance(message, Table | TableDelta):
            for entry in message.entries:
                if isinstance(entry, TableEntry):
                    self.peers[entry.name] = (entry.ip, entry.port)
            await self.send(client.table_ack(message), None)
        elif isinstance(message, ChannelDelivery | Relay | Mailbox | NotStored):
            await self.send(client.ack(message.id), None)

    async def send(self, data: bytes, message: Message | None, to: Address | None = None) -> None:
        to = to or self.server
        self.recorder.sent(self.name, self.endpoint.local_address, to, data, message)
        await self.endpoint.send(data, to)

    async def sealed(self, message: Message) -> None:
        assert self.client is not None
        await self.send(self.client.seal(message), message)

    async def play(self, kind: str, words: list[str], server: Address | None) -> None:
        if server is None:
            raise ValueError("attack before serve")
        self.server = server
        if kind == "hellos":
            await self.hellos(int(words[0]))
        elif kind == "register":
            await self.register()
        elif self.client is None:
            raise ValueError(f"{self.name} must register before {kind}")
        elif kind == "chat-tag":
            await self.chat_wrong_tag(words[0], self.client)
        else:
            await self.sealed(self._forged(kind, words, self.client))

    def _forged(self, kind: str, words: list[str], client: RawClient) -> Message:
        msg_id = client.new_id()
        if kind == "dereg":
            return Deregister(msg_id, words[0])
        if kind in ("reg", "reg-as"):
            return Reregister(msg_id, words[0] if words else self.name)
        if kind == "badsig":
            text = "forged"
            sig = client.identity.sign(CHANNEL_DOMAIN, self.name.encode(), msg_id.encode(), b"x")
            return ChannelPost(msg_id, text, bytes([sig[0] ^ 1]) + sig[1:])
        other, to = words
        made_up = Identity.generate().sign(CHANNEL_DOMAIN, b"key")[:32]
        sealed = seal_peer_bytes(made_up, client.entropy.token_bytes(24), other, b"{}")
        return SaveMessage(msg_id, to, sealed)

    async def chat_wrong_tag(self, to: str, client: RawClient) -> None:
        """A direct message to ``to`` sealed for a session it does not have."""
        chat = Chat(client.new_id(), "forged tag", client.entropy.token_bytes(8))
        await self.send(client.codec.to_peer(client.keys[to], chat), chat, self.peers[to])

    async def hellos(self, count: int) -> None:
        port = self.endpoint.local_address[1]
        for _ in range(count):
            client = RawClient(self.name, port)
            hello = Hello(client.new_id(), self.name, port, client.identity.public)
            await self.send(encode(hello), hello)

    async def register(self) -> None:
        self.client = RawClient(self.name, self.endpoint.local_address[1])
        data = self.client.hello()
        await self.send(data, msgspec.json.decode(data, type=Hello))
        with trio.fail_after(REGISTER_WAIT):
            await self.registered.wait()

    def close(self) -> None:
        self.endpoint.close()


def read_unkeyed(data: bytes) -> Received:
    """A datagram as a node that holds no key reads it (an attacker's trace, a replay's
    played node): a handshake datagram, else undecodable."""
    try:
        if data[:1] != bytes((PLAIN_KIND,)):
            raise WireError("sealed: a played node holds no key to open it")
        message = decode_plain(data)
        if not isinstance(message, Hello | Challenge | Register):
            raise WireError("sealed: a played node holds no key to open it")
    except WireError as exc:
        return Received(None, str(exc))
    return Received(message)
