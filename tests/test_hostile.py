"""Hostile input: no datagram, from anywhere, stops a node; no one speaks for someone else.

The decoder and both state machines are fuzzed with hypothesis (random bytes,
malformed and wrong-typed JSON, every message type with fields drawn from small
pools so that names, tokens and ids collide, messages in the wrong state,
replays of old datagrams, commands at the prompt). Then garbage goes over real
UDP to a real ``chatapp serve`` and ``chatapp join``, and a control datagram
copied from a trace is sent from another port.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import socket
import time
from pathlib import Path
from typing import Any

import trio
import trio.testing
from _harness import (
    chatapp_env,
    free_udp_ports,
    join,
    serve,
    start_client,
    start_server,
)
from _sim import Sim, key_of, trio_of_clients
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatapp import screen
from chatapp.protocol.changes import Presence
from chatapp.protocol.client import ClientProtocol, ClientState
from chatapp.protocol.common import Effect, Exit, Log, Received, Send, Show
from chatapp.protocol.sealing import TO_SERVER, Session, decode_plain, parse_peer
from chatapp.testing import MemoryNetwork, RawClient
from chatapp.wire import (
    MAX_DATAGRAM,
    Ack,
    Challenge,
    ChannelDelivery,
    ChannelPost,
    Chat,
    Deregister,
    Hello,
    Lookup,
    LookupResult,
    Mailbox,
    Message,
    NotStored,
    Refused,
    Register,
    Registered,
    Rekey,
    Relay,
    Reregister,
    Saved,
    SaveMessage,
    Seq,
    StoredItem,
    Table,
    TableAck,
    TableDelta,
    TableEntry,
    WireError,
    decode,
    encode,
)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SERVER = ("127.0.0.1", 8001)
USERS = {"user1": ("127.0.0.1", 9001), "user2": ("127.0.0.1", 9101), "user3": ("127.0.0.1", 9201)}
STRANGER = ("127.0.0.1", 6666)
TAGS = [t.__struct_config__.tag for t in Message.__args__]  # type: ignore[attr-defined]

# --- pools that make collisions likely -------------------------------------------------------

names = st.sampled_from([*USERS, "user4", "x" * 32, "bad name", "", "é"])
ids = st.sampled_from(["c.1", "c.2", "s1.1", "s1.2", "s1.3", "s1.4", "user1.2", "", "i" * 65])
texts = st.one_of(st.sampled_from(["hi", "", "x" * 9000]), st.text(max_size=50))
addrs = st.sampled_from([SERVER, *USERS.values(), STRANGER])
ints = st.one_of(st.integers(-3, 3), st.sampled_from([2**63, -(2**70), 10**30]))
ips = st.sampled_from(["127.0.0.1", "999.1.1.1", ""])
keys = st.sampled_from([bytes(32), b"k" * 32, b"short", key_of("user1").public])
sigs = st.sampled_from([bytes(64), b"s" * 64, b"", b"x" * 70])
sids = st.sampled_from([bytes(8), b"t" * 8, b"", b"x" * 9])
blobs = st.one_of(st.binary(max_size=80), st.sampled_from([b"\x02" + b"x" * 60]))
entries = st.builds(TableEntry, names, ips, ints, st.booleans(), keys, sids)
kinds = st.sampled_from(["direct", "channel"])
seqs = st.builds(Seq, st.sampled_from(["o1", "o2", ""]), ints)
items = st.builds(StoredItem, seqs, ids, kinds, names, st.floats(), texts, sigs, blobs)

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, ids, names, ints, keys),
    st.builds(Challenge, ids, keys, st.sampled_from([b"c" * 16, b""])),
    st.builds(Register, ids, names, ints, keys, st.sampled_from([b"c" * 16]), sigs),
    st.builds(Rekey, ids, sids, sids, sigs),
    st.builds(Registered, ids, sids, keys, sids),
    st.builds(Deregister, ids, names),
    st.builds(Reregister, ids, names),
    st.builds(SaveMessage, ids, names, blobs),
    st.builds(ChannelPost, ids, texts, sigs),
    st.builds(Lookup, ids, names),
    st.builds(Refused, ids, texts),
    st.builds(Saved, ids, st.sampled_from(["delivered", "stored"])),
    st.builds(Table, ids, ints, ints, ints, ints, st.lists(entries, max_size=4)),
    st.builds(
        TableDelta,
        ids,
        ints,
        ints,
        ints,
        ints,
        ints,
        st.lists(entries, max_size=4),
        st.lists(names, max_size=4),
    ),
    st.builds(TableAck, ids, ints, ints),
    st.builds(ChannelDelivery, ids, names, ids, texts, sigs, keys),
    st.builds(Relay, ids, seqs, blobs, keys),
    st.builds(Mailbox, ids, ids, st.lists(items, max_size=4)),
    st.builds(NotStored, ids, ids, st.lists(names, max_size=3)),
    st.builds(LookupResult, ids, st.none() | entries),
    st.builds(Chat, ids, texts, sids),
    st.builds(Ack, ids, sids),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)

FIELDS = ["id", "name", "key", "sig", "cookie", "port", "text", "to", "sealed", "sid", "x"]


@st.composite
def json_datagrams(draw: st.DrawFn) -> bytes:
    """JSON objects that look like ours: a real tag, real and made-up fields, any types."""
    fields: dict[str, Any] = {"t": draw(st.sampled_from([*TAGS, "nope", 3]))}
    for key in draw(st.lists(st.sampled_from(FIELDS))):
        fields[key] = draw(json_values)
    data = json.dumps(fields).encode()
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]  # truncated
    return data


plain = st.one_of(
    st.binary(max_size=200),
    json_datagrams(),
    messages.map(encode),
    st.sampled_from(
        [
            b"",
            b"\x00" * 70000,
            b" " * (MAX_DATAGRAM + 1),
            b"{}",
            b"[]",
            b"null",
            b'{"t":"ack"}',
            b'{"t":"ack","id":"a","id":"b"}',
            b"\xff\xfe{",
            b"[" * 8000,
            b"\x01" + b"\x00" * 40,
            b"\x02" + b"\x00" * 40,
        ]
    ),
)
#: Who seals a message for the fuzz: a client's session, the server's session with a
#: client, a peer's box, or someone without the key.
sealers = st.sampled_from(["client", "server", "peer", "forger"])
sealed = st.tuples(sealers, st.sampled_from(list(USERS)), messages)
datagrams = st.one_of(plain.map(lambda d: ("plain", d)), sealed.map(lambda m: ("sealed", m)))


def seal(sim: Sim, what: tuple[Any, ...]) -> bytes:
    """A fuzzed datagram's bytes: sealed with real keys, so that it reaches the rules."""
    kind, payload = what
    if kind == "plain":
        return payload  # type: ignore[no-any-return]
    sealer, name, message = payload
    client = sim.clients[name]
    if sealer == "client":
        return client.codec.to_server(message)
    if sealer == "server":
        session = sim.server.codec.sessions[sim.server.clients[name].sid]
        return sim.server.codec.seal(session, message)
    if sealer == "peer":
        return client.codec.to_peer(key_of("user1").public, message)
    return Session(client.sid, b"f" * 32).seal(TO_SERVER, message)


# --- the decoders --------------------------------------------------------------------------


@FUZZ
@given(plain)
def test_the_decoders_return_a_message_or_raise_wire_error(data: bytes) -> None:
    try:
        message = decode(data)
    except WireError as exc:
        assert str(exc)
    else:
        assert len(data) <= MAX_DATAGRAM
        assert decode(encode(message)) == message  # what we accept, we can say again
    try:
        decode_plain(data)
    except WireError as exc:
        assert str(exc)
    try:
        parse_peer(data)
    except WireError as exc:
        assert str(exc)


# --- the state machines --------------------------------------------------------------------


def check_effects(effects: list[Effect]) -> None:
    """Effects any well-behaved node may produce: sendable datagrams, one-line text."""
    for effect in effects:
        assert isinstance(effect, Effect.__args__)  # type: ignore[attr-defined]
        if isinstance(effect, Send):
            assert len(effect.data) <= MAX_DATAGRAM
            if effect.data[:1] == b"{" and not isinstance(effect.message, Registered | Refused):
                assert decode(effect.data) == effect.message
        elif isinstance(effect, Log):
            assert effect.text and effect.level in ("debug", "info", "warning")


def still_serves(sim: Sim) -> None:
    """A newcomer with its own key can register."""
    newcomer = ("127.0.0.1", 7777)
    client = RawClient("newcomer", newcomer[1])
    effects = sim.server.handle_datagram(client.hello(), newcomer, sim.now)
    (challenge,) = [e.data for e in effects if isinstance(e, Send)]
    register = client.answer(challenge)
    assert register is not None
    effects = sim.server.handle_datagram(register, newcomer, sim.now)
    for effect in effects:
        if isinstance(effect, Send) and effect.addr == newcomer:
            client.answer(effect.data)
    assert client.registered, effects


events = st.lists(
    st.one_of(
        st.tuples(st.just("datagram"), datagrams, addrs),
        st.tuples(st.just("timer"), st.floats(0, 3)),
        st.tuples(st.just("replay"), st.integers(0, 1000), addrs),
    ),
    max_size=40,
)


@FUZZ
@given(events)
def test_the_server_survives_any_sequence_of_datagrams(sequence: list[tuple[Any, ...]]) -> None:
    sim = trio_of_clients()
    server = sim.server
    now = sim.now + 1.0
    history: list[bytes] = []
    for event in sequence:
        if event[0] == "timer":
            now += event[1]
            effects = server.handle_timer(now)
        else:
            if event[0] == "replay":
                if not history:
                    continue
                data, addr = history[event[1] % len(history)], event[2]
            else:
                data, addr = seal(sim, event[1]), event[2]
            effects = server.handle_datagram(data, addr, now)
            assert isinstance(effects[0], Received)
            if effects[0].message is None:  # not opened: dropped, logged, nothing else
                assert all(isinstance(e, Log | Send) for e in effects[1:]), effects
                assert all(isinstance(e.message, Rekey) for e in effects if isinstance(e, Send))
        check_effects(effects)
        history += [e.data for e in effects if isinstance(e, Send)]
        if event[0] == "datagram":
            history.append(data)
    check_effects(server.handle_timer(now + 100))
    sim.now = now + 100
    still_serves(sim)


def client_in(state: ClientState) -> tuple[Sim, ClientProtocol]:
    """user1 brought to ``state`` by what a real server sends (and its peers beside it)."""
    sim = trio_of_clients()
    client = sim.clients["user1"]
    if state is ClientState.JOINING:
        sim.kill("server")
        sim.join("user1", label="joining", port=9002)
        return sim, sim.clients["joining"]
    server = sim.addr["server"]
    if state is ClientState.DEREGISTERING:
        sim.drop.append(lambda src, send: src == server)
    if state is not ClientState.ONLINE:
        sim.type("user1", "dereg user1")
    if state is ClientState.REJOINING:
        sim.drop.append(lambda src, send: src == server)
        sim.type("user1", "reg user1")
    if state is ClientState.EXITED:
        sim.type("user1", "exit")
    assert client.state is state
    return sim, client


commands = st.one_of(
    st.text(max_size=100),
    st.builds(
        lambda verb, rest: f"{verb} {rest}",
        st.sampled_from(
            ["send", "send_all", "dereg", "reg", "table", "help", "list", "fingerprint", "exit"]
        ),
        st.one_of(
            st.sampled_from(["user1", "user2 hi", "nobody hi", "user2", ""]),
            st.text(max_size=30),
            st.just("user2 " + "x" * 70000),
        ),
    ),
)

client_events = st.lists(
    st.one_of(
        st.tuples(st.just("datagram"), datagrams, addrs),
        st.tuples(st.just("timer"), st.floats(0, 3)),
        st.tuples(st.just("command"), commands),
    ),
    max_size=40,
)


@FUZZ
@given(st.sampled_from(list(ClientState)), client_events)
def test_the_client_survives_any_datagram_and_any_command(
    state: ClientState, sequence: list[tuple[Any, ...]]
) -> None:
    sim, client = client_in(state)
    now = sim.now + 1.0
    for event in sequence:
        if event[0] == "timer":
            now += event[1]
            effects = client.handle_timer(now)
        elif event[0] == "command":
            waiting = client.lines_waiting
            effects = client.handle_input(event[1], now)
            if event[1].strip() and client.state is not ClientState.EXITED:
                # every command line is answered on the screen or on the wire, or waits
                # its turn (the state is settling), or comes after an exit
                answered = any(isinstance(e, (Show, Send, Exit)) for e in effects)
                assert answered or client.lines_waiting > waiting or client.leaving, (
                    event,
                    effects,
                )
        else:
            effects = client.handle_datagram(seal(sim, event[1]), event[2], now)
        check_effects(effects)
        if client.state is ClientState.EXITED:
            data = sim.clients["user2"].codec.to_peer(key_of("user1").public, Ack("x"))
            after = client.handle_datagram(data, SERVER, now)[1:]
            assert not [e for e in after if isinstance(e, Send | Show | Exit)]


async def test_replayed_datagrams_change_nothing(autojump_clock: trio.testing.MockClock) -> None:
    """Every datagram of a whole conversation, sent again to where it went from where it
    came, in a shuffled order: nothing is shown again, nobody's presence changes, and
    everyone keeps working."""
    network = MemoryNetwork()
    recorded: list[tuple[bytes, tuple[str, int], tuple[str, int]]] = []
    transmit = network._transmit

    def tap(data: bytes, source: tuple[str, int], destination: tuple[str, int]) -> None:
        recorded.append((data, source, destination))
        transmit(data, source, destination)

    network._transmit = tap  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, network, SERVER)
        x, y, z = [await start_client(nursery, network, n, a, SERVER) for n, a in USERS.items()]
        for client in (x, y, z):
            await client.idle()
        for client, command in [
            (x, "send user2 hello"),
            (y, "send_all hello guys"),
            (x, "dereg user1"),
            (y, "send user1 hello?"),
            (z, "send_all anyone?"),
            (x, "reg user1"),
            (z, "send user1 welcome back"),
            (x, "dereg user1"),
            (x, "reg user1"),
        ]:
            await client.type(command)
            await client.idle()
        await trio.sleep(3)
        before = {c.name: list(c.lines) for c in (x, y, z)}
        presence = {n: r.presence for n, r in server.protocol.clients.items()}
        assert presence == dict.fromkeys(USERS, Presence.ONLINE)

        replays = list(recorded)
        random.Random(4).shuffle(replays)
        for data, source, destination in replays:
            network._transmit(data, source, destination)
        await trio.sleep(5)  # every retry the replays could start has run out
        assert {c.name: c.lines for c in (x, y, z)} == before
        assert {n: r.presence for n, r in server.protocol.clients.items()} == presence

        await y.type("send_all still here")
        await y.idle()
        await x.expect("Channel_Message user2 : still here")
        await z.expect("Channel_Message user2 : still here")
        nursery.cancel_scope.cancel()


def test_a_flood_of_warnings_is_rate_limited() -> None:
    import logging
    from io import StringIO

    from chatapp.logs import LogSink

    clock = [0.0]
    out = StringIO()
    log = LogSink("chatapp.test.flood", now=lambda: clock[0], handler=logging.StreamHandler(out))
    for _ in range(10_000):  # one second's flood
        clock[0] += 0.0001
        log(Log("dropped a bad datagram", "warning"))
    assert len(out.getvalue().splitlines()) <= 10
    clock[0] += 10
    log(Log("dropped a bad datagram", "warning"))
    assert "suppressed" in out.getvalue().splitlines()[-1]


def test_log_lines_have_a_time_and_a_level_and_respect_the_threshold() -> None:
    import logging
    import re
    from io import StringIO

    from chatapp.logs import LogSink

    out = StringIO()
    log = LogSink("chatapp.test.levels", level="info", handler=logging.StreamHandler(out))
    log(Log("registered user1 at 127.0.0.1:9001"))
    log(Log("table version 1 sent to 1 clients", "debug"))  # below the threshold
    log(Log("dropped a bad datagram: 100% garbage", "warning"))  # a % is not a format
    lines = out.getvalue().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert len(lines) == 2, lines
    assert re.fullmatch(stamp + " INFO registered user1 at 127.0.0.1:9001", lines[0])
    assert re.fullmatch(stamp + " WARNING dropped a bad datagram: 100% garbage", lines[1])
    quiet = StringIO()
    off = LogSink("chatapp.test.off", level="off", handler=logging.StreamHandler(quiet))
    off(Log("anything", "warning"))
    assert quiet.getvalue() == ""


# --- real processes over real UDP ----------------------------------------------------------


def _answers(data: bytes, to: int, wait: float = 1.0) -> list[bytes]:
    """Send ``data`` from a fresh port (not any client's); every datagram that comes back
    within ``wait`` seconds."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.1)
        sock.sendto(data, ("127.0.0.1", to))
        answers = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                answers.append(sock.recvfrom(65536)[0])
        return answers


def register_raw(name: str, server_port: int, tries: int = 10) -> RawClient:
    """A newcomer with its own key registers from a fresh port (sent again if unanswered:
    the first may be lost in a socket buffer still full of a flood)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(1.0)
        client = RawClient(name, int(sock.getsockname()[1]))
        for _ in range(tries):
            sock.sendto(client.hello(), ("127.0.0.1", server_port))
            with contextlib.suppress(TimeoutError):
                while not client.registered and not client.refusal:
                    reply = client.answer(sock.recvfrom(65536)[0])
                    if reply is not None:
                        sock.sendto(reply, ("127.0.0.1", server_port))
            if client.registered or client.refusal:
                return client
    raise AssertionError(f"no registration at UDP port {server_port} in {tries} tries")


def test_garbage_over_real_udp_never_stops_the_server_or_a_client(tmp_path: Path) -> None:
    env = chatapp_env(tmp_path)
    server_port, client_port = free_udp_ports(2)
    started = time.monotonic()
    server = serve(server_port, env, db=tmp_path / "server.sqlite3")
    procs = [server]
    try:
        client = join("user1", server_port, client_port, env)
        procs.append(client)
        client.expect(screen.TABLE_UPDATED)
        shown_before = client.lines()

        rng = random.Random(20240325)
        fixed = [
            b"",
            b"\x00" * 65000,
            b"{",
            b"null",
            b'{"t":"register"}',
            b'{"t":"ack","id":5}',
            b'{"t":"table","id":"a","epoch":1,"version":1,"part":5,"parts":1,"entries":[]}',
            encode(Deregister("x.1", "user1")),
            encode(Ack("s1.1")),
            b"\x01" + bytes(40),
            b"\x02" + bytes(24) + b"\x05user1" + bytes(40),
            "ünïcödé".encode(),
            b"\xff\xfe\xfd",
        ]
        flood = fixed + [rng.randbytes(rng.randint(1, 1400)) for _ in range(1500)]
        flood += [
            json.dumps({"t": rng.choice(TAGS), "id": rng.random()}).encode() for _ in range(500)
        ]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            for data in flood:
                for port in (server_port, client_port):
                    try:
                        sock.sendto(data, ("127.0.0.1", port))
                    except OSError:  # a full socket buffer: the datagram is simply lost
                        time.sleep(0.001)
        time.sleep(0.5)

        # Both still serve: a newcomer registers, the client's send_all is answered.
        assert register_raw("newcomer", server_port).registered
        client.type("send_all still here")
        client.expect(screen.CHANNEL_ACKED)
        assert client.lines()[: len(shown_before)] == shown_before
        assert not [
            line
            for line in client.lines()[len(shown_before) :]
            if line not in (screen.CHANNEL_ACKED, screen.TABLE_UPDATED)
        ]
    finally:
        statuses = [proc.stop() for proc in procs]
    running = time.monotonic() - started
    assert statuses == [0, 0]
    for proc in procs:
        assert "Traceback" not in proc.output, proc.output
    dropped = [line for line in server.lines() if "dropped" in line or "refused" in line]
    # Warnings are let through at 5 a second after a burst of 5 (chatapp.logs),
    # so the bound grows with how long the server ran; a few refusals are not warnings.
    limit = 40 + 5 * running
    assert 1 <= len(dropped) <= limit, f"{len(dropped)} log lines for {len(flood)} bad datagrams"


def _sent_in_trace(trace: Path, until: str, timeout: float = 5.0) -> dict[str, bytes]:
    """The datagrams a node sent, by type, as its trace has them once ``until`` is in
    (a trace may be written a little behind the node)."""
    deadline = time.monotonic() + timeout
    while True:
        sent: dict[str, bytes] = {}
        for line in trace.read_text(encoding="utf-8").splitlines()[1:]:
            with contextlib.suppress(ValueError):  # a line still being written
                event = json.loads(line)
                if event.get("ev") == "send":
                    raw = event.get("raw")
                    data = raw.encode() if raw is not None else base64.b64decode(event["raw_b64"])
                    sent[event["msg"]["t"]] = data
        if until in sent or time.monotonic() > deadline:
            return sent
        time.sleep(0.05)


def test_a_datagram_copied_from_a_trace_is_refused_or_ignored_and_changes_nothing(
    tmp_path: Path,
) -> None:
    env = chatapp_env(tmp_path)
    server_port, x_port, y_port = free_udp_ports(3)
    server = serve(server_port, env, db=tmp_path / "server.sqlite3")
    procs = [server]
    trace = tmp_path / "user1.jsonl"
    try:
        x = join("user1", server_port, x_port, env, "--trace", str(trace))
        procs.append(x)
        x.expect(screen.TABLE_UPDATED)
        y = join("user2", server_port, y_port, env)
        procs.append(y)
        x.expect(screen.TABLE_UPDATED, count=2)
        x.type("dereg user1")
        x.expect(screen.YOU_ARE_OFFLINE)
        x.type("reg user1")
        x.expect(screen.TABLE_UPDATED, count=3)
        x.type("send_all hello guys")
        x.expect(screen.CHANNEL_ACKED)
        y.expect("Channel_Message user1 : hello guys")

        # What an eavesdropper on the path (or anyone shown the trace) has in hand: the
        # session datagrams were seen already (their counters), and are sealed anyway.
        sent = _sent_in_trace(trace, until="send_all")
        for tag in ("dereg", "reg", "send_all"):
            assert sent[tag][:1] == b"\x01", tag
            assert _answers(sent[tag], server_port, wait=0.3) == [], tag
        # A copy of user1's registration from another port gets a challenge (its cookie
        # was for user1's address), never a session; nor does its hello.
        for tag in ("register", "hello"):
            answers = [decode_plain(data) for data in _answers(sent[tag], server_port, wait=0.3)]
            assert answers and all(isinstance(a, Challenge) for a in answers), (tag, answers)

        # user1 is still online at the server: a channel message reaches it live.
        y.type("send_all are you there?")
        x.expect("Channel_Message user2 : are you there?")
        time.sleep(0.5)
        assert y.lines().count("Channel_Message user1 : hello guys") == 1  # not re-broadcast
        assert "[You have message]" not in x.lines()
    finally:
        for proc in procs:
            proc.stop()
    for proc in procs:
        assert "Traceback" not in proc.output
