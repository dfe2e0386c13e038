"""Decoding is total: whatever arrives, a node drops it or takes it, and keeps serving.

Hypothesis feeds raw bytes and JSON shaped like our messages (every field of every
type given values of every JSON type, nesting thousands deep, numbers out of every
range; see ``tests/_fuzz.py``) to the decoder, to both state machines, and over real
UDP to a real ``chatapp serve`` and a real ``chatapp join``. A datagram goes as it is,
or sealed in a session or boxed by a peer with the right keys, so that it gets past
the cryptography to the rules behind it. After each example a normal request must be
answered.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _fuzz import Spoiled, hostile_datagrams, sealings, spoil
from _harness import Proc, chatapp_env, free_udp_ports, join_args, serve
from _sim import SERVER, Sim
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatapp import screen
from chatapp.protocol.changes import Change
from chatapp.protocol.client import ClientProtocol
from chatapp.protocol.common import Log, Received, Send
from chatapp.protocol.crypto import CHANNEL_DOMAIN, Identity, SystemEntropy
from chatapp.protocol.sealing import TO_CLIENT, TO_SERVER, Session, seal_peer_bytes
from chatapp.protocol.server import ServerProtocol
from chatapp.testing.raw import RawClient
from chatapp.wire import (
    Address,
    Lookup,
    LookupResult,
    Mailbox,
    Message,
    Seq,
    StoredItem,
    WireError,
    decode,
    encode,
)

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Real processes: fewer examples, each a batch of datagrams.
FUZZ_REAL = settings(FUZZ, max_examples=40)

STRANGER = ("10.0.0.66", 6666)
NESTED = b'{"x":' + b"[" * 3000 + b"]" * 3000 + b',"t":"ack","id":"a"}'


def test_nesting_deeper_than_the_recursion_limit_is_a_bad_datagram() -> None:
    """The datagram that stopped every node: msgspec skips the value before the tag
    recursively, and ran out of stack (in the clear, and inside a session too)."""
    with pytest.raises(WireError, match="nested too deeply"):
        decode(NESTED)
    server = ServerProtocol(identity=Identity.generate())
    effects = server.handle_datagram(NESTED, STRANGER, 0.0)
    assert effects[0] == Received(None, "JSON nested too deeply")
    assert isinstance(effects[1], Log) and effects[1].level == "warning"
    assert server.undecodable == 1
    sim = Sim()
    sim.join("user1")
    effects = sim.inject_raw(sim.addr["user1"], _sealed(sim, "user1", NESTED), SERVER)
    assert effects[0] == Received(None, "JSON nested too deeply")
    assert sim.server.undecodable == 1


def test_a_codec_that_fails_in_any_way_drops_the_datagram() -> None:
    """The machine's one decode point catches whatever a codec raises."""

    class Broken:
        def decode(self, data: bytes, addr: Address) -> Message:
            raise MemoryError("no room")

    client = ClientProtocol("user1", SERVER, 9001, identity=Identity.generate())
    client.codec = Broken()  # type: ignore[assignment]
    effects = client.handle_datagram(b"{}", SERVER, 0.0)
    assert effects[0].message is None and "MemoryError" in str(effects[0].error)  # type: ignore[union-attr]
    assert client.undecodable == 1


@FUZZ
@given(hostile_datagrams)
def test_the_decoder_returns_a_message_or_a_wire_error(data: bytes) -> None:
    try:
        message = decode(data)
    except WireError:
        return
    assert decode(encode(message)) == message


# --- the state machines -----------------------------------------------------------------

#: Where a counter "far ahead" jumps to: past any window, close to the largest.
AHEAD = 2**64 - 2**20
Sealing = str | Spoiled


def _sealed(sim: Sim, label: str, data: bytes) -> bytes:
    """``data`` sealed in ``label``'s session, as its client would send it."""
    session = sim.clients[label].codec.session
    assert session is not None
    return session.seal_bytes(TO_SERVER, data)


def _boxed(sim: Sim, sender: str, to: str, data: bytes) -> bytes:
    """``data`` boxed by ``sender`` for ``to``, as a peer datagram."""
    client = sim.clients[sender]
    shared = client.codec._shared.get(sim.clients[to].identity.public)
    return seal_peer_bytes(shared, SystemEntropy().token_bytes(24), client.name, data)


def _jump(session: Session) -> Session:
    """``session`` with its counter far ahead, as its holder may send (every later
    datagram of the session goes on from there)."""
    session.sent = max(session.sent, AHEAD)
    return session


Seal = Callable[[bytes], bytes]


def _as(sealing: Sealing, data: bytes, seal: Seal, earlier: list[bytes]) -> bytes:
    """``data`` sent as ``sealing`` says: as it is, sealed by ``seal``, or sealed then
    spoiled (``earlier``: what the same sender sent before, for a replay)."""
    if sealing == "as it is":
        return data
    sealed = seal(data)
    return spoil(sealed, sealing, earlier) if isinstance(sealing, Spoiled) else sealed


def _sent_by(sim: Sim, src: Address, dst: Address) -> list[bytes]:
    return [d.send.data for d in sim.sent if d.src == src and d.dst == dst]


@FUZZ
@given(st.lists(st.tuples(hostile_datagrams, sealings, st.booleans()), max_size=30))
def test_the_server_machine_keeps_serving(batch: list[tuple[bytes, Sealing, bool]]) -> None:
    """From user1 (in its session, its datagrams spoiled or replayed), from user2 (whose
    counter jumps far ahead), and from a stranger."""
    sim = Sim()
    sim.join("user1")
    sim.join("user2")
    for data, sealing, from_user1 in batch:
        src = sim.addr["user1"] if from_user1 else STRANGER
        if sealing == "ahead":
            src = sim.addr["user2"]
            session = sim.clients["user2"].codec.session
            assert session is not None
            data = _jump(session).seal_bytes(TO_SERVER, data)
        else:
            earlier = _sent_by(sim, sim.addr["user1"], SERVER)
            data = _as(sealing, data, lambda d: _sealed(sim, "user1", d), earlier)
        assert isinstance(sim.inject_raw(src, data, SERVER)[0], Received)
        sim.run(0.1)
    # A newcomer registers, and a request in user1's session is answered.
    assert sim.join("newcomer").table
    effects = sim.from_client("user1", Lookup("probe.1", "newcomer"))
    assert any(isinstance(e, Send) and isinstance(e.message, LookupResult) for e in effects)


def _source(sim: Sim, source: str, ahead: bool) -> tuple[Address, Seal]:
    """Where a datagram to user1 comes from, and how that source seals it: the server
    (in user1's session, its counter far ahead if ``ahead``), user2 (boxed), a stranger."""
    if source == "S":
        record = sim.server.clients["user1"]
        session = sim.server.codec.sessions[record.sid]
        if ahead:
            _jump(session)
        return SERVER, lambda data: session.seal_bytes(TO_CLIENT, data)
    if source == "P":
        return sim.addr["user2"], lambda data: _boxed(sim, "user2", "user1", data)
    return STRANGER, lambda data: data


@FUZZ
@given(st.lists(st.tuples(hostile_datagrams, sealings, st.sampled_from("SPX")), max_size=30))
def test_the_client_machine_keeps_serving(batch: list[tuple[bytes, Sealing, str]]) -> None:
    """From the server (sealed in user1's session, spoiled, replayed, or with its counter
    far ahead), from a peer that boxes whatever it likes, and from a stranger."""
    sim = Sim()
    sim.join("user1")
    sim.join("user2")
    at = sim.addr["user1"]
    for data, sealing, source in batch:
        src, seal = _source(sim, source, ahead=sealing == "ahead")
        how = "sealed" if sealing == "ahead" else sealing
        data = _as(how, data, seal, _sent_by(sim, src, at))
        assert isinstance(sim.inject_raw(src, data, at)[0], Received)
        sim.run(0.1)
    sim.type("user2", "send user1 still there?")
    assert "user2 : still there?" in sim.lines("user1")
    assert screen.received_by("user1") in sim.lines("user2")
    # ...and the server's session with user1 still carries a request and its answer.
    mark = len(sim.lines("user1"))
    sim.type("user1", "send_all still here")
    assert screen.CHANNEL_ACKED in sim.lines_since("user1", mark)


# --- real processes over real UDP -------------------------------------------------------------


def _exchange(
    sock: socket.socket, data: bytes, to: Address, me: RawClient, want: type, timeout: float = 3.0
) -> Message:
    """Send ``data`` (again every 0.5 s) until ``me`` opens an answer of type ``want``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.sendto(data, to)
        sock.settimeout(0.5)
        try:
            while True:
                message = me.open(sock.recvfrom(65536)[0])
                if isinstance(message, want):
                    return message
        except TimeoutError:
            continue
    raise AssertionError(f"no {want.__name__} from {to} in {timeout} s")


def _joined(sock: socket.socket, to: Address, me: RawClient) -> None:
    """The handshake from ``sock``, each step again every 0.5 s until it is answered."""
    deadline = time.monotonic() + 5
    sock.settimeout(0.5)
    while not me.registered and time.monotonic() < deadline:
        sock.sendto(me.hello(), to)
        try:
            while not me.registered:
                reply = me.answer(sock.recvfrom(65536)[0])
                if reply is not None:
                    sock.sendto(reply, to)
        except TimeoutError:
            continue
    assert me.registered, me.refusal


def _fresh_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.mark.e2e
def test_a_real_server_keeps_serving_whatever_it_is_sent(tmp_path: Path) -> None:
    """Each example from a client of its own (its sealed datagrams spoiled, or replayed),
    and from ``ahead``, whose session's counter jumps far ahead."""
    (port,) = free_udp_ports(1)
    server = serve(port, chatapp_env(tmp_path), db=tmp_path / "server.sqlite3")
    to = ("127.0.0.1", port)
    counter = itertools.count()
    try:
        with _fresh_socket() as ahead_sock:
            ahead = RawClient("ahead", ahead_sock.getsockname()[1])
            _joined(ahead_sock, to, ahead)
            ahead_session = ahead.codec.session
            assert ahead_session is not None

            @FUZZ_REAL
            @given(st.lists(st.tuples(hostile_datagrams, sealings), min_size=1, max_size=25))
            def feed(batch: list[tuple[bytes, Sealing]]) -> None:
                n = next(counter)
                with _fresh_socket() as sock:  # a registered client of its own per example
                    me = RawClient(f"fuzz{n}", sock.getsockname()[1])
                    _joined(sock, to, me)
                    session = me.codec.session
                    assert session is not None
                    sent: list[bytes] = []
                    for data, sealing in batch:
                        if sealing == "ahead":
                            jumped = _jump(ahead_session).seal_bytes(TO_SERVER, data)
                            ahead_sock.sendto(jumped, to)
                            continue
                        seal = lambda d: session.seal_bytes(TO_SERVER, d)  # noqa: E731
                        sent.append(_as(sealing, data, seal, sent))
                        sock.sendto(sent[-1], to)
                    # ...and a normal request from it is answered.
                    lookup = me.seal(Lookup(f"l{n}", f"fuzz{n}"))
                    answer = _exchange(sock, lookup, to, me, LookupResult)
                    assert isinstance(answer, LookupResult) and answer.entry is not None
                assert server.popen.poll() is None, server.output

            feed()
    finally:
        status = server.stop()
    assert status == 0, server.output
    assert "Traceback" not in server.output and "internal error" not in server.output


class PlayedServer:
    """A server state machine the test runs over its own socket, so that the test can
    also seal whatever it likes in the client's session, as only its server could."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.machine = ServerProtocol(identity=Identity.generate())
        self.peers: dict[Address, RawClient] = {}  # clients that live in the test

    def deliver(self, effects: list[object]) -> None:
        for effect in effects:
            if isinstance(effect, Send):
                peer = self.peers.get(effect.addr)
                if peer is None:
                    self.sock.sendto(effect.data, effect.addr)
                    continue
                reply = peer.answer(effect.data)  # the handshake; tables teach it keys
                if reply is not None:
                    self.deliver(self.machine.handle_datagram(reply, effect.addr, time.time()))
            else:
                assert isinstance(effect, Received | Log | Change), effect
        self.machine.checkpoint()

    def serve(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                data, addr = self.sock.recvfrom(65536)
            except TimeoutError:
                break
            self.deliver(self.machine.handle_datagram(data, addr, time.time()))
        self.deliver(self.machine.handle_timer(time.time()))

    def join_peer(self, name: str, addr: Address) -> RawClient:
        peer = RawClient(name, addr[1])
        self.peers[addr] = peer
        self.deliver(self.machine.handle_datagram(peer.hello(), addr, time.time()))
        assert peer.registered
        return peer

    def session_of(self, name: str) -> Session:
        return self.machine.codec.sessions[self.machine.clients[name].sid]

    def seal_for(self, name: str, data: bytes) -> bytes:
        return self.session_of(name).seal_bytes(TO_CLIENT, data)


@pytest.mark.e2e
def test_a_real_client_keeps_serving_whatever_its_server_and_strangers_send(tmp_path: Path) -> None:
    """The test plays the server (a server state machine on its own socket), so that
    what it sends passes the client's checks of its key and session and reaches every
    handler."""
    client_port = free_udp_ports(1)[0]
    with _fresh_socket() as server_sock, _fresh_socket() as stranger:
        played = PlayedServer(server_sock)
        server_port = server_sock.getsockname()[1]
        client = Proc(join_args("user1", server_port, client_port), chatapp_env(tmp_path))
        at = ("127.0.0.1", client_port)
        counter = itertools.count()
        try:
            played.serve(3.0)
            client.expect(screen.TABLE_UPDATED)
            user2 = played.join_peer("user2", ("127.0.0.1", 1))
            played.serve(1.0)
            client.expect(screen.TABLE_UPDATED, count=2)

            user1_key = played.machine.clients["user1"].key
            shared = user2.codec._shared.get(user1_key)
            sent: dict[str, list[bytes]] = {"S": [], "P": [], "X": []}

            def box(data: bytes) -> bytes:
                nonce = SystemEntropy().token_bytes(24)
                return seal_peer_bytes(shared, nonce, "user2", data)

            @FUZZ_REAL
            @given(
                st.lists(
                    st.tuples(hostile_datagrams, sealings, st.sampled_from("SPX")),
                    min_size=1,
                    max_size=25,
                )
            )
            def feed(batch: list[tuple[bytes, Sealing, str]]) -> None:
                """From the server (sealed in the session, spoiled, replayed, or its counter
                far ahead), from user2 (boxed), and from a stranger."""
                n = next(counter)
                for data, sealing, source in batch:
                    if source == "S" and sealing == "ahead":
                        _jump(played.session_of("user1"))
                    seal = {
                        "S": lambda d: played.seal_for("user1", d),
                        "P": box,
                        "X": lambda d: d,
                    }[source]
                    how = "sealed" if sealing == "ahead" else sealing
                    sent[source].append(_as(how, data, seal, sent[source]))
                    (server_sock if source == "S" else stranger).sendto(sent[source][-1], at)
                played.serve(0.2)
                # ...and a stored message from user2 (signed by it) is still shown. (A
                # batch names its senders' keys: what the server sealed, a table say, may
                # have changed the client's table; the server is trusted with that.)
                text = f"ping {n}"
                sig = user2.identity.sign(
                    CHANNEL_DOMAIN, b"user2", f"probe.{n}".encode(), text.encode()
                )
                item = StoredItem(
                    Seq(f"probe{n}", 1), f"probe.{n}", "channel", "user2", 1e9, text, sig
                )
                batch = Mailbox(f"b.{n}", f"d.{n}", [item], {"user2": user2.identity.public})
                server_sock.sendto(played.seal_for("user1", encode(batch)), at)
                client.expect(screen.stored_channel(1e9, "user2", text), timeout=5)
                played.serve(0.1)
                assert client.popen.poll() is None, client.output

            feed()
        finally:
            status = client.stop()
    assert status == 0, client.output
    assert "Traceback" not in client.output and "internal error" not in client.output
