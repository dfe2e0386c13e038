"""End to end: the installed ``chatapp`` command, run as real processes in real
terminals (pseudo-terminals) on loopback, played as a person would play the
seed's tests: type a command, wait for the screen to answer, press Ctrl-C.

Each client's whole screen is compared with what the seed transcripts show,
line by line and with the ``>>> `` prompts, plus the ``[Client Table Updated]``
lines the transcripts leave out (a table goes to every online client on every
change) and the typed commands the terminal echoes.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pexpect
import pytest
from _harness import (
    TEST_1_SCREENS,
    TEST_3_SCREENS,
    chatapp_command,
    chatapp_env,
    free_udp_ports,
    join_args,
    serve_args,
    wait_until_serving,
)

from chatapp.testing import SEED_LINES, line_matches, unmatched_seed_lines

pytestmark = pytest.mark.e2e

PROMPT = ">>> "
TIMEOUT = 10.0
INTERRUPTED = "Caught keyboard interrupt. Exiting"
TABLE = "[Client Table Updated]"
# What must never reach a screen, whether on stdout or stderr, while running or at exit.
NOISE = ("Traceback", "Exception", "Error:", "Warning:", "Fatal Python error")


class Terminal:
    """One ``chatapp`` process in its own pseudo-terminal, with everything it showed."""

    def __init__(self, args: list[str], env: dict[str, str], stderr_file: Path | None = None):
        command = [*chatapp_command(), *args]
        if stderr_file is not None:
            # The terminal may be gone by the time the process exits: keep its stderr in a file.
            env = {**env, "CHATAPP_TEST_STDERR": str(stderr_file)}
            command = ["/bin/sh", "-c", 'exec "$@" 2>"$CHATAPP_TEST_STDERR"', "sh", *command]
        self.transcript = io.StringIO()
        self.child = pexpect.spawn(
            command[0],
            command[1:],
            env=env,
            encoding="utf-8",
            codec_errors="replace",
            timeout=TIMEOUT,
            dimensions=(50, 400),
        )
        self.child.logfile_read = self.transcript
        #: A ``--quiet`` server's: the port ``wait_until_serving`` probed it from.
        self.probe_port: int | None = None

    def shows(self, line: str) -> None:
        """Wait until the program shows ``line`` (whole), after what it showed before."""
        self.child.expect_exact(line + "\r\n")

    def shows_pattern(self, pattern: str) -> None:
        """Like ``shows``, for a regular expression; ``.`` does not match a line end."""
        self.child.expect(re.compile(pattern))

    def type(self, line: str) -> None:
        self.child.sendline(line)

    def drain(self) -> None:
        """Read what the program has written so far: Ctrl-C makes the terminal discard
        output nobody has read yet, and a person's terminal would have shown it."""
        while True:
            try:
                self.child.read_nonblocking(65536, timeout=0.05)
            except (pexpect.TIMEOUT, pexpect.EOF):
                return

    def interrupt(self) -> None:
        self.drain()
        self.child.sendintr()

    def exit_status(self, timeout: float = TIMEOUT) -> int:
        """Wait for the process to end on its own; its status (never a signal's death)."""
        self.child.expect(pexpect.EOF, timeout=timeout)
        self.child.close()
        assert self.child.signalstatus is None, f"killed by signal {self.child.signalstatus}"
        assert isinstance(self.child.exitstatus, int)
        return self.child.exitstatus

    def screen(self) -> list[str]:
        """The terminal's lines as a person reads them (the echoed ``^C`` left out)."""
        text = self.transcript.getvalue().replace("\r\n", "\n").replace("\r", "")
        lines = [line.replace("^C", "").rstrip() for line in text.split("\n")]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    def shown_lines(self) -> list[str]:
        """The lines without their prompts, as chatapp.testing.seed writes them."""
        shown = []
        for line in self.screen():
            while line.startswith(PROMPT.rstrip()):
                line = line[len(PROMPT) :] if line.startswith(PROMPT) else ""
            if line:
                shown.append(line)
        return shown

    def kill(self) -> None:
        with contextlib.suppress(OSError, pexpect.ExceptionPexpect):
            if self.child.isalive():
                os.killpg(self.child.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, pexpect.ExceptionPexpect):
            self.child.close(force=True)


Start = Callable[..., Terminal]


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The children's environment: no database or trace outside this test's directory, and
    every warning Python would otherwise keep quiet shown, so that the noise checks see it."""
    return chatapp_env(tmp_path / "data", show_warnings=True)


@pytest.fixture
def start(env: dict[str, str]) -> Iterator[Start]:
    started: list[Terminal] = []

    def start(*args: str, stderr_file: Path | None = None) -> Terminal:
        terminal = Terminal(list(args), env, stderr_file)
        started.append(terminal)
        return terminal

    yield start
    for terminal in started:
        terminal.kill()


def start_server(start: Start, port: int, *options: str) -> Terminal:
    server = start(*serve_args(port, *options))
    if "--quiet" in options:
        # nothing is shown but warnings: ask the server itself (see quiet_events)
        server.probe_port = wait_until_serving(port)
    else:
        server.shows_pattern(r"listening on UDP 127\.0\.0\.1:\d+")
    return server


LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (DEBUG|INFO|WARNING) (.*)")


def log_entries(server: Terminal) -> list[tuple[str, str]]:
    """The server's log entries (level, text), each checked to be one timestamped line."""
    matches = [LOG_LINE.fullmatch(line) for line in server.screen() if line]
    assert all(matches), server.screen()
    return [(m.group(1), m.group(2)) for m in matches if m]


def log_events(server: Terminal) -> list[str]:
    return [text for _, text in log_entries(server)]


def quiet_events(server: Terminal) -> list[str]:
    """The log entries of a ``--quiet`` server (the probes that waited for it to serve
    drew challenges, which it does not log)."""
    return log_events(server)


def join(
    start: Start, name: str, server_port: int, port: int, *options: str, seed_spelling: bool
) -> Terminal:
    command = "-c" if seed_spelling else "join"
    return start(*join_args(name, server_port, port, *options, command=command))


def assert_screen(terminal: Terminal, expected: str) -> None:
    """The whole screen, line for line; ``{time}`` stands for a Unix time."""
    want = [line.rstrip() for line in expected.strip("\n").splitlines()]
    got = terminal.screen()
    assert len(got) == len(want) and all(map(line_matches, want, got)), "\n".join(got)


def assert_seed_lines(test: int, clients: dict[str, Terminal]) -> None:
    for name, expected in SEED_LINES[test].items():
        shown = clients[name].shown_lines()
        assert unmatched_seed_lines(expected, shown) == [], (name, shown)


def assert_no_noise(*terminals: Terminal) -> None:
    for terminal in terminals:
        text = terminal.transcript.getvalue()
        assert not [word for word in NOISE if word in text], text


def stop_server(server: Terminal, *, quiet: bool = False) -> None:
    server.interrupt()
    if not quiet:
        server.shows("server stopped (Ctrl-C)")
    assert server.exit_status() == 0


def chat(sender: Terminal, receiver: Terminal, to: str, text: str, sender_name: str) -> None:
    sender.type(f"send {to} {text}")
    receiver.shows(f"{sender_name} : {text}")
    sender.shows(f"[Message has been received by {to}.]")


def test_seed_test_1(start: Start) -> None:
    server_port, *ports = free_udp_ports(4)
    server = start_server(start, server_port)
    x = join(start, "user1", server_port, ports[0], seed_spelling=True)
    x.shows(TABLE)
    y = join(start, "user2", server_port, ports[1], seed_spelling=True)
    for client in (x, y):
        client.shows(TABLE)
    z = join(start, "user3", server_port, ports[2], seed_spelling=False)
    for client in (x, y, z):
        client.shows(TABLE)

    chat(x, y, "user2", "hello nice to meet you.", "user1")
    chat(x, z, "user3", "hi!", "user1")
    chat(y, x, "user1", "hello, nice to meet you, too!", "user2")
    chat(y, z, "user3", "hello", "user2")
    chat(z, x, "user1", "hi~", "user3")
    chat(z, y, "user2", "hello!", "user3")

    x.type("dereg user1")
    x.shows("[You are now offline. Bye.]")
    y.shows(TABLE)
    z.shows(TABLE)
    for sender, text in ((y, "hello?"), (z, "are you still there?")):
        sender.type(f"send user1 {text}")
        sender.shows("[No ACK from user1, message sent to server.]")
        sender.shows("[Messages received by the server and saved.]")

    x.type("reg user1")
    x.shows("[You have message]")
    x.shows_pattern(r"\(\d+\.\d+\) user2 : hello\?\r\n")
    x.shows_pattern(r"\(\d+\.\d+\) user3 : are you still there\?\r\n")
    for client in (x, y, z):
        client.shows(TABLE)

    for client in (x, y, z):
        client.interrupt()
        client.shows(INTERRUPTED)
        assert client.exit_status() == 0
    stop_server(server)

    for name, client in (("user1", x), ("user2", y), ("user3", z)):
        assert_screen(client, TEST_1_SCREENS[name] + f">>> {INTERRUPTED}\n")
    assert_seed_lines(1, {"user1": x, "user2": y, "user3": z})
    stored = [float(line[1:].split(")")[0]) for line in x.shown_lines() if line.startswith("(")]
    assert len(stored) == 2 and stored[0] <= stored[1] and abs(stored[1] - time.time()) < 60
    events = log_events(server)
    assert events[0].startswith(f"chatapp server listening on UDP 127.0.0.1:{server_port} ")
    assert [event.split(" at ")[0] for event in events[1:]] == [
        "registered user1",
        "registered user2",
        "registered user3",
        "user1 deregistered",
        "stored a message for user1",
        "stored a message for user1",
        "user1 is back online",
        "delivering 2 stored messages to user1",
        "server stopped (Ctrl-C)",
    ]
    assert_no_noise(server, x, y, z)


def test_seed_test_2_client_gives_up_about_3_seconds_after_send(start: Start) -> None:
    server_port, *ports = free_udp_ports(3)
    server = start_server(start, server_port)
    x = join(start, "user1", server_port, ports[0], seed_spelling=True)
    x.shows(TABLE)
    y = join(start, "user2", server_port, ports[1], seed_spelling=True)
    for client in (x, y):
        client.shows(TABLE)
    y.type("dereg user2")
    y.shows("[You are now offline. Bye.]")
    x.shows(TABLE)
    stop_server(server)

    x.type("send user2 hi")
    sent = time.monotonic()
    x.shows("[No ACK from user2, message sent to server.]")
    x.shows("[Exiting]")
    assert x.exit_status() == 1
    # one direct try and five tries to the server, 500 ms each
    assert 2.5 <= time.monotonic() - sent <= 20.0

    y.drain()
    assert_screen(
        x,
        """
>>> [Client Table Updated]
>>> [Client Table Updated]
>>> [Client Table Updated]
>>> send user2 hi
>>> [No ACK from user2, message sent to server.]
>>> [Message sent failed]
>>> [Server is shut down]
>>> [Exiting]
>>>
""",
    )
    assert_screen(
        y,
        """
>>> [Client Table Updated]
>>> dereg user2
>>> [You are now offline. Bye.]
>>>
""",
    )
    assert_seed_lines(2, {"user1": x, "user2": y})
    y.interrupt()
    y.shows(INTERRUPTED)
    assert y.exit_status() == 0
    assert_no_noise(server, x, y)


def test_seed_test_3(start: Start) -> None:
    server_port, *ports = free_udp_ports(4)
    server = start_server(start, server_port, "--verbose")
    x = join(start, "user1", server_port, ports[0], seed_spelling=True)
    x.shows(TABLE)
    y = join(start, "user2", server_port, ports[1], seed_spelling=True)
    for client in (x, y):
        client.shows(TABLE)
    z = join(start, "user3", server_port, ports[2], seed_spelling=True)
    for client in (x, y, z):
        client.shows(TABLE)

    x.type("send_all hello guys")
    x.shows("[Message received by the server.]")
    y.shows("Channel_Message user1 : hello guys")
    z.shows("Channel_Message user1 : hello guys")
    y.interrupt()
    y.shows(INTERRUPTED)
    assert y.exit_status() == 0

    x.type("send_all hi")
    x.shows("[Message received by the server.]")
    z.shows("Channel_Message user1 : hi")
    # the server waits 500 ms for user2's ACK, then marks it offline and sends the table
    x.shows(TABLE)
    z.shows(TABLE)
    server.shows_pattern(r"no ACK from user2.*marked offline")

    x.drain()
    z.drain()
    for name, client in (("user1", x), ("user2", y), ("user3", z)):
        assert_screen(client, TEST_3_SCREENS[name])
    assert_seed_lines(3, {"user1": x, "user2": y, "user3": z})
    for client in (x, z):
        client.interrupt()
        client.shows(INTERRUPTED)
        assert client.exit_status() == 0
    stop_server(server)
    events = log_events(server)
    assert "channel message from user1: sent to 2, stored for 0" in events
    assert "no ACK from user2 (channel): marked offline" in events
    assert "stored a message for user2" in events
    # --verbose: the table's every version too
    for version in (1, 2, 3, 4):
        assert any(e.startswith(f"table version {version} sent to ") for e in events), events
    assert_no_noise(server, x, y, z)


def test_ctrl_d_exit_sighup_and_a_closed_terminal_leave_cleanly(
    start: Start, tmp_path: Path
) -> None:
    server_port, *ports = free_udp_ports(5)
    server = start_server(start, server_port, "--quiet")
    clients = []
    for index, port in enumerate(ports):
        stderr_file = tmp_path / f"stderr{index}.txt" if index == 3 else None
        client = start(*join_args(f"u{index}", server_port, port), stderr_file=stderr_file)
        client.shows(TABLE)
        clients.append(client)
    ctrl_d, typed_exit, hung_up, closed = clients

    ctrl_d.drain()
    ctrl_d.child.sendeof()
    assert ctrl_d.exit_status() == 0

    typed_exit.type("exit")
    typed_exit.shows("[Exiting]")
    assert typed_exit.exit_status() == 0

    hung_up.drain()
    hung_up.child.kill(signal.SIGHUP)
    assert hung_up.exit_status() == 0

    # Closing the terminal: the kernel sends SIGHUP, and the terminal is gone.
    closed.drain()
    pty = closed.child.ptyproc
    # What pexpect's close() does first; it would then signal the child after a fixed
    # delay, so give the child all the time it needs to exit on its own instead.
    pty.fileobj.close()
    pty.closed = True
    deadline = time.monotonic() + 3 * TIMEOUT
    while closed.child.isalive():
        assert time.monotonic() < deadline, "still running long after its terminal closed"
        time.sleep(0.05)
    assert closed.child.signalstatus is None and closed.child.exitstatus == 0
    assert (tmp_path / "stderr3.txt").read_text() == ""

    for client in (ctrl_d, typed_exit, hung_up):
        assert INTERRUPTED not in client.transcript.getvalue()
    stop_server(server, quiet=True)
    assert quiet_events(server) == []  # --quiet: warnings only, and there were none
    assert_no_noise(server, *clients)


def test_a_name_bound_to_another_key_is_refused_and_its_holder_undisturbed(
    start: Start, tmp_path: Path
) -> None:
    server_port, holder_port, intruder_port = free_udp_ports(3)
    server = start_server(start, server_port)
    holder = join(start, "user1", server_port, holder_port, seed_spelling=False)
    holder.shows(TABLE)
    # another person (another state directory, so another key) asks for the name
    other = str(tmp_path / "someone-else")
    intruder = join(
        start, "user1", server_port, intruder_port, "--state-dir", other, seed_spelling=False
    )
    intruder.shows(
        "[Registration refused: the name user1 belongs to another key. Choose another name.]"
    )
    assert intruder.exit_status() == 1

    chat(holder, holder, "user1", "still here", "user1")
    holder.drain()
    assert_screen(
        holder,
        """
>>> [Client Table Updated]
>>> send user1 still here
>>> user1 : still here
>>> [Message has been received by user1.]
>>>
""",
    )
    holder.interrupt()
    holder.shows(INTERRUPTED)
    assert holder.exit_status() == 0
    stop_server(server)
    assert_no_noise(server, holder, intruder)


def test_the_same_person_restarted_on_another_port_keeps_the_name(start: Start) -> None:
    server_port, first_port, second_port = free_udp_ports(3)
    server = start_server(start, server_port)
    first = join(start, "user1", server_port, first_port, seed_spelling=False)
    first.shows(TABLE)
    first.kill()  # gone without a word
    second = join(start, "user1", server_port, second_port, seed_spelling=False)
    second.shows(TABLE)
    chat(second, second, "user1", "it is me", "user1")
    second.type("fingerprint")
    second.shows_pattern(r"\[Your key \(user1\): [A-Z2-7]{4}( [A-Z2-7]{4}){3}\]\r\n")
    second.interrupt()
    second.shows(INTERRUPTED)
    assert second.exit_status() == 0
    stop_server(server)
    assert_no_noise(server, second)


def test_a_client_without_a_server_gives_up_after_5_tries(start: Start) -> None:
    server_port, port = free_udp_ports(2)
    started = time.monotonic()
    client = join(start, "user1", server_port, port, seed_spelling=True)
    client.shows_pattern(r"\[Server 127\.0\.0\.1:\d+ not responding\..*\]\r\n")
    client.shows("[Exiting]")
    assert client.exit_status() == 1
    assert 2.0 <= time.monotonic() - started <= 20.0
    assert_no_noise(client)


def test_bad_commands_get_a_line_and_the_client_keeps_working(start: Start) -> None:
    server_port, port = free_udp_ports(2)
    server = start_server(start, server_port)
    client = join(start, "user1", server_port, port, seed_spelling=False)
    client.shows(TABLE)
    for command, answer in (
        (
            "hello",
            r"\[Unknown command 'hello'\. Did you mean 'help'\? Type help for the commands\.\]",
        ),
        ("xyzzy", r"\[Unknown command 'xyzzy'\. Type help for the commands\.\]"),
        ("help send_all", r"\[send_all MESSAGE: a channel message to every other client.*\]"),
        ("send", r"\[Usage: send NAME MESSAGE\]"),
        ("send nobody hi", r"\[Unknown user nobody: .*\]"),
        ("dereg someone", r"\[You can only deregister yourself \(user1\)\.\]"),
        ("reg user1", r"\[You are already online\.\]"),
        ("help", r"\[Commands: .*\]"),
        ("table", r"\[user1 +127\.0\.0\.1:\d+ +online\]"),
    ):
        client.type(command)
        client.shows_pattern(answer + r"\r\n")
    os.write(client.child.child_fd, b"send user1 caf\xe9\xff\n")
    client.shows_pattern(r"\[Could not read that line: it is not UTF-8 text\. Nothing was sent\.\]")
    long_text = "x" * 4000  # about the most a terminal passes in one line
    client.type(f"send user1 {long_text}")
    client.shows(f"user1 : {long_text}")
    client.type("send user1 still working")
    client.shows("user1 : still working")
    client.shows("[Message has been received by user1.]")
    client.interrupt()
    client.shows(INTERRUPTED)
    assert client.exit_status() == 0
    stop_server(server)
    assert_no_noise(server, client)


def read_until(stream: IO[bytes], marker: bytes, seen: bytearray) -> None:
    deadline = time.monotonic() + TIMEOUT
    while marker not in seen:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no {marker!r} in {bytes(seen)!r}"
        chunk = os.read(stream.fileno(), 65536)
        assert chunk, f"no {marker!r} in {bytes(seen)!r}"
        seen += chunk


class Piped:
    """``chatapp`` processes with stdin, stdout and stderr all pipes (a script, not a person)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.processes: list[subprocess.Popen[bytes]] = []

    def run(self, *args: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [*chatapp_command(), *args],
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def serve(self, port: int) -> subprocess.Popen[bytes]:
        server = self.run(*serve_args(port))
        assert server.stderr is not None
        read_until(server.stderr, b"listening on UDP", bytearray())  # serving: go on
        return server

    def stop_server(self, server: subprocess.Popen[bytes]) -> None:
        server.send_signal(signal.SIGINT)
        assert server.wait(TIMEOUT) == 0
        assert server.stderr is not None
        log = server.stderr.read().decode()
        entries = [LOG_LINE.fullmatch(line) for line in log.splitlines()]
        assert all(entries) and not [e for e in entries if e and e.group(1) == "WARNING"], log

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def piped(env: dict[str, str]) -> Iterator[Piped]:
    processes = Piped(env)
    yield processes
    processes.close()


def test_long_lines_from_a_pipe_get_a_clear_line(piped: Piped) -> None:
    """A terminal cuts lines at about 4 KB; input from a pipe or a file is not cut."""
    server_port, port = free_udp_ports(2)
    server = piped.serve(server_port)
    client = piped.run(*join_args("user1", server_port, port))
    assert client.stdin is not None and client.stdout is not None and client.stderr is not None
    out = bytearray()
    read_until(client.stdout, TABLE.encode(), out)
    lines = [
        "send user1 " + "é" * 5000,  # too long for one datagram
        "send user1 " + "y" * 100_000,  # too long to read as one line
        "send user1 after",
    ]
    client.stdin.write("".join(line + "\n" for line in lines).encode())
    client.stdin.flush()
    read_until(client.stdout, b"[Message has been received by user1.]", out)
    client.stdin.close()  # end of input: the client leaves quietly
    assert client.wait(TIMEOUT) == 0
    piped.stop_server(server)
    text = (out + client.stdout.read()).decode()
    assert "[Message too long: 10000 bytes, the limit is " in text
    assert "[Could not read that line: the line is longer than 65536 bytes." in text
    assert "user1 : after" in text
    assert client.stderr.read() == b""


def test_a_whole_script_from_a_pipe_gets_plain_lines(piped: Piped) -> None:
    """A script piped in at once, before the client has even registered, `exit`
    included: its lines wait for the registration, every answer is a line of its own,
    word for word, with no prompts (nobody reads them), and the client leaves cleanly
    once the answers are in."""
    server_port, x_port, y_port = free_udp_ports(3)
    server = piped.serve(server_port)
    y = piped.run(*join_args("user2", server_port, y_port))
    assert y.stdin and y.stdout
    y_out = bytearray()
    read_until(y.stdout, TABLE.encode(), y_out)
    x = piped.run(*join_args("user1", server_port, x_port))
    assert x.stdin and x.stdout and x.stderr
    script = ["send user2 hello nice to meet you.", "send_all hello guys", "help reg", "exit"]
    x.stdin.write("".join(line + "\n" for line in script).encode())
    x.stdin.close()
    assert x.wait(TIMEOUT) == 0
    read_until(y.stdout, b"Channel_Message user1 : hello guys\n", y_out)
    x_lines = x.stdout.read().decode().splitlines()
    leaving = "[Leaving once the requests in flight are answered (Ctrl-C leaves now).]"
    # How the script's lines interleave with the registration is a race (the whole
    # script may be read before or after the first table), so only what holds either
    # way is asserted: the table first, every answer once, `exit` saying it waits at
    # most once, and the client leaving last.
    assert x_lines.count(leaving) <= 1, x_lines
    answered = [line for line in x_lines if line != leaving]
    assert answered[0] == TABLE, x_lines
    assert answered[-1] == "[Exiting]", x_lines
    assert sorted(answered[1:-1]) == sorted(
        [
            "[Message has been received by user2.]",
            "[Message received by the server.]",
            "[reg NAME: come back online after dereg, and receive what was stored for you.]",
        ]
    ), x_lines
    assert y_out.decode().splitlines() == [
        TABLE,
        TABLE,
        "user1 : hello nice to meet you.",
        "Channel_Message user1 : hello guys",
    ]
    assert x.stderr.read() == b""
    y.stdin.close()
    assert y.wait(TIMEOUT) == 0
    piped.stop_server(server)


def test_input_left_after_the_client_exits_is_not_an_error(piped: Piped) -> None:
    """Lines still coming when the client has left (`exit`, then more) have nowhere to
    go: the client exits 0, not with an internal error."""
    server_port, port = free_udp_ports(2)
    server = piped.serve(server_port)
    client = piped.run(*join_args("user1", server_port, port))
    assert client.stdin and client.stdout and client.stderr
    read_until(client.stdout, TABLE.encode(), bytearray())
    with contextlib.suppress(BrokenPipeError):
        client.stdin.write(b"exit\n" + b"help\n" * 20_000)
        client.stdin.flush()
    assert client.wait(TIMEOUT) == 0
    assert client.stderr.read() == b""
    piped.stop_server(server)


def test_a_port_in_use_gets_one_line_and_status_1_and_sigterm_stops_the_server(
    start: Start,
) -> None:
    server_port, port = free_udp_ports(2)
    server = start_server(start, server_port)
    second = start(*serve_args(server_port))
    assert second.exit_status() == 1
    assert second.screen() == [
        f"chatapp: error: cannot listen on UDP 127.0.0.1:{server_port} (server):"
        " Address already in use"
    ]
    client = join(start, "user1", server_port, port, seed_spelling=False)
    client.shows(TABLE)
    same_port = join(start, "user2", server_port, port, seed_spelling=False)
    assert same_port.exit_status() == 1
    assert same_port.screen() == [
        f"chatapp: error: cannot listen on UDP 127.0.0.1:{port} (client): Address already in use"
    ]
    client.interrupt()
    client.shows(INTERRUPTED)
    assert client.exit_status() == 0
    server.drain()
    server.child.kill(signal.SIGTERM)  # `kill`, as a service manager stops it
    server.shows("server stopped (SIGTERM)")
    assert server.exit_status() == 0
    assert_no_noise(server, client)


def _database_with_clients(path: Path, count: int) -> None:
    """A server database that knows ``count`` clients, all offline (gone with ``dereg``),
    as if a big server had run: a restarted server sends them nothing."""
    import trio

    from chatapp.protocol.changes import ClientSaved, Presence
    from chatapp.protocol.crypto import Identity
    from chatapp.sqlite_store import SqliteStore

    store = SqliteStore(str(path))
    changes = [
        ClientSaved(  # each name bound to a key of its own; no session (it left)
            f"member{n:05d}",
            "127.0.0.1",
            20000 + n % 40000,
            Identity.generate().public,
            b"",
            Presence.DEREGISTERED,
        )
        for n in range(count)
    ]
    try:
        trio.run(store.commit, changes)
    finally:
        store.close()


def test_a_client_with_a_10000_entry_table_starts_shows_it_and_sends_at_once(
    start: Start, tmp_path: Path
) -> None:
    db = tmp_path / "big.sqlite3"
    _database_with_clients(db, 10_000)
    server_port, *ports = free_udp_ports(3)
    server = start(*serve_args(server_port, db=db))
    server.shows_pattern(r"listening on UDP 127\.0\.0\.1:\d+ \(10000 known clients")
    x = join(start, "user1", server_port, ports[0], seed_spelling=False)
    x.shows(TABLE)  # the whole table: 10,001 entries in many parts, shown once
    y = join(start, "user2", server_port, ports[1], seed_spelling=False)
    y.shows(TABLE)
    x.shows(TABLE)  # and then a delta: user2 joined

    x.type("table")
    x.shows("[member09999      127.0.0.1:29999  offline]")
    x.shows("[user2            127.0.0.1:" + f"{ports[1]:<6} online]")
    chat(x, y, "user2", "hello from a big table", "user1")
    chat(y, x, "user1", "and back", "user2")
    x.type("send member04242 are you there?")  # offline: stored by the server
    x.shows("[No ACK from member04242, message sent to server.]")
    x.shows("[Messages received by the server and saved.]")

    shown = x.shown_lines()
    table = [line for line in shown if line.startswith("[member") or line.startswith("[user")]
    assert len(table) == 10_002
    assert shown.count(TABLE) == 2 and y.shown_lines().count(TABLE) == 1
    for client in (x, y):
        client.interrupt()
        client.shows(INTERRUPTED)
        assert client.exit_status() == 0
    stop_server(server)
    assert_no_noise(server, x, y)
