"""End to end: the input line in a real terminal (a pty with ``TERM=xterm-256color``),
as a person uses it. What the terminal shows is rendered by a VT100 emulator (pyte),
so the checks read the screen a person would read, escape sequences applied.

The other clients are real processes too, fed from pipes.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pexpect
import pyte
import pytest
from _harness import Proc, chatapp_command, chatapp_env, free_udp_ports, join, join_args, serve

from chatapp import screen

pytestmark = pytest.mark.e2e

ROWS, COLUMNS = 40, 120
#: Generous: the machine may be loaded; nothing here measures time.
TIMEOUT = 30.0
PROMPT = screen.PROMPT.rstrip()
TABLE = screen.TABLE_UPDATED


class XTerm:
    """``chatapp join`` in a pty that says it is an xterm, and the screen it draws."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        command = chatapp_command()
        self.child = pexpect.spawn(
            command[0],
            [*command[1:], *args],
            env={**env, "TERM": "xterm-256color"},
            dimensions=(ROWS, COLUMNS),
            timeout=TIMEOUT,
        )
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self.stream = pyte.ByteStream(self.screen)

    def lines(self) -> list[str]:
        """The screen's lines, the trailing blank ones left out."""
        lines = [line.rstrip() for line in self.screen.display]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    def _read(self) -> bool:
        try:
            self.stream.feed(self.child.read_nonblocking(65536, timeout=0.05))
        except pexpect.TIMEOUT:
            pass
        except pexpect.EOF:
            return False
        return True

    def wait(self, what: str, test: Callable[[list[str]], bool]) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not test(self.lines()):
            if not self._read() or time.monotonic() > deadline:
                raise AssertionError(f"{what}: not on the screen:\n" + "\n".join(self.lines()))

    def shows(self, line: str) -> None:
        """Wait until ``line`` is a line of its own on the screen."""
        self.wait(repr(line), lambda lines: line in lines)

    def input_line(self, text: str) -> None:
        """Wait until the last line is the prompt with ``text`` typed after it."""
        want = f"{screen.PROMPT}{text}".rstrip()
        self.wait(f"input line {want!r}", lambda lines: bool(lines) and lines[-1] == want)

    def type(self, keys: str) -> None:
        data = keys.encode()
        while data:  # a long paste goes in as the terminal takes it
            written = os.write(self.child.child_fd, data[:4096])
            data = data[written:]

    def resize(self, rows: int, columns: int) -> None:
        """The window is resized (the program gets SIGWINCH), and the emulator with it."""
        self.child.setwinsize(rows, columns)
        self.screen.resize(rows, columns)

    def exit_status(self) -> int:
        self.child.expect(pexpect.EOF)
        self.stream.feed(self.child.before or b"")
        self.cooked = cooked(self.child.child_fd)
        self.child.close()
        assert self.child.signalstatus is None
        assert isinstance(self.child.exitstatus, int)
        return self.child.exitstatus

    def kill(self) -> None:
        with contextlib.suppress(OSError, pexpect.ExceptionPexpect):
            if self.child.isalive():
                os.killpg(self.child.pid, signal.SIGKILL)
            self.child.close(force=True)


def cooked(fd: int) -> bool:
    """The terminal is back in the mode a shell expects: its own line editing and echo."""
    lflag = termios.tcgetattr(fd)[3]
    return bool(lflag & termios.ICANON and lflag & termios.ECHO and lflag & termios.ISIG)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return chatapp_env(tmp_path / "data")


@pytest.fixture
def started() -> Iterator[list[XTerm | Proc]]:
    processes: list[XTerm | Proc] = []
    yield processes
    for process in processes:
        process.kill()


def a_server_and_bob(env: dict[str, str], started: list[XTerm | Proc]) -> tuple[int, Proc]:
    """A server, and bob: a client fed from a pipe. The server's port, and bob."""
    server_port, bob_port = free_udp_ports(2)
    started.append(serve(server_port, env))
    bob = join("bob", server_port, bob_port, env)
    started.append(bob)
    bob.expect(TABLE)
    return server_port, bob


def user1_at_a_terminal(env: dict[str, str], started: list[XTerm | Proc], server: int) -> XTerm:
    (port,) = free_udp_ports(1)
    user1 = XTerm(join_args("user1", server, port), env)
    started.append(user1)
    user1.shows(f"{screen.PROMPT}{TABLE}")
    user1.input_line("")
    return user1


def test_a_half_typed_line_survives_an_incoming_message(
    env: dict[str, str], started: list[XTerm | Proc]
) -> None:
    server, bob = a_server_and_bob(env, started)
    user1 = user1_at_a_terminal(env, started, server)
    bob.expect(TABLE, count=2)

    user1.type("send bob hel")
    user1.input_line("send bob hel")
    bob.type("send user1 are you there?")
    user1.shows(f"{screen.PROMPT}bob : are you there?")  # above the input line, whole
    user1.input_line("send bob hel")  # which is intact

    user1.type("lo\r")
    bob.expect("user1 : hello")  # sent as it read on the screen
    user1.shows(f"{screen.PROMPT}[Message has been received by bob.]")
    user1.input_line("")
    assert user1.lines() == [
        f"{screen.PROMPT}{TABLE}",
        f"{screen.PROMPT}bob : are you there?",
        f"{screen.PROMPT}send bob hello",
        f"{screen.PROMPT}[Message has been received by bob.]",
        PROMPT,
    ]

    user1.type("\x03")  # Ctrl-C
    user1.shows(screen.KEYBOARD_INTERRUPT.join((screen.PROMPT, "")))
    assert user1.exit_status() == 0
    assert user1.cooked, "the terminal was not given back in cooked mode"
    assert user1.lines()[-1] == f"{screen.PROMPT}{screen.KEYBOARD_INTERRUPT}"


def test_up_recalls_the_last_command_from_a_private_history_file(
    env: dict[str, str], started: list[XTerm | Proc], tmp_path: Path
) -> None:
    server, bob = a_server_and_bob(env, started)
    user1 = user1_at_a_terminal(env, started, server)
    user1.type("send bob first\r")
    bob.expect("user1 : first")
    user1.type("\x1b[A")  # Up
    user1.input_line("send bob first")
    user1.type("\r")
    bob.expect("user1 : first", count=2)
    # at once after Enter, before the answer: what comes after the Enter waits for it
    user1.type("send bob second\r")
    user1.type("\x1b[A")
    user1.input_line("send bob second")
    user1.type("\x15")  # Ctrl-U: the line is emptied
    user1.input_line("")
    for text in ("third", "fourth", "fifth"):
        user1.type(f"send bob {text}\r")
    bob.expect("user1 : fifth")
    assert [line for line in bob.lines() if line.startswith("user1 : ")][-4:] == [
        "user1 : second",
        "user1 : third",
        "user1 : fourth",
        "user1 : fifth",
    ]

    user1.type("\x04")  # Ctrl-D on an empty line: leave quietly
    assert user1.exit_status() == 0
    assert screen.KEYBOARD_INTERRUPT not in "\n".join(user1.lines())
    history = Path(env["XDG_STATE_HOME"]) / "chatapp" / "history"
    assert "send bob first" in history.read_text()
    assert stat.S_IMODE(history.stat().st_mode) == 0o600
    assert str(tmp_path) in str(history)  # never the user's own

    again = user1_at_a_terminal(env, started, server)  # a new client, the same history
    again.type("\x1b[A")
    again.input_line("send bob fifth")


def test_tab_completes_commands_and_names(env: dict[str, str], started: list[XTerm | Proc]) -> None:
    server, bob = a_server_and_bob(env, started)
    user1 = user1_at_a_terminal(env, started, server)
    user1.type("sen\t")
    user1.input_line("send")  # what send and send_all share
    user1.type(" b\t")
    user1.input_line("send bob")
    user1.type(" tab works\r")
    bob.expect("user1 : tab works")
    user1.shows(f"{screen.PROMPT}[Message has been received by bob.]")


def test_a_long_pasted_line_is_sent_whole_or_refused_never_cut(
    env: dict[str, str], started: list[XTerm | Proc]
) -> None:
    """A terminal in its own line editing passes at most 4095 characters of a line;
    the input line has no such limit, and the datagram's is said in a line."""
    server, bob = a_server_and_bob(env, started)
    user1 = user1_at_a_terminal(env, started, server)
    text = "".join(chr(ord("a") + i % 26) for i in range(5000))  # over 4095, under the limit
    user1.type(f"send bob {text}\r")
    bob.expect(f"user1 : {text}")
    user1.shows(f"{screen.PROMPT}[Message has been received by bob.]")

    user1.type("send bob " + "é" * 6000 + "\r")
    user1.wait(
        "too long",
        lambda lines: any(line.startswith(">>> [Message too long: 12000 bytes") for line in lines),
    )
    user1.type("send bob after\r")
    bob.expect("user1 : after")
    sent = [line for line in bob.lines() if line.startswith("user1 : ")]
    assert sent == [f"user1 : {text}", "user1 : after"]  # nothing cut, nothing else


def test_a_line_the_terminal_may_have_cut_is_not_sent(
    env: dict[str, str], started: list[XTerm | Proc]
) -> None:
    """Typing at a terminal whose output goes to a file: the client reads plain lines and
    the terminal edits them itself (canonical mode), passing at most 4095 characters of
    a line. A line that long may have been cut, so it is refused, never sent cut."""
    server, bob = a_server_and_bob(env, started)
    (port,) = free_udp_ports(1)
    master, slave = os.openpty()
    process = subprocess.Popen(
        [*chatapp_command(), *join_args("user1", server, port)],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    try:
        assert process.stdout is not None and process.stderr is not None
        read_line(process.stdout, TABLE)
        os.write(master, ("send bob " + "x" * 5000 + "\n").encode())
        assert read_line(process.stdout, "[Could not read") == (
            f"[Could not read that line: {screen.CUT_BY_TERMINAL}. Nothing was sent.]"
        )
        os.write(master, b"send bob short\n")
        bob.expect("user1 : short")
        assert [line for line in bob.lines() if line.startswith("user1")] == ["user1 : short"]
        os.write(master, b"\x04")  # Ctrl-D: the end of input
        assert process.wait(TIMEOUT) == 0
        assert process.stderr.read() == b""
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def read_line(stream: IO[bytes], start: str) -> str:
    """The next line of ``stream`` that starts with ``start`` (waiting for it)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = stream.readline().decode()
        if not line:
            break
        if line.startswith(start):
            return line.rstrip("\n")
    raise AssertionError(f"no line starting with {start!r}")


def test_the_seed_s_test_3_line_for_line_on_xterms(
    env: dict[str, str], started: list[XTerm | Proc]
) -> None:
    """The seed's third test with every client at a full terminal: each screen, as a
    person reads it, is the seed's transcript line for line (with the table updates the
    rules add, and the prompt left on the last line)."""
    server_port, *ports = free_udp_ports(4)
    started.append(serve(server_port, env, "--verbose"))
    clients: dict[str, XTerm] = {}
    for index, name in enumerate(("user1", "user2", "user3")):
        clients[name] = XTerm(join_args(name, server_port, ports[index], command="-c"), env)
        started.append(clients[name])
        clients[name].shows(f">>> {TABLE}")  # joined: the next one may start
    x, y, z = clients["user1"], clients["user2"], clients["user3"]
    x.wait("3 tables", lambda lines: lines.count(f">>> {TABLE}") == 3)
    y.wait("2 tables", lambda lines: lines.count(f">>> {TABLE}") == 2)

    x.type("send_all hello guys\r")
    x.shows(">>> [Message received by the server.]")
    y.shows(">>> Channel_Message user1 : hello guys")
    z.shows(">>> Channel_Message user1 : hello guys")
    y.type("\x03")
    assert y.exit_status() == 0
    x.type("send_all hi\r")
    z.shows(">>> Channel_Message user1 : hi")
    x.wait("4 tables", lambda lines: lines.count(f">>> {TABLE}") == 4)
    z.wait("2 tables", lambda lines: lines.count(f">>> {TABLE}") == 2)
    for client in (x, z):
        client.input_line("")

    assert x.lines() == [
        f">>> {TABLE}",
        f">>> {TABLE}",
        f">>> {TABLE}",
        ">>> send_all hello guys",
        ">>> [Message received by the server.]",
        ">>> send_all hi",
        ">>> [Message received by the server.]",
        f">>> {TABLE}",
        ">>>",
    ]
    assert y.lines() == [
        f">>> {TABLE}",
        f">>> {TABLE}",
        ">>> Channel_Message user1 : hello guys",
        f">>> {screen.KEYBOARD_INTERRUPT}",
    ]
    assert z.lines() == [
        f">>> {TABLE}",
        ">>> Channel_Message user1 : hello guys",
        ">>> Channel_Message user1 : hi",
        f">>> {TABLE}",
        ">>>",
    ]


def test_a_line_wider_than_the_terminal_is_edited_across_rows_and_sent_whole(
    env: dict[str, str], started: list[XTerm | Proc]
) -> None:
    server, bob = a_server_and_bob(env, started)
    user1 = user1_at_a_terminal(env, started, server)
    text = "".join(chr(ord("a") + i % 26) for i in range(250))
    user1.type(f"send bob {text}")
    typed = f"{screen.PROMPT}send bob {text}"
    rows = [typed[i : i + COLUMNS] for i in range(0, len(typed), COLUMNS)]
    user1.wait("three rows", lambda lines: lines[-3:] == rows)
    user1.type("\x1b[D" * 5 + "Z")  # Left five times, across no row: then a Z
    edited = f"{text[:-5]}Z{text[-5:]}"
    typed = f"{screen.PROMPT}send bob {edited}"
    rows = [typed[i : i + COLUMNS] for i in range(0, len(typed), COLUMNS)]
    user1.wait("the Z", lambda lines: lines[-3:] == rows)
    assert (user1.screen.cursor.y, user1.screen.cursor.x) == (len(user1.lines()) - 1, 19)
    user1.type("\x01\x1bf\x1bf\x1bfY")  # to the start, three words on: a Y after the text
    user1.type("\r")
    bob.expect(f"user1 : {edited}Y")
    user1.shows(f"{screen.PROMPT}[Message has been received by bob.]")
    assert user1.lines()[-1] == PROMPT


def test_a_resized_window_gets_the_input_line_drawn_again(
    env: dict[str, str], started: list[XTerm | Proc]
) -> None:
    server, bob = a_server_and_bob(env, started)
    user1 = user1_at_a_terminal(env, started, server)
    text = "x" * 90
    user1.type(f"send bob {text}")
    user1.input_line(f"send bob {text}")
    user1.resize(ROWS, 60)  # narrower: the line takes two rows now
    typed = f"{screen.PROMPT}send bob {text}"
    user1.wait("two rows", lambda lines: lines[-2:] == [typed[:60], typed[60:]])
    bob.type("send user1 still there?")
    user1.shows(f"{screen.PROMPT}bob : still there?")
    user1.wait("redrawn below", lambda lines: lines[-2:] == [typed[:60], typed[60:]])
    user1.type("\r")
    bob.expect(f"user1 : {text}")


def test_pastes_ctrl_z_and_ctrl_backslash(env: dict[str, str], started: list[XTerm | Proc]) -> None:
    """A paste comes marked (bracketed paste): its tab is text, each of its line breaks an
    Enter. Ctrl-Z and Ctrl-\\ neither stop nor kill the client (they would leave the
    terminal without its line editing)."""
    server, bob = a_server_and_bob(env, started)
    user1 = user1_at_a_terminal(env, started, server)
    user1.type("\x1a\x1c")
    user1.type("\x1b[200~send bob one\tpasted\nsend bob two\x1b[201~")
    bob.expect("user1 : one\\x09pasted")  # (the receiver shows a control character so)
    user1.input_line("send bob two")  # the last line waits for Enter
    user1.type("\r")
    bob.expect("user1 : two")
    user1.child.kill(signal.SIGHUP)  # the terminal hangs up: a quiet exit
    assert user1.exit_status() == 0
    assert user1.cooked
    assert screen.KEYBOARD_INTERRUPT not in "\n".join(user1.lines())


def test_on_a_dumb_terminal_the_line_is_echoed_without_cursor_movement(
    env: dict[str, str], started: list[XTerm | Proc]
) -> None:
    server, bob = a_server_and_bob(env, started)
    (port,) = free_udp_ports(1)
    command = chatapp_command()
    user1 = pexpect.spawn(
        command[0],
        [*command[1:], *join_args("user1", server, port)],
        env={**env, "TERM": "dumb"},
        dimensions=(ROWS, COLUMNS),
        timeout=TIMEOUT,
    )
    try:
        user1.expect_exact(f"{screen.PROMPT}{TABLE}\r\n{screen.PROMPT}")
        bob.expect(TABLE, count=2)
        user1.send("send bob helx")
        user1.expect_exact("send bob helx")
        user1.send("\x7flo")  # Backspace
        user1.expect_exact("\b \blo")
        bob.type("send user1 are you there?")
        # the half-typed line, the message on a line of its own, the line again
        user1.expect_exact(
            f"\r\n{screen.PROMPT}bob : are you there?\r\n{screen.PROMPT}send bob hello"
        )
        user1.send("\r")
        bob.expect("user1 : hello")
        user1.expect_exact(f"\r\n{screen.PROMPT}[Message has been received by bob.]\r\n")
        user1.sendcontrol("c")
        user1.expect_exact(f"{screen.PROMPT}{screen.KEYBOARD_INTERRUPT}\r\n")
        user1.expect(pexpect.EOF)
        assert "\x1b" not in (user1.before or b"").decode()
        assert cooked(user1.child_fd)
        user1.close()
        assert user1.exitstatus == 0
    finally:
        with contextlib.suppress(OSError, pexpect.ExceptionPexpect):
            user1.close(force=True)


#: A program that opens the input line and fails on the first key: in its input task
#: (the ``finally`` of ``read_input`` gives the terminal back), or with no task running
#: (``atexit`` does).
CRASHING = """
import os, sys, trio
from prompt_toolkit.history import InMemoryHistory
from chatapp.input_line import InputLine

async def deliver(item):
    raise RuntimeError("a bug")

async def main(where):
    line = InputLine.open(["send"], list, dumb=False, history=InMemoryHistory(), deliver=deliver)
    if where == "atexit":
        os.read(0, 1)
        sys.exit(3)  # never closed
    await line.read_input()

trio.run(main, sys.argv[1])
"""


@pytest.mark.parametrize("where", ["task", "atexit"])
def test_the_terminal_is_given_back_when_the_program_fails(where: str) -> None:
    child = pexpect.spawn(
        sys.executable, ["-c", CRASHING, where], dimensions=(ROWS, COLUMNS), timeout=TIMEOUT
    )
    child.expect_exact(screen.PROMPT)
    assert not cooked(child.child_fd)  # the input line's own mode, while it runs
    child.send("x\r")
    child.expect(pexpect.EOF)
    output = (child.before or b"").decode()
    assert cooked(child.child_fd)
    restored = output.index("\x1b[?2004l")  # the paste mode off, as the rest was restored
    if where == "task":  # before the traceback is printed
        assert restored < output.index("Traceback") < output.index("RuntimeError: a bug")
    child.close()
    assert child.exitstatus == (1 if where == "task" else 3)
