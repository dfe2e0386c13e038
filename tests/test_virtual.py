"""The Trio runtime (``Node``) over the in-memory network, in virtual time.

Every test runs under ``autojump_clock``: a 3-second give-up takes
milliseconds. Faults are injected by a tap on each endpoint that drops or
duplicates chosen datagrams (by type, sender and receiver), or by the memory
network's own seeded loss, duplication and delay.

Trio shuffles the order in which ready tasks run, so these tests assert what
must hold under any order: the lines each client shows, never how two
clients' lines interleave.
"""

from __future__ import annotations

import io
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
import trio.testing
from _harness import first_only

from chatapp import screen
from chatapp.launch import ClientOptions, ServerOptions, run_node
from chatapp.net import Endpoint
from chatapp.node import Input
from chatapp.protocol.inputs import BadInput, Signal
from chatapp.protocol.server import ServerProtocol
from chatapp.terminal import PlainScreen
from chatapp.testing import (
    SEED_LINES,
    SEED_SCREENS,
    CapturedScreen,
    Cluster,
    Faults,
    MemoryNetwork,
    line_matches,
    parse_scenario,
    scenario_path,
    unmatched_seed_lines,
)
from chatapp.testing.scenario import SERVER
from chatapp.trace import NullRecorder
from chatapp.wire import (
    Ack,
    Address,
    ChannelDelivery,
    ChannelPost,
    Chat,
    Mailbox,
    Message,
    Registered,
    Relay,
    Saved,
    Table,
    TableAck,
    TableDelta,
)

TU = screen.TABLE_UPDATED
TABLES = (Table, TableDelta)

#: (message, sender name, receiver name) -> True to apply the rule to that datagram.
Rule = Callable[[Message, str, str], bool]


# --- a tap on every endpoint ---------------------------------------------------------


@dataclass
class Tap:
    """Decides, for each datagram sent, whether it is lost, delivered, or delivered twice."""

    drop: list[Rule] = field(default_factory=list)
    duplicate: list[Rule] = field(default_factory=list)
    #: Every datagram sent: (virtual time, sender, receiver, message, fate).
    log: list[tuple[float, str, str, Message, str]] = field(default_factory=list)
    #: Every datagram a node took from its endpoint: (sender, receiver, bytes).
    received: list[tuple[str, str, bytes]] = field(default_factory=list)
    names: Callable[[Address], str] = lambda addr: f"{addr[0]}:{addr[1]}"
    #: What each datagram sent holds (most are sealed: its node says, see TapRecorder).
    messages: dict[bytes, Message] = field(default_factory=dict)

    def fate(self, data: bytes, src: Address, dst: Address) -> int:
        """How many copies to deliver."""
        message = self.messages.get(data)
        if message is None:
            return 1
        sender, receiver = self.names(src), self.names(dst)
        if any(rule(message, sender, receiver) for rule in self.drop):
            copies, fate = 0, "dropped"
        elif any(rule(message, sender, receiver) for rule in self.duplicate):
            copies, fate = 2, "duplicated"
        else:
            copies, fate = 1, "sent"
        self.log.append((trio.current_time(), sender, receiver, message, fate))
        return copies

    def sent(self, kind: type, src: str | None = None, dst: str | None = None) -> list[Message]:
        return [
            m
            for _, s, d, m, fate in self.log
            if isinstance(m, kind) and src in (None, s) and dst in (None, d)
        ]


class TapRecorder(NullRecorder):
    """Tells the tap what each datagram holds as its node hands it to the network."""

    def __init__(self, tap: Tap) -> None:
        self._tap = tap

    def sent(
        self, node: str, local: Address, peer: Address, data: bytes, msg: Message | None
    ) -> None:
        if msg is not None:
            self._tap.messages[data] = msg


class TappedEndpoint:
    def __init__(self, inner: Endpoint, tap: Tap) -> None:
        self._inner = inner
        self._tap = tap

    @property
    def local_address(self) -> Address:
        return self._inner.local_address

    async def send(self, data: bytes, addr: Address) -> None:
        for _ in range(self._tap.fate(data, self.local_address, addr)):
            await self._inner.send(data, addr)

    async def receive(self) -> tuple[bytes, Address]:
        data, addr = await self._inner.receive()
        self._tap.received.append(
            (self._tap.names(addr), self._tap.names(self.local_address), data)
        )
        return data, addr

    def close(self) -> None:
        self._inner.close()


@dataclass
class TappedNetwork:
    network: MemoryNetwork
    tap: Tap

    async def listen(self, host: str, port: int) -> Endpoint:
        return TappedEndpoint(await self.network.listen(host, port), self.tap)


def is_(kind: type, src: str | None = None, dst: str | None = None) -> Rule:
    return lambda m, s, d: isinstance(m, kind) and src in (None, s) and dst in (None, d)


def ack_of(
    kind: type, tap: Tap, src: str | None = None, where: Callable[[Message], bool] = bool
) -> Rule:
    """An ACK (sent by ``src``) of a message of ``kind`` (for which ``where`` is true)."""

    def rule(message: Message, s: str, d: str) -> bool:
        if not isinstance(message, Ack | TableAck) or src not in (None, s):
            return False
        return any(isinstance(m, kind) and m.id == message.id and where(m) for *_, m, _ in tap.log)

    return rule


# --- running a scenario ---------------------------------------------------------------


@dataclass
class Run:
    cluster: Cluster
    tap: Tap
    network: MemoryNetwork
    #: (virtual time, node, line): every line shown, and every line typed as "<typed> ...".
    timeline: list[tuple[float, str, str]]
    real_seconds: float

    def lines(self, name: str) -> list[str]:
        return self.cluster.clients[name].screen.lines

    def at(self, name: str, line: str) -> float:
        return next(t for t, who, shown in self.timeline if who == name and shown == line)

    def status(self, name: str) -> int | None:
        return self.cluster.clients[name].status


#: A scenario: a shipped one's name, a script, or scripts with actions to run between them.
Script = str | list[str | Callable[[Cluster, MemoryNetwork], None]]


async def play(
    script: Script,
    tap: Tap | None = None,
    faults: Faults | None = None,
    seed: int = 0,
) -> Run:
    tap = tap or Tap()
    memory = MemoryNetwork(faults=faults or Faults(), seed=seed)
    network = TappedNetwork(network=memory, tap=tap)
    timeline: list[tuple[float, str, str]] = []
    if isinstance(script, str) and "\n" not in script:
        script = [scenario_path(script).read_text(encoding="utf-8")]
    parts = [script] if isinstance(script, str) else script
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        cluster = Cluster(
            nursery,
            network,
            on_line=lambda node, line: timeline.append((trio.current_time(), node, line)),
            wall_offset=1_648_153_596.0,
            recorder=TapRecorder(tap),
        )

        def names(addr: Address) -> str:
            if addr == cluster.server_addr:
                return SERVER
            for name, handle in cluster.clients.items():
                if handle.node is not None and handle.node.endpoint.local_address == addr:
                    return name
            return f"{addr[0]}:{addr[1]}"

        tap.names = names
        try:
            for part in parts:
                if isinstance(part, str):
                    await cluster.play(parse_scenario(part))
                else:
                    part(cluster, memory)
        finally:
            await cluster.shutdown()
    return Run(cluster, tap, memory, timeline, time.perf_counter() - started)


def without_tables(lines: list[str]) -> list[str]:
    return [line for line in lines if line != TU]


def assert_lines(shown: list[str], expected: list[str]) -> None:
    """``shown`` is ``expected`` line for line (``{time}`` matches a Unix time)."""
    assert len(shown) == len(expected), (shown, expected)
    for got, want in zip(shown, expected, strict=True):
        assert line_matches(want, got), (got, want)


def assert_nothing_shown_twice(run: Run) -> None:
    for name, handle in run.cluster.clients.items():
        lines = without_tables(handle.screen.lines)
        repeated = {line for line in lines if lines.count(line) > 1 and not line.startswith("[")}
        assert not repeated, (name, repeated)


# --- the seed's three tests --------------------------------------------------------------


@pytest.mark.parametrize("test", [1, 2, 3])
async def test_seed_test_in_virtual_time(test: int, autojump_clock: trio.testing.MockClock) -> None:
    run = await play(f"test{test}")
    for name, expected in SEED_LINES[test].items():
        shown = run.lines(name)
        assert unmatched_seed_lines(expected, shown) == []
        assert_lines(shown, SEED_SCREENS[test][name])


async def test_seed_test_2_gives_up_3_seconds_after_send_in_milliseconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = await play("test2")
    typed = run.at("user1", "<typed> send user2 hi")
    no_ack = run.at("user1", "[No ACK from user2, message sent to server.]")
    assert no_ack - typed == pytest.approx(0.5)
    for line in ("[Message sent failed]", "[Server is shut down]", "[Exiting]"):
        assert run.at("user1", line) - typed == pytest.approx(3.0)
    assert run.status("user1") == 1
    assert run.status("user2") == 0
    # one direct try, five to the server (which is gone), all in virtual time
    assert len(run.tap.sent(Chat, "user1", "user2")) == 1
    assert len(run.tap.sent(Saved)) == 0
    assert run.real_seconds < 10.0  # not 3 s and more of waiting: virtual time


async def test_seed_test_3_marks_the_silent_client_offline_500_ms_after_send_all(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = await play("test3")
    typed = run.at("user1", "<typed> send_all hi")
    assert run.at("user3", "Channel_Message user1 : hi") == pytest.approx(typed)
    tables = [t for t, who, line in run.timeline if who == "user1" and line == TU and t > typed]
    assert tables == [pytest.approx(typed + 0.5)]
    server = run.cluster.server
    assert server is not None and isinstance(server.protocol, ServerProtocol)
    (stored,) = server.protocol.mailbox["user2"]
    assert (stored.kind, stored.text) == ("channel", "hi")


# --- lost and duplicated datagrams, one exchange at a time --------------------------------

TWO = """
serve
join user1
expect user1 [Client Table Updated]
join user2
expect user2 [Client Table Updated]
expect user1 [Client Table Updated]
"""

THREE = (
    TWO
    + """
join user3
expect user3 [Client Table Updated]
expect user1 [Client Table Updated]
expect user2 [Client Table Updated]
"""
)


async def test_a_lost_registered_answer_is_retried(autojump_clock: trio.testing.MockClock) -> None:
    tap = Tap(drop=[first_only(is_(Registered))])
    run = await play(TWO + "wait 5\n", tap)
    assert run.lines("user1") == [TU, TU]
    assert run.lines("user2") == [TU]
    assert len(run.tap.sent(Registered)) == 3


async def test_a_lost_direct_ack_is_not_shown_twice(autojump_clock: trio.testing.MockClock) -> None:
    tap = Tap(drop=[first_only(is_(Ack, "user2", "user1"))])
    run = await play(
        TWO
        + """
type user1 send user2 hello nice to meet you.
expect user1 [No ACK from user2, message sent to server.]
expect user1 [Message has been received by user2.]
wait 5
""",
        tap,
    )
    assert run.lines("user2") == [TU, "user1 : hello nice to meet you."]
    typed = run.at("user1", "<typed> send user2 hello nice to meet you.")
    assert run.at("user1", "[Message has been received by user2.]") - typed == pytest.approx(0.5)
    # the server's delivery reached user2 and was ACKed, but not shown again
    assert len(tap.sent(Relay, SERVER, "user2")) == 1
    assert len(tap.sent(Ack, "user2")) >= 2


async def test_a_lost_direct_chat_is_delivered_by_the_server(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tap = Tap(drop=[first_only(is_(Chat, "user1", "user2"))])
    run = await play(
        TWO
        + """
type user1 send user2 hi
expect user2 user1 : hi
expect user1 [Message has been received by user2.]
wait 5
""",
        tap,
    )
    assert without_tables(run.lines("user1")) == [
        "[No ACK from user2, message sent to server.]",
        "[Message has been received by user2.]",
    ]
    assert run.lines("user2") == [TU, "user1 : hi"]


async def test_a_lost_table_ack_does_not_show_the_table_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tap = Tap()
    # the last update: the whole table to user3, a delta from version 2 to the others
    last = lambda m: getattr(m, "version", getattr(m, "to", 0)) == 3  # noqa: E731
    tap.drop = [first_only(ack_of(TABLES, tap, name, last)) for name in ("user1", "user2", "user3")]
    run = await play(THREE + "wait 5\n", tap)
    assert run.lines("user1") == [TU, TU, TU]
    assert run.lines("user2") == [TU, TU]
    assert run.lines("user3") == [TU]
    server = run.cluster.server
    assert server is not None and isinstance(server.protocol, ServerProtocol)
    assert all(record.online for record in server.protocol.clients.values())
    for name in ("user1", "user2", "user3"):
        assert len([m for m in tap.sent(TABLES, SERVER, name) if last(m)]) == 2


async def test_a_lost_mailbox_ack_loses_nothing_and_shows_nothing_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tap = Tap()
    tap.drop = [first_only(ack_of(Mailbox, tap, "user1"))]
    run = await play(
        THREE
        + """
type user1 dereg user1
expect user1 [You are now offline. Bye.]
type user2 send user1 hello?
expect user2 [Messages received by the server and saved.]
type user3 send_all hello guys
expect user3 [Message received by the server.]
type user3 send user1 are you still there?
expect user3 [Messages received by the server and saved.]
type user1 reg user1
expect user1 [You have message]
wait 5
""",
        tap,
    )
    assert_lines(
        without_tables(run.lines("user1")),
        [
            "[You are now offline. Bye.]",
            "[You have message]",
            "({time}) user2 : hello?",
            "({time}) Channel_Message user3 : hello guys",
            "({time}) user3 : are you still there?",
        ],
    )
    assert len(tap.sent(Mailbox)) == 2
    server = run.cluster.server
    assert server is not None and isinstance(server.protocol, ServerProtocol)
    assert server.protocol.mailbox == {}


async def test_a_lost_send_all_ack_broadcasts_once(autojump_clock: trio.testing.MockClock) -> None:
    tap = Tap(drop=[first_only(is_(Ack, SERVER, "user1"))])
    run = await play(
        THREE
        + """
type user1 send_all hello guys
expect user1 [Message received by the server.]
wait 5
""",
        tap,
    )
    assert len(tap.sent(ChannelPost)) == 2
    assert len(tap.sent(ChannelDelivery)) == 2
    for name in ("user2", "user3"):
        assert run.lines(name).count("Channel_Message user1 : hello guys") == 1
    typed = run.at("user1", "<typed> send_all hello guys")
    assert run.at("user1", "[Message received by the server.]") - typed == pytest.approx(0.5)


async def test_a_lost_channel_ack_does_not_show_it_twice_or_lose_the_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tap = Tap()
    tap.drop = [first_only(ack_of(ChannelDelivery, tap, "user2"))]
    run = await play(
        THREE
        + """
type user1 send_all hello guys
expect user2 Channel_Message user1 : hello guys
wait 5
type user3 send user2 still there?
expect user2 user3 : still there?
wait 5
""",
        tap,
    )
    assert without_tables(run.lines("user2")) == [
        "Channel_Message user1 : hello guys",
        "user3 : still there?",
    ]
    server = run.cluster.server
    assert server is not None and isinstance(server.protocol, ServerProtocol)
    assert server.protocol.clients["user2"].online
    assert server.protocol.mailbox == {}


async def test_a_lost_dereg_ack_and_a_lost_saved_answer_are_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    tap = Tap(drop=[first_only(is_(Ack, SERVER, "user2")), first_only(is_(Saved, SERVER, "user1"))])
    run = await play(
        TWO
        + """
type user2 dereg user2
expect user2 [You are now offline. Bye.]
type user1 send user2 hi
expect user1 [Messages received by the server and saved.]
type user2 reg user2
expect user2 [You have message]
wait 5
""",
        tap,
    )
    assert_lines(
        without_tables(run.lines("user2")),
        ["[You are now offline. Bye.]", "[You have message]", "({time}) user1 : hi"],
    )
    typed = run.at("user1", "<typed> send user2 hi")
    # the first Saved was lost: the retry 500 ms later is answered
    saved = run.at("user1", "[Messages received by the server and saved.]")
    assert saved - typed == pytest.approx(1.0)


@pytest.mark.parametrize("test", [1, 3])
async def test_every_datagram_duplicated_shows_nothing_twice(
    test: int, autojump_clock: trio.testing.MockClock
) -> None:
    tap = Tap(duplicate=[lambda m, s, d: True])
    run = await play(f"test{test}", tap)
    for name in SEED_LINES[test]:
        assert_lines(run.lines(name), SEED_SCREENS[test][name])
    # the duplicates did arrive: every chat and channel message taken in came twice
    copies = Counter(tap.received)
    chats = [key for key in copies if isinstance(tap.messages.get(key[2]), (Chat, ChannelDelivery))]
    assert chats and all(copies[key] % 2 == 0 for key in chats), copies


# --- a terrible network: seeded loss, duplication and delay ----------------------------------

CHATTY = (
    THREE
    + "".join(
        f"type {a} send {b} message {n} from {a} to {b}\nwait 2\n"
        for n, (a, b) in enumerate(
            [
                ("user1", "user2"),
                ("user2", "user3"),
                ("user3", "user1"),
                ("user2", "user1"),
                ("user1", "user3"),
                ("user3", "user2"),
            ]
            * 2
        )
    )
    + "type user1 send_all all of you\nwait 4\n"
)


def check_nothing_lost_or_shown_twice(run: Run) -> None:
    """What a sender saw confirmed reached its receiver's screen, or is in the mailbox;
    and no message was shown twice."""
    assert_nothing_shown_twice(run)
    server = run.cluster.server
    assert server is not None and isinstance(server.protocol, ServerProtocol)
    stored = {item.text for items in server.protocol.mailbox.values() for item in items}
    for t, who, typed in run.timeline:
        if not typed.startswith("<typed> send"):
            continue
        after = [line for when, w, line in run.timeline if w == who and t <= when < t + 2]
        if typed.startswith("<typed> send_all "):
            text = typed.split(" ", 2)[2]
            receivers = [name for name in run.cluster.clients if name != who]
            confirmed = "[Message received by the server.]" in after
            line = f"Channel_Message {who} : {text}"
        else:
            _, _, to, text = typed.split(" ", 3)
            receivers = [to]
            confirmed = any(
                line in after
                for line in (
                    f"[Message has been received by {to}.]",
                    "[Messages received by the server and saved.]",
                )
            )
            line = f"{who} : {text}"
        for receiver in receivers:
            # shown live, or later from the mailbox as "(TIME) ..."
            shown = [got for got in run.lines(receiver) if got == line or got.endswith(") " + line)]
            assert len(shown) <= 1, (receiver, line)
            if confirmed:
                assert shown or text in stored, (receiver, line)
        if f"[Message has been received by {receivers[0]}.]" in after:
            assert run.lines(receivers[0]).count(line) == 1


@pytest.mark.parametrize("seed", range(40))
async def test_a_lossy_network_loses_nothing_and_shows_nothing_twice(
    seed: int, autojump_clock: trio.testing.MockClock
) -> None:
    faults = Faults(loss=0.1, duplicate=0.2, min_delay=0.0, max_delay=0.05)
    run = await play(CHATTY, faults=faults, seed=seed)
    assert run.network.dropped > 0 and run.network.duplicated > 0
    assert all(handle.status == 0 for handle in run.cluster.clients.values())
    check_nothing_lost_or_shown_twice(run)


# --- the node itself: the terminal, bad input, exits --------------------------------------


async def test_a_client_node_writing_plain_lines(autojump_clock: trio.testing.MockClock) -> None:
    network = MemoryNetwork()
    out = io.StringIO()
    server = ServerOptions(8001, host="127.0.0.1", db=":memory:")
    client = ClientOptions("user1", "127.0.0.1", 8001, 9001, host="127.0.0.1")
    send_input, inputs = trio.open_memory_channel[Input](8)
    async with trio.open_nursery() as nursery:
        server_node = await nursery.start(partial(run_node, server, network=network))
        client_node = await nursery.start(
            partial(run_node, client, network=network, screen=PlainScreen(out), inputs=inputs)
        )
        await trio.sleep(1)
        await send_input.send(BadInput("not UTF-8"))
        await send_input.send("bogus")
        await send_input.send("send user1 hi")
        await trio.sleep(1)
        await send_input.send(Signal.INTERRUPT)
        await trio.sleep(1)
        assert client_node.exit_status == 0
        server_node.stop()
    # what a pipe or a file gets: the lines, without prompts
    assert out.getvalue() == (
        "[Client Table Updated]\n"
        "[Could not read that line: not UTF-8. Nothing was sent.]\n"
        "[Unknown command 'bogus'. Type help for the commands.]\n"
        "user1 : hi\n"
        "[Message has been received by user1.]\n"
        "Caught keyboard interrupt. Exiting\n"
    )


async def test_a_client_node_with_no_server_exits_1_after_2_5_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    captured = CapturedScreen()
    _, inputs = trio.open_memory_channel[Input](1)
    started = trio.current_time()
    options = ClientOptions("user1", "127.0.0.1", 8001, 9001, host="127.0.0.1")
    status = await run_node(options, network=network, screen=captured, inputs=inputs)
    assert status == 1
    assert trio.current_time() - started == pytest.approx(2.5)
    assert captured.lines == [
        "[Server 127.0.0.1:8001 not responding. Is `chatapp serve` running there?]",
        "[Exiting]",
    ]


async def test_end_of_input_ends_the_client_quietly(autojump_clock: trio.testing.MockClock) -> None:
    run = await play(TWO + "hangup user2\nexits user2 0\nwait 1\n")
    assert run.lines("user2") == [TU]
    assert run.status("user2") == 0
    server = run.cluster.server
    assert server is not None and isinstance(server.protocol, ServerProtocol)
    assert server.protocol.clients["user2"].online  # a silent leave: no dereg


# --- a partition, with the memory network's own switch ------------------------------------


def address(cluster: Cluster, name: str) -> Address:
    if name == SERVER:
        assert cluster.server_addr is not None
        return cluster.server_addr
    node = cluster.clients[name].node
    assert node is not None
    return node.endpoint.local_address


def cut(a: str, b: str) -> Callable[[Cluster, MemoryNetwork], None]:
    def action(cluster: Cluster, network: MemoryNetwork) -> None:
        x, y = address(cluster, a), address(cluster, b)
        network.partitions |= {(x, y), (y, x)}

    return action


def heal(cluster: Cluster, network: MemoryNetwork) -> None:
    network.partitions.clear()


async def test_a_client_cut_off_from_the_server_gets_what_it_missed_when_it_speaks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    run = await play(
        [
            THREE,
            cut("user2", SERVER),
            """
type user1 send_all hello guys
expect user1 [Message received by the server.]
expect user3 Channel_Message user1 : hello guys
expect user1 [Client Table Updated]
expect user3 [Client Table Updated]
""",
            heal,
            # peers still reach it directly while the server thinks it is offline
            """
type user3 send user2 are you there?
expect user2 user3 : are you there?
expect user3 [Message has been received by user2.]
type user2 send_all back again
expect user2 [You have message]
expect user2 ({time}) Channel_Message user1 : hello guys
expect user1 Channel_Message user2 : back again
wait 5
""",
        ]
    )
    typed = run.at("user1", "<typed> send_all hello guys")
    tables = [t for t, who, line in run.timeline if who == "user1" and line == TU and t > typed]
    assert tables[0] == pytest.approx(typed + 0.5)
    assert_lines(
        without_tables(run.lines("user2")),
        [
            "user3 : are you there?",
            "[You have message]",
            "({time}) Channel_Message user1 : hello guys",
            "[Message received by the server.]",
        ],
    )
    server = run.cluster.server
    assert server is not None and isinstance(server.protocol, ServerProtocol)
    assert server.protocol.clients["user2"].online
    assert server.protocol.mailbox == {}
    assert run.cluster.clients["user1"].node.protocol.table["user2"].online  # type: ignore[union-attr]
