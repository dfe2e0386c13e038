"""The terminal's pieces that need no terminal: which input the client uses, where
the history goes, Tab completion, and the help and suggestions at the prompt."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest
import trio
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, InMemoryHistory

from chatapp import screen
from chatapp.input_line import Output
from chatapp.protocol.client import COMMANDS, ClientProtocol, nearest_command
from chatapp.protocol.common import Show
from chatapp.protocol.crypto import Identity
from chatapp.terminal import (
    CommandCompleter,
    Mode,
    history_path,
    open_history,
    terminal_mode,
)


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        return self._tty


@pytest.mark.parametrize(
    ("stdin_tty", "stdout_tty", "term", "mode"),
    [
        (True, True, "xterm-256color", Mode.PROMPT),
        (True, True, "", Mode.PROMPT),
        (True, True, "dumb", Mode.DUMB),
        (True, True, "unknown", Mode.DUMB),
        (False, True, "xterm-256color", Mode.PLAIN),  # a script piped in
        (True, False, "xterm-256color", Mode.PLAIN),  # output to a pipe or a file
        (False, False, "dumb", Mode.PLAIN),
    ],
)
def test_the_input_follows_what_stdin_and_stdout_are(
    stdin_tty: bool, stdout_tty: bool, term: str, mode: Mode
) -> None:
    assert terminal_mode(Stream(stdin_tty), Stream(stdout_tty), {"TERM": term}) is mode


def test_a_closed_stdin_reads_plain_lines() -> None:
    closed = Stream(True)
    closed.close()
    assert terminal_mode(closed, Stream(True), {"TERM": "xterm"}) is Mode.PLAIN


def test_the_history_lives_in_the_state_directory(tmp_path: Path) -> None:
    assert history_path({"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "chatapp" / "history"
    default = history_path({"HOME": str(tmp_path)})
    assert default.parts[-4:] == (".local", "state", "chatapp", "history")
    # a relative XDG_STATE_HOME is ignored, as the XDG spec says
    assert history_path({"XDG_STATE_HOME": "relative"}).parts[-4:-2] == (".local", "state")


def test_the_history_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "chatapp" / "history"
    path.parent.mkdir()
    path.write_text("")
    path.chmod(0o644)  # a file from elsewhere, readable by others: tightened
    history = open_history({"XDG_STATE_HOME": str(tmp_path)})
    assert isinstance(history, FileHistory)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    history.store_string("send user2 a secret")
    assert "send user2 a secret" in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_history_that_cannot_be_written_is_kept_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert isinstance(open_history({"XDG_STATE_HOME": str(blocker)}), InMemoryHistory)


def completions(text: str, names: list[str]) -> list[str]:
    completer = CommandCompleter(COMMANDS, lambda: names)
    found = completer.get_completions(Document(text), CompleteEvent(completion_requested=True))
    return [text[: len(text) + c.start_position] + c.text for c in found]


def test_tab_completes_commands_then_names() -> None:
    names = ["user2", "user1", "alice"]
    assert completions("se", names) == ["send", "send_all"]
    assert completions("d", names) == ["dereg"]
    assert completions("send u", names) == ["send user1", "send user2"]
    assert completions("dereg al", names) == ["dereg alice"]
    assert completions("send user1 hel", names) == []  # the message is free text
    assert completions("send_all u", names) == []
    assert completions("", names) == sorted(COMMANDS)


def shown(client: ClientProtocol, line: str) -> list[str]:
    return [e.line for e in client.handle_input(line, 0.0) if isinstance(e, Show)]


def test_help_explains_one_command() -> None:
    client = ClientProtocol("user1", ("127.0.0.1", 8001), 9001, identity=Identity.generate())
    assert shown(client, "help") == [screen.HELP]
    assert shown(client, "help send") == [screen.COMMAND_HELP["send"]]
    assert shown(client, "help  list ") == [screen.COMMAND_HELP["table"]]
    assert shown(client, "help sned") == [
        "[No command 'sned' to explain. Did you mean 'send'? Type help for the list.]"
    ]
    assert shown(client, "help zzzz") == ["[No command 'zzzz' to explain. Type help for the list.]"]


def test_every_command_has_its_help_and_is_in_the_list() -> None:
    assert set(screen.COMMAND_HELP) == set(COMMANDS)
    for command in COMMANDS:
        explained = screen.COMMAND_HELP[command]
        assert explained.startswith("[") and explained.endswith("]")
        assert command in screen.HELP or f"or {command}" in explained  # an alias


def test_an_unknown_command_suggests_the_nearest_one() -> None:
    client = ClientProtocol("user1", ("127.0.0.1", 8001), 9001, identity=Identity.generate())
    assert shown(client, "sendall hi") == [
        "[Unknown command 'sendall'. Did you mean 'send_all'? Type help for the commands.]"
    ]
    assert shown(client, "xyzzy") == ["[Unknown command 'xyzzy'. Type help for the commands.]"]
    assert nearest_command("dreg") == "dereg"
    assert nearest_command("") is None


async def test_output_to_a_terminal_that_reads_slowly_never_blocks_and_loses_nothing() -> None:
    """The input line writes from Trio's own thread: what the terminal cannot take now
    waits, in order, for a task that writes it as the terminal takes it (a pipe stands
    in for a slow terminal here: a real file descriptor that fills up)."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        output = Output(write_end)
        output.hold(">>> typed\n")  # held (after Enter): goes out before the next write
        text = "".join(f"line {index}\n" for index in range(100_000))  # far more than a pipe
        output.write(text)
        with pytest.raises(BlockingIOError):
            os.write(write_end, b"!")  # the pipe is full: the write above did not wait
        received = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(output.write_pending_forever)
            while len(received) < len(">>> typed\n" + text):
                await trio.lowlevel.wait_readable(read_end)
                received += os.read(read_end, 65536)
            nursery.cancel_scope.cancel()
        assert received.decode() == ">>> typed\n" + text
        output.write("one more\n")
        output.close(1.0)
        output.write("after close\n")  # nothing: the terminal is given back
        assert os.read(read_end, 65536) == b"one more\n"
    finally:
        os.close(read_end)
        os.close(write_end)
