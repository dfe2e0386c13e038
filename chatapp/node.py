"""The Trio layer: runs a protocol state machine against an endpoint.

One nursery per node runs its receive task, its timer task and (for a
client) its input task. Every handler call and the effects it returns are
carried out under one lock, so effects leave in the order the state machine
produced them, and a change (``chatapp.protocol.changes``) is committed before
anything after it is sent.

The timer task waits in a cancel scope, ``trio.move_on_at(deadline)``, for the
earliest ACK deadline the state machine has: every retry and give-up of every
pending request is driven from there.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import ClassVar, Protocol, TextIO

import trio

from chatapp import screen
from chatapp.net import Endpoint
from chatapp.protocol.changes import Change
from chatapp.protocol.client import ClientProtocol
from chatapp.protocol.common import Effect, Exit, Log, Received, Send, Show
from chatapp.protocol.inputs import BadInput, ClientInput, Signal
from chatapp.protocol.server import ServerProtocol
from chatapp.trace import NullRecorder, Recorder
from chatapp.wire import Address

#: What a client's input channel carries (``chatapp.protocol.inputs``).
Input = ClientInput

__all__ = [
    "BadInput",
    "Input",
    "LogSink",
    "Node",
    "Screen",
    "Signal",
    "TerminalScreen",
]


class Screen(Protocol):
    def show(self, line: str) -> None: ...

    def typed(self) -> None: ...

    def close(self) -> None: ...


class TerminalScreen:
    """The client's terminal: every line is shown behind the prompt, and the prompt
    is shown again whenever the client waits for input."""

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out if out is not None else sys.stdout
        self._at_prompt = False
        self._write(screen.PROMPT)
        self._at_prompt = True

    def _write(self, text: str) -> None:
        try:
            self._out.write(text)
            self._out.flush()
        except (OSError, ValueError):
            pass  # the terminal is gone; the node exits on the hang-up that follows

    def show(self, line: str) -> None:
        if line == screen.KEYBOARD_INTERRUPT:
            self._write(line + "\n")
            self._at_prompt = False
            return
        self._write(line + "\n" + screen.PROMPT)
        self._at_prompt = True

    def typed(self) -> None:
        self._write(screen.PROMPT)
        self._at_prompt = True

    def close(self) -> None:
        if self._at_prompt:
            self._write("\n")
            self._at_prompt = False


class LogSink:
    """A node's log: one timestamped line per event, rate-limited for warnings
    so that a flood of bad datagrams cannot fill the screen or the disk."""

    LEVELS: ClassVar[dict[str, int]] = {"debug": 10, "info": 20, "warning": 30}

    def __init__(
        self,
        out: TextIO | None,
        *,
        level: str = "info",
        warnings_per_second: float = 5.0,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out = out
        self._threshold = self.LEVELS[level]
        self._rate = warnings_per_second
        self._allowance = warnings_per_second
        self._last = now()
        self._now = now
        self.suppressed = 0
        self._stamp_second = -1
        self._stamp = ""

    def __call__(self, entry: Log) -> None:
        if self._out is None or self.LEVELS.get(entry.level, 20) < self._threshold:
            return
        if entry.level == "warning" and not self._admit():
            return
        second = int(time.time())
        if second != self._stamp_second:  # strftime once a second, not once per line
            self._stamp_second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        stamp = self._stamp
        suffix = ""
        if self.suppressed and entry.level == "warning":
            suffix = f" ({self.suppressed} similar lines suppressed)"
            self.suppressed = 0
        try:
            self._out.write(f"{stamp} {entry.text}{suffix}\n")
            self._out.flush()
        except (OSError, ValueError):
            pass

    def end_line(self) -> None:
        """End the line the terminal left open (its echo of ``^C``) before the next entry."""
        if self._out is None:
            return
        try:
            if self._out.isatty():
                self._out.write("\n")
                self._out.flush()
        except (OSError, ValueError):
            pass

    def _admit(self) -> bool:
        now = self._now()
        self._allowance = min(self._rate, self._allowance + (now - self._last) * self._rate)
        self._last = now
        if self._allowance >= 1:
            self._allowance -= 1
            return True
        self.suppressed += 1
        return False


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


class Node:
    """One client or server: a state machine, an endpoint, and the tasks that drive them."""

    #: Most datagrams handled under one commit: bounds how long the first one's answer
    #: waits for the others' handling.
    GROUP_COMMIT_LIMIT = 64

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
        started: Mapping[str, object] | None = None,
    ) -> None:
        """``started``: what the trace's start event records besides the node's address
        (the seed of its randomness, what it read from disk)."""
        self.name = name
        self.protocol = protocol
        self.endpoint = endpoint
        self.screen = screen
        self.log = log or (lambda entry: None)
        self.recorder = recorder or NullRecorder()
        self.store: Committer = store or _Nowhere()
        self.started = started or {}
        self.exit_status: int | None = None
        self._lock = trio.Lock()
        # Group commit needs a store worth batching for and an endpoint that can say what
        # is already queued (real UDP); the in-memory network keeps one datagram per event.
        receive_nowait = getattr(endpoint, "receive_nowait", None)
        self._receive_nowait: Callable[[], tuple[bytes, Address]] | None = (
            receive_nowait if self.store.durable else None
        )
        self._timer_changed = trio.Event()
        self._armed_deadline = math.inf
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
                nursery.start_soon(self._receive_loop)
                nursery.start_soon(self._timer_loop)
                if inputs is not None:
                    nursery.start_soon(self._input_loop, inputs)
                task_status.started(self)
                await self._handle(self.protocol.start)
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
        while True:
            try:
                data, addr = await self.endpoint.receive()
            except OSError as exc:
                # e.g. an ICMP "port unreachable" reported on a later read: not fatal
                self.log(Log(f"receive failed: {exc}", "debug"))
                continue
            await self._handle(self._take_first, data, addr)

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
        handled = 1
        while handled < self.GROUP_COMMIT_LIMIT:
            try:
                data, addr = self._receive_nowait()
            except (trio.WouldBlock, OSError):
                break
            gathered += self._take(data, addr, trio.current_time())
            handled += 1
        if handled == 1:
            return effects
        changes: list[Effect] = [e for e in gathered if isinstance(e, Change)]
        return changes + [e for e in gathered if not isinstance(e, Change)]

    async def _timer_loop(self) -> None:
        while True:
            deadline = self.protocol.next_deadline()
            self._armed_deadline = math.inf if deadline is None else deadline
            with trio.move_on_at(self._armed_deadline):
                await self._timer_changed.wait()
                self._timer_changed = trio.Event()
                continue
            await self._handle(self.protocol.handle_timer)

    async def _input_loop(self, inputs: trio.MemoryReceiveChannel[Input]) -> None:
        client = self.protocol
        assert isinstance(client, ClientProtocol)
        async with inputs:
            async for item in inputs:
                self.recorder.typed(self.name, item)
                if self.screen is not None and not isinstance(item, Signal):
                    self.screen.typed()
                await self._handle(client.handle_input, item)
        await self._handle(client.handle_input, Signal.HANG_UP)

    # --- carrying out effects ---------------------------------------------------------

    async def _handle(self, handler: Callable[..., list[Effect]], *args: object) -> None:
        # The lock is almost always free: take it without the scheduler trip that
        # ``async with`` costs (the receive loop already yields once per datagram).
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            effects = handler(*args, trio.current_time())
            await self._apply_locked(effects)
        finally:
            self._lock.release()

    async def _apply_locked(self, effects: list[Effect]) -> None:
        changes: list[Change] = []
        for effect in effects:
            if isinstance(effect, Change):
                changes.append(effect)
                continue
            # Log lines leave nothing outside the node: one transaction covers every change
            # up to the next datagram or screen line (a channel message stored for a hundred
            # offline clients is one commit, not a hundred).
            if changes and not isinstance(effect, Log):
                if not await self._commit(changes):
                    break
                changes = []
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
        if changes:
            await self._commit(changes)
        deadline = self.protocol.next_deadline()
        if deadline is not None and deadline < self._armed_deadline:
            self._timer_changed.set()

    async def _commit(self, changes: list[Change]) -> bool:
        """Commit ``changes``; False if the database failed, and then nothing that depends
        on them (an ACK above all) may leave: the sender retries, or is told it failed."""
        try:
            await self.store.commit(changes)
        except Exception as exc:  # sqlite3.Error, OSError (disk full): any failure to persist
            self.log(
                Log(
                    f"database write failed ({exc}): the answers that needed it were held back",
                    "warning",
                )
            )
            return False
        return True

    async def _send(self, effect: Send) -> None:
        local = self.endpoint.local_address
        self.recorder.sent(self.name, local, effect.addr, effect.data, effect.message)
        try:
            await self.endpoint.send(effect.data, effect.addr)
        except OSError as exc:
            self.log(Log(f"could not send to {effect.addr[0]}:{effect.addr[1]}: {exc}", "warning"))
