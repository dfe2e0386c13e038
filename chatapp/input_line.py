"""The input line (``PROMPT`` and ``DUMB`` modes; chatapp.terminal says when), run in
Trio's own thread: the keys are read, the line sent and the answer drawn by the same
loop that runs the node, with no hop between threads on the way.

- The terminal is opened a second time (``os.ttyname(0)``), non-blocking. That new
  open file description is the only one that is non-blocking: stdin and stdout keep
  theirs as they were (making fd 0 non-blocking would make stdout so too, as they
  share one). It is put in a raw-ish mode: no line editing and no echo by the
  terminal, but Ctrl-C stays a signal, which Trio's signal handling turns into the
  client's interrupt. The mode is given back on every way out: ``close`` (the node's
  end), the ``finally`` of ``read_input``, and ``atexit`` for anything else.
- Keys are decoded by prompt_toolkit's own VT100 parser and edited by
  chatapp.line_editor; chatapp.line_views says what to draw. Nothing of
  prompt_toolkit's drawing (its ``Application``, its renderer) is used.
- Writes never block Trio: what the terminal cannot take at once (a slow or stopped
  terminal) waits in memory, in order, and a task writes it when it can.

Why this design, and what it measured against the thread it replaces:
docs/terminal.md.
"""

from __future__ import annotations

import atexit
import codecs
import contextlib
import errno
import math
import os
import select
import signal
import sys
import termios
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio
from prompt_toolkit.history import History
from prompt_toolkit.input.vt100_parser import Vt100Parser
from prompt_toolkit.key_binding import KeyPress
from prompt_toolkit.keys import Keys

from chatapp.line_editor import (
    MAX_LINE_CHARS,
    Accepted,
    Choices,
    EndOfInput,
    LineEditor,
    Outcome,
)
from chatapp.line_views import CursorView, DumbView, View
from chatapp.node import BadInput, Input, Signal
from chatapp.terminal import CommandCompleter

#: A lone Escape is told from the start of a key's escape sequence by waiting this long
#: for the rest (a terminal sends a sequence in one write).
ESCAPE_SECONDS = 0.1
#: After Enter, the screen waits this long at most for the answer before the typed
#: line's end and the new prompt are written (see Output); the history file is written
#: this long after Enter, in a worker thread.
HOLD_SECONDS = 0.05
#: At exit, output the terminal has not taken yet gets this long.
CLOSE_SECONDS = 2.0
#: Read at most this much before working on it (a long paste is drawn once, not per read).
READ_SIZE = 65536
READ_LIMIT = 4 * READ_SIZE

BRACKETED_PASTE_ON = b"\x1b[?2004h"
BRACKETED_PASTE_OFF = b"\x1b[?2004l"


class Terminal:
    """The terminal opened a second time, non-blocking, in the input line's mode."""

    def __init__(self, fd: int, saved: list[Any], bracketed_paste: bool) -> None:
        self.fd = fd
        self._saved = saved
        self._bracketed_paste = bracketed_paste
        self._restored = False

    @classmethod
    def open(cls, *, bracketed_paste: bool) -> Terminal:
        """OSError if stdin and stdout are not one terminal that can be opened again."""
        path = os.ttyname(0)
        if os.ttyname(1) != path:
            raise OSError(errno.ENOTTY, "standard input and output are different terminals")
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            terminal = cls(fd, termios.tcgetattr(fd), bracketed_paste)
            termios.tcsetattr(fd, termios.TCSANOW, _input_line_mode(fd, terminal._saved))
        except termios.error as exc:
            os.close(fd)
            raise OSError(exc.args[0], f"cannot set the terminal's mode: {exc}") from None
        atexit.register(terminal.restore)
        if bracketed_paste:  # a paste comes marked: its tabs and escapes are text
            with contextlib.suppress(OSError):
                os.write(fd, BRACKETED_PASTE_ON)
        return terminal

    def columns(self) -> int:
        try:
            return os.get_terminal_size(self.fd).columns or 80
        except OSError:
            return 80

    def read(self) -> bytes | None:
        """What has been typed (or pasted) so far; None: nothing yet; b"": the end."""
        chunks: list[bytes] = []
        size = 0
        while size < READ_LIMIT:
            try:
                chunk = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError:  # EIO: the terminal is gone
                chunk = b""
            if not chunk:
                return b"".join(chunks)  # the end comes again on the next read
            chunks.append(chunk)
            size += len(chunk)
            if len(chunk) < READ_SIZE:
                break  # that was all (a read less than asked for does not block)
        return b"".join(chunks) if chunks else None

    def restore(self) -> None:
        """The terminal as it was; idempotent (close, then atexit, may both come)."""
        if self._restored:
            return
        self._restored = True
        atexit.unregister(self.restore)
        with contextlib.suppress(OSError, termios.error):
            if self._bracketed_paste:
                os.write(self.fd, BRACKETED_PASTE_OFF)
            termios.tcsetattr(self.fd, termios.TCSANOW, self._saved)
        with contextlib.suppress(RuntimeError):  # RuntimeError: at exit, Trio is done
            trio.lowlevel.notify_closing(self.fd)  # a task waiting on it wakes up
        os.close(self.fd)


def _input_line_mode(fd: int, saved: list[Any]) -> list[Any]:
    """Keys one by one, no echo, the end of line as typed (Enter is \\r, Ctrl-J is \\n),
    Ctrl-S/Q/V/O as keys. Ctrl-C stays a signal; Ctrl-\\ and Ctrl-Z are keys (a core dump
    or a stop would leave the terminal in this mode). NOFLSH: a Ctrl-C does not throw
    away the output the terminal has not shown yet."""
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = saved
    iflag &= ~(termios.IXON | termios.IXOFF | termios.ICRNL | termios.INLCR | termios.IGNCR)
    lflag &= ~(termios.ICANON | termios.ECHO | termios.ECHONL | termios.IEXTEN)
    lflag |= termios.ISIG | termios.NOFLSH
    try:
        disabled = bytes([os.fpathconf(fd, "PC_VDISABLE")])
    except (OSError, ValueError):
        disabled = b"\x00"
    cc = list(cc)
    cc[termios.VMIN], cc[termios.VTIME] = 1, 0
    cc[termios.VQUIT] = cc[termios.VSUSP] = disabled
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


class Output:
    """Writes to the terminal that never block Trio: what the terminal cannot take now
    waits here, in order, and ``write_pending_forever`` writes it when it can.

    ``hold`` keeps text back for a moment: after Enter, the typed line's end and the new
    prompt wait (at most ``HOLD_SECONDS``) for the answer, and go out with it in one
    write. A write to the terminal wakes whatever reads it (the terminal emulator),
    and on a busy machine that costs the answer time (docs/terminal.md)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._held = ""
        self._pending = bytearray()
        self._more = trio.Event()
        self._gone = False  # the terminal is gone or closed: nothing more is written

    def hold(self, text: str) -> None:
        self._held += text

    def release(self) -> None:
        """What is held, now."""
        held, self._held = self._held, ""
        self.write(held)

    def write(self, text: str) -> None:
        """``text`` after what is held; nothing at all if ``text`` is empty."""
        if not text:
            return
        if self._held:
            text, self._held = self._held + text, ""
        if self._gone:
            return
        data = text.encode("utf-8", "replace")
        if self._pending:
            self._pending += data
            return
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            written = 0
        except OSError:
            self._gone = True
            return
        if written < len(data):
            self._pending += data[written:]
            self._more.set()

    def _write_pending(self) -> None:
        try:
            written = os.write(self._fd, self._pending)
        except BlockingIOError:
            return
        except OSError:
            self._gone = True
            self._pending.clear()
            return
        del self._pending[:written]

    async def write_pending_forever(self) -> None:
        try:
            while True:
                await self._more.wait()
                self._more = trio.Event()
                while self._pending and not self._gone:
                    await trio.lowlevel.wait_writable(self._fd)
                    self._write_pending()
        except trio.ClosedResourceError:
            return  # closed: close() wrote what it could

    def close(self, seconds: float) -> None:
        """Write the rest, waiting (blocking, at most ``seconds``) for the terminal to
        take it; then write nothing more."""
        self.release()
        deadline = time.monotonic() + seconds
        while self._pending and not self._gone:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            select.select([], [self._fd], [], left)
            self._write_pending()
        self._gone = True


class InputLine:
    """The input line and the screen above it: the node's screen, and its input task
    (``read_input``). Every method runs in Trio's thread."""

    def __init__(
        self,
        terminal: Terminal,
        editor: LineEditor,
        view: View,
        history: History,
        deliver: Callable[[Input], Awaitable[None]],
    ) -> None:
        self._terminal = terminal
        self._output = Output(terminal.fd)
        self._editor = editor
        self._view = view
        self._history = history
        self._deliver = deliver
        self._to_remember: list[str] = []
        # After Enter: when the held output goes out and the history file is written,
        # unless the answer came first (a deadline, so that setting it wakes no task)
        self._after_enter = trio.CancelScope()
        self._accepted: list[str] = []  # Enter was pressed on these: not drawn yet
        self._keys: list[KeyPress | str] = []  # str: characters typed, no key among them
        self._closed = False
        self._output.write(view.start())

    @classmethod
    def open(
        cls,
        commands: Iterable[str],
        names: Callable[[], Iterable[str]],
        *,
        dumb: bool,
        history: History,
        deliver: Callable[[Input], Awaitable[None]],
    ) -> InputLine:
        """The input line on the terminal of stdin and stdout (OSError: none to open).
        Each typed line (and Ctrl-D, and the end of input) goes to ``deliver``."""
        terminal = Terminal.open(bracketed_paste=not dumb)
        try:
            view: View = DumbView(terminal.columns()) if dumb else CursorView(terminal.columns())
            editor = LineEditor(CommandCompleter(commands, names))
            return cls(terminal, editor, view, history, deliver)
        except BaseException:
            terminal.restore()
            raise

    # --- the node's screen ----------------------------------------------------------------

    def _screen(self) -> View:
        """The view, once the lines accepted since it last drew are drawn: as typed, each
        on a line of its own (held: see Output)."""
        while self._accepted:
            self._output.hold(self._view.accept(self._accepted.pop(0)))
        return self._view

    def show(self, line: str) -> None:
        if self._closed:  # the input line has ended
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            return
        self._output.write(self._screen().show(line, *self._editor.view()))

    def typed(self) -> None:
        pass  # the typed line is on the screen already

    def close(self) -> None:
        """The input line ends; the terminal is given back as it was. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._output.write(self._screen().finish(self._editor.text))
            self._output.close(CLOSE_SECONDS)
        finally:
            self._terminal.restore()
            lines, self._to_remember = self._to_remember, []
            self._store(lines)

    # --- the input task -------------------------------------------------------------------

    async def read_input(self) -> None:
        """Read keys until the input ends (then the node is told: ``Signal.HANG_UP``)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._output.write_pending_forever)
                nursery.start_soon(self._after_enters)
                nursery.start_soon(self._follow_resizes)
                await self._load_history()
                await self._read_keys()
                nursery.cancel_scope.cancel()
            if not self._closed:
                await self._deliver(Signal.HANG_UP)
        finally:
            self.close()

    async def _read_keys(self) -> None:
        parser = Vt100Parser(self._keys.append)
        decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        escape_pending = False  # the last read may end in the middle of a key's sequence
        fd = self._terminal.fd
        try:
            while not self._closed:
                if escape_pending:
                    with trio.move_on_after(ESCAPE_SECONDS):
                        await trio.lowlevel.wait_readable(fd)
                else:
                    await trio.lowlevel.wait_readable(fd)
                data = self._terminal.read()
                if data is None:
                    if escape_pending:  # nothing followed the Escape: it was one
                        parser.flush()
                        escape_pending = False
                elif not data:
                    return
                else:
                    text = decoder.decode(data)
                    escape_pending = "\x1b" in text
                    if not escape_pending and _plain_typing(text):
                        self._keys += _typed_keys(text)  # nothing to parse
                    else:
                        parser.feed(text)
                self._screen()
                self._output.release()  # what was held goes before the echo of these keys
                await self._handle_keys()
        except trio.ClosedResourceError:
            return  # the input line was closed

    async def _handle_keys(self) -> None:
        keys = self._keys.copy()  # the parser appends to this very list
        self._keys.clear()
        for key in keys:
            if isinstance(key, str):
                self._editor.type(key)
                continue
            for outcome in self._editor.press(key):
                await self._act(outcome)
                if self._closed:
                    return
        self._output.write(self._screen().draw(*self._editor.view()))

    async def _act(self, outcome: Outcome) -> None:
        if isinstance(outcome, Accepted):
            # Drawn (and held) once the line has gone out: see _screen and Output.
            self._accepted.append(outcome.line)
            await self._deliver(_typed_input(outcome))
            if outcome.remember:
                self._to_remember.append(outcome.line)
            if self._after_enter.deadline == math.inf:
                self._after_enter.deadline = trio.current_time() + HOLD_SECONDS
        elif isinstance(outcome, EndOfInput):
            await self._deliver(Signal.HANG_UP)
        elif isinstance(outcome, Choices):
            self._output.write(self._screen().choices(outcome.items, *self._editor.view()))
        else:
            self._output.write(self._screen().clear(*self._editor.view()))

    async def _follow_resizes(self) -> None:
        with trio.open_signal_receiver(signal.SIGWINCH) as resizes:
            async for _ in resizes:
                width = self._terminal.columns()
                self._output.write(self._screen().resize(width, *self._editor.view()))

    # --- the history file -----------------------------------------------------------------

    async def _load_history(self) -> None:
        """Before any key is read, so that Up finds the earlier runs' lines at once."""
        history = self._history

        def load() -> list[str]:
            return list(history.load_history_strings())[::-1]  # oldest first

        self._editor.load_history(await trio.to_thread.run_sync(load))

    async def _after_enters(self) -> None:
        """A moment after Enter: the held output, if the answer has not taken it out,
        and the new history lines, written to the file in a worker thread. Both wait so
        as to stay off the path from Enter to the answer."""
        while True:
            self._after_enter = trio.CancelScope()
            with self._after_enter:
                await trio.sleep_forever()
            self._screen()
            self._output.release()
            lines, self._to_remember = self._to_remember, []
            if lines:
                await trio.to_thread.run_sync(self._store, lines)

    def _store(self, lines: list[str]) -> None:
        for line in lines:
            self._history.store_string(line)


def _plain_typing(text: str) -> bool:
    """Characters and Enters only: what a person's typing mostly is."""
    return text.replace("\r", "").isprintable()


def _typed_keys(text: str) -> list[KeyPress | str]:
    """Runs of characters, and an Enter for each carriage return."""
    keys: list[KeyPress | str] = []
    for index, run in enumerate(text.split("\r")):
        if index:
            keys.append(_ENTER)
        if run:
            keys.append(run)
    return keys


_ENTER = KeyPress(Keys.ControlM, "\r")


def _typed_input(accepted: Accepted) -> Input:
    """A typed line, or why it cannot be read (bytes that are not UTF-8 reach us as
    lone surrogates)."""
    if accepted.too_long:
        return BadInput(f"the line is longer than {MAX_LINE_CHARS} characters")
    try:
        accepted.line.encode("utf-8")
    except UnicodeEncodeError:
        return BadInput("it is not UTF-8 text")
    return accepted.line
