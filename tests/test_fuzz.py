"""Decoding is total: whatever arrives, a node drops it or takes it, and keeps serving.

Hypothesis feeds raw bytes and JSON shaped like our messages (every field of every
type given values of every JSON type, nesting thousands deep, numbers out of every
range; see ``tests/_fuzz.py``) to the decoder, to both state machines, and over real
UDP to a real ``chatapp serve`` and a real ``chatapp join``. After each example a
normal request must be answered.
"""

from __future__ import annotations

import itertools
import socket
import time
from pathlib import Path

import pytest
from _fuzz import hostile_datagrams, with_token
from _harness import Proc, chatapp_env, free_udp_ports, join_args, serve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatapp import screen
from chatapp.protocol.client import ClientProtocol
from chatapp.protocol.common import Log, Received, Send, Show
from chatapp.protocol.server import ServerProtocol
from chatapp.wire import (
    Ack,
    ChannelDelivery,
    Chat,
    Lookup,
    LookupResult,
    Message,
    Register,
    Registered,
    Table,
    TableAck,
    TableEntry,
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

SERVER = ("127.0.0.1", 8001)
PEER = ("127.0.0.1", 9101)
STRANGER = ("127.0.0.1", 6666)


def test_nesting_deeper_than_the_recursion_limit_is_a_bad_datagram() -> None:
    """The datagram that stopped every node: msgspec skips the value before the tag
    recursively, and ran out of stack."""
    data = b'{"x":' + b"[" * 3000 + b"]" * 3000 + b',"t":"ack","id":"a"}'
    with pytest.raises(WireError, match="nested too deeply"):
        decode(data)
    server = ServerProtocol()
    effects = server.handle_datagram(data, STRANGER, 0.0)
    assert effects[0] == Received(None, "JSON nested too deeply")
    assert isinstance(effects[1], Log) and effects[1].level == "warning"
    assert server.undecodable == 1


def test_a_codec_that_fails_in_any_way_drops_the_datagram() -> None:
    """The machine's one decode point catches whatever a codec raises."""

    class Broken:
        def encode(self, message: Message) -> bytes:
            return encode(message)

        def decode(self, data: bytes) -> Message:
            raise MemoryError("no room")

    client = ClientProtocol("user1", SERVER, 9001, codec=Broken())
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


def _registered_server() -> tuple[ServerProtocol, str]:
    server = ServerProtocol(
        id_prefix="s1", token_factory=iter(f"t.{i}" for i in range(9999)).__next__
    )
    server.handle_message(Register("c.0", "user1", 9001), ("127.0.0.1", 9001), 0.0)
    server.handle_message(Register("c.1", "user2", 9101), PEER, 0.0)
    return server, "t.0"


@FUZZ
@given(
    st.lists(
        st.tuples(hostile_datagrams, st.sampled_from([("127.0.0.1", 9001), PEER, STRANGER])),
        max_size=30,
    )
)
def test_the_server_machine_keeps_serving(batch: list[tuple[bytes, tuple[str, int]]]) -> None:
    server, token = _registered_server()
    now = 1.0
    for data, addr in batch:
        effects = server.handle_datagram(with_token(data, token), addr, now)
        assert isinstance(effects[0], Received)
        now += 0.1
        server.handle_timer(now)
    newcomer = ("127.0.0.1", 7777)
    effects = server.handle_datagram(encode(Register("new.1", "newcomer", 7777)), newcomer, now)
    assert any(isinstance(e, Send) and isinstance(e.message, Registered) for e in effects)


@FUZZ
@given(
    st.lists(st.tuples(hostile_datagrams, st.sampled_from([SERVER, PEER, STRANGER])), max_size=30)
)
def test_the_client_machine_keeps_serving(batch: list[tuple[bytes, tuple[str, int]]]) -> None:
    client = ClientProtocol("user1", SERVER, 9001, id_prefix="user1")
    client.start(0.0)
    client.handle_message(Registered("user1.1", "t.1"), SERVER, 0.0)
    now = 1.0
    for data, addr in batch:
        assert isinstance(client.handle_datagram(with_token(data, "t.1"), addr, now)[0], Received)
        now += 0.1
        client.handle_timer(now)
    effects = client.handle_datagram(encode(Chat("probe.1", "user2", "still there?")), PEER, now)
    assert Show("user2 : still there?") in effects
    assert any(isinstance(e, Send) and e.message == Ack("probe.1") for e in effects)


# --- real processes over real UDP -------------------------------------------------------------


def _exchange(
    sock: socket.socket, data: bytes, to: tuple[str, int], want: type, timeout: float = 3.0
) -> Message:
    """Send ``data`` (again every 0.5 s) until an answer of type ``want`` comes back."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.sendto(data, to)
        sock.settimeout(0.5)
        try:
            while True:
                message = decode(sock.recvfrom(65536)[0])
                if isinstance(message, want):
                    return message
        except (TimeoutError, WireError):
            continue
    raise AssertionError(f"no {want.__name__} from {to} in {timeout} s")


def _fresh_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.mark.e2e
def test_a_real_server_keeps_serving_whatever_it_is_sent(tmp_path: Path) -> None:
    (port,) = free_udp_ports(1)
    server = serve(port, chatapp_env(tmp_path), db=tmp_path / "server.sqlite3")
    to = ("127.0.0.1", port)
    counter = itertools.count()
    try:

        @FUZZ_REAL
        @given(st.lists(hostile_datagrams, min_size=1, max_size=25))
        def feed(batch: list[bytes]) -> None:
            n = next(counter)
            with _fresh_socket() as sock:  # a registered client of its own per example
                me = sock.getsockname()[1]
                registered = _exchange(
                    sock, encode(Register(f"r{n}", f"fuzz{n}", me)), to, Registered
                )
                assert isinstance(registered, Registered)
                for data in batch:
                    sock.sendto(with_token(data, registered.token), to)
                # ...and a normal request from it is answered.
                answer = _exchange(
                    sock, encode(Lookup(f"l{n}", f"fuzz{n}", registered.token)), to, LookupResult
                )
                assert isinstance(answer, LookupResult) and answer.entry is not None
            assert server.popen.poll() is None, server.output

        feed()
    finally:
        status = server.stop()
    assert status == 0, server.output
    assert "Traceback" not in server.output and "internal error" not in server.output


@pytest.mark.e2e
def test_a_real_client_keeps_serving_whatever_its_server_and_strangers_send(tmp_path: Path) -> None:
    """The test plays the server, so that what it sends passes the client's check of
    where it came from and reaches every handler."""
    client_port = free_udp_ports(1)[0]
    with _fresh_socket() as fake_server, _fresh_socket() as stranger:
        server_port = fake_server.getsockname()[1]
        client = Proc(join_args("user1", server_port, client_port), chatapp_env(tmp_path))
        at = ("127.0.0.1", client_port)
        counter = itertools.count()
        try:
            fake_server.settimeout(10)
            join, _ = fake_server.recvfrom(65536)
            register = decode(join)
            assert isinstance(register, Register)
            fake_server.sendto(encode(Registered(register.id, "t.1")), at)
            entry = TableEntry("user1", "127.0.0.1", client_port, True)
            _exchange(fake_server, encode(Table("s.0", 1, 1, 0, 1, [entry])), at, TableAck)
            client.expect(screen.TABLE_UPDATED)

            @FUZZ_REAL
            @given(st.lists(st.tuples(hostile_datagrams, st.booleans()), min_size=1, max_size=25))
            def feed(batch: list[tuple[bytes, bool]]) -> None:
                n = next(counter)
                for data, from_server in batch:
                    (fake_server if from_server else stranger).sendto(with_token(data, "t.1"), at)
                probe = ChannelDelivery(f"probe.{n}", "user2", f"ping {n}")
                assert _exchange(fake_server, encode(probe), at, Ack) == Ack(probe.id)
                assert client.popen.poll() is None, client.output

            feed()
            client.expect(screen.channel_message("user2", f"ping {next(counter) - 1}"))
        finally:
            status = client.stop()
    assert status == 0, client.output
    assert "Traceback" not in client.output and "internal error" not in client.output
