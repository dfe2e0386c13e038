"""How the input line is drawn: what to write to the terminal, as text, for each thing
that happens to the line (a key, Enter, a line to show above it, a resize). No I/O here:
chatapp.input_line writes what these return.

- ``CursorView`` (``PROMPT`` mode): the input line at the bottom, drawn again in place
  with cursor movement (carriage return, cursor up, erase below). A line wider than the
  terminal wraps over several rows; a line to show erases the input line, is written
  as ``>>> LINE``, and the input line is drawn again below it.
- ``DumbView`` (``DUMB`` mode): no cursor movement at all. Typed text is echoed as it
  comes, Backspace is ``\\b \\b``, and any other change starts a line of its own.

Characters a terminal would act on (a tab, an escape from a paste) are drawn as ``^I``,
``^[``, ...; what is sent is the text as typed.
"""

from __future__ import annotations

from prompt_toolkit.utils import get_cwidth

from chatapp import screen

#: Narrower than this, the terminal is taken to be this wide (a wide character needs 2).
MIN_WIDTH = 4

ERASE_BELOW = "\x1b[J"
CLEAR_SCREEN = "\x1b[H\x1b[2J"


def cell(char: str) -> str:
    """What stands for ``char`` on the screen."""
    code = ord(char)
    if code < 0x20 or code == 0x7F:
        return "^" + chr(code ^ 0x40)
    if 0x80 <= code < 0xA0 or 0xD800 <= code < 0xE000:  # C1 controls, undecodable bytes
        return "\ufffd"
    return char


def layout(prompt: str, text: str, cursor: int, width: int) -> tuple[str, int, int, int, int]:
    """``prompt + text`` as written to a terminal ``width`` columns wide: the text to write,
    and the rows and columns (from where it starts) of the cursor and of the end. A wide
    character that does not fit on a row starts the next one (padded, so that every
    terminal wraps it alike)."""
    full = prompt + text
    target = len(prompt) + cursor
    if full.isascii() and full.isprintable():  # one column per character
        end = len(full)
        return full, target // width, target % width, end // width, end % width
    parts: list[str] = []
    row = column = 0
    cursor_row, cursor_column = 0, 0
    for index, char in enumerate(full):
        shown = cell(char)
        cells = sum(get_cwidth(c) for c in shown)
        if column + cells > width:
            parts.append(" " * (width - column))
            row, column = row + 1, 0
        if index == target:
            cursor_row, cursor_column = row, column
        parts.append(shown)
        column += cells
    if column >= width:
        row, column = row + 1, 0
    if target >= len(full):
        cursor_row, cursor_column = row, column
    return "".join(parts), cursor_row, cursor_column, row, column


def _shared_start(one: str, other: str) -> int:
    """How many characters ``one`` and ``other`` begin with alike."""
    for index, (a, b) in enumerate(zip(one, other, strict=False)):
        if a != b:
            return index
    return min(len(one), len(other))


def _up(rows: int) -> str:
    return f"\x1b[{rows}A" if rows > 0 else ""


def columns(items: list[str], width: int) -> str:
    """``items`` in columns, as readline lists completions; one row a line."""
    cell_width = max(sum(get_cwidth(c) for c in item) for item in items) + 2
    per_row = max(1, width // cell_width)
    rows = [items[start : start + per_row] for start in range(0, len(items), per_row)]
    return "".join("".join(item.ljust(cell_width) for item in row).rstrip() + "\n" for row in rows)


class CursorView:
    """The input line drawn in place (see the module's docstring)."""

    def __init__(self, width: int) -> None:
        self.width = max(width, MIN_WIDTH)
        self._cursor_row = 0  # rows from the input line's first row down to the cursor
        self._drawn: tuple[str, str, int] | None = None  # on the screen now (None: nothing)
        self._ended = False  # the last line said the client is leaving: no input line
        self._end_on_new_row = False  # the line drawn fills its last row exactly

    def start(self) -> str:
        return self.draw(screen.PROMPT, "", 0)

    def draw(self, prompt: str, text: str, cursor: int) -> str:
        """The input line as it is now (nothing to write if it is on the screen already)."""
        if self._ended or self._drawn == (prompt, text, cursor):
            return ""
        written, cursor_row, cursor_column, end_row, end_column = layout(
            prompt, text, cursor, self.width
        )
        out = [self._erase(), written]
        self._end_on_new_row = end_column == 0 and end_row > 0
        if self._end_on_new_row:
            out.append("\n\r")  # the end fills its row: the cursor goes to the next one
        if (cursor_row, cursor_column) != (end_row, end_column):
            out += [_up(end_row - cursor_row), "\r"]
            if cursor_column:
                out.append(f"\x1b[{cursor_column}C")
        self._cursor_row = cursor_row
        self._drawn = (prompt, text, cursor)
        return "".join(out)

    def _erase(self) -> str:
        """Back to where the input line starts, and everything from there down erased."""
        up, self._cursor_row, self._drawn = self._cursor_row, 0, None
        return _up(up) + "\r" + ERASE_BELOW

    def accept(self, text: str) -> str:
        """Enter: the line stays on the screen as typed, and a new input line starts."""
        finished = self._draw_to_the_end(text)
        self._cursor_row, self._drawn = 0, None
        return finished + self.draw(screen.PROMPT, "", 0)

    def show(self, line: str, prompt: str, text: str, cursor: int) -> str:
        """``>>> LINE`` above the input line, which is drawn again below it; after the
        line that says the client was interrupted, no input line."""
        shown = self._erase() + f"{screen.PROMPT}{line}\n"
        self._ended = self._ended or line == screen.KEYBOARD_INTERRUPT
        return shown + self.draw(prompt, text, cursor)

    def choices(self, items: list[str], prompt: str, text: str, cursor: int) -> str:
        return self._erase() + columns(items, self.width) + self.draw(prompt, text, cursor)

    def clear(self, prompt: str, text: str, cursor: int) -> str:
        self._cursor_row, self._drawn = 0, None
        return CLEAR_SCREEN + self.draw(prompt, text, cursor)

    def resize(self, width: int, prompt: str, text: str, cursor: int) -> str:
        """Drawn again for the new width, from the row the cursor was on (as a terminal
        that does not rewrap its lines leaves them)."""
        self.width = max(width, MIN_WIDTH)
        return self._erase() + self.draw(prompt, text, cursor)

    def finish(self, text: str) -> str:
        """The client is leaving: the input line stays, as a typed line does."""
        if self._ended:
            return ""
        finished = self._draw_to_the_end(text)
        self._ended = True
        return finished

    def _draw_to_the_end(self, text: str) -> str:
        """``>>> text`` with the cursor after it, and the cursor on the next row."""
        drawn = self.draw(screen.PROMPT, text, len(text))
        return drawn if self._end_on_new_row else drawn + "\n"


class DumbView:
    """The input line with no cursor movement (see the module's docstring)."""

    def __init__(self, width: int) -> None:
        self.width = max(width, MIN_WIDTH)
        self._line: str | None = None  # what is on the last line: prompt and typed text

    def start(self) -> str:
        self._line = screen.PROMPT
        return screen.PROMPT

    def draw(self, prompt: str, text: str, cursor: int) -> str:
        line, new = self._line, prompt + "".join(cell(c) for c in text)
        if line is None or new == line:
            return ""
        self._line = new
        kept = _shared_start(line, new)
        if kept >= len(screen.PROMPT) and (len(line) - 1) // self.width == kept // self.width:
            # what changed is on the last row: rubbed out, and written again
            return "\b \b" * (len(line) - kept) + new[kept:]
        return "\n" + new

    def accept(self, text: str) -> str:
        echoed = self.draw(screen.PROMPT, text, len(text))
        self._line = screen.PROMPT
        return echoed + "\n" + screen.PROMPT

    def show(self, line: str, prompt: str, text: str, cursor: int) -> str:
        """A line arriving while something is typed starts a line of its own, and what was
        typed is shown again below it."""
        before = "" if self._line == screen.PROMPT else "\n" + screen.PROMPT
        if self._line is None:
            return f"{line}\n"  # the client is leaving: no input line any more
        if line == screen.KEYBOARD_INTERRUPT:
            self._line = None  # nothing is typed after this one
            return f"{before}{line}\n"
        self._line = prompt + "".join(cell(c) for c in text)
        return f"{before}{line}\n{self._line}"

    def choices(self, items: list[str], prompt: str, text: str, cursor: int) -> str:
        self._line = prompt + "".join(cell(c) for c in text)
        return "\n" + columns(items, self.width) + self._line

    def clear(self, prompt: str, text: str, cursor: int) -> str:
        return ""

    def resize(self, width: int, prompt: str, text: str, cursor: int) -> str:
        self.width = max(width, MIN_WIDTH)
        return ""

    def finish(self, text: str) -> str:
        if self._line is None:
            return ""
        self._line = None
        return "\n"


View = CursorView | DumbView
