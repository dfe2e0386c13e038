"""Running a real server or client: sockets, the terminal, signals, the database."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable

import trio

from chatapp.launch import ClientOptions, ServerOptions, StartupError, run_node
from chatapp.node import BadInput, Input, LogSink, Signal, TerminalScreen
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
    log = LogSink(sys.stdout, level=options.log_level)
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
            log.end_line()  # the terminal echoed ^C where the next log line would start
        reason = f" ({_SIGNAL_NAMES.get(stopped_by[0], 'signal')})" if stopped_by else ""
        if listened:
            log(Log(f"server stopped{reason}"))
    return 0


async def run_client(options: ClientOptions, argv: list[str]) -> int:
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:  # as in run_server
        return await _run_client(options, argv, signals)


async def _run_client(options: ClientOptions, argv: list[str], signals: AsyncIterator[int]) -> int:
    log = LogSink(sys.stderr if options.verbose else None, level="debug")
    send_input, receive_input = trio.open_memory_channel[Input](16)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_stdin, send_input.clone())
        nursery.start_soon(_stop_on_signals, signals, None, send_input)
        status = await run_node(
            options, make_screen=TerminalScreen, log=log, inputs=receive_input, argv=argv
        )
        nursery.cancel_scope.cancel()
    return status


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
    """Lines from standard input, until its end or until the node stops taking them (it
    exited with lines still unread: ``exit`` in the middle of a piped script)."""
    async with inputs:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await _send_lines(inputs)


async def _send_lines(inputs: trio.MemorySendChannel[Input]) -> None:
    """Read with os.read in a thread: the terminal stays blocking (so stdout does too),
    and no Python-level lock is held at exit."""
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
