"""The three kinds of datagram, and how each is sealed and opened.

- ``{``, a handshake datagram: JSON (``hello``, ``challenge``, ``register``,
  ``rekey``); the answers ``registered`` and ``refused`` as ``{t, id, nonce,
  box}``, ``box`` a Box (server -> client) of the answer's JSON;
- ``0x01``, a session datagram: ``01 | sid (8) | counter (8, big-endian) |
  secretbox(JSON)``, whose nonce is direction (1) | counter (8) | zeros (15);
- ``0x02``, a peer datagram: ``02 | nonce (24) | length of the sender's name (1)
  | name | box(JSON)``.

Every function that reads bytes raises ``WireError`` and nothing else: a
datagram that does not parse, open or verify is dropped by its caller, and
changes no state (a session's replay window moves only for a datagram that
opened).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
from nacl import bindings as sodium
from nacl.exceptions import CryptoError

from chatapp.protocol.crypto import BOX_NONCE_BYTES, MAC_BYTES, SID_BYTES
from chatapp.wire import (
    MAX_DATAGRAM,
    Challenge,
    Hello,
    Message,
    Nonce,
    Refused,
    Register,
    Registered,
    Rekey,
    WireError,
    decode,
    encode,
)

SESSION_KIND = 0x01
PEER_KIND = 0x02
PLAIN_KIND = ord("{")

#: The direction byte of a session nonce: the same key never seals the same nonce twice.
TO_SERVER = 0x01
TO_CLIENT = 0x02

#: Bytes of a session datagram around its message: kind, sid, counter and the MAC.
SESSION_OVERHEAD = 1 + SID_BYTES + 8 + MAC_BYTES
#: Bytes of a peer datagram around its message, besides the sender's name.
PEER_OVERHEAD = 1 + BOX_NONCE_BYTES + 1 + MAC_BYTES

_NONCE_PAD = bytes(24 - 1 - 8)


# --- sessions ----------------------------------------------------------------------------


class Replayed(WireError):
    """A session datagram whose counter was seen before (or is too old): a copy, from
    the network (which may duplicate) or from someone replaying it."""


class Session:
    """One registration's session on either side: its id, its key, the counter of what
    this side sealed, and a replay window over what it opened (as DTLS and WireGuard):
    a counter seen before, or more than ``WINDOW`` below the highest, is refused."""

    __slots__ = ("_highest", "_seen", "key", "name", "sent", "sid")

    WINDOW = 64

    def __init__(self, sid: bytes, key: bytes, name: str = "") -> None:
        self.sid = sid
        self.key = key
        self.name = name  # at the server: whose session it is
        self.sent = 0
        self._highest = 0
        self._seen = 1  # bit i: counter (highest - i) was opened; counter 0 is never used

    def seal(self, direction: int, message: Message) -> bytes:
        """``message`` in a session datagram, with the next counter."""
        return self.seal_bytes(direction, encode(message))

    def seal_bytes(self, direction: int, plaintext: bytes) -> bytes:
        """A message already encoded (one table for many clients), sealed."""
        self.sent += 1
        counter = self.sent.to_bytes(8, "big")
        nonce = bytes((direction,)) + counter + _NONCE_PAD
        sealed = sodium.crypto_secretbox_easy(plaintext, nonce, self.key)
        return bytes((SESSION_KIND,)) + self.sid + counter + sealed

    def open(self, direction: int, data: bytes) -> Message:
        """The message in session datagram ``data`` (whose sid the caller has matched)."""
        counter, plaintext = self._open(direction, data)
        message = decode(plaintext)
        self._remember(counter)  # only now: a forged datagram must not move the window
        return message

    def open_bytes(self, direction: int, data: bytes) -> bytes:
        """The plaintext in session datagram ``data``, not decoded (a load generator
        reads only the fields it needs)."""
        counter, plaintext = self._open(direction, data)
        self._remember(counter)
        return plaintext

    def _open(self, direction: int, data: bytes) -> tuple[int, bytes]:
        if len(data) < SESSION_OVERHEAD or len(data) > MAX_DATAGRAM:
            raise WireError(f"a session datagram of {len(data)} bytes")
        counter = int.from_bytes(data[1 + SID_BYTES : 1 + SID_BYTES + 8], "big")
        if not self._fresh(counter):
            raise Replayed(f"session counter {counter} was seen before or is too old")
        nonce = bytes((direction,)) + data[1 + SID_BYTES : 1 + SID_BYTES + 8] + _NONCE_PAD
        try:
            sealed = data[1 + SID_BYTES + 8 :]
            plaintext = sodium.crypto_secretbox_open_easy(sealed, nonce, self.key)
        except (CryptoError, ValueError, TypeError):
            raise WireError("a session datagram that does not open with its key") from None
        return counter, plaintext

    def _fresh(self, counter: int) -> bool:
        if counter == 0:
            return False
        if counter > self._highest:
            return True
        offset = self._highest - counter
        return offset < self.WINDOW and not (self._seen >> offset) & 1

    def _remember(self, counter: int) -> None:
        if counter > self._highest:
            shift = counter - self._highest
            # A jump past the window forgets it: shifted, a counter 2**40 ahead would
            # make an integer of 2**40 bits (a sender with the key could stall the node).
            window = ((self._seen << shift) | 1) if shift < self.WINDOW else 1
            self._seen = window & ((1 << self.WINDOW) - 1)
            self._highest = counter
        else:
            self._seen |= 1 << (self._highest - counter)


def session_id(data: bytes) -> bytes:
    """The sid of a session datagram (``WireError`` if it is too short to be one)."""
    if len(data) < SESSION_OVERHEAD:
        raise WireError(f"a session datagram of {len(data)} bytes")
    return data[1 : 1 + SID_BYTES]


# --- the handshake -------------------------------------------------------------------------


class BoxedAnswer(msgspec.Struct, frozen=True, tag_field="t", forbid_unknown_fields=True):
    """``registered`` or ``refused`` on the wire: the answer's JSON in a Box from the
    server's key to the client's."""

    id: str
    nonce: Nonce
    box: bytes


class RegisteredBox(BoxedAnswer, tag="registered", frozen=True):
    pass


class RefusedBox(BoxedAnswer, tag="refused", frozen=True):
    pass


Plain = Hello | Challenge | Register | Rekey | RegisteredBox | RefusedBox
_plain_decoder = msgspec.json.Decoder(Plain)
_plain_encoder = msgspec.json.Encoder()


def decode_plain(data: bytes) -> Plain:
    """A handshake datagram (first byte ``{``)."""
    if len(data) > MAX_DATAGRAM:
        raise WireError(f"{len(data)} bytes is over the {MAX_DATAGRAM}-byte limit")
    try:
        plain: Plain = _plain_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise WireError(str(exc)) from None
    except RecursionError:  # as in ``chatapp.wire.decode``
        raise WireError("JSON nested too deeply") from None
    except Exception as exc:  # MemoryError on hostile input
        raise WireError(f"undecodable ({type(exc).__name__})") from None
    return plain


def box_answer(shared: bytes, nonce: bytes, answer: Registered | Refused) -> bytes:
    """``answer`` boxed to the client whose ``Box`` shared key with the server is ``shared``."""
    sealed = sodium.crypto_box_easy_afternm(encode(answer), nonce, shared)
    envelope = RegisteredBox if isinstance(answer, Registered) else RefusedBox
    return _plain_encoder.encode(envelope(answer.id, nonce, sealed))


def open_answer(envelope: BoxedAnswer, shared: bytes) -> Registered | Refused:
    """The answer in ``envelope``, if it opens with ``shared`` and is what it says it is."""
    try:
        plaintext = sodium.crypto_box_open_easy_afternm(envelope.box, envelope.nonce, shared)
    except (CryptoError, ValueError, TypeError):
        raise WireError(
            f"a {tag_of_box(envelope)} that does not open with the server's key"
        ) from None
    answer = decode(plaintext)
    expected = Registered if isinstance(envelope, RegisteredBox) else Refused
    if not isinstance(answer, expected) or answer.id != envelope.id:
        raise WireError(f"a {tag_of_box(envelope)} whose box holds something else")
    return answer


def tag_of_box(envelope: BoxedAnswer) -> str:
    return "registered" if isinstance(envelope, RegisteredBox) else "refused"


# --- peer datagrams ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerDatagram:
    nonce: bytes
    sender: str
    box: bytes


def seal_peer(shared: bytes, nonce: bytes, sender: str, message: Message) -> bytes:
    """``message`` from ``sender`` in a peer datagram (``shared``: the pair's Box key)."""
    return seal_peer_bytes(shared, nonce, sender, encode(message))


def seal_peer_bytes(shared: bytes, nonce: bytes, sender: str, plaintext: bytes) -> bytes:
    """``plaintext`` (an encoded message, or a fuzzer's bytes) in a peer datagram."""
    name = sender.encode("ascii")
    sealed = sodium.crypto_box_easy_afternm(plaintext, nonce, shared)
    return bytes((PEER_KIND,)) + nonce + bytes((len(name),)) + name + sealed


def parse_peer(data: bytes) -> PeerDatagram:
    """A peer datagram's parts (not yet opened)."""
    if len(data) < PEER_OVERHEAD + 1 or len(data) > MAX_DATAGRAM or data[0] != PEER_KIND:
        raise WireError(f"not a peer datagram ({len(data)} bytes)")
    nonce = data[1 : 1 + BOX_NONCE_BYTES]
    length = data[1 + BOX_NONCE_BYTES]
    start = 2 + BOX_NONCE_BYTES
    name = data[start : start + length]
    if not 1 <= length <= 32 or len(name) != length or not name.isascii():
        raise WireError("a peer datagram without a valid sender name")
    # Not checked further: a name is only ever looked up among the table's (valid) ones.
    return PeerDatagram(nonce, name.decode("ascii"), data[start + length :])


def open_peer(datagram: PeerDatagram, shared: bytes) -> Message:
    """The message in a peer datagram, if it opens with the pair's Box key."""
    try:
        plaintext = sodium.crypto_box_open_easy_afternm(datagram.box, datagram.nonce, shared)
    except (CryptoError, ValueError, TypeError):
        raise WireError(
            f"a peer datagram that does not open with {datagram.sender}'s key"
        ) from None
    return decode(plaintext)


def is_handshake(data: bytes) -> bool:
    """Whether ``data`` is a handshake datagram (``hello``, ``register``, ...), judged by
    its first byte alone, before anything is decoded: the only plaintext a node takes is
    JSON that starts with ``{`` (no leading white space); a session datagram starts with
    0x01 and a peer datagram with 0x02, whatever bytes follow."""
    return data[:1] == b"{"


def kind_of(data: bytes) -> str:
    """What a datagram says it is, by its first byte (for logs)."""
    first = data[0] if data else -1
    return {SESSION_KIND: "session", PEER_KIND: "peer", PLAIN_KIND: "handshake"}.get(
        first, "unknown"
    )
