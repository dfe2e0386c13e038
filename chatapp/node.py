"""The Trio layer: runs a protocol state machine against an endpoint.

One nursery per node runs its receive task, its timer task and (for a
client) its input task; the terminal's input line hands typed lines to
``take_input`` from its own task instead. Every handler call and the effects it
returns are carried out under one lock, so effects leave in the order the state machine
produced them, and the changes (``chatapp.protocol.changes``) of a handling are
committed, in one transaction, before anything of it is sent. If the commit fails,
nothing of it is sent and the server's state machine rolls back to what the
database holds.

The receive task reads the socket in batches and asks the node's admission policy
(``chatapp.protocol.admission``) about each datagram before it is decoded.

The timer task sleeps in a cancel scope whose deadline is the earliest ACK
deadline the state machine has: every retry and give-up of every pending
request is driven from there. A request that needs an earlier deadline moves
the scope's deadline rather than waking the task (a wake would cost CPU just
as the request's datagram leaves).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, TypeVar, cast

import trio

from chatapp import screen
from chatapp.net import Admit, Endpoint, Fault, SendFaults
from chatapp.protocol.admission import Admission
from chatapp.protocol.changes import Change
from chatapp.protocol.client import ClientProtocol
from chatapp.protocol.common import Effect, Exit, Log, Received, Send, Show
from chatapp.protocol.inputs import BadInput, ClientInput, Signal
from chatapp.protocol.server import ServerProtocol
from chatapp.store import ServerDisk, Store
from chatapp.trace import NullRecorder, Recorder
from chatapp.wire import Address

T = TypeVar("T")

#: What a client's input channel carries (``chatapp.protocol.inputs``).
Input = ClientInput

__all__ = [
    "BadInput",
    "Input",
    "Node",
    "Screen",
    "Signal",
]


class Screen(Protocol):
    def show(self, line: str) -> None: ...

    def typed(self) -> None: ...

    def close(self) -> None: ...


AnyProtocol = ClientProtocol | ServerProtocol


class Committer(Protocol):
    """Where a node commits its changes: a server's store, a client's state files."""

    #: Whether a commit reaches a disk (worth gathering several changes per commit).
    durable: bool

    async def commit(self, changes: list[Change]) -> None: ...


class _Nowhere:
    """A node that keeps nothing (a test's): a change is a bug."""

    durable = False

    async def commit(self, changes: list[Change]) -> None:
        raise RuntimeError(f"this node has nowhere to keep {changes!r}")


def _admit_all(data: bytes, addr: Address, now: float) -> bool:
    return True


class Node:
    """One client or server: a state machine, an endpoint, and the tasks that drive them."""

    #: Most datagrams handled under one commit: bounds how long the first one's answer
    #: waits for the others' handling.
    GROUP_COMMIT_LIMIT = 64
    #: Most datagrams read from the socket between two turns of the other tasks.
    RECEIVE_BATCH = 256

    def __init__(
        self,
        name: str,
        protocol: AnyProtocol,
        endpoint: Endpoint,
        *,
        screen: Screen | None = None,
        log: Callable[[Log], None] | None = None,
        recorder: Recorder | None = None,
        store: Committer | None = None,
        admission: Admission | None = None,
        started: Mapping[str, object] | None = None,
    ) -> None:
        """``admission`` decides, before decoding, which datagrams are handled at all;
        ``started``: what the trace's start event records besides the node's address
        (the seed of its randomness, what it read from disk)."""
        self.name = name
        self.protocol = protocol
        self.endpoint = endpoint
        self.screen = screen
        self.log = log or (lambda entry: None)
        self.recorder = recorder or NullRecorder()
        self.store: Committer = store or _Nowhere()
        self.started = started or {}
        self.admission = admission
        self._admit: Admit = admission.admit if admission is not None else _admit_all
        self.exit_status: int | None = None
        #: Faults injected where this node sends (tests, scenarios, replays); None: none.
        self.faults: SendFaults | None = None
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()
        # Group commit needs a store worth batching for and an endpoint that can say what
        # is already queued (real UDP); the in-memory network keeps one datagram per event.
        receive_nowait = getattr(endpoint, "receive_nowait", None)
        self._receive_nowait: Callable[[], tuple[bytes, Address]] | None = (
            receive_nowait if self.store.durable else None
        )
        #: Datagrams read and admitted, not yet handled.
        self._queued: collections.deque[tuple[bytes, Address]] = collections.deque()
        self._store_trouble: str | None = None  # why the last commit failed, if it did
        self._store_unread: str | None = None  # why the read after it failed, if it did
        self._trace_failure_said = False
        self._can_shut_out = True
        self._timer = trio.CancelScope()  # the timer task sleeps in it until its deadline
        self._cancel_scope: trio.CancelScope | None = None

    # --- running ------------------------------------------------------------------

    async def run(
        self,
        inputs: trio.MemoryReceiveChannel[Input] | None = None,
        *,
        argv: list[str] | None = None,
        task_status: trio.TaskStatus[Node] = trio.TASK_STATUS_IGNORED,
    ) -> int:
        """Run until the node exits (returns its status) or is cancelled; started (with
        ``nursery.start``) once its tasks run."""
        role = "client" if isinstance(self.protocol, ClientProtocol) else "server"
        local = self.endpoint.local_address
        self.recorder.node_started(self.name, role, argv or [], local, self.started)
        try:
            async with trio.open_nursery() as nursery:
                self._cancel_scope = nursery.cancel_scope
                self._nursery = nursery
                nursery.start_soon(self._receive_loop)
                nursery.start_soon(self._timer_loop)
                if inputs is not None:
                    nursery.start_soon(self._input_loop, inputs)
                task_status.started(self)
                await self._handle(self.protocol.start, cause="start")
        finally:
            status = 0 if self.exit_status is None else self.exit_status
            self.recorder.node_exited(self.name, status)
            if self.screen is not None:
                self.screen.close()
        return status

    def stop(self) -> None:
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def _receive_loop(self) -> None:
        receive_batch = getattr(self.endpoint, "receive_batch", None)
        while True:
            if receive_batch is not None:
                batch = await receive_batch(self._admit, self.RECEIVE_BATCH)
            else:
                batch = await self._receive_one()
            queued = self._queued
            queued.extend(batch)
            while queued:  # group commit (``_gather``) may take some of them first
                data, addr = queued.popleft()
                await self._handle(self._take_first, data, addr, cause="datagram")
            if self.admission is not None and self.admission.dropped:
                self._admission_report(self.admission, trio.current_time())

    def _admission_report(self, admission: Admission, now: float) -> None:
        """What was dropped (once a second), and the floods the kernel is to drop."""
        line = admission.report(now)
        if line is not None:
            self.log(Log(line, "warning", summary=True))
        addresses = admission.shut_out_changed(now)
        shut_out = getattr(self.endpoint, "shut_out", None)
        if addresses is None or shut_out is None or not self._can_shut_out:
            return
        try:
            shut_out(addresses)
        except OSError as exc:
            self._can_shut_out = False
            line = f"floods cannot be shut out at the socket ({exc}): they are read and dropped"
            self.log(Log(line, "warning", summary=True))

    async def _receive_one(self) -> list[tuple[bytes, Address]]:
        """From an endpoint that reads one datagram at a time (the in-memory network)."""
        try:
            data, addr = await self.endpoint.receive()
        except OSError as exc:
            # e.g. an ICMP "port unreachable" reported on a later read: not fatal
            self.log(Log(f"receive failed: {exc}", "debug"))
            return []
        return [(data, addr)] if self._admit(data, addr, trio.current_time()) else []

    def _take_first(self, data: bytes, addr: Address, now: float) -> list[Effect]:
        effects = self._take(data, addr, now)
        if self._receive_nowait is not None and any(isinstance(e, Change) for e in effects):
            effects = self._gather(effects)
        return effects

    def _take(self, data: bytes, addr: Address, now: float) -> list[Effect]:
        """A datagram through the state machine's one entry; what it read is recorded
        before anything it caused."""
        effects = self.protocol.handle_datagram(data, addr, now)
        received = effects[0]
        assert isinstance(received, Received)
        self.recorder.received(self.name, self.endpoint.local_address, addr, data, received)
        return effects[1:]

    def _gather(self, effects: list[Effect]) -> list[Effect]:
        """Group commit: the datagrams already queued behind one that changes the database
        are handled now too, and all their changes go in one transaction before any of
        their answers leave. Committing a change sooner and sending an answer later than
        strictly needed are both safe; one fsync for a burst instead of one per datagram
        is the point (the disk, not the protocol, limits a durable server)."""
        assert self._receive_nowait is not None
        gathered = list(effects)
        read = 1
        now = trio.current_time()
        while read < self.GROUP_COMMIT_LIMIT:
            read += 1
            if self._queued:
                data, addr = self._queued.popleft()  # read and admitted already
            else:
                try:
                    data, addr = self._receive_nowait()
                except (trio.WouldBlock, OSError):
                    break
                if not self._admit(data, addr, now):
                    continue
            gathered += self._take(data, addr, now)
        return gathered  # their changes are committed first, together (``_apply_locked``)

    async def _timer_loop(self) -> None:
        while True:
            deadline = self.protocol.next_deadline()
            self._timer = trio.CancelScope(deadline=math.inf if deadline is None else deadline)
            with self._timer:
                await trio.sleep_forever()
            await self._handle(self.protocol.handle_timer, cause="timer")

    async def _input_loop(self, inputs: trio.MemoryReceiveChannel[Input]) -> None:
        async with inputs:
            async for item in inputs:
                await self.take_input(item)
        await self.take_input(Signal.HANG_UP)

    async def take_input(self, item: Input) -> None:
        """A client's input, handled now in the caller's task. The input channel comes
        here; the terminal's input line calls it directly, so that a typed line goes out
        without a trip through the scheduler (docs/terminal.md)."""
        client = self.protocol
        assert isinstance(client, ClientProtocol)
        self.recorder.typed(self.name, item)
        if self.screen is not None and not isinstance(item, Signal):
            self.screen.typed()
        await self._handle(client.handle_input, item, cause="input")

    async def handle_outside(
        self, read: Callable[[], Awaitable[T]], handler: Callable[[T, float], list[Effect]]
    ) -> None:
        """What came from elsewhere than the node's socket (other servers' changes to a
        shared database): ``read`` it, then hand it to ``handler``, both under the node's
        lock, so that none of the node's own handlings runs in between."""
        async with self._lock:
            value = await read()
            await self._apply_locked(handler(value, trio.current_time()), "outside")

    # --- carrying out effects ---------------------------------------------------------

    async def _handle(
        self, handler: Callable[..., list[Effect]], *args: object, cause: str
    ) -> None:
        # The lock is almost always free: take it without the scheduler trip that
        # ``async with`` costs (the receive loop already yields once per datagram).
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            effects = handler(*args, trio.current_time())
            await self._apply_locked(effects, cause)
        finally:
            self._lock.release()

    async def _apply_locked(self, effects: list[Effect], cause: str) -> None:
        # One transaction for every change of the handling, before anything it sends: a
        # channel message stored for a hundred offline clients is one commit, and no
        # answer leaves before the change it reports is on disk.
        if cause == "timer" and any(isinstance(e, Change | Send | Show | Exit) for e in effects):
            self.recorder.timer_fired(self.name)  # what follows is the timer's
        changes = [effect for effect in effects if isinstance(effect, Change)]
        if changes and not await self._commit(changes, cause):
            effects = await self._roll_back()
        for effect in effects:
            if isinstance(effect, Send):
                await self._send(effect)
            elif isinstance(effect, Show):
                self.recorder.shown(self.name, effect.line)
                if self.screen is not None:
                    self.screen.show(effect.line)
            elif isinstance(effect, Log):
                self.log(effect)
            elif isinstance(effect, Exit):
                self.exit_status = effect.status
                self.stop()
        self.protocol.checkpoint()
        if not self._trace_failure_said and (why := self.recorder.failure()) is not None:
            self._say_trace_stopped(why)
        deadline = self.protocol.next_deadline()
        if deadline is not None and deadline < self._timer.deadline:
            # moved, not woken: the timer task sleeps on until the new deadline
            self._timer.deadline = deadline

    def _say_trace_stopped(self, why: str) -> None:
        """Once: the trace file could not be written (the node itself goes on)."""
        self._trace_failure_said = True
        if self.screen is not None:
            self.screen.show(screen.trace_stopped(why))
        else:
            self.log(Log(f"trace not written ({why}): recording stopped", "warning", True))

    async def _commit(self, changes: list[Change], cause: str) -> bool:
        """Commit ``changes`` (and record them, once committed); False if the database
        failed."""
        try:
            await self.store.commit(changes)
        except Exception as exc:  # sqlite3.Error, OSError (disk full): any failure to persist
            reason = str(exc) or type(exc).__name__
            line = f"database write failed: {reason}. Nothing that needed it was acknowledged"
            # A new reason is always said; the same one again is a warning like any other.
            self.log(Log(line, "warning", summary=reason != self._store_trouble))
            self._store_trouble = reason
            return False
        self.recorder.committed(self.name, changes, cause)
        if self._store_trouble is not None:
            self._store_trouble = None
            self.log(Log("database writes work again"))
        return True

    async def _roll_back(self) -> list[Effect]:
        """After a failed commit: none of the handling's effects leave, and the state
        machine goes back to what its disk holds (a server's database; a client's state
        file, whose marks it remembers). A store across a network (PostgreSQL) is read
        without blocking the loop (its ``load_async``); one that cannot be read either
        gives what the server knows it holds (its ``held``: the server goes on), a local
        file that cannot be read stops the server."""
        protocol = self.protocol
        if isinstance(protocol, ClientProtocol):
            return protocol.rollback(trio.current_time())
        store = cast(Store, self.store)
        load_async: Callable[[], Awaitable[ServerDisk]] | None = getattr(store, "load_async", None)
        try:
            disk = await load_async() if load_async is not None else store.load()
        except Exception as exc:  # a database that can be neither written nor read
            held: Callable[[], ServerDisk] | None = getattr(store, "held", None)
            if held is None:  # a local file: the disk itself is failing
                self.log(Log(f"cannot read the database either ({exc}): stopping", "warning", True))
                self.stop()
                return []
            # A database across a network that does not answer: back to what this server
            # knows it holds; the server goes on, refusing what it cannot store.
            line = f"cannot read the database either ({exc}): back to what it held last"
            self.log(Log(line, "warning", summary=str(exc) != self._store_unread))
            self._store_unread = str(exc)
            disk = held()
        else:
            self._store_unread = None
        return protocol.rollback(disk, trio.current_time())

    async def _send(self, effect: Send) -> None:
        local = self.endpoint.local_address
        self.recorder.sent(self.name, local, effect.addr, effect.data, effect.message)
        if self.faults is not None:
            fault = self.faults.decide(self.name, effect.addr, effect.message)
            if fault is not None:
                await self._send_faulty(effect, fault)
                return
        await self._transmit(effect)

    async def _send_faulty(self, effect: Send, fault: Fault) -> None:
        """An injected fault, recorded, then carried out: the datagram is lost, sent
        twice, or sent later (by the node's nursery, so that the node goes on)."""
        self.recorder.fault(self.name, self.endpoint.local_address, effect.addr, fault)
        if fault.what == "delay" and self._nursery is not None:
            self._nursery.start_soon(self._transmit_later, effect, fault.delay)
        elif fault.what == "dup":
            await self._transmit(effect)
            await self._transmit(effect)

    async def _transmit_later(self, effect: Send, delay: float) -> None:
        await trio.sleep(delay)
        await self._transmit(effect)

    async def _transmit(self, effect: Send) -> None:
        try:
            await self.endpoint.send(effect.data, effect.addr)
        except OSError as exc:
            self.log(Log(f"could not send to {effect.addr[0]}:{effect.addr[1]}: {exc}", "warning"))
