"""Table deltas on the Trio runtime, in virtual time, over the in-memory network:
a storm of joins, a server restart (a new epoch), and property tests where, with
10% loss, duplication and reordering (and, in one, a database whose commits fail at
random), every client ends with the server's table.
"""

from __future__ import annotations

import errno
import os
import random
from dataclasses import dataclass, field

import trio
import trio.testing
from _harness import VirtualClient, VirtualServer, start_client, start_server
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from chatapp import screen
from chatapp.protocol.changes import Change, Presence
from chatapp.protocol.client import ClientState
from chatapp.store import MemoryStore
from chatapp.testing import Faults, MemoryNetwork
from chatapp.trace import NullRecorder
from chatapp.wire import Address, Table, TableDelta, TableEntry

SERVER = ("127.0.0.1", 8001)
TU = screen.TABLE_UPDATED


def _address(index: int) -> tuple[str, int]:
    return ("127.0.0.1", 9000 + index)


def server_table(server: VirtualServer) -> dict[str, TableEntry]:
    return {name: record.entry() for name, record in server.protocol.clients.items()}


def holds_the_servers_table(client: VirtualClient, server: VirtualServer) -> bool:
    roster = server.protocol.roster
    copy = client.protocol.copy
    return (copy.epoch, copy.version) == (roster.epoch, roster.version) and (
        client.protocol.table == server_table(server)
    )


async def test_a_storm_of_joins_ends_with_every_client_holding_the_servers_table(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork(Faults(max_delay=0.002), seed=3)
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, network, SERVER)
        clients = [
            await start_client(nursery, network, f"user{i}", _address(i), SERVER) for i in range(40)
        ]  # all started at once: their registrations cross the server's deltas
        for client in clients:
            await client.idle()
        await trio.sleep(5)
        for client in clients:
            assert holds_the_servers_table(client, server), client.name
            # a burst of changes is applied as a few updates, not one per join
            assert 1 <= client.lines.count(TU) <= 8, (client.name, client.lines.count(TU))
        assert all(record.online for record in server.protocol.clients.values())
        nursery.cancel_scope.cancel()


async def test_after_a_restart_every_client_gets_the_new_epochs_whole_table_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    store = MemoryStore()
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, network, SERVER, store=store, epoch=1)
        clients = [
            await start_client(nursery, network, f"user{i}", _address(i), SERVER) for i in range(3)
        ]
        for client in clients:
            await client.idle()
        await clients[2].type("dereg user2")
        await clients[2].idle()
        await server.stop()
        marks = [len(client.lines) for client in clients]

        server = await start_server(nursery, network, SERVER, store=store, epoch=2)
        await trio.sleep(3)
        for client, mark in zip(clients[:2], marks, strict=False):
            assert client.lines[mark:] == [TU]
            assert holds_the_servers_table(client, server)
            assert client.protocol.copy.epoch == 2
        assert clients[2].lines[marks[2] :] == []  # offline: nothing is sent to it

        await clients[1].type("dereg user1")  # and deltas of the new epoch follow
        await trio.sleep(1)
        assert clients[0].lines[marks[0] :] == [TU, TU]
        assert holds_the_servers_table(clients[0], server)
        nursery.cancel_scope.cancel()


# --- every client ends with the server's table ------------------------------------------------


@dataclass(frozen=True)
class Step:
    who: int
    kind: str  # "toggle" (dereg when online, reg when offline) | "join" | "leave"
    pause: float


@dataclass(frozen=True)
class Churn:
    seed: int
    clients: int
    steps: tuple[Step, ...]


churns = st.integers(3, 7).flatmap(
    lambda n: st.builds(
        Churn,
        seed=st.integers(0, 2**32 - 1),
        clients=st.just(n),
        steps=st.lists(
            st.builds(
                Step,
                who=st.integers(0, 9),
                kind=st.sampled_from(["toggle", "toggle", "join", "leave"]),
                pause=st.sampled_from([0.0, 0.01, 0.2, 0.6, 3.0]),
            ),
            max_size=12,
        ).map(tuple),
    )
)


class FlakyStore(MemoryStore):
    """A store whose commits fail at random (one in four) until it is ``steady``."""

    def __init__(self, seed: int) -> None:
        super().__init__(key=b"K" * 32, origin="o1")
        self.random = random.Random(seed)
        self.steady = False
        self.failed = 0

    async def commit(self, changes: list[Change]) -> None:
        await trio.lowlevel.checkpoint()
        if not self.steady and self.random.random() < 0.25:
            self.failed += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        await super().commit(changes)

    def table(self) -> dict[str, TableEntry]:
        return {record.name: record.entry() for record in self.load().clients}


@dataclass
class TableWatch(NullRecorder):
    """Sees every datagram the server sends: each part of a table or a delta, the first
    time it goes to an address, must say what the database holds (never a change that
    was rolled back). A retry repeats what was true when it was first sent."""

    store: FlakyStore
    seen: set[tuple[Address, str]] = field(default_factory=set)
    wrong: list[str] = field(default_factory=list)

    def sent(self, node: str, local: Address, to: Address, data: bytes, message: object) -> None:
        if not isinstance(message, Table | TableDelta) or (to, message.id) in self.seen:
            return
        self.seen.add((to, message.id))
        held = self.store.table()
        for entry in message.entries:
            if held.get(entry.name) != entry:
                self.wrong.append(f"{message!r} to {to}: {entry} (database: {held})")
        for name in message.gone if isinstance(message, TableDelta) else []:
            if name in held:
                self.wrong.append(f"{message!r} to {to}: {name} gone (database: {held})")


async def _churn(
    churn: Churn, store: FlakyStore | None = None
) -> tuple[VirtualServer, list[VirtualClient], set[str]]:
    """Clients join, go offline and back, and leave without a word, on a network that
    loses 10% of datagrams, duplicates 10% and delays (so reorders) them, and with
    ``store`` whose commits may fail; then the loss (and the failures) stop and every
    running client speaks to the server once."""
    network = MemoryNetwork(Faults(loss=0.1, duplicate=0.1, max_delay=0.05), seed=churn.seed)
    clients: list[VirtualClient] = []
    async with trio.open_nursery() as nursery:
        server = await start_server(nursery, network, SERVER, store=store)
        if store is not None:
            server.node.recorder = TableWatch(store)

        async def join(index: int) -> None:
            name = f"u{index}"
            clients.append(await start_client(nursery, network, name, _address(index), SERVER))

        for index in range(churn.clients):
            await join(index)
        for step in churn.steps:
            await trio.sleep(step.pause)
            running = [c for c in clients if c.alive]
            if step.kind == "join" and len(clients) < 10:
                await join(len(clients))
            elif step.kind == "leave" and len(running) > 1:
                leaving = running[step.who % len(running)]
                leaving.node.stop()  # a silent leave
                await leaving.done.wait()
            elif running and step.kind == "toggle":
                client = running[step.who % len(running)]
                await client.idle()
                state = client.protocol.state
                if state in (ClientState.ONLINE, ClientState.OFFLINE):
                    verb = "reg" if state is ClientState.OFFLINE else "dereg"
                    await client.type(f"{verb} {client.name}")
        network.faults = Faults()
        if store is not None:
            store.steady = True
        await trio.sleep(30)  # every retry and probe runs its course
        for client in clients:
            await client.idle()
            if client.alive and client.protocol.state is ClientState.OFFLINE:
                await client.type(f"reg {client.name}")
            elif client.alive:
                await client.type("send nobody_here ping")  # contact brings it back
        await trio.sleep(10)
        running = {client.name for client in clients if client.alive}
        nursery.cancel_scope.cancel()
    return server, clients, running


def _settings() -> settings:
    examples = int(os.environ.get("CHATAPP_TABLE_EXAMPLES", "100"))
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize="CHATAPP_TABLE_EXAMPLES" not in os.environ,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


@_settings()
@given(churns)
def test_with_loss_duplication_and_reordering_every_client_ends_with_the_servers_table(
    churn: Churn,
) -> None:
    note(f"failing churn: {churn!r}")
    clock = trio.testing.MockClock(autojump_threshold=0)
    server, clients, running = trio.run(_churn, churn, clock=clock)
    records = server.protocol.clients
    for client in clients:
        note(f"{client.name}: {client.lines}")
        if client.name not in running:
            continue
        assert records[client.name].presence is Presence.ONLINE, client.name
        assert holds_the_servers_table(client, server), (
            client.name,
            client.protocol.table,
            server_table(server),
        )
        # every update shown once: never more lines than versions made
        assert client.lines.count(TU) <= server.protocol.roster.version


churns_with_failures = st.builds(
    lambda churn, seed: (churn, seed), churns, st.integers(0, 2**32 - 1)
)


@_settings()
@given(churns_with_failures)
def test_with_commits_failing_at_random_no_client_hears_of_a_change_that_was_rolled_back(
    case: tuple[Churn, int],
) -> None:
    churn, seed = case
    note(f"failing churn: {churn!r}, store seed {seed}")
    store = FlakyStore(seed)
    clock = trio.testing.MockClock(autojump_threshold=0)
    server, clients, running = trio.run(_churn, churn, store, clock=clock)
    watch = server.node.recorder
    assert isinstance(watch, TableWatch)
    assert watch.wrong == []
    assert server_table(server) == store.table()  # the server holds what the database does
    for client in clients:
        note(f"{client.name}: {client.lines}")
        if client.name in running:
            assert holds_the_servers_table(client, server), (client.name, client.protocol.table)
