"""The client's terminal: the input line, and the screen above it.

Three ways to meet a person (or a script), chosen from what stdin and stdout are:

- ``PROMPT``: both are terminals. The input line ``>>> `` stays at the bottom,
  with Emacs-style editing, history (Up/Down, kept in a file) and Tab
  completion of commands and names. Every line the client shows is printed
  above it as ``>>> LINE`` (as the seed transcripts show it), and the
  half-typed line is drawn again, intact, below.
- ``DUMB``: both are terminals but ``TERM`` is ``dumb`` (or ``unknown``): no
  cursor movement is allowed, so the typed line is echoed character by
  character, and a line that arrives while something is half typed starts a
  line of its own; what was typed is then shown again below it.
- ``PLAIN``: stdin or stdout is not a terminal (a script, a pipe, a file).
  Lines are read as they come, without the input line, and shown one per
  line, without prompts: nobody is there to read a prompt, and a log of the
  run is the seed's lines alone.

The input line itself is chatapp.input_line (reading keys and drawing, in
Trio's thread), chatapp.line_editor (editing, history, completion) and
chatapp.line_views (what is drawn). From prompt_toolkit it uses the key parser,
``Document`` (words), the history file and the completion API; not its drawing.
"""

from __future__ import annotations

import contextlib
import enum
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TextIO

from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory


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
_NAME_COMMANDS = ("send", "dereg", "reg", "fingerprint", "key")


class CommandCompleter(Completer):
    """Tab: the command words, then a name from the client table for ``send``,
    ``dereg``, ``reg`` and ``fingerprint`` (or ``key``)."""

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
