"""The cryptography chatapp uses: all of it libsodium's, through PyNaCl.

- identities: Ed25519 key pairs (``SigningKey``), with the X25519 pair for
  ``Box`` derived by libsodium's conversion, so one 32-byte public key stands
  for a client;
- signatures over a domain-separated encoding of their fields (``signed_bytes``);
- the server's stateless cookie (keyed BLAKE2b);
- fingerprints and safety numbers (BLAKE2b, shown as base32 and digits);
- the randomness every node draws from (``Entropy``): the system's, or a
  deterministic generator (``randombytes_buf_deterministic``) whose seed a
  trace records, so that a replayed node draws the same bytes.

Nothing here touches a socket or a clock. The datagram formats that use these
are in ``chatapp.protocol.sealing``.
"""

from __future__ import annotations

import base64
import os
from typing import Protocol

from nacl import bindings as sodium
from nacl.exceptions import CryptoError
from nacl.signing import SigningKey

KEY_BYTES = 32  # an Ed25519 or X25519 public key, a seed, a session key
SIGNATURE_BYTES = 64
SID_BYTES = 8  # a session id
COOKIE_BYTES = 16
BOX_NONCE_BYTES = sodium.crypto_box_NONCEBYTES  # 24
MAC_BYTES = sodium.crypto_secretbox_MACBYTES  # 16
ID_BYTES = 12  # a message id: 16 characters of base64url

# Signature domains: a signature made for one purpose never verifies for another.
REGISTER_DOMAIN = b"chatapp/2 register"
CHANNEL_DOMAIN = b"chatapp/2 channel message"
REKEY_DOMAIN = b"chatapp/2 rekey"
_COOKIE_DOMAIN = b"chatapp/2 cookie"
_FINGERPRINT_PERSON = b"chatapp-fp"  # BLAKE2b's personalisation: 16 bytes at most
_SAFETY_PERSON = b"chatapp-safety"
_ENTROPY_PERSON = b"chatapp-entropy"


class BadKey(ValueError):
    """Bytes that are not a usable key (wrong size, or not a point on the curve)."""


# --- randomness ------------------------------------------------------------------------


class Entropy(Protocol):
    """Where a node gets every random byte it uses (ids, nonces, session keys, secrets)."""

    def token_bytes(self, n: int) -> bytes: ...


class SystemEntropy:
    """The operating system's randomness (a live node that records no trace)."""

    def token_bytes(self, n: int) -> bytes:
        return os.urandom(n)


class SeededEntropy:
    """Deterministic randomness from a 32-byte seed: block k of 4 KiB is
    ``randombytes_buf_deterministic(4096, BLAKE2b(k, key=seed))``, handed out in
    order. A live node that records a trace draws from one seeded from
    ``os.urandom`` and writes the seed into the trace; its replay, given the seed,
    draws the same bytes in the same order."""

    BLOCK = 4096

    def __init__(self, seed: bytes) -> None:
        if len(seed) != KEY_BYTES:
            raise BadKey(f"an entropy seed is {KEY_BYTES} bytes, not {len(seed)}")
        self.seed = seed
        self._blocks = 0
        self._buffer = b""
        self._offset = 0

    def token_bytes(self, n: int) -> bytes:
        while len(self._buffer) - self._offset < n:
            self._buffer = self._buffer[self._offset :] + self._next_block()
            self._offset = 0
        start = self._offset
        self._offset += n
        return self._buffer[start : self._offset]

    def _next_block(self) -> bytes:
        self._blocks += 1
        block_seed = blake2b(
            self._blocks.to_bytes(8, "big"), KEY_BYTES, key=self.seed, person=_ENTROPY_PERSON
        )
        return sodium.randombytes_buf_deterministic(self.BLOCK, block_seed)


def new_message_id(entropy: Entropy) -> str:
    """12 random bytes as base64url: 16 characters that cannot be guessed from others."""
    return base64.urlsafe_b64encode(entropy.token_bytes(ID_BYTES)).decode("ascii")


# --- hashing ---------------------------------------------------------------------------


def blake2b(data: bytes, size: int, *, key: bytes = b"", person: bytes = b"") -> bytes:
    """libsodium's BLAKE2b (``crypto_generichash``), ``size`` bytes, keyed and personalised."""
    return sodium.crypto_generichash_blake2b_salt_personal(
        data, digest_size=size, key=key, person=person
    )


def signed_bytes(domain: bytes, *fields: bytes) -> bytes:
    """What a signature covers: the domain, then each field with its length (so no two
    different lists of fields encode alike)."""
    parts = [len(domain).to_bytes(4, "big"), domain]
    for value in fields:
        parts += [len(value).to_bytes(4, "big"), value]
    return b"".join(parts)


def cookie(secret: bytes, *fields: bytes) -> bytes:
    """The server's stateless cookie over ``fields`` (keyed BLAKE2b; cheap, no state)."""
    return blake2b(signed_bytes(_COOKIE_DOMAIN, *fields), COOKIE_BYTES, key=secret)


# --- keys ------------------------------------------------------------------------------


class Identity:
    """An Ed25519 key pair, and the X25519 pair libsodium derives from it for ``Box``."""

    __slots__ = ("_signing", "box_public", "box_secret", "public", "seed")

    def __init__(self, seed: bytes) -> None:
        if len(seed) != KEY_BYTES:
            raise BadKey(f"a key seed is {KEY_BYTES} bytes, not {len(seed)}")
        self.seed = seed
        self._signing = SigningKey(seed)
        self.public = bytes(self._signing.verify_key)
        secret = self.seed + self.public  # libsodium's 64-byte Ed25519 secret key
        self.box_secret = sodium.crypto_sign_ed25519_sk_to_curve25519(secret)
        self.box_public = sodium.crypto_sign_ed25519_pk_to_curve25519(self.public)

    @classmethod
    def generate(cls) -> Identity:
        """A new key pair from the system's randomness (never from a replayable seed)."""
        return cls(bytes(SigningKey.generate()))

    def sign(self, domain: bytes, *fields: bytes) -> bytes:
        return self._signing.sign(signed_bytes(domain, *fields)).signature

    def __repr__(self) -> str:
        return f"Identity({fingerprint(self.public)})"  # never the seed


def verify(public: bytes, signature: bytes, domain: bytes, *fields: bytes) -> bool:
    """Whether ``signature`` is ``public``'s over ``fields`` in ``domain``."""
    if len(public) != KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        sodium.crypto_sign_open(signature + signed_bytes(domain, *fields), public)
    except (CryptoError, ValueError, TypeError):
        return False
    return True


def box_public_key(public: bytes) -> bytes:
    """The X25519 public key of an Ed25519 public key; ``BadKey`` if it has none."""
    if len(public) != KEY_BYTES:
        raise BadKey(f"a public key is {KEY_BYTES} bytes, not {len(public)}")
    try:
        return sodium.crypto_sign_ed25519_pk_to_curve25519(public)
    except (CryptoError, ValueError, TypeError, RuntimeError):
        raise BadKey("not an Ed25519 public key") from None


class SharedKeys:
    """``Box`` shared keys (``crypto_box_beforenm``) by the other party's Ed25519 key, for
    one of our own: the expensive step of ``Box`` done once per peer. Bounded: past
    ``capacity`` keys the oldest is forgotten (made again if needed)."""

    def __init__(self, own: Identity, capacity: int = 1024) -> None:
        self._own = own
        self._capacity = capacity
        self._keys: dict[bytes, bytes] = {}  # in the order they were made

    def get(self, public: bytes) -> bytes:
        """The shared key with ``public``; ``BadKey`` if it is not a key."""
        shared = self._keys.get(public)
        if shared is not None:
            return shared
        shared = sodium.crypto_box_beforenm(box_public_key(public), self._own.box_secret)
        self._keys[public] = shared
        if len(self._keys) > self._capacity:
            del self._keys[next(iter(self._keys))]
        return shared


# --- what people compare ---------------------------------------------------------------


def fingerprint(public: bytes) -> str:
    """A key as people read it aloud: BLAKE2b, 10 bytes, base32 in groups of 4."""
    digest = blake2b(public, 10, person=_FINGERPRINT_PERSON)
    text = base64.b32encode(digest).decode("ascii")
    return " ".join(text[i : i + 4] for i in range(0, len(text), 4))


def short_fingerprint(public: bytes) -> str:
    """The fingerprint without spaces (for file names)."""
    return fingerprint(public).replace(" ", "")


def safety_number(a: bytes, b: bytes) -> str:
    """A pair's safety number: 30 digits in groups of 5, the same for both people
    (BLAKE2b of the two keys, sorted)."""
    digest = blake2b(b"".join(sorted((a, b))), 30, person=_SAFETY_PERSON)
    groups = [int.from_bytes(digest[i : i + 5], "big") % 100_000 for i in range(0, 30, 5)]
    return " ".join(f"{group:05d}" for group in groups)


def b64(data: bytes) -> str:
    """Standard base64 (how keys are written in ``known_servers`` and traces)."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    """``b64`` read back; ``ValueError`` for anything that is not base64."""
    return base64.b64decode(text.encode("ascii"), validate=True)
