"""An attacker in a scenario: a node of role ``raw`` with a socket of its own, sending
datagrams no honest client would (``attack NAME KIND ...`` steps).

Its sends are recorded as ordinary ``send`` events with their bytes, and what it
receives as ``recv`` events; a replay plays it from the recording, sending the
recorded bytes as they are, so what is compared is what the other nodes do with
them. The attacks:

``attack NAME hellos N``
    a burst of N ``hello`` datagrams from one socket (one IP), each a new
    registration of NAME with a key of its own: a handshake flood. The server's
    admission limit (``serve --join-limit J``: J registrations, 2J handshake
    datagrams, at once) answers the first 2J and drops the rest unread.
"""

from __future__ import annotations

import trio

from chatapp.net import Endpoint, Network
from chatapp.protocol.common import Received
from chatapp.protocol.sealing import PLAIN_KIND, decode_plain
from chatapp.testing.raw import RawClient
from chatapp.trace import Recorder
from chatapp.wire import Address, Hello, Message, WireError, encode

#: The attacks an ``attack`` step names, and how many numbers each takes.
ATTACKS = {"hellos": 1}
RAW = "raw"


def attack_args(text: str, where: str) -> tuple[str, list[int]]:
    """An ``attack`` step's kind and numbers (after the node's name)."""
    kind, *numbers = text.split()
    if kind not in ATTACKS or len(numbers) != ATTACKS[kind] or not all(
        n.isdigit() for n in numbers
    ):
        shapes = ", ".join(f"{k} {' '.join(['N'] * n)}" for k, n in ATTACKS.items())
        raise ValueError(f"{where}: attack takes NAME and one of: {shapes}; not {text!r}")
    return kind, [int(n) for n in numbers]


class Attacker:
    """NAME's socket: every datagram it sends or gets goes into the trace."""

    def __init__(self, name: str, endpoint: Endpoint, recorder: Recorder) -> None:
        self.name = name
        self.endpoint = endpoint
        self.recorder = recorder

    @classmethod
    async def open(
        cls, name: str, network: Network, host: str, recorder: Recorder
    ) -> Attacker:
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
            self.recorder.received(self.name, local, addr, data, _read(data))

    async def send(self, data: bytes, message: Message | None, to: Address) -> None:
        self.recorder.sent(self.name, self.endpoint.local_address, to, data, message)
        await self.endpoint.send(data, to)

    async def play(self, kind: str, numbers: list[int], server: Address) -> None:
        if kind == "hellos":
            await self.hellos(numbers[0], server)

    async def hellos(self, count: int, server: Address) -> None:
        port = self.endpoint.local_address[1]
        for _ in range(count):
            client = RawClient(self.name, port)
            hello = Hello(client.new_id(), self.name, port, client.identity.public)
            await self.send(encode(hello), hello, server)

    def close(self) -> None:
        self.endpoint.close()


def _read(data: bytes) -> Received:
    """The attacker opens only what needs no key (a challenge, say)."""
    try:
        if data[:1] != bytes((PLAIN_KIND,)):
            raise WireError("sealed: the attacker holds no key to open it")
        return Received(decode_plain(data))
    except WireError as exc:
        return Received(None, str(exc))
