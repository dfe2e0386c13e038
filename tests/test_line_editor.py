"""The input line without a terminal: the editing keys, the history, the search and
Tab (chatapp.line_editor), and what is drawn for them (chatapp.line_views), the
drawing read back through a VT100 emulator (pyte) as a terminal would show it."""

from __future__ import annotations

import pyte
import pytest
from prompt_toolkit.input.vt100_parser import Vt100Parser
from prompt_toolkit.key_binding import KeyPress

from chatapp import screen
from chatapp.line_editor import (
    MAX_LINE_CHARS,
    Accepted,
    Choices,
    ClearScreen,
    EndOfInput,
    LineEditor,
    Outcome,
)
from chatapp.line_views import CursorView, DumbView, cell, layout
from chatapp.protocol.client import COMMANDS
from chatapp.terminal import CommandCompleter

NAMES = ["bob", "bobby", "alice"]


def editor(history: list[str] | None = None) -> LineEditor:
    line = LineEditor(CommandCompleter(COMMANDS, lambda: NAMES))
    line.load_history(history or [])
    return line


def keys(line: LineEditor, typed: str) -> list[Outcome]:
    """``typed`` as a terminal sends it, through prompt_toolkit's parser."""
    pressed: list[KeyPress] = []
    parser = Vt100Parser(pressed.append)
    parser.feed_and_flush(typed)
    return [outcome for key in pressed for outcome in line.press(key)]


def state(line: LineEditor) -> str:
    """The text with a ``|`` where the cursor is."""
    return line.text[: line.cursor] + "|" + line.text[line.cursor :]


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("hello\x01X", "X|hello"),  # Ctrl-A
        ("hello\x01\x05X", "helloX|"),  # Ctrl-E
        ("hello\x1b[D\x1b[DX", "helX|lo"),  # Left
        ("hello\x02\x02\x06X", "hellX|o"),  # Ctrl-B, Ctrl-F
        ("hello\x1b[H\x1b[3~", "|ello"),  # Home, Delete
        ("hello\x7f\x08", "hel|"),  # Backspace (DEL and ^H)
        ("send bob hi\x17", "send bob |"),  # Ctrl-W
        ("send bob hi\x17\x17", "send |"),
        ("send bob hi\x1b\x7f", "send bob |"),  # Alt-Backspace
        ("send bob hi\x1bb\x1bb", "send |bob hi"),  # Alt-B
        ("send bob hi\x01\x1bf", "send| bob hi"),  # Alt-F
        ("send bob hi\x01\x1bd", "| bob hi"),  # Alt-D
        ("send bob hi\x1b[1;5D", "send bob |hi"),  # Ctrl-Left
        ("send bob hi\x02\x02\x0b", "send bob |"),  # Ctrl-K
        ("send bob hi\x02\x02\x15", "|hi"),  # Ctrl-U
        ("send bob hi\x02\x02\x0b\x01\x19", "hi|send bob "),  # Ctrl-K, Ctrl-Y
        ("ab\x14", "ba|"),  # Ctrl-T at the end
        ("abc\x02\x02\x14", "ba|c"),  # Ctrl-T inside
        ("send hello\x1f", "|"),  # Ctrl-_: the word typed, taken back
        ("send\x15bob\x1f", "|"),  # Ctrl-_ after Ctrl-U and typing: the typing
        ("send\x15bob\x1f\x1f", "send|"),  # and then the Ctrl-U
    ],
)
def test_emacs_editing_keys(typed: str, expected: str) -> None:
    line = editor()
    assert keys(line, typed) == []
    assert state(line) == expected


def test_enter_accepts_the_line_and_ctrl_d_ends_an_empty_one() -> None:
    line = editor()
    assert keys(line, "send bob hi\r") == [Accepted("send bob hi", remember=True)]
    assert state(line) == "|"
    assert keys(line, "x\x04") == []  # Ctrl-D on a line with text: Delete
    assert keys(line, "\x01\x04") == []
    assert keys(line, "\x04") == [EndOfInput()]
    assert keys(line, "\n") == [Accepted("")]  # Ctrl-J too (pexpect's sendline)


def test_up_and_down_walk_the_history_and_keep_its_edits() -> None:
    line = editor(["send bob one", "send bob two"])
    keys(line, "draft")
    keys(line, "\x1b[A")
    assert line.text == "send bob two"
    keys(line, "\x1b[A")
    assert line.text == "send bob one"
    keys(line, "\x1b[A")  # the oldest: stays
    assert line.text == "send bob one"
    keys(line, "!\x1b[B\x1b[B")  # an edit of a history line, then down to the draft
    assert line.text == "draft"
    keys(line, "\x10")  # Ctrl-P
    assert line.text == "send bob two"
    keys(line, "\x10")
    assert line.text == "send bob one!"  # the edit is kept until Enter
    assert keys(line, "\r") == [Accepted("send bob one!", remember=True)]
    keys(line, "\x1b[A\x1b[A")
    assert line.text == "send bob two"  # the history itself is as it was
    assert keys(line, "\x1b[B\r") == [Accepted("send bob one!")]  # not stored twice


def test_ctrl_r_searches_the_history() -> None:
    line = editor(["send bob first", "table", "send alice second"])
    keys(line, "\x12")
    assert line.view()[0] == "(reverse-i-search)`': "
    keys(line, "send")
    assert line.view() == ("(reverse-i-search)`send': ", "send alice second", 0)
    keys(line, "\x12")  # again: older
    assert line.text == "send bob first"
    keys(line, "zz")
    assert line.view()[0].startswith("(failed reverse-i-search)")
    keys(line, "\x7f\x7f\x1b")  # Backspace twice, Escape: the search ends, the line stays
    assert line.view()[0] == screen.PROMPT
    assert line.text == "send alice second"
    keys(line, "\x12bob\r")
    assert line.view()[0] == screen.PROMPT


def test_ctrl_g_gives_up_the_search() -> None:
    line = editor(["send bob first"])
    keys(line, "draft\x12bob")
    assert line.text == "send bob first"
    keys(line, "\x07")
    assert state(line) == "draft|"


def test_tab_completes_as_readline_does() -> None:
    line = editor()
    assert keys(line, "sen\t") == []
    assert state(line) == "send|"  # what send and send_all share
    assert keys(line, "\t") == [Choices(["send", "send_all"])]
    assert keys(line, " a\t") == []
    assert state(line) == "send alice|"
    keys(line, "\x17b\t")
    assert state(line) == "send bob|"
    assert keys(line, "\t") == [Choices(["bob", "bobby"])]
    assert keys(line, "\x0c") == [ClearScreen()]


def test_a_paste_is_text_and_its_line_breaks_are_enters() -> None:
    line = editor()
    outcomes = keys(line, "\x1b[200~send bob a\tb\r\nsend bob c\x1b[201~")
    assert outcomes == [Accepted("send bob a\tb", remember=True)]  # the tab is text
    assert line.text == "send bob c"


def test_a_line_longer_than_the_editor_keeps_is_refused_whole() -> None:
    line = editor()
    line.type("x" * (MAX_LINE_CHARS + 10))
    assert len(line.text) == MAX_LINE_CHARS
    assert line.accept() == Accepted("x" * MAX_LINE_CHARS, too_long=True)
    assert line.accept() == Accepted("")


# --- drawing --------------------------------------------------------------------------------


class Terminal:
    """A VT100 emulator fed what a view writes (the kernel's \\n -> \\r\\n applied)."""

    def __init__(self, columns: int, rows: int = 8) -> None:
        self.screen = pyte.Screen(columns, rows)
        self.stream = pyte.Stream(self.screen)

    def feed(self, text: str) -> None:
        self.stream.feed(text.replace("\n", "\r\n"))

    def lines(self) -> list[str]:
        lines = [line.rstrip() for line in self.screen.display]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    def cursor(self) -> tuple[int, int]:
        return self.screen.cursor.y, self.screen.cursor.x


def test_a_line_wider_than_the_terminal_wraps_and_the_cursor_follows() -> None:
    term, view = Terminal(10), CursorView(10)
    term.feed(view.start())
    text = "send bob 0123456789abcdef"  # 4 + 25 columns: three rows
    term.feed(view.draw(screen.PROMPT, text, len(text)))
    assert term.lines() == [">>> send b", "ob 0123456", "789abcdef"]
    assert term.cursor() == (2, 9)
    term.feed(view.draw(screen.PROMPT, text, 3))  # the cursor moves back two rows
    assert term.cursor() == (0, 7)
    shorter = text[:8]
    term.feed(view.draw(screen.PROMPT, shorter, 8))  # what was below is erased
    assert term.lines() == [">>> send b", "ob"]
    assert term.cursor() == (1, 2)
    term.feed(view.show("[Client Table Updated]", screen.PROMPT, shorter, 8))
    assert term.lines() == [">>> [Clien", "t Table Up", "dated]", ">>> send b", "ob"]
    assert term.cursor() == (4, 2)


def test_a_line_that_fills_its_last_row_puts_the_cursor_on_the_next() -> None:
    term, view = Terminal(10), CursorView(10)
    term.feed(view.start())
    term.feed(view.draw(screen.PROMPT, "abcdef", 6))  # exactly 10 columns
    assert term.cursor() == (1, 0)
    term.feed(view.accept("abcdef"))
    assert term.lines() == [">>> abcdef", ">>>"]  # no blank row between
    assert term.cursor() == (1, 4)


def test_wide_and_control_characters() -> None:
    assert cell("\t") == "^I"
    assert cell("\x1b") == "^["
    assert cell("\udcff") == "\ufffd"  # a byte that was not UTF-8
    assert cell("é") == "é"
    # A wide character that does not fit on the row starts the next one.
    written, cursor_row, cursor_column, end_row, end_column = layout(">>> ", "abcd漢字", 6, 9)
    assert written == ">>> abcd \u6f22字"
    assert (cursor_row, cursor_column, end_row, end_column) == (1, 4, 1, 4)
    term, view = Terminal(9), CursorView(9)
    term.feed(view.start())
    term.feed(view.draw(screen.PROMPT, "abcd漢字", 6))
    assert term.lines() == [">>> abcd", "漢字"]
    assert term.cursor() == (1, 4)


def test_a_resize_draws_the_line_again_for_the_new_width() -> None:
    term, view = Terminal(20), CursorView(20)
    term.feed(view.start())
    term.feed(view.draw(screen.PROMPT, "send bob hello", 14))
    term.screen.resize(8, 10)
    term.feed(view.resize(10, screen.PROMPT, "send bob hello", 14))
    assert term.lines() == [">>> send b", "ob hello"]


def test_the_dumb_view_never_moves_the_cursor() -> None:
    view = DumbView(80)
    out = [view.start()]
    out.append(view.draw(screen.PROMPT, "send bo", 7))
    out.append(view.draw(screen.PROMPT, "send b", 6))  # Backspace
    out.append(view.draw(screen.PROMPT, "Xsend b", 1))  # an edit before the end
    out.append(view.show("bob : hi", screen.PROMPT, "Xsend b", 1))
    out.append(view.accept("Xsend b"))
    out.append(view.show("[Message sent failed]", screen.PROMPT, "", 0))
    out.append(view.finish(""))
    written = "".join(out)
    assert "\x1b" not in written and "\r" not in written
    assert written == (
        ">>> send bo\b \b" + "\b \b" * 6 + "Xsend b\n>>> bob : hi\n>>> Xsend b"
        "\n>>> [Message sent failed]\n>>> \n"
    )
    long_line = DumbView(10)  # a change on a row above the last: the line again, below
    long_line.start()
    long_line.draw(screen.PROMPT, "abcdefghijkl", 12)
    assert long_line.draw(screen.PROMPT, "Xbcdefghijkl", 1) == "\n>>> Xbcdefghijkl"
