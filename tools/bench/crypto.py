"""What the cryptography costs: each sealed form beside the bare operation it wraps.

Measured in this process, per datagram: sealing and opening a session datagram,
a peer datagram (Box), a channel message's signature (signed once, verified by
the server and by a receiver), and the server's side of a registration (the
cookie twice, the signature, the key conversion and the Box of the answer),
each against encoding and decoding the same message as plain JSON.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from chatapp.protocol.codecs import ClientCodec, ServerCodec
from chatapp.protocol.crypto import (
    CHANNEL_DOMAIN,
    REGISTER_DOMAIN,
    Identity,
    SystemEntropy,
    cookie,
    verify,
)
from chatapp.protocol.sealing import TO_SERVER, Session
from chatapp.wire import Chat, Register, Registered, SaveMessage, decode, encode

from .report import Figure
from .sizes import Sizes

TEXT = "hello nice to meet you."


def _per_call(work: Callable[[], object], count: int) -> float:
    """Seconds per call of ``work``: the best of three runs of ``count`` calls."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(count):
            work()
        best = min(best, (time.perf_counter() - start) / count)
    return best


def _figure(key: str, label: str, sealed: float, plain: float, what: str) -> Figure:
    return Figure(
        key,
        label,
        sealed,
        "s",
        plain,
        what,
        "lower",
        extra={"added_us": (sealed - plain) * 1e6},
    )


def _session(count: int) -> Figure:
    alice = Identity.generate()
    codec = ClientCodec(alice, "alice", lambda name: None, SystemEntropy())
    sealed_chat = codec.to_peer(Identity.generate().public, Chat("i" * 16, TEXT, bytes(8)))
    save = SaveMessage("i" * 16, "bob", sealed_chat)
    client = Session(b"s" * 8, b"k" * 32)
    server = Session(b"s" * 8, b"k" * 32)

    def sealed() -> object:
        return server.open(TO_SERVER, client.seal(TO_SERVER, save))

    def plain() -> object:
        return decode(encode(save))

    return _figure(
        "crypto_session",
        "crypto: a session datagram sealed and opened (a save)",
        _per_call(sealed, count),
        _per_call(plain, count),
        "the same message as JSON, encoded and decoded",
    )


def _peer(count: int) -> Figure:
    alice, bob = Identity.generate(), Identity.generate()
    sender = ClientCodec(alice, "alice", lambda name: None, SystemEntropy())
    receiver = ClientCodec(bob, "bob", {"alice": alice.public}.get, SystemEntropy())
    chat = Chat("i" * 16, TEXT, bytes(8))
    sender.to_peer(bob.public, chat)  # the shared key, once per peer (cached)
    receiver.open_sealed(sender.to_peer(bob.public, chat))

    def sealed() -> object:
        return receiver.open_sealed(sender.to_peer(bob.public, chat))

    def plain() -> object:
        return decode(encode(chat))

    return _figure(
        "crypto_peer",
        "crypto: a direct message boxed and opened (Box, key cached)",
        _per_call(sealed, count),
        _per_call(plain, count),
        "the same message as JSON, encoded and decoded",
    )


def _channel(count: int) -> Figure:
    alice = Identity.generate()
    fields = (b"alice", b"i" * 16, TEXT.encode())

    def sealed() -> object:
        sig = alice.sign(CHANNEL_DOMAIN, *fields)
        return verify(alice.public, sig, CHANNEL_DOMAIN, *fields) and verify(
            alice.public, sig, CHANNEL_DOMAIN, *fields
        )

    post = SaveMessage("i" * 16, "x", TEXT.encode())

    def plain() -> object:
        return decode(encode(post))

    return _figure(
        "crypto_channel",
        "crypto: a channel message signed, checked by the server and a receiver",
        _per_call(sealed, count // 10),
        _per_call(plain, count),
        "a message of its size as JSON, encoded and decoded",
    )


def _registration(count: int) -> Figure:
    server, client = Identity.generate(), Identity.generate()
    codec = ServerCodec(server)
    secret = b"c" * 32
    fields = (b"127.0.0.1", b"9001", b"alice", client.public, b"9001", b"0")
    made = cookie(secret, *fields)
    signed = (server.public, made, b"alice", b"9001")
    sig = client.sign(REGISTER_DOMAIN, *signed)
    register = Register("i" * 16, "alice", 9001, client.public, made, sig)
    granted = Registered("i" * 16, b"s" * 8, b"k" * 32, b"b" * 8)
    data = encode(register)

    def sealed() -> object:
        message = decode(data)
        cookie(secret, *fields)  # the challenge's
        assert cookie(secret, *fields) == made  # the register's, checked
        assert isinstance(message, Register)
        assert verify(message.key, message.sig, REGISTER_DOMAIN, *signed)
        return codec.box_answer(message.key, b"n" * 24, granted)

    def plain() -> object:
        return encode(decode(data))

    return _figure(
        "crypto_register",
        "crypto: a registration at the server (cookie x2, signature, Box)",
        _per_call(sealed, count // 10),
        _per_call(plain, count),
        "the register datagram as JSON, decoded and encoded",
    )


def bench_crypto(sizes: Sizes) -> list[Figure]:
    count = max(1000, sizes.rtt_rounds * 20)
    return [_session(count), _peer(count), _channel(count), _registration(count)]
