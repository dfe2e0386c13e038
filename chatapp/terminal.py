"""The client's terminal: the input line, and the screen above it.

Three ways to meet a person (or a script), chosen from what stdin and stdout are:

- ``PROMPT``: both are terminals. prompt_toolkit draws the input line ``>>> ``
  at the bottom, with Emacs-style editing, history (Up/Down, kept in a file)
  and Tab completion of commands and names. Every line the client shows is
  printed above it as ``>>> LINE`` (as the seed transcripts show it), and the
  half-typed line is drawn again, intact, below.
- ``DUMB``: both are terminals but ``TERM`` is ``dumb`` (or ``unknown``): no
  cursor movement is allowed, so the typed line is echoed character by
  character, and a line that arrives while something is half typed starts a
  line of its own; what was typed is then shown again below it.
- ``PLAIN``: stdin or stdout is not a terminal (a script, a pipe, a file).
  Lines are read as they come, without prompt_toolkit, and shown one per
  line, without prompts: nobody is there to read a prompt, and a log of the
  run is the seed's lines alone.

Why a thread and not Trio as a guest of prompt_toolkit's asyncio loop: both
were measured through a real pty (docs/terminal.md). prompt_toolkit is pure
Python and slow next to a network round trip on loopback (redrawing the
prompt costs about a millisecond); what decides the latency is keeping that
redraw off the path from Enter to the answer, which works the same in both.
The thread keeps the Trio program exactly as it is (signals, cancellation,
the CLI's error handling, the tests' runtime), and a slow redraw never delays
the protocol's timers or the receive task, which guest mode would (one thread
runs both there).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import trio
from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.filters import Condition
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.input import create_input
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.layout import ConditionalContainer
from prompt_toolkit.output import DummyOutput
from prompt_toolkit.output.vt100 import Vt100_Output
from prompt_toolkit.shortcuts import CompleteStyle

from chatapp import screen
from chatapp.node import BadInput, Input, Signal


class Mode(enum.Enum):
    PROMPT = "prompt"
    DUMB = "dumb"
    PLAIN = "plain"


def terminal_mode(
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> Mode:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    environ = os.environ if environ is None else environ
    try:
        both_terminals = stdin.isatty() and stdout.isatty()
    except (OSError, ValueError):  # closed
        both_terminals = False
    if not both_terminals:
        return Mode.PLAIN
    if environ.get("TERM", "").lower() in ("dumb", "unknown"):
        return Mode.DUMB
    return Mode.PROMPT


# --- history -----------------------------------------------------------------------


def history_path(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/chatapp/history`` (``~/.local/state/chatapp/history`` by default)."""
    environ = os.environ if environ is None else environ
    state = environ.get("XDG_STATE_HOME") or ""
    base = Path(state) if os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "chatapp" / "history"


class _PrivateHistory(FileHistory):
    """The typed lines, in a file only its owner can read (messages are in it). A file
    that cannot be written costs the history, never the client."""

    def store_string(self, string: str) -> None:
        with contextlib.suppress(OSError):
            super().store_string(string)

    def load_history_strings(self) -> Iterable[str]:
        try:
            yield from super().load_history_strings()
        except OSError:
            return


def open_history(environ: Mapping[str, str] | None = None) -> History:
    path = history_path(environ)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(path, 0o600)
    except OSError:
        return InMemoryHistory()
    return _PrivateHistory(str(path))


# --- completion ----------------------------------------------------------------------

#: Commands whose argument is a name from the client table.
_NAME_COMMANDS = ("send", "dereg", "reg")


class CommandCompleter(Completer):
    """Tab: the command words, then a name from the client table for ``send``,
    ``dereg`` and ``reg``. ``names`` is called in the input thread: it must only read."""

    def __init__(self, commands: Iterable[str], names: Callable[[], Iterable[str]]) -> None:
        self._commands = sorted(commands)
        self._names = names

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterator[Completion]:
        before = document.text_before_cursor.lstrip()
        words = before.split(" ")
        if len(words) == 1:
            candidates: Iterable[str] = self._commands
        elif len(words) == 2 and words[0] in _NAME_COMMANDS:
            candidates = sorted(self._names())
        else:
            return
        word = words[-1]
        for candidate in candidates:
            if candidate.startswith(word):
                yield Completion(candidate, start_position=-len(word))


def table_names(table: Mapping[str, object]) -> list[str]:
    """A copy of the table's names, safe to take from another thread: the protocol
    replaces or extends its table under the GIL, and a copy that raced a change is
    simply taken again."""
    for _ in range(10):
        try:
            return list(table)
        except RuntimeError:  # changed size during iteration
            continue
    return []


# --- screens -----------------------------------------------------------------------


class PlainScreen:
    """Lines without prompts, for a pipe or a file (``PLAIN``)."""

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out if out is not None else sys.stdout

    def show(self, line: str) -> None:
        try:
            self._out.write(line + "\n")
            self._out.flush()
        except (OSError, ValueError):
            pass  # the reader is gone; the node exits on the end of input that follows

    def typed(self) -> None:
        pass

    def close(self) -> None:
        pass


class _QuietStream:
    """stdout for prompt_toolkit: a terminal that has gone away (closed window, EIO)
    makes writes fail; the hang-up that follows ends the client, without a traceback."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.encoding = stream.encoding or "utf-8"
        self.errors = "replace"

    def write(self, data: str) -> int:
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(data)
        return len(data)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        try:
            return self._stream.isatty()
        except (OSError, ValueError):
            return False


#: After Enter, the prompt is drawn again when the answer arrives or after this long,
#: whichever comes first: drawing it costs prompt_toolkit about a millisecond of the
#: one CPU the GIL gives both threads, and the answer usually comes sooner than that.
PROMPT_HOLD_SECONDS = 0.05


class _State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    ENDED = "ended"


class PromptConsole:
    """The input line (``PROMPT`` and ``DUMB``): prompt_toolkit in a thread of its own,
    with its own asyncio loop. It is also the node's screen: ``show`` hands each line
    to that thread, which prints it above the input line.

    Lines and keys the person types come back to Trio through ``run_sync_soon``,
    which never blocks the input thread (so neither side ever waits for the other)."""

    def __init__(
        self,
        commands: Iterable[str],
        names: Callable[[], Iterable[str]],
        *,
        dumb: bool = False,
        history: History | None = None,
        out: TextIO | None = None,
    ) -> None:
        self._commands = list(commands)
        self._names = names
        self._dumb = dumb
        self._history = history if history is not None else InMemoryHistory()
        self._out = _QuietStream(out if out is not None else sys.stdout)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: PromptSession[str] | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._arrivals: trio.MemorySendChannel[Input | BaseException] | None = None
        self._lock = threading.Lock()
        self._state = _State.STARTING
        self._early: list[str] = []
        self._closing = False
        self._held: asyncio.TimerHandle | None = None
        self._shown = ""  # DUMB: the typed text on the screen after the prompt
        self._prompt_on_screen = False
        self._last_line = ""

    # --- the Trio side ---------------------------------------------------------------

    async def read_input(self, inputs: trio.MemorySendChannel[Input]) -> None:
        """Run the input line; hand what is typed to ``inputs`` until the input ends."""
        self._token = trio.lowlevel.current_trio_token()
        send, arrivals = trio.open_memory_channel[Input | BaseException](math.inf)
        self._arrivals = send
        self._thread = threading.Thread(target=self._thread_main, name="chatapp-input", daemon=True)
        self._thread.start()
        try:
            async with inputs, arrivals:
                async for item in arrivals:
                    if isinstance(item, BaseException):
                        raise item  # a bug in the input thread: the CLI reports it
                    await inputs.send(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the node has exited
        finally:
            self.close()

    def show(self, line: str) -> None:
        with self._lock:
            if self._state is _State.STARTING:
                self._early.append(line)  # printed as soon as the input line is up
                return
            if self._state is _State.RUNNING and self._loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    self._loop.call_soon_threadsafe(self._print, line)
                    return
        self._write(line + "\n")  # the input line has ended

    def typed(self) -> None:
        pass  # the input line already left the typed line on the screen

    def close(self) -> None:
        """End the input line and give the terminal back as it was (cooked mode).
        Idempotent; waits for the input thread, so the process never exits in raw mode."""
        if self._closing:
            return
        self._closing = True
        with self._lock:
            never_started = self._state is _State.STARTING
            self._state = _State.ENDED if never_started else self._state
            early, self._early = self._early, []
        for line in early:  # the client is done before its input line was up
            self._write(f"{screen.PROMPT}{line}\n")
        loop, thread = self._loop, self._thread
        if loop is not None and not never_started:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._finish)
        if thread is not None:
            thread.join(timeout=5)

    # --- the input thread ---------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._run_prompt())
        except BaseException as exc:  # handed to Trio, which reports it
            self._forward(exc)
        finally:
            with self._lock:
                self._state = _State.ENDED
            self._forward(None)

    def _forward(self, item: Input | BaseException | None) -> None:
        """To Trio without waiting (None: the input has ended)."""
        token, arrivals = self._token, self._arrivals
        if token is None or arrivals is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(_deliver, arrivals, item)

    async def _run_prompt(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.set_exception_handler(self._on_loop_error)
        session = self._session = self._new_session()
        if self._dumb:
            self._write(screen.PROMPT)
        self._prompt_on_screen = True
        with self._lock:
            if self._state is _State.ENDED:
                return  # closed while starting
            self._state = _State.RUNNING
            early, self._early = self._early, []
        for line in early:
            self._print(line)
        try:
            await session.prompt_async(
                handle_sigint=False, set_exception_handler=False, pre_run=self._finish_if_closing
            )
        except EOFError:  # the terminal closed
            self._forward(Signal.HANG_UP)
        except KeyboardInterrupt:
            self._forward(Signal.INTERRUPT)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        error = context.get("exception")
        if isinstance(error, OSError):
            return  # the terminal is gone: the hang-up ends the client
        self._forward(error if error is not None else RuntimeError(context.get("message")))
        self._finish()

    def _new_session(self) -> PromptSession[str]:
        if self._dumb:
            output: Any = DummyOutput()
        else:
            output = Vt100_Output.from_pty(self._out)  # type: ignore[arg-type]
            # No cursor position requests: they only size completion menus, which
            # the readline-like completion does not use, and a terminal that does not
            # answer them would wait and then print a warning.
            output.enable_cpr = False
        session: PromptSession[str] = PromptSession(
            screen.PROMPT,
            input=create_input(always_prefer_tty=False),
            output=output,
            history=self._history,
            completer=CommandCompleter(self._commands, self._names),
            complete_style=CompleteStyle.READLINE_LIKE,
            complete_while_typing=False,
            key_bindings=self._key_bindings(),
            erase_when_done=False,
        )
        session.default_buffer.accept_handler = self._accept
        if self._dumb:
            session.default_buffer.on_text_changed += self._echo
        else:
            hidden = Condition(self._prompt_hidden)
            session.layout.container = ConditionalContainer(session.layout.container, ~hidden)
        return session

    def _key_bindings(self) -> KeyBindings:
        bindings = KeyBindings()
        empty = Condition(lambda: not self._typed_text())

        @bindings.add("c-c")
        def _interrupt(event: KeyPressEvent) -> None:
            self._forward(Signal.INTERRUPT)

        @bindings.add("c-d", filter=empty)
        def _end_of_input(event: KeyPressEvent) -> None:
            self._forward(Signal.HANG_UP)

        return bindings

    def _typed_text(self) -> str:
        return self._session.default_buffer.text if self._session is not None else ""

    def _accept(self, buffer: Any) -> bool:
        """Enter: the line goes to Trio first, then the screen is put right."""
        lines = buffer.text.splitlines() or [""]
        for line in lines:
            self._forward(_checked(line))
        if self._dumb:
            self._write("\n" + screen.PROMPT)
            self._shown = ""
        else:
            self._erase()
            self._write("".join(f"{screen.PROMPT}{line}\n" for line in lines))
            self._hold_prompt()
        if self._loop is not None:
            # Up finds this line at once: the buffer reloads its history only when it is
            # drawn next, and that waits while the prompt is held.
            self._loop.call_soon(buffer.load_history_if_not_yet_loaded)
        return False  # clear the line (after it goes into the history)

    # --- drawing (input thread only) -------------------------------------------------------

    def _print(self, line: str) -> None:
        self._last_line = line
        final = line == screen.KEYBOARD_INTERRUPT  # nothing is typed after this one
        if self._dumb:
            self._print_dumb(line, final)
            return
        self._erase()
        self._write(f"{screen.PROMPT}{line}\n")
        if final:
            self._prompt_on_screen = False
        self._release_prompt()

    def _print_dumb(self, line: str, final: bool) -> None:
        text = self._typed_text()
        before = "\n" + screen.PROMPT if self._shown else ""
        after = "" if final else screen.PROMPT + text
        self._write(f"{before}{line}\n{after}")
        self._shown = "" if final else text
        self._prompt_on_screen = not final

    def _echo(self, buffer: Any) -> None:
        """DUMB: keep ``>>> `` + the typed text on the last line, with no cursor moves."""
        text, shown = buffer.text, self._shown
        if not self._prompt_on_screen:
            return
        if text.startswith(shown):
            self._write(text[len(shown) :])
        elif shown.startswith(text):
            self._write("\b \b" * (len(shown) - len(text)))
        else:
            self._write("\n" + screen.PROMPT + text)
        self._shown = text

    def _prompt_hidden(self) -> bool:
        return self._held is not None or not self._prompt_on_screen

    def _erase(self) -> None:
        session = self._session
        if session is not None and session.app.is_running:
            session.app.renderer.erase()

    def _hold_prompt(self) -> None:
        if self._loop is None:
            return
        if self._held is not None:
            self._held.cancel()
        self._held = self._loop.call_later(PROMPT_HOLD_SECONDS, self._release_prompt)

    def _release_prompt(self) -> None:
        if self._held is not None:
            self._held.cancel()
            self._held = None
        if self._session is not None:
            self._session.app.invalidate()

    def _finish_if_closing(self) -> None:
        if self._closing:  # closed while the input line was starting
            self._finish()

    def _finish(self) -> None:
        """Leave the input line as the seed's screens end: the prompt left on the last
        line, unless the last line said the client was interrupted."""
        session = self._session
        if session is None or not session.app.is_running or session.app.is_done:
            return
        interrupted = self._last_line == screen.KEYBOARD_INTERRUPT
        if self._dumb:
            if self._prompt_on_screen:
                self._write("\n")
            self._prompt_on_screen = False
        elif self._held is not None:
            self._held.cancel()
            self._held = None
        session.app.erase_when_done = interrupted
        session.app.exit(result="")

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()


def _checked(line: str) -> Input:
    """A typed line, or why it cannot be read (bytes that are not UTF-8 reach us as
    lone surrogates)."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return BadInput("it is not UTF-8 text")
    return line


def _deliver(
    arrivals: trio.MemorySendChannel[Input | BaseException], item: Input | BaseException | None
) -> None:
    """In Trio's thread: one arrival from the input thread (None: there will be no more)."""
    if item is None:
        arrivals.close()
        return
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        arrivals.send_nowait(item)
