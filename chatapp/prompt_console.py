"""The input line: prompt_toolkit in a thread of its own (chatapp.terminal says
when it is used).

Why a thread and not Trio as a guest of prompt_toolkit's asyncio loop
(``trio.lowlevel.start_guest_run``): both were prototyped and measured through
a real pty (docs/terminal.md). prompt_toolkit is pure Python: working on one
key and drawing the prompt again costs it about a millisecond here, more than
a whole round trip on loopback. What decides the latency is keeping that work
off the path from Enter to the answer (the line is handed to Trio before
prompt_toolkit works on the Enter, and the prompt is drawn again once the
answer is shown), and that is open to both. Guest mode was not faster, and it
would run that millisecond on the one thread that also runs the protocol's
timers and receive task; the thread keeps the Trio program as it is (signals,
cancellation, the CLI's error handling, the tests' runtime).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import trio
from prompt_toolkit import PromptSession
from prompt_toolkit.filters import Condition
from prompt_toolkit.history import History, InMemoryHistory
from prompt_toolkit.input.vt100 import Vt100Input
from prompt_toolkit.key_binding import KeyBindings, KeyPress, KeyPressEvent
from prompt_toolkit.keys import Keys
from prompt_toolkit.layout import ConditionalContainer
from prompt_toolkit.output import DummyOutput
from prompt_toolkit.output.vt100 import Vt100_Output
from prompt_toolkit.shortcuts import CompleteStyle

from chatapp import screen
from chatapp.node import BadInput, Input, Signal
from chatapp.terminal import CommandCompleter, QuietStream

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
        self._out = QuietStream(out if out is not None else sys.stdout)
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
        # Enter, handed on before prompt_toolkit works on it (see _keys_read)
        self._pending_enter: list[KeyPress] = []
        self._pending_timer: asyncio.TimerHandle | None = None
        self._sent_early: str | None = None  # the text that Enter sent
        self._shown_early = False  # and its ">>> text" line is on the screen
        self._holding_keys = False  # while the history reloads after Enter
        self._held_keys: list[KeyPress] = []

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
            input=_EnterFirstInput(sys.stdin, self._keys_read),
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

    def _keys_read(self, keys: list[KeyPress]) -> list[KeyPress]:
        """Enter pressed alone, as a person does: the line goes to Trio at once, and
        prompt_toolkit's own work on the key (key bindings, the history, a redraw: about
        a millisecond of CPU) waits until the answer is on the screen, or 50 ms. On a
        busy machine that CPU would otherwise delay the answer itself."""
        if self._pending_enter:
            self._catch_up()  # the Enter comes first
        if self._holding_keys:
            self._held_keys += keys  # in the order they were typed
            return []
        keys = self._up_to_enter(keys)
        if len(keys) != 1 or keys[0].key != Keys.ControlM or not self._can_send_early():
            return keys
        assert self._session is not None and self._loop is not None
        self._sent_early = text = self._session.default_buffer.text
        for line in text.splitlines() or [""]:
            self._forward(_checked(line))
        self._pending_enter = keys
        self._pending_timer = self._loop.call_later(PROMPT_HOLD_SECONDS, self._catch_up)
        return []

    def _can_send_early(self) -> bool:
        session = self._session
        if self._dumb or session is None or self._loop is None:
            return False
        app, buffer = session.app, session.default_buffer
        return (
            app.is_running
            and not app.key_processor.key_buffer  # not the end of a longer key sequence
            and app.layout.current_buffer is buffer  # not searching the history
            and buffer.complete_state is None
        )

    def _take_pending_enter(self) -> list[KeyPress]:
        keys, self._pending_enter = self._pending_enter, []
        if self._pending_timer is not None:
            self._pending_timer.cancel()
            self._pending_timer = None
        return keys

    def _catch_up(self) -> None:
        """prompt_toolkit works on the Enter that was handed on early."""
        keys = self._take_pending_enter()
        if keys and self._session is not None and self._session.app.is_running:
            processor = self._session.app.key_processor
            processor.feed_multiple(keys)
            processor.process_keys()

    def _up_to_enter(self, keys: list[KeyPress]) -> list[KeyPress]:
        """The keys up to the first Enter; those after it wait (see _hold_keys)."""
        for index, key in enumerate(keys[:-1]):
            if key.key == Keys.ControlM:
                self._hold_keys(keys[index + 1 :])
                return keys[: index + 1]
        return keys

    def _hold_keys(self, keys: list[KeyPress]) -> None:
        """After Enter the buffer reloads its history in a task of its own, two turns of
        the loop later (``load_history_if_not_yet_loaded``). Keys typed after the Enter
        wait for it, or an Up pressed right after Enter would find nothing."""
        self._held_keys += keys
        session = self._session
        if self._holding_keys or session is None or not session.app.is_running:
            return
        self._holding_keys = True
        session.app.create_background_task(self._feed_held_keys())

    async def _feed_held_keys(self) -> None:
        for _ in range(4):
            await asyncio.sleep(0)
        self._holding_keys = False
        keys, self._held_keys = self._held_keys, []
        keys = self._up_to_enter(keys)  # one line at a time, again
        if keys and self._session is not None and self._session.app.is_running:
            processor = self._session.app.key_processor
            processor.feed_multiple(keys)
            processor.process_keys()

    def _accept(self, buffer: Any) -> bool:
        """Enter: the line goes to Trio first, then the screen is put right."""
        lines = buffer.text.splitlines() or [""]
        if self._sent_early != buffer.text:
            for line in lines:
                self._forward(_checked(line))
        self._sent_early = None
        if self._dumb:
            self._write("\n" + screen.PROMPT)
            self._shown = ""
        else:
            if not self._shown_early:
                self._show_typed(lines)
            self._shown_early = False
            self._hold_prompt()
        if self._loop is not None:
            self._loop.call_soon(buffer.load_history_if_not_yet_loaded)
        self._hold_keys([])
        return False  # clear the line (after it goes into the history)

    # --- drawing (input thread only) -------------------------------------------------------

    def _show_typed(self, lines: list[str]) -> None:
        self._erase()
        self._write("".join(f"{screen.PROMPT}{line}\n" for line in lines))

    def _print(self, line: str) -> None:
        self._last_line = line
        final = line == screen.KEYBOARD_INTERRUPT  # nothing is typed after this one
        if self._dumb:
            self._print_dumb(line, final)
            return
        if self._pending_enter and self._sent_early is not None:
            # the answer to the line just sent: that line, then the answer, then
            # prompt_toolkit catches up with the Enter
            self._show_typed(self._sent_early.splitlines() or [""])
            self._shown_early = True
            self._write(f"{screen.PROMPT}{line}\n")
            self._catch_up()
            if final:
                self._prompt_on_screen = False
            self._release_prompt()
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
        self._catch_up()
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


class _EnterFirstInput(Vt100Input):
    """The terminal's keys, each batch shown to ``keys_read`` before prompt_toolkit
    works on it (it may hold an Enter back: see ``PromptConsole._keys_read``)."""

    def __init__(
        self, stdin: TextIO, keys_read: Callable[[list[KeyPress]], list[KeyPress]]
    ) -> None:
        super().__init__(stdin)
        self._keys_read = keys_read

    def read_keys(self) -> list[KeyPress]:
        return self._keys_read(super().read_keys())
