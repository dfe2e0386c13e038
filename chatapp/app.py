"""Running a real server or client: sockets, the terminal, signals, the database."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import trio

from chatapp import screen as screen_lines
from chatapp import terminal
from chatapp.input_line import InputLine
from chatapp.launch import ClientOptions, ServerOptions, StartupError, run_node
from chatapp.logs import LogSink, end_log_line
from chatapp.node import BadInput, Input, Node, Screen, Signal
from chatapp.protocol.client import COMMANDS, ClientProtocol
from chatapp.protocol.common import Log

#: A typed line longer than this is refused whole rather than read into memory.
MAX_LINE_BYTES = 65536


#: What ends a node cleanly: Ctrl-C, ``kill``, a closed terminal.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def run_server(options: ServerOptions, argv: list[str]) -> int:
    # Signals are caught from the start: one that comes while the server starts up is
    # queued and handled like any other, not left to kill the process or raise.
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        return await _run_server(options, argv, signals)


async def _run_server(options: ServerOptions, argv: list[str], signals: AsyncIterator[int]) -> int:
    log = LogSink("chatapp.server", level=options.log_level)
    stopped_by: list[int] = []
    listened = True
    try:
        async with trio.open_nursery() as nursery:

            def stop(signum: int) -> None:
                stopped_by.append(signum)
                nursery.cancel_scope.cancel()

            nursery.start_soon(_stop_on_signals, signals, stop, None)
            try:
                await run_node(options, log=log, argv=argv)
            except StartupError:
                listened = False  # the error says why; nothing was stopped
                raise
            nursery.cancel_scope.cancel()
    finally:
        if stopped_by and stopped_by[0] == signal.SIGINT:
            end_log_line()  # the terminal echoed ^C where the next log line would start
        reason = f" ({_SIGNAL_NAMES.get(stopped_by[0], 'signal')})" if stopped_by else ""
        if listened:
            log(Log(f"server stopped{reason}"))
    return 0


async def run_client(options: ClientOptions, argv: list[str]) -> int:
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:  # as in run_server
        return await _run_client(options, argv, signals)


async def _run_client(options: ClientOptions, argv: list[str], signals: AsyncIterator[int]) -> int:
    log = LogSink(f"chatapp.client.{options.name}", level="debug" if options.verbose else "off")
    send_input, receive_input = trio.open_memory_channel[Input](16)
    mode = terminal.terminal_mode()
    async with trio.open_nursery() as nursery:

        def open_terminal(node: Node) -> Screen:
            # once the endpoint is bound: a port in use is said before any prompt shows
            screen, read_input = _open_terminal(mode, node, send_input)
            nursery.start_soon(read_input)
            return screen

        nursery.start_soon(_stop_on_signals, signals, None, send_input)
        status = await run_node(
            options, make_screen=open_terminal, log=log, inputs=receive_input, argv=argv
        )
        nursery.cancel_scope.cancel()
    return status


def _open_terminal(
    mode: terminal.Mode, node: Node, inputs: trio.MemorySendChannel[Input]
) -> tuple[Screen, Callable[[], Awaitable[None]]]:
    """The screen and the input task: the input line on a terminal, which hands each
    line to the node itself; plain lines otherwise, through ``inputs`` (see
    chatapp.terminal)."""
    protocol = node.protocol
    assert isinstance(protocol, ClientProtocol)
    if mode is not terminal.Mode.PLAIN:
        try:
            console = InputLine.open(
                COMMANDS,
                lambda: protocol.table,
                dumb=mode is terminal.Mode.DUMB,
                history=terminal.open_history(),
                deliver=node.take_input,
            )
        except OSError:
            pass  # the terminal cannot be opened again: plain lines, as from a pipe
        else:
            return console, console.read_input
    return terminal.PlainScreen(), partial(_read_stdin, inputs.clone())


_SIGNAL_NAMES: dict[int, str] = {
    signal.SIGINT: "Ctrl-C",
    signal.SIGTERM: "SIGTERM",
    signal.SIGHUP: "SIGHUP",
}


async def _stop_on_signals(
    signals: AsyncIterator[int],
    stop: Callable[[int], None] | None,
    inputs: trio.MemorySendChannel[Input] | None,
) -> None:
    """Ctrl-C, SIGTERM and SIGHUP end the node cleanly: a server stops, a client is told."""
    async for signum in signals:
        if inputs is None:
            assert stop is not None
            stop(signum)
            return
        item = Signal.INTERRUPT if signum == signal.SIGINT else Signal.HANG_UP
        with contextlib.suppress(
            trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            inputs.send_nowait(item)


async def _read_stdin(inputs: trio.MemorySendChannel[Input]) -> None:
    """Lines from standard input. Read with os.read in a thread: the terminal stays
    blocking (so stdout does too), and no Python-level lock is held at exit."""
    # The client may exit before its input ends (`exit`, a refused name): what is still
    # coming then has nowhere to go, and that is not an error.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        await _read_lines(inputs, cut_at=_CANONICAL_LINE_MAX if _stdin_is_a_terminal() else None)


#: A terminal in canonical mode (the kernel's line editing) passes at most this many
#: bytes of a line, newline included, and silently drops the rest (Linux's N_TTY).
_CANONICAL_LINE_MAX = 4096


def _stdin_is_a_terminal() -> bool:
    try:
        return os.isatty(0)
    except OSError:
        return False


async def _read_lines(inputs: trio.MemorySendChannel[Input], cut_at: int | None) -> None:
    async with inputs:
        pending = b""
        while True:
            chunk = await trio.to_thread.run_sync(_read_fd0, abandon_on_cancel=True)
            if not chunk:
                if pending:
                    await inputs.send(_decode_line(pending))
                await inputs.send(Signal.HANG_UP)
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if cut_at is not None and len(line) >= cut_at - 1:
                    # as long as the terminal allows: it may have been cut, and a cut
                    # message is never sent
                    await inputs.send(BadInput(screen_lines.CUT_BY_TERMINAL))
                    continue
                await inputs.send(_decode_line(line))
            if len(pending) > MAX_LINE_BYTES:
                await inputs.send(BadInput(f"the line is longer than {MAX_LINE_BYTES} bytes"))
                pending = await _after_this_line()


async def _after_this_line() -> bytes:
    """Skip the rest of an over-long line; what follows it is kept, not lost."""
    while True:
        chunk = await trio.to_thread.run_sync(_read_fd0, abandon_on_cancel=True)
        if not chunk:
            return b""
        if b"\n" in chunk:
            return chunk.split(b"\n", 1)[1]


def _read_fd0() -> bytes:
    try:
        return os.read(0, 65536)
    except OSError:
        return b""


def _decode_line(raw: bytes) -> Input:
    if len(raw) > MAX_LINE_BYTES:
        return BadInput(f"the line is longer than {MAX_LINE_BYTES} bytes")
    try:
        return raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
        return BadInput("it is not UTF-8 text")


__all__ = [
    "ClientOptions",
    "ServerOptions",
    "StartupError",
    "run_client",
    "run_server",
]
