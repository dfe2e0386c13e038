"""The cryptographic building blocks: libsodium's constructions, used as they are."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatapp.protocol.crypto import (
    CHANNEL_DOMAIN,
    REGISTER_DOMAIN,
    BadKey,
    Identity,
    SeededEntropy,
    SharedKeys,
    SystemEntropy,
    box_public_key,
    cookie,
    fingerprint,
    new_message_id,
    safety_number,
    signed_bytes,
    verify,
)

SEED = bytes(range(32))


def test_seeded_entropy_draws_the_same_bytes_from_the_same_seed() -> None:
    first, second = SeededEntropy(SEED), SeededEntropy(SEED)
    draws = [first.token_bytes(n) for n in (12, 24, 32, 5000, 8)]
    assert draws == [second.token_bytes(n) for n in (12, 24, 32, 5000, 8)]
    assert [len(d) for d in draws] == [12, 24, 32, 5000, 8]
    other = SeededEntropy(bytes(32))
    assert other.token_bytes(12) != SeededEntropy(SEED).token_bytes(12)


def test_seeded_entropy_never_repeats_a_draw() -> None:
    entropy = SeededEntropy(SEED)
    ids = {new_message_id(entropy) for _ in range(5000)}
    assert len(ids) == 5000


def test_a_seed_must_be_32_bytes() -> None:
    with pytest.raises(BadKey):
        SeededEntropy(b"short")
    with pytest.raises(BadKey):
        Identity(b"short")


def test_message_ids_are_16_characters_that_cannot_be_predicted() -> None:
    ids = [new_message_id(SystemEntropy()) for _ in range(1000)]
    assert all(len(i) == 16 for i in ids)
    assert len(set(ids)) == 1000
    # no shared prefix, as the counters of protocol 1 had
    assert len({i[:4] for i in ids}) > 900


def test_a_signature_verifies_only_for_its_key_domain_and_fields() -> None:
    alice, mallory = Identity(SEED), Identity(bytes(32))
    sig = alice.sign(CHANNEL_DOMAIN, b"user1", b"id", b"hello")
    assert verify(alice.public, sig, CHANNEL_DOMAIN, b"user1", b"id", b"hello")
    assert not verify(mallory.public, sig, CHANNEL_DOMAIN, b"user1", b"id", b"hello")
    assert not verify(alice.public, sig, REGISTER_DOMAIN, b"user1", b"id", b"hello")
    assert not verify(alice.public, sig, CHANNEL_DOMAIN, b"user1", b"id", b"hell0")
    # the fields are length-prefixed: moving a byte from one field to the next changes it
    assert not verify(alice.public, sig, CHANNEL_DOMAIN, b"user1i", b"d", b"hello")
    altered = bytes([sig[0] ^ 1]) + sig[1:]
    assert not verify(alice.public, altered, CHANNEL_DOMAIN, b"user1", b"id", b"hello")
    assert not verify(alice.public, sig[:10], CHANNEL_DOMAIN, b"user1", b"id", b"hello")
    assert not verify(b"junk", sig, CHANNEL_DOMAIN, b"user1", b"id", b"hello")


@given(st.lists(st.binary(max_size=8), max_size=4), st.lists(st.binary(max_size=8), max_size=4))
def test_different_fields_never_encode_alike(a: list[bytes], b: list[bytes]) -> None:
    if a != b:
        assert signed_bytes(b"d", *a) != signed_bytes(b"d", *b)


def test_box_keys_are_derived_from_the_signing_key() -> None:
    alice, bob = Identity(SEED), Identity(bytes(32))
    assert box_public_key(alice.public) == alice.box_public
    # the pair's shared key is the same from both ends
    assert SharedKeys(alice).get(bob.public) == SharedKeys(bob).get(alice.public)
    with pytest.raises(BadKey):
        box_public_key(b"x" * 31)


def test_the_cookie_depends_on_every_field_and_the_secret() -> None:
    base = cookie(b"s" * 32, b"1.2.3.4", b"9001", b"user1")
    assert len(base) == 16
    assert cookie(b"s" * 32, b"1.2.3.4", b"9001", b"user1") == base
    assert cookie(b"t" * 32, b"1.2.3.4", b"9001", b"user1") != base
    assert cookie(b"s" * 32, b"1.2.3.4", b"9002", b"user1") != base


def test_fingerprints_and_safety_numbers_read_aloud() -> None:
    alice, bob = Identity(SEED), Identity(bytes(32))
    printed = fingerprint(alice.public)
    assert len(printed.split()) == 4 and all(len(group) == 4 for group in printed.split())
    assert printed != fingerprint(bob.public)
    number = safety_number(alice.public, bob.public)
    assert number == safety_number(bob.public, alice.public)  # both people see the same
    groups = number.split()
    assert len(groups) == 6 and all(len(g) == 5 and g.isdigit() for g in groups)
    assert safety_number(alice.public, Identity(b"\x07" * 32).public) != number


def test_an_identity_never_shows_its_seed() -> None:
    alice = Identity(SEED)
    assert SEED.hex() not in repr(alice) and str(SEED) not in repr(alice)


def test_a_session_counter_far_ahead_moves_the_window_without_a_giant_integer() -> None:
    """A sender that holds the key may jump its counter as far as 2**64 - 1: the window
    is forgotten, not shifted by that many bits (which would build an integer of that
    many bits, and stall the node). Older counters are then too old; newer ones pass."""
    from chatapp.protocol.sealing import TO_SERVER, Replayed, Session
    from chatapp.wire import Ack

    sender, receiver = Session(b"s" * 8, b"k" * 32), Session(b"s" * 8, b"k" * 32)
    assert receiver.open(TO_SERVER, sender.seal(TO_SERVER, Ack("a"))) == Ack("a")
    for jump in (2**40, 2**63, 2**64 - 3):
        sender.sent = jump
        assert receiver.open(TO_SERVER, sender.seal(TO_SERVER, Ack("b"))) == Ack("b")
    older = Session(b"s" * 8, b"k" * 32)
    older.sent = 2**40
    with pytest.raises(Replayed):
        receiver.open(TO_SERVER, older.seal(TO_SERVER, Ack("c")))
    assert receiver.open(TO_SERVER, sender.seal(TO_SERVER, Ack("d"))) == Ack("d")
