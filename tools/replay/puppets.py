"""Nodes played from the recording (``--node``): they send what the recording says
they sent, with the values the node under test chose in this run, and record what
they receive."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import msgspec
import trio

from chatapp.net import Endpoint
from chatapp.protocol.common import PLAIN, Received
from chatapp.trace import Recorder
from chatapp.wire import Address, Message, WireError

from .normalise import Normaliser


class Puppet:
    """A node played from the recording: it only sends what it is told and records
    what it gets."""

    def __init__(self, name: str, endpoint: Endpoint, recorder: Recorder) -> None:
        self.name = name
        self.endpoint = endpoint
        self.recorder = recorder

    async def receive_loop(self) -> None:
        local = self.endpoint.local_address
        while True:
            try:
                data, addr = await self.endpoint.receive()
            except OSError:
                continue
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return
            try:
                seen = Received(PLAIN.decode(data))
            except WireError as exc:
                seen = Received(None, str(exc))
            self.recorder.received(self.name, local, addr, data, seen)

    async def send(self, data: bytes, message: Message | None, addr: Address) -> None:
        self.recorder.sent(self.name, self.endpoint.local_address, addr, data, message)
        with contextlib.suppress(OSError):
            await self.endpoint.send(data, addr)


class Rewriter:
    """A recorded datagram of a played node, with the values the node under test chose
    in this run (its ids, its tokens) and the addresses of this run."""

    def __init__(
        self,
        recorded: Normaliser,
        live: Normaliser,
        under_test: str,
        server: str,
        new_addresses: Mapping[str, Address],
    ) -> None:
        self.recorded = recorded
        self.live = live
        self.under_test = under_test
        self.server = server
        self.new_addresses = new_addresses

    def datagram(
        self, msg: dict[str, Any] | None, data: bytes, puppet: str
    ) -> tuple[bytes, Message | None]:
        """The bytes to send for a recorded datagram (and its message, if it is one)."""
        if msg is None:
            return data, None
        try:
            message = msgspec.convert(self.message(msg, puppet), Message)
        except msgspec.ValidationError:
            return data, None
        return PLAIN.encode(message), message

    def message(self, msg: dict[str, Any], puppet: str) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in msg.items():
            if key in ("id", "delivery"):
                result[key] = self._id(value, puppet)
            elif key == "epoch" and self.under_test == self.server:
                result[key] = self.live.epochs.get(self.server, value)  # the table it holds
            elif key == "token" and self.under_test == self.server:
                label = self.recorded.token_labels.get(value)
                result[key] = self.live.token_values.get(label, value) if label else value
            elif key == "port" and isinstance(value, int):
                node = self.recorded.ports.get(value, "")
                result[key] = self.new_addresses[node][1] if node in self.new_addresses else value
            elif key == "entries" and isinstance(value, list):
                result[key] = [self._entry(entry) for entry in value]
            elif key == "entry" and value is not None:
                result[key] = self._entry(value)
            elif key == "items" and isinstance(value, list):
                result[key] = [{**item, "id": self._id(item.get("id"), puppet)} for item in value]
            else:
                result[key] = value
        return result

    def _id(self, value: Any, puppet: str) -> Any:
        label = self.recorded.label(value, puppet)
        if label.partition("#")[0] != self.under_test:
            return value
        return self.live.id_values.get(label, value)

    def _entry(self, entry: Any) -> Any:
        if not isinstance(entry, list) or len(entry) != 4:
            return entry
        name, ip, port, online = entry
        node = self.recorded.address(f"{ip}:{port}")
        if node in self.new_addresses:
            ip, port = self.new_addresses[node]
        return [name, ip, port, online]
