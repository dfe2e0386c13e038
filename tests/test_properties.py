"""Nothing lost, nothing twice: properties of whole runs on a lossy virtual network.

Every run is a server and 2-5 clients on the in-memory network, in virtual
time (``MockClock``), with seeded loss (up to 20%), duplication and random
delays (so reordering) on every link. Each client plays its part of a random
schedule of ``send``, ``send_all``, ``dereg`` and ``reg``, typing its next
command once its last one is answered (as a person at a prompt would, and so
that each "received"/"saved" line belongs to one message). Then the loss stops,
every client comes back (``reg``, or any word to the server), and the run must
show:

* every message whose sender was told it was received or saved is shown to
  each of its recipients that is still running exactly once;
* no client shows any message twice, or one that was not sent to it;
* every node is still running or left by the protocol's own rule (5 tries
  unanswered), never by an exception;
* every client still running holds the server's table, at its current version.

A failing example is printed by hypothesis as a ``Run(...)``; paste it into
``REGRESSIONS`` to keep it. ``CHATAPP_PROPERTY_PROFILE=long`` (and
``CHATAPP_PROPERTY_EXAMPLES=N``) explores longer and at random.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import trio
import trio.testing
from _harness import VirtualClient, VirtualServer, shown_messages, start_client, start_server
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st

from chatapp import screen
from chatapp.protocol.changes import Presence
from chatapp.protocol.client import ClientState
from chatapp.testing import Faults, MemoryNetwork

SERVER = ("127.0.0.1", 8001)
NAMES = ("u0", "u1", "u2", "u3", "u4")


def _address(index: int) -> tuple[str, int]:
    return ("127.0.0.1", 9000 + index)


# --- runs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    who: int
    kind: str  # "send" | "send_all" | "toggle" (dereg when online, reg when offline)
    to: int = 0
    pause: float = 0.0  # seconds before the command is typed


@dataclass(frozen=True)
class Run:
    seed: int
    clients: int
    loss: float
    duplicate: float
    max_delay: float
    actions: tuple[Action, ...]


def _actions(clients: int) -> st.SearchStrategy[tuple[Action, ...]]:
    action = st.builds(
        Action,
        who=st.integers(0, clients - 1),
        kind=st.sampled_from(["send", "send", "send_all", "toggle"]),
        to=st.integers(0, clients - 1),
        pause=st.sampled_from([0.0, 0.05, 0.3, 0.5, 0.6, 1.5]),
    )
    return st.lists(action, max_size=30).map(tuple)


runs = st.integers(2, 5).flatmap(
    lambda n: st.builds(
        Run,
        seed=st.integers(0, 2**32 - 1),
        clients=st.just(n),
        loss=st.sampled_from([0.0, 0.05, 0.1, 0.2]),
        duplicate=st.sampled_from([0.0, 0.1, 0.3]),
        max_delay=st.sampled_from([0.0, 0.05, 0.3]),
        actions=_actions(n),
    )
)

#: Runs that once failed, kept so that they are played on every test run.
REGRESSIONS: list[Run] = [
    # Found by this test: a channel message that reached a client before its first
    # table (lost) was ACKed but dropped, its sender's key unknown. Fixed: a channel
    # delivery names its sender's key, as relays and batches do.
    Run(
        seed=1980,
        clients=2,
        loss=0.2,
        duplicate=0.0,
        max_delay=0.3,
        actions=(
            Action(who=1, kind="send_all", to=0, pause=0.0),
            Action(who=1, kind="toggle", to=0, pause=0.3),
        ),
    ),
    # Both found by this test: a dereg or reg datagram that arrived again late (a retry,
    # a duplicate) was carried out again, so a client that had come back with reg was
    # taken offline for good. Fixed: the server answers a repeated request id without
    # redoing it.
    Run(
        seed=1179,
        clients=2,
        loss=0.0,
        duplicate=0.3,
        max_delay=0.3,
        actions=(Action(0, "send", to=0), Action(0, "toggle")),
    ),
    Run(
        seed=1980,
        clients=2,
        loss=0.2,
        duplicate=0.0,
        max_delay=0.3,
        actions=(Action(1, "send_all"), Action(1, "toggle", pause=0.3)),
    ),
]


# --- playing a run ------------------------------------------------------------------------


@dataclass
class Sent:
    text: str
    sender: str
    recipients: tuple[str, ...]
    acknowledged: bool = False


@dataclass
class Outcome:
    server: VirtualServer
    clients: list[VirtualClient]
    sent: dict[str, Sent] = field(default_factory=dict)
    converged: bool = False
    running: set[str] = field(default_factory=set)  # clients still running at the end


async def _act(client: VirtualClient, action: Action, number: int, outcome: Outcome) -> None:
    names = [c.name for c in outcome.clients]
    state = client.protocol.state
    if action.kind == "toggle" or state is ClientState.OFFLINE:
        verb = "reg" if state is ClientState.OFFLINE else "dereg"
        await client.type(f"{verb} {client.name}")
        await client.idle()
        return
    text = f"m{number}"
    if action.kind == "send":
        to = names[action.to]
        sent = Sent(text, client.name, (to,))
        command = f"send {to} {text}"
        told = (screen.received_by(to), screen.SAVED_BY_SERVER)
    else:
        others = tuple(name for name in names if name != client.name)
        sent = Sent(text, client.name, others)
        command = f"send_all {text}"
        told = (screen.CHANNEL_ACKED,)
    outcome.sent[text] = sent
    start = len(client.lines)
    await client.type(command)
    await client.idle()
    sent.acknowledged = any(line in told for line in client.lines[start:])


async def _play_part(
    client: VirtualClient, part: list[tuple[int, Action]], outcome: Outcome
) -> None:
    for number, action in part:
        await trio.sleep(action.pause)
        await client.idle()
        if not client.alive:
            return
        await _act(client, action, number, outcome)


def _converged(outcome: Outcome) -> bool:
    server = outcome.server.protocol
    for client in outcome.clients:
        if not client.alive:
            continue
        record = server.clients.get(client.name)
        if record is None or record.presence is not Presence.ONLINE:
            return False
        if server.mailbox.get(client.name):
            return False
        if client.protocol.state is not ClientState.ONLINE:
            return False
    return server.next_deadline() is None


async def _bring_everyone_back(outcome: Outcome) -> None:
    """Each running client speaks to the server until it is online with an empty mailbox."""
    for _ in range(5):
        for client in outcome.clients:
            await client.idle()
            if not client.alive:
                continue
            if client.protocol.state is ClientState.OFFLINE:
                await client.type(f"reg {client.name}")
            else:  # any datagram from its address is contact; a lookup changes nothing
                await client.type("send nobody_here ping")
            await client.idle()
        await trio.sleep(10)  # the server's retries, tables and mailboxes run their course
        if _converged(outcome):
            outcome.converged = True
            return


async def play(run: Run) -> Outcome:
    network = MemoryNetwork(
        Faults(loss=run.loss, duplicate=run.duplicate, max_delay=run.max_delay), seed=run.seed
    )
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, network, SERVER)
        clients = [
            await start_client(nursery, network, NAMES[i], _address(i), SERVER)
            for i in range(run.clients)
        ]
        outcome = Outcome(server, clients)
        for client in clients:
            await client.idle()
        async with trio.open_nursery() as players:
            for index, client in enumerate(clients):
                part = [(n, a) for n, a in enumerate(run.actions) if a.who == index]
                players.start_soon(_play_part, client, part, outcome)
        network.faults = Faults(duplicate=run.duplicate, max_delay=run.max_delay)
        await _bring_everyone_back(outcome)
        assert not server.done.is_set(), "the server stopped"
        outcome.running = {client.name for client in clients if client.alive}
        nursery.cancel_scope.cancel()
    return outcome


def check(outcome: Outcome) -> None:
    for client in outcome.clients:
        note(f"{client.name} (status {client.status}): {client.lines}")
        if client.name not in outcome.running:  # only the protocol's own give-up ends one
            assert client.status == 1 and client.lines[-1] == screen.EXITING, client.lines
        shown = shown_messages(client.lines)
        twice = [text for text, count in Counter(t for _, t in shown).items() if count > 1]
        assert not twice, f"{client.name} showed {twice} more than once"
        for sender, text in shown:
            sent = outcome.sent.get(text)
            assert sent is not None and sent.sender == sender, f"{client.name} showed {text} unsent"
            assert client.name in sent.recipients, f"{client.name} showed {text} meant for others"
    assert outcome.converged, "the clients still running did not all get back online"
    server = outcome.server.protocol
    table = {name: record.entry() for name, record in server.clients.items()}
    for client in outcome.clients:
        if client.name in outcome.running:  # each ends with the server's table
            copy = client.protocol.copy
            assert (copy.epoch, copy.version) == (server.roster.epoch, server.roster.version)
            assert client.protocol.table == table, client.name
    by_name = {client.name: client for client in outcome.clients}
    for sent in outcome.sent.values():
        if not sent.acknowledged:
            continue
        for name in sent.recipients:
            if name in outcome.running:
                texts = [text for _, text in shown_messages(by_name[name].lines)]
                assert texts.count(sent.text) == 1, f"{name} did not show {sent.text} ({sent})"


def _settings() -> settings:
    if os.environ.get("CHATAPP_PROPERTY_PROFILE") == "long":
        examples = int(os.environ.get("CHATAPP_PROPERTY_EXAMPLES", "1000"))
        return settings(max_examples=examples, deadline=None, print_blob=True)
    # In CI: the same examples on every run, so the outcome does not depend on luck.
    return settings(
        max_examples=600,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


def _with_regressions(test):  # type: ignore[no-untyped-def]
    for run in REGRESSIONS:
        test = example(run)(test)
    return test


@_settings()
@_with_regressions
@given(runs)
def test_every_acknowledged_message_is_shown_exactly_once(run: Run) -> None:
    note(f"failing run: {run!r}")
    outcome = trio.run(play, run, clock=trio.testing.MockClock(autojump_threshold=0))
    check(outcome)


# --- presence by contact ---------------------------------------------------------------------


async def test_a_client_marked_offline_for_silence_is_back_when_it_speaks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    x_addr = _address(0)
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, network, SERVER)
        x = await start_client(nursery, network, "user1", x_addr, SERVER)
        y = await start_client(nursery, network, "user2", _address(1), SERVER)
        z = await start_client(nursery, network, "user3", _address(2), SERVER)
        for client in (x, y, z):
            await client.idle()
        # user1 hears nothing for a while (a cable pulled out): it cannot ACK anything.
        network.partitions |= {(SERVER, x_addr), (_address(1), x_addr), (_address(2), x_addr)}
        await y.type("send_all hello guys")
        await y.type("send user1 are you there?")
        await y.idle()
        await trio.sleep(3)
        assert server.protocol.clients["user1"].presence is Presence.SILENT
        stored = [
            item.text or x.protocol.codec.open_sealed(item.sealed)[1].text  # type: ignore[attr-defined]
            for item in server.protocol.mailbox["user1"]
        ]
        assert stored == ["hello guys", "are you there?"]
        assert b"are you there" not in server.protocol.mailbox["user1"][1].sealed
        assert screen.SAVED_BY_SERVER in y.lines
        assert not y.protocol.table["user1"].online  # the others were told
        assert not z.protocol.table["user1"].online

        network.partitions.clear()
        start = len(x.lines)
        await x.type("send_all I am back")  # any word to the server will do
        await x.idle()
        await trio.sleep(3)
        shown = x.lines[start:]
        assert screen.YOU_HAVE_MESSAGE in shown
        assert [m[1] for m in shown_messages(shown)] == ["hello guys", "are you there?"]
        assert server.protocol.clients["user1"].presence is Presence.ONLINE
        assert "user1" not in server.protocol.mailbox  # ACKed, so deleted
        assert y.protocol.table["user1"].online and z.protocol.table["user1"].online
        assert "Channel_Message user1 : I am back" in z.lines
        nursery.cancel_scope.cancel()
