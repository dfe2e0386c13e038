"""A server among several that share one PostgreSQL database: the tasks beside its node.

- The listener: a connection that LISTENs on ``chatapp.pg_store.CHANNEL``. Each
  notification names another server's changelog row; the row's changes go to the
  state machine (``ServerProtocol.handle_shared``), which tells this server's own
  clients what concerns them. After (re)connecting, before anything else, the
  tables are read again (``handle_reload``): PostgreSQL keeps no notifications for
  a listener that was away, and a changelog row that is gone is caught up the same
  way.
- The heartbeat: this server's row in ``servers`` every ``HEARTBEAT_INTERVAL``,
  and a sweep that marks offline the clients of servers whose heartbeat stopped
  (``handle_swept``: they are asked to come here).

A database that does not answer is said once in the log (and again when it
answers); the node itself goes on, refusing what it cannot store. The Trio loop
never waits on the database: the listener waits for its socket with Trio, every
query runs in a worker thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

import psycopg
import trio

from chatapp.node import Node
from chatapp.pg_pool import listen
from chatapp.pg_store import (
    CHANNEL,
    HEARTBEAT_INTERVAL,
    PgStore,
    Snapshot,
    decode_changes,
)
from chatapp.protocol.changes import Change
from chatapp.protocol.common import Effect, Log
from chatapp.protocol.server import ServerProtocol

#: How long the listener waits before it connects again, at first and at most (seconds).
RECONNECT_DELAY = (0.1, 5.0)
#: Changelog rows remembered as already held (those a reload read), at most.
_REMEMBERED = 10_000


class SharedLink:
    """Keeps one server's node in step with the others sharing its database."""

    def __init__(self, store: PgStore, node: Node, log: Callable[[Log], None]) -> None:
        assert isinstance(node.protocol, ServerProtocol)
        self.store = store
        self.node = node
        self.protocol: ServerProtocol = node.protocol
        self.log = log
        self._held: OrderedDict[int, None] = OrderedDict()  # changelog rows a reload read
        self._trouble: dict[str, str] = {}  # task -> the last failure said
        self._listened = False  # the listener's last connection got as far as LISTEN
        #: Times the tables were read again after a (re)connect.
        self.reloads = 0

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._heartbeats)
            nursery.start_soon(self._listen_forever)

    # --- notifications -----------------------------------------------------------------

    async def _listen_forever(self) -> None:
        delay = RECONNECT_DELAY[0]
        while True:
            self._listened = False
            try:
                await listen(self.store.url, [CHANNEL], self._notified, self._listening)
            except (psycopg.Error, OSError) as exc:
                self._failed("listener", f"lost the other servers' changes ({exc}); reconnecting")
            # Soon after a connection that worked; later and later while none does.
            delay = RECONNECT_DELAY[0] if self._listened else min(delay * 2, RECONNECT_DELAY[1])
            await trio.sleep(delay)

    async def _listening(self) -> None:
        self._listened = True
        await self._reload()
        self._works_again("listener")

    async def _reload(self) -> None:
        await self.node.handle_outside(self.store.snapshot, self._reloaded)
        self.reloads += 1

    def _reloaded(self, snapshot: Snapshot, now: float) -> list[Effect]:
        for seq in snapshot.logged:
            self._held[seq] = None
        while len(self._held) > _REMEMBERED:
            self._held.popitem(last=False)
        return self.protocol.handle_reload(snapshot.disk, now)

    async def _notified(self, notifies: list[psycopg.Notify]) -> None:
        seqs = []
        for notify in notifies:
            server, _, number = notify.payload.partition(" ")
            if server != self.store.me and number.isdigit() and int(number) not in self._held:
                seqs.append(int(number))
        if not seqs:
            return
        rows = await self.store.changelog(seqs)
        batches: list[tuple[str, list[Change]]] = []
        try:
            for seq in seqs:  # in the order of the notifications: the order of the commits
                batches.append((rows[seq][0], decode_changes(rows[seq][1])))
        except (KeyError, ValueError) as exc:
            why = "gone" if isinstance(exc, KeyError) else str(exc)
            self.log(Log(f"a changelog row could not be read ({why}): reading the tables"))
            await self._reload()
            return
        for server, changes in batches:
            await self.node.handle_outside(_value(changes), self._shared(server))

    def _shared(self, server: str) -> Callable[[list[Change], float], list[Effect]]:
        """Another server's changes: what the store knows the database holds, and the
        state machine (both under the node's lock, so that they stay alike)."""

        def handle(changes: list[Change], now: float) -> list[Effect]:
            self.store.learned(changes, server)
            return self.protocol.handle_shared(changes, now)

        return handle

    # --- heartbeats ----------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        while True:
            await trio.sleep(HEARTBEAT_INTERVAL)
            try:
                await self.store.beat()
                swept = await self.store.sweep()  # committed: handled like another's changes
                if swept:
                    await self.node.handle_outside(_value(swept), self.protocol.handle_swept)
            except (psycopg.Error, OSError) as exc:
                self._failed("heartbeat", f"cannot record this server's heartbeat ({exc})")
            else:
                self._works_again("heartbeat")

    # --- saying what fails, once -------------------------------------------------------

    def _failed(self, task: str, line: str) -> None:
        if self._trouble.get(task) != line:
            self.log(Log(line, "warning", summary=True))
        self._trouble[task] = line

    def _works_again(self, task: str) -> None:
        if self._trouble.pop(task, None) is not None:
            self.log(Log(f"the database answers again ({task})"))


def _value(changes: list[Change]) -> Callable[[], Awaitable[list[Change]]]:
    async def read() -> list[Change]:
        return changes

    return read


__all__ = ["SharedLink"]
