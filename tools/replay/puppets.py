"""Nodes played from the recording (``--node``, ``--target``): they send what the
recording says they sent, and record what they receive.

Against a node replayed from its recorded seed and state (``--node``), a played
node sends the recorded bytes as they are: the node under test draws the same
ids, keys and session as it did, so the recorded datagrams fit it, and a
datagram altered in the trace fails to open and is refused exactly as it would
be live. Against a running server (``--target``), which has its own key and its
own randomness, a played client speaks the protocol: it registers with its
recorded key, answering the server's challenge, and seals the recorded messages
(with the ids the server chose in this run) in the session it was given.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import msgspec
import trio

from chatapp.net import Endpoint
from chatapp.protocol.codecs import ClientCodec
from chatapp.protocol.common import Received
from chatapp.protocol.crypto import REGISTER_DOMAIN, Identity, SystemEntropy
from chatapp.protocol.sealing import PLAIN_KIND, Session
from chatapp.testing.attacker import read_unkeyed
from chatapp.trace import Recorder
from chatapp.wire import (
    Address,
    Challenge,
    Chat,
    Hello,
    Message,
    Register,
    Registered,
    WireError,
    encode,
)

from .normalise import Normaliser


class LiveKeys:
    """A played client's side of the protocol against a running server: its recorded key,
    and the server's key, cookie and session as this run gives them."""

    def __init__(self, name: str, identity: Identity) -> None:
        self.identity = identity
        self.codec = ClientCodec(identity, name, lambda peer: None, SystemEntropy())
        self._cookie = b""

    def learn(self, message: Message) -> None:
        if isinstance(message, Challenge):
            self.codec.server_key, self._cookie = message.server_key, message.cookie
        elif isinstance(message, Registered):
            self.codec.session = Session(message.sid, message.session_key)

    def encode(self, message: Message, recorded: bytes) -> bytes:
        if isinstance(message, Hello):
            return encode(message)
        if isinstance(message, Register):
            return encode(self._register(message))
        if isinstance(message, Chat) or recorded[:1] == bytes((PLAIN_KIND,)):
            return recorded
        if self.codec.session is None:
            return recorded  # not registered in this run: the server will say so
        return self.codec.to_server(message)

    def _register(self, recorded: Register) -> Register:
        server_key = self.codec.server_key or b""
        port = str(recorded.port).encode()
        signed = (server_key, self._cookie, recorded.name.encode(), port)
        sig = self.identity.sign(REGISTER_DOMAIN, *signed)
        return msgspec.structs.replace(recorded, cookie=self._cookie or recorded.cookie, sig=sig)


class Puppet:
    """A node played from the recording: it only sends what it is told and records
    what it gets (``keys``: a client played against a running server)."""

    def __init__(
        self, name: str, endpoint: Endpoint, recorder: Recorder, keys: LiveKeys | None = None
    ) -> None:
        self.name = name
        self.endpoint = endpoint
        self.recorder = recorder
        self.keys = keys

    async def receive_loop(self) -> None:
        local = self.endpoint.local_address
        while True:
            try:
                data, addr = await self.endpoint.receive()
            except OSError:
                continue
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            self.recorder.received(self.name, local, addr, data, self._read(data, addr))

    def _read(self, data: bytes, addr: Address) -> Received:
        try:
            if self.keys is None:
                return read_unkeyed(data)
            message, _ = self.keys.codec.decode(data, addr)
        except WireError as exc:
            return Received(None, str(exc))
        self.keys.learn(message)
        return Received(message)

    def bytes_for(self, message: Message | None, recorded: bytes) -> bytes:
        if message is None or self.keys is None:
            return recorded
        return self.keys.encode(message, recorded)

    async def send(self, data: bytes, message: Message | None, addr: Address) -> None:
        self.recorder.sent(self.name, self.endpoint.local_address, addr, data, message)
        with contextlib.suppress(OSError):
            await self.endpoint.send(data, addr)


class Rewriter:
    """A recorded datagram's message with the values the node under test chose in this
    run (its ids) and the addresses of this run."""

    def __init__(
        self,
        recorded: Normaliser,
        live: Normaliser,
        under_test: str,
        new_addresses: Mapping[str, Address],
    ) -> None:
        self.recorded = recorded
        self.live = live
        self.under_test = under_test
        self.new_addresses = new_addresses

    def message_of(self, msg: dict[str, Any] | None, puppet: str) -> Message | None:
        if msg is None:
            return None
        try:
            message: Message = msgspec.convert(self.message(msg, puppet), Message)
        except msgspec.ValidationError:
            return None
        return message

    def message(self, msg: dict[str, Any], puppet: str) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in msg.items():
            if key in ("id", "delivery", "post"):
                result[key] = self._id(value, puppet)
            elif key == "epoch":  # the table the node under test holds, in this run
                result[key] = self.live.epochs.get(self.under_test, value)
            elif key == "port" and isinstance(value, int):
                node = self.recorded.ports.get(value, "")
                result[key] = self.new_addresses[node][1] if node in self.new_addresses else value
            else:
                result[key] = value
        return result

    def _id(self, value: Any, puppet: str) -> Any:
        label = self.recorded.label(value, puppet)
        if label.partition("#")[0] != self.under_test:
            return value
        return self.live.id_values.get(label, value)
