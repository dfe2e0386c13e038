"""The input line's editing: the typed text, the cursor, the history, the kill buffer,
the incremental search and Tab completion. No I/O here: keys come in (prompt_toolkit's
``KeyPress``, from its own VT100 key parser), and what the terminal must show or the
node must be told comes out; chatapp.input_line does the reading and the drawing.

The keys are prompt_toolkit's Emacs defaults, the ones a line needs (its multi-line
and selection bindings have nothing to work on here): Ctrl-A/E and Home/End, Ctrl-B/F
and Left/Right, Alt-B/F and Ctrl-Left/Right, Backspace, Delete, Ctrl-D (the end of
input on an empty line), Ctrl-K/U/W, Alt-D, Alt-Backspace, Ctrl-Y, Ctrl-T, Ctrl-_
(undo), Up/Down and Ctrl-P/N (history), Ctrl-R/S (search), Ctrl-L, Tab, Enter.
Editing goes through prompt_toolkit's ``Document`` where words are concerned, so a
word is what it is in prompt_toolkit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prompt_toolkit.completion import CompleteEvent, Completer, get_common_complete_suffix
from prompt_toolkit.document import Document
from prompt_toolkit.key_binding import KeyPress
from prompt_toolkit.keys import Keys

from chatapp import screen

#: The longest line kept. A paste longer than this is refused when Enter comes (the
#: protocol's own limit, one datagram, is far lower): never cut and sent.
MAX_LINE_CHARS = 65536
#: Edits that Ctrl-_ can take back.
UNDO_DEPTH = 100


@dataclass(frozen=True)
class Accepted:
    """Enter: ``line`` is done. ``too_long``: more was typed than a line keeps.
    ``remember``: the line is new to the history (to be kept in its file)."""

    line: str
    too_long: bool = False
    remember: bool = False


@dataclass(frozen=True)
class EndOfInput:
    """Ctrl-D on an empty line."""


@dataclass(frozen=True)
class Choices:
    """Tab found several completions and nothing they share to add: show them."""

    items: list[str]


@dataclass(frozen=True)
class ClearScreen:
    """Ctrl-L."""


Outcome = Accepted | EndOfInput | Choices | ClearScreen


@dataclass
class _Search:
    query: str
    backward: bool
    origin: tuple[int, str, int]  # the history index, text and cursor it started from
    index: int  # the history line that matches
    position: int  # where in it
    failed: bool = False


class LineEditor:
    """One line being typed, its history, and what Enter and the other keys do to it."""

    def __init__(self, completer: Completer, history: Iterable[str] = ()) -> None:
        self._completer = completer
        self.text = ""
        self.cursor = 0
        self._history: list[str] = list(history)  # oldest first
        # Lines of the history edited since the last Enter (the new line is the last index)
        self._edited: dict[int, str] = {}
        self._index = len(self._history)
        self._killed = ""
        self._undo: list[tuple[str, int]] = []
        self._inserting = False  # the last key inserted text: its undo step goes on
        self._meta = False  # Escape was pressed: the next key is Alt-key
        self._search: _Search | None = None
        self._too_long = False
        self._keys = self._key_table()

    def load_history(self, lines: Iterable[str]) -> None:
        """The history kept from earlier runs (oldest first), before any line of this one."""
        self._history = [*lines, *self._history]
        self._edited.clear()
        self._index = len(self._history)

    # --- what is on the line ----------------------------------------------------------

    def view(self) -> tuple[str, str, int]:
        """The prompt, the text and the cursor, as the line should be drawn."""
        search = self._search
        if search is None:
            return screen.PROMPT, self.text, self.cursor
        kind = "reverse-i-search" if search.backward else "i-search"
        failed = "failed " if search.failed else ""
        return f"({failed}{kind})`{search.query}': ", self.text, self.cursor

    # --- keys -------------------------------------------------------------------------------

    def press(self, key: KeyPress) -> list[Outcome]:
        """One key; what it asks of the terminal or the node (most keys only edit)."""
        if self._search is not None and self._search_key(key):
            return [self.accept()] if key.key in (Keys.ControlM, Keys.ControlJ) else []
        if key.key == Keys.BracketedPaste:
            return self._paste(key.data)
        if self._meta:
            self._meta = False
            if self._meta_key(key):
                return []
        action = self._keys.get(key.key)
        if action is not None:
            return action() or []
        if not isinstance(key.key, Keys):  # a character
            self._insert(key.data)
        return []

    def type(self, text: str) -> None:
        """Characters typed (no control character among them): as many key presses, at
        the cost of one."""
        if self._search is None and not self._meta:
            self._insert(text)
            return
        for char in text:
            self.press(KeyPress(char, char))

    def accept(self) -> Accepted:
        """Enter: the line is done; it goes into the history, and a new line starts."""
        line, too_long = self.text, self._too_long
        remember = bool(line) and not too_long and self._history[-1:] != [line]
        if remember:
            self._history.append(line)
        self._edited.clear()
        self._index = len(self._history)
        self.text, self.cursor, self._too_long = "", 0, False
        self._undo.clear()
        self._inserting = False
        return Accepted(line, too_long, remember)

    def _key_table(self) -> dict[str | Keys, Callable[[], list[Outcome] | None]]:
        return {
            Keys.ControlM: lambda: [self.accept()],
            Keys.ControlJ: lambda: [self.accept()],
            Keys.ControlA: lambda: self._move(0),
            Keys.Home: lambda: self._move(0),
            Keys.ControlE: lambda: self._move(len(self.text)),
            Keys.End: lambda: self._move(len(self.text)),
            Keys.ControlB: lambda: self._move(self.cursor - 1),
            Keys.Left: lambda: self._move(self.cursor - 1),
            Keys.ControlF: lambda: self._move(self.cursor + 1),
            Keys.Right: lambda: self._move(self.cursor + 1),
            Keys.ControlLeft: self._word_back,
            Keys.ControlRight: self._word_forward,
            Keys.ControlH: lambda: self._delete(self.cursor - 1, self.cursor),
            Keys.Delete: lambda: self._delete(self.cursor, self.cursor + 1),
            Keys.ControlD: self._delete_or_end,
            Keys.ControlK: lambda: self._kill(self.cursor, len(self.text)),
            Keys.ControlU: lambda: self._kill(0, self.cursor),
            Keys.ControlW: lambda: self._kill_word_back(whitespace_only=True),
            Keys.ControlY: lambda: self._insert(self._killed),
            Keys.ControlT: self._transpose,
            Keys.ControlUnderscore: self._undo_edit,
            Keys.Up: lambda: self._recall(-1),
            Keys.ControlP: lambda: self._recall(-1),
            Keys.Down: lambda: self._recall(+1),
            Keys.ControlN: lambda: self._recall(+1),
            Keys.ControlR: lambda: self._start_search(backward=True),
            Keys.ControlS: lambda: self._start_search(backward=False),
            Keys.ControlI: self._complete,
            Keys.ControlL: lambda: [ClearScreen()],
            Keys.Escape: self._escape,
        }

    def _meta_key(self, key: KeyPress) -> bool:
        """Alt-B, Alt-F, Alt-D, Alt-Backspace (Escape, then the key); False: not one."""
        actions: dict[str | Keys, Callable[[], object]] = {
            "b": self._word_back,
            "f": self._word_forward,
            "d": self._kill_word_forward,
            Keys.ControlH: lambda: self._kill_word_back(whitespace_only=False),
        }
        action = actions.get(key.key)
        if action is None:
            return False
        action()
        return True

    def _escape(self) -> None:
        self._meta = True

    # --- moving -------------------------------------------------------------------------------

    def _move(self, position: int) -> None:
        self.cursor = min(max(position, 0), len(self.text))
        self._inserting = False

    def _document(self) -> Document:
        return Document(self.text, self.cursor)

    def _word_back(self) -> None:
        self._move(self.cursor + (self._document().find_previous_word_beginning() or 0))

    def _word_forward(self) -> None:
        self._move(self.cursor + (self._document().find_next_word_ending() or 0))

    # --- editing -------------------------------------------------------------------------------

    def _change(self, text: str, cursor: int, *, inserting: bool = False) -> None:
        if text == self.text:
            self.cursor = cursor
            return
        if not (inserting and self._inserting):  # typing one word is one undo step
            self._undo = [*self._undo[-UNDO_DEPTH + 1 :], (self.text, self.cursor)]
        self.text, self.cursor, self._inserting = text, cursor, inserting

    def _insert(self, data: str) -> None:
        room = MAX_LINE_CHARS - len(self.text)
        if len(data) > room:
            self._too_long = True  # refused on Enter, never sent cut
            data = data[:room]
        before, after = self.text[: self.cursor], self.text[self.cursor :]
        self._change(before + data + after, self.cursor + len(data), inserting=True)

    def _delete(self, start: int, end: int) -> None:
        start, end = max(start, 0), min(end, len(self.text))
        if start < end:
            self._change(self.text[:start] + self.text[end:], start)

    def _delete_or_end(self) -> list[Outcome] | None:
        if not self.text:
            return [EndOfInput()]
        self._delete(self.cursor, self.cursor + 1)
        return None

    def _kill(self, start: int, end: int) -> None:
        if start < end:
            self._killed = self.text[start:end]
            self._delete(start, end)

    def _kill_word_back(self, *, whitespace_only: bool) -> None:
        offset = self._document().find_start_of_previous_word(WORD=whitespace_only) or 0
        self._kill(self.cursor + offset, self.cursor)

    def _kill_word_forward(self) -> None:
        self._kill(self.cursor, self.cursor + (self._document().find_next_word_ending() or 0))

    def _transpose(self) -> None:
        """Ctrl-T: swap the two characters before the cursor (at the end of the line) or
        around it, and move on, as in Emacs."""
        at = min(self.cursor, len(self.text) - 1)
        if at < 1:
            return
        text = self.text
        swapped = text[: at - 1] + text[at] + text[at - 1] + text[at + 1 :]
        self._change(swapped, at + 1)

    def _undo_edit(self) -> None:
        if self._undo:
            self.text, self.cursor = self._undo.pop()
            self._inserting = False

    def _paste(self, data: str) -> list[Outcome]:
        """Pasted text is typed text: each line break is an Enter."""
        outcomes: list[Outcome] = []
        first, *rest = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._insert(first)
        for piece in rest:
            outcomes.append(self.accept())
            self._insert(piece)
        self._inserting = False
        return outcomes

    # --- history ---------------------------------------------------------------------------

    def _recall(self, step: int) -> None:
        index = self._index + step
        if 0 <= index <= len(self._history):
            self._edited[self._index] = self.text
            self._show_history_line(index, None)

    def _show_history_line(self, index: int, cursor: int | None) -> None:
        self._index = index
        self.text = self._line(index)
        self.cursor = len(self.text) if cursor is None else cursor
        self._undo.clear()
        self._inserting = False

    def _line(self, index: int) -> str:
        """A line of the history as edited, or the new line (the last index)."""
        if index in self._edited:
            return self._edited[index]
        return self._history[index] if index < len(self._history) else ""

    def _start_search(self, *, backward: bool) -> None:
        self._edited[self._index] = self.text
        origin = (self._index, self.text, self.cursor)
        self._search = _Search("", backward, origin, self._index, self.cursor)

    def _search_key(self, key: KeyPress) -> bool:
        """A key while searching; False: the search ends and the key does what it does."""
        search = self._search
        assert search is not None
        if key.key in (Keys.ControlR, Keys.ControlS):
            search.backward = key.key == Keys.ControlR
            self._find(search, search.index + (-1 if search.backward else 1))
        elif key.key == Keys.ControlH:
            search.query = search.query[:-1]
            self._find(search, search.origin[0])
        elif key.key == Keys.ControlG:
            self._search = None
            index, text, cursor = search.origin
            self._edited[index] = text
            self._show_history_line(index, cursor)
        elif not isinstance(key.key, Keys):
            search.query += key.data
            self._find(search, search.index)
        else:
            self._search = None  # the line found stays, to edit or send
            return key.key in (Keys.Escape, Keys.ControlM, Keys.ControlJ)
        return True

    def _find(self, search: _Search, start: int) -> None:
        step = -1 if search.backward else 1
        index = start
        while 0 <= index <= len(self._history):
            line = self._line(index)
            position = line.rfind(search.query) if search.backward else line.find(search.query)
            if position >= 0:
                search.index, search.position, search.failed = index, position, False
                self._show_history_line(index, position)
                return
            index += step
        search.failed = True

    # --- completion -------------------------------------------------------------------------

    def _complete(self) -> list[Outcome] | None:
        """Tab, as readline does it: the one completion, or what all of them share, or
        (when they share nothing more) the list of them."""
        document = self._document()
        found = list(
            self._completer.get_completions(document, CompleteEvent(completion_requested=True))
        )
        if not found:
            return None
        if len(found) == 1:
            only = found[0]
            start = self.cursor + only.start_position
            self._change(
                self.text[:start] + only.text + self.text[self.cursor :], start + len(only.text)
            )
            self._inserting = False
            return None
        shared = get_common_complete_suffix(document, found)
        if shared:
            self._insert(shared)
            self._inserting = False
            return None
        return [Choices(sorted({completion.text for completion in found}))]
