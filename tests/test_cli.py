"""The command line: help, version, and a bad argument said in one line with status 2.

``chatapp.cli.main`` is what the installed command runs: it turns the seed's
spelling (``-s``, ``-c``) into the commands and every usage error into one
line. It is called here with its argv; the Typer app itself is driven with
CliRunner for the help screens; the installed command is run once for real.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from _harness import chatapp_command, free_udp_ports
from typer.testing import CliRunner

from chatapp import __version__, cli
from chatapp.launch import StartupError


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    out, err = capsys.readouterr()
    code = done.value.code
    return (code if isinstance(code, int) else 0 if code is None else 1), out, err


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["--help"], ["Usage: chatapp", "serve", "join", "demo", "chatapp -c NAME"]),
        (["-h"], ["Usage: chatapp", "serve", "join"]),
        (["serve", "--help"], ["Usage: chatapp serve", "PORT", "1024-65535", "--quiet"]),
        (["join", "--help"], ["Usage: chatapp join", "NAME", "SERVER_IP", "CLIENT_PORT"]),
        (["demo", "--help"], ["Usage: chatapp demo", "--test"]),
        (["release", "--help"], ["Usage: chatapp release", "NAME", "--db", "stopped server"]),
        (["join", "--help"], ["--state-dir", "XDG_STATE_HOME"]),
    ],
)
def test_help(args: list[str], mentions: list[str]) -> None:
    result = CliRunner().invoke(cli.app, args, prog_name="chatapp")
    assert result.exit_code == 0, result.output
    for text in mentions:
        assert text in result.output


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(["--version"], capsys) == (0, f"chatapp {__version__}\n", "")


def test_the_version_is_the_installed_package_s() -> None:
    from importlib import metadata

    assert __version__ == metadata.version("chatapp")


@pytest.mark.parametrize(
    ("args", "usage", "rows"),
    [
        (["serve", "--help"], "Usage: chatapp serve [OPTIONS] [PORT]", ["  PORT  UDP port"]),
        (
            ["join", "--help"],
            "Usage: chatapp join [OPTIONS] NAME SERVER_IP SERVER_PORT CLIENT_PORT",
            ["  NAME ", "  SERVER_IP ", "  SERVER_PORT ", "  CLIENT_PORT "],
        ),
    ],
)
def test_help_names_arguments_as_words(args: list[str], usage: str, rows: list[str]) -> None:
    result = CliRunner().invoke(cli.app, args, prog_name="chatapp")
    assert result.exit_code == 0 and usage in result.output, result.output
    for row in rows:
        assert row in result.output, result.output
    assert "<str>" not in result.output and "{" not in result.output


def test_shell_completion_is_offered() -> None:
    result = CliRunner().invoke(cli.app, ["--help"], prog_name="chatapp")
    assert "--install-completion" in result.output and "--show-completion" in result.output


@pytest.mark.parametrize("program", ["chatapp", "chat-replay", "chatapp-bench"])
def test_every_installed_command_has_a_version(program: str) -> None:
    script = Path(sys.executable).with_name(program)
    assert script.exists(), script
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{program} {__version__}\n", "")


def test_no_arguments_shows_the_help_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_main([], capsys)
    assert (status, out) == (2, "")
    assert err.startswith("Usage: chatapp") and "join" in err


GOOD = ["user1", "127.0.0.1", "8001", "9001"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["serve", "80"], "from 1024 to 65535, not '80'"),
        (["serve", "1023"], "not '1023'"),
        (["serve", "65536"], "not '65536'"),
        (["serve", "99999999999"], "from 1024 to 65535"),
        (["serve", "abc"], "not 'abc'"),
        (["serve", "80.5"], "not '80.5'"),
        (["serve", "--", "-8001"], "not '-8001'"),
        (["serve", ""], "not ''"),
        (["serve", "8001", "8002"], "unexpected extra argument"),
        (["serve", "--host", "1.2.3"], "--host must be an IPv4 address"),
        (["serve", "--bogus"], "No such option: --bogus"),
        (["serve", "--mailbox-limit", "0"], "--mailbox-limit must be from 1 to"),
        (["serve", "--mailbox-limit", "-5"], "--mailbox-limit must be from 1 to"),
        (["serve", "--rate-limit", "-1"], "--rate-limit must be from 0 (no limit) to"),
        (["serve", "--join-limit", "99999999999"], "--join-limit must be from 0 (no limit)"),
        (["serve", "--join-limit", "many"], "--join-limit"),
        (["serve", "--host", "127.0.0.\udcff"], "--host must be an IPv4 address"),
        (["join", "user1", "\udcff", "8001", "9001"], "SERVER_IP must be an IPv4 address"),
        (["join"], "Missing argument 'NAME'"),
        (["join", "user1"], "Missing argument 'SERVER_IP'"),
        (["join", "user1", "127.0.0.1"], "Missing argument 'SERVER_PORT'"),
        (["join", "user1", "127.0.0.1", "8001"], "Missing argument 'CLIENT_PORT'"),
        (["join", *GOOD, "extra"], "unexpected extra argument"),
        (["join", "bad name", *GOOD[1:]], "NAME must be 1 to 32"),
        (["join", "user/1", *GOOD[1:]], "not 'user/1'"),
        (["join", "", *GOOD[1:]], "NAME must be"),
        (["join", "u" * 33, *GOOD[1:]], "NAME must be 1 to 32"),
        (["join", "usér", *GOOD[1:]], "NAME must be"),
        (["join", "user1", "10.150.0", "8001", "9001"], "SERVER_IP must be an IPv4 address"),
        (["join", "user1", "256.1.1.1", "8001", "9001"], "not '256.1.1.1'"),
        (["join", "user1", "example.com", "8001", "9001"], "not 'example.com'"),
        (["join", "user1", "::1", "8001", "9001"], "SERVER_IP must be an IPv4 address"),
        (["join", "user1", "0.0.0.0", "8001", "9001"], "0.0.0.0 is not one a server can have"),
        (["join", "user1", "255.255.255.255", "8001", "9001"], "not one a server can have"),
        (["join", "user1", "224.0.0.1", "8001", "9001"], "not one a server can have"),
        (["join", "user1", "127.0.0.1", "0", "9001"], "SERVER_PORT must be"),
        (["join", "user1", "127.0.0.1", "8001", "x"], "CLIENT_PORT must be"),
        (["join", *GOOD, "--host", "nowhere"], "--host must be an IPv4 address"),
        (["join", *GOOD, "--tries", "0"], "--tries must be from 1 to 100"),
        (["join", *GOOD, "--ack-timeout", "soon"], "--ack-timeout"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["--frobnicate"], "No such option: --frobnicate"),
        (["demo", "--test", "4"], "--test"),
        (["release"], "Missing argument 'NAME'"),
        (["release", "bad name"], "NAME must be 1 to 32"),
        (["release", "user1", "--port", "80"], "--port must be a whole number"),
        # the seed's spelling, with bad values
        (["-s", "80"], "PORT must be a whole number from 1024 to 65535"),
        (["-s", "8001", "8002"], "unexpected extra argument"),
        (["-s"], "-s needs a PORT, as in: chatapp -s 8001"),
        (["-s", "--db", ":memory:"], "-s needs a PORT"),
        (["-c"], "Missing argument 'NAME'"),
        (["-c", "user1", "10.150.0.2", "8001"], "Missing argument 'CLIENT_PORT'"),
        (["-c", "user 1", "10.150.0.2", "8001", "9001"], "NAME must be"),
        (["-c", "user1", "10.150.0.256", "8001", "9001"], "SERVER_IP must be"),
        (["-c", "user1", "10.150.0.2", "8001", "70000"], "CLIENT_PORT must be"),
    ],
)
def test_a_bad_argument_gets_one_line_and_status_2(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run_main(argv, capsys)
    assert (status, out) == (2, "")
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("chatapp") and ": error: " in err and says in err, err
    assert "--help')" in err  # and where to look next
    assert "Traceback" not in err


def test_a_node_that_cannot_start_says_why_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    async def cannot_start(options: object, argv: list[str]) -> int:
        raise StartupError("cannot listen on UDP 0.0.0.0:8001 (server): Address already in use")

    with pytest.raises(SystemExit) as done:
        cli._run(cannot_start, None, [], command="serve")
    assert done.value.code == 1
    assert capsys.readouterr() == (
        "",
        "chatapp: error: cannot listen on UDP 0.0.0.0:8001 (server): Address already in use\n",
    )


def test_a_bug_gets_one_line_and_a_report_file_not_a_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))

    async def broken(options: object, argv: list[str]) -> int:
        raise ZeroDivisionError("a bug")

    with pytest.raises(SystemExit) as done:
        cli._run(broken, None, [], command="join")
    assert done.value.code == cli.INTERNAL_ERROR_EXIT
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("chatapp: internal error: ZeroDivisionError: a bug. Please report it")
    (report,) = tmp_path.glob("chatapp-crash-*.txt")
    assert str(report) in err
    assert "Traceback" in report.read_text() and "ZeroDivisionError: a bug" in report.read_text()


def in_a_nursery(error: BaseException) -> Callable[..., Awaitable[int]]:
    """A node whose task fails with ``error``: Trio hands it on inside an exception group."""

    async def node(*args: object) -> int:
        async def task() -> None:
            raise error

        async with trio.open_nursery() as nursery:
            nursery.start_soon(task)
        return 0

    return node


@pytest.mark.parametrize(
    ("error", "command", "status", "out", "err"),
    [
        (KeyboardInterrupt(), "join", 0, "Caught keyboard interrupt. Exiting\n", ""),
        (KeyboardInterrupt(), "serve", 0, "", ""),
        (KeyboardInterrupt(), "demo", 130, "", ""),
        (
            StartupError("cannot open the database x: locked"),
            "serve",
            1,
            "",
            "chatapp: error: cannot open the database x: locked\n",
        ),
        (RuntimeError("a bug"), "join", 70, "", "chatapp: internal error: RuntimeError: a bug."),
    ],
)
def test_an_error_inside_the_nodes_tasks_still_ends_in_one_line(
    error: BaseException,
    command: str,
    status: int,
    out: str,
    err: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(SystemExit) as done:
        cli._run(in_a_nursery(error), command=command)
    assert done.value.code == status
    shown = capsys.readouterr()
    assert shown.out == out and shown.err.startswith(err)
    assert shown.err.count("\n") == (1 if err else 0)
    assert "Traceback" not in shown.err


def test_the_installed_command_with_a_bad_argument() -> None:
    done = subprocess.run(
        [*chatapp_command(), "-c", "user1", "10.150.0.2", "8001", "99999"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "chatapp join: error: CLIENT_PORT must be a whole number from 1024 to 65535,"
        " not '99999' (see 'chatapp join --help')\n"
    )


def test_python_dash_m_chatapp_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "chatapp", "--version"], capture_output=True, text=True, timeout=30
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, f"chatapp {__version__}\n", "")


def test_the_installed_demo_plays_a_seed_test_from_anywhere(tmp_path: Path) -> None:
    # Run away from the source tree, so the installed package (with its scenario files)
    # is what runs, as on a fresh machine.
    done = subprocess.run(
        [*chatapp_command(), "demo", "--test", "3"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert "--- Test 3: every seed line matched" in done.stdout
    assert "user3  | >>> Channel_Message user1 : hi" in done.stdout


def test_a_client_with_a_bad_key_file_stops_with_one_line_and_status_1(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / "user1.key").write_bytes(b"x" * 32)
    (keys / "user1.key").chmod(0o644)  # readable by others: refused, not replaced
    server_port, client_port = free_udp_ports(2)  # a fixed port may be taken by a running chatapp
    argv = ["join", "user1", "127.0.0.1", str(server_port), str(client_port)]
    done = subprocess.run(
        [*chatapp_command(), *argv, "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("chatapp: error: the key file")
    assert "can be read by others (mode 0o644; chatapp makes it 0600)" in done.stderr
    assert (keys / "user1.key").read_bytes() == b"x" * 32


def test_release_refuses_a_memory_database(capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run_main(["release", "user1", "--db", ":memory:"], capsys)
    assert status == 2 and out == ""
    assert err == "chatapp: error: a --db :memory: server keeps no names to release\n"
