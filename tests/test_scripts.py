"""Scripts that do not wait (issue 13, item 2): lines typed or piped before the
registration completes wait for it, in order; ``exit`` and the end of input wait for
the answers to the requests in flight; Ctrl-C leaves at once.

The rules in the client's state machine, in virtual time (``Sim``); a node fed a
script at once over the in-memory network (``autojump_clock``); real processes fed
from pipes (``printf '...' | chatapp join ...``) and from a real terminal.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import trio
import trio.testing
from _harness import (
    chatapp_command,
    chatapp_env,
    first_only,
    free_udp_ports,
    join,
    join_args,
    serve,
    start_client,
    start_server,
)
from _sim import SERVER, Sim, trio_of_clients

from chatapp import screen
from chatapp.protocol.client import WAITING_LINES_LIMIT, ClientState
from chatapp.protocol.common import Exit, Show
from chatapp.protocol.inputs import Signal
from chatapp.testing import MemoryNetwork
from chatapp.wire import Ack, ChannelPost, Lookup, Registered, Table

# --- the rules, in virtual time ------------------------------------------------------------


def _server_ack_lost(sim: Sim) -> None:
    """The server's first ACK is lost (the request is answered at its second try)."""
    sim.drop.append(first_only(lambda src, send: src == SERVER and isinstance(send.message, Ack)))


def test_exit_waits_for_the_answer_to_a_channel_message_then_leaves() -> None:
    sim = trio_of_clients()
    _server_ack_lost(sim)
    start = sim.now
    sim.type("user1", "send_all hi")
    sim.type("user1", "exit")
    assert sim.lines("user1")[-1] == screen.LEAVING and "user1" not in sim.exits
    sim.run(5.0)
    assert sim.timed("user1")[-2:] == [
        (start + 0.5, screen.CHANNEL_ACKED),
        (start + 0.5, screen.EXITING),
    ]
    assert sim.exits["user1"] == 0


def test_exit_waits_for_a_direct_message_handed_to_the_server() -> None:
    """No ACK from the peer: the message goes to the server (which relays it, gets no
    ACK either, and keeps it), and the client leaves once the server has saved it."""
    sim = trio_of_clients()
    sim.kill("user2")
    start = sim.now
    sim.type("user1", "send user2 hi")
    sim.type("user1", "exit")
    sim.run(5.0)
    assert sim.timed("user1")[-4:] == [
        (start, screen.LEAVING),
        (start + 0.5, screen.no_ack("user2")),
        (start + 1.0, screen.SAVED_BY_SERVER),
        (start + 1.0, screen.EXITING),
    ]
    assert sim.exits["user1"] == 0
    assert [item.sender for item in sim.server.mailbox["user2"]] == ["user1"]


def test_exit_with_the_server_gone_waits_for_the_last_try() -> None:
    sim = trio_of_clients()
    sim.kill("server")
    start = sim.now
    sim.type("user1", "send_all anyone?")
    sim.type("user1", "exit")
    sim.run(5.0)
    assert sim.timed("user1")[-2:] == [
        (start + 2.5, screen.SERVER_NOT_RESPONDING_CHANNEL),
        (start + 2.5, screen.EXITING),
    ]
    assert sim.exits["user1"] == 0


def test_the_end_of_input_waits_for_the_answers_quietly() -> None:
    sim = trio_of_clients()
    _server_ack_lost(sim)
    sim.type("user1", "send_all hi")
    mark = len(sim.lines("user1"))
    user1 = sim.clients["user1"]
    effects = user1.handle_input(Signal.HANG_UP, sim.now)
    assert effects == [] and user1.leaving  # no line: nobody typed exit
    sim.run(5.0)
    assert sim.lines_since("user1", mark) == [screen.CHANNEL_ACKED]
    assert sim.exits["user1"] == 0


def test_exit_with_nothing_in_flight_leaves_at_once_even_while_joining() -> None:
    sim = trio_of_clients()
    assert sim.clients["user1"].handle_input("exit", sim.now) == [Show(screen.EXITING), Exit(0)]
    sim.kill("server")
    joining = sim.join("user4")
    assert joining.state is ClientState.JOINING
    assert joining.handle_input(Signal.HANG_UP, sim.now) == [Exit(0)]


def test_ctrl_c_leaves_at_once_while_leaving() -> None:
    sim = trio_of_clients()
    sim.kill("server")
    sim.type("user1", "send_all hi")
    sim.type("user1", "exit")
    user1 = sim.clients["user1"]
    effects = user1.handle_input(Signal.INTERRUPT, sim.now)
    assert effects == [Show(screen.KEYBOARD_INTERRUPT), Exit(0)]


def test_lines_after_exit_are_not_carried_out_and_a_second_end_changes_nothing() -> None:
    sim = trio_of_clients()
    _server_ack_lost(sim)
    sim.type("user1", "send_all hi")
    sim.type("user1", "exit")
    sent = len(sim.sent)
    mark = len(sim.lines("user1"))
    sim.type("user1", "send_all too late")
    sim.type("user1", "help")
    assert sim.clients["user1"].handle_input(Signal.HANG_UP, sim.now) == []
    assert len(sim.sent) == sent and sim.lines_since("user1", mark) == []
    sim.run(5.0)
    assert sim.lines_since("user1", mark) == [screen.CHANNEL_ACKED, screen.EXITING]
    assert [d.message.text for d in sim.datagrams(ChannelPost, src="user1")] == ["hi", "hi"]


def test_a_whole_script_typed_before_the_registration_is_carried_out_then_leaves() -> None:
    """The server's answers are lost at first: the script waits for the registration,
    then goes in order, and the client leaves once the last answer is in."""
    sim = trio_of_clients()
    sim.drop.append(lambda src, send: src == SERVER and send.addr[1] == 9301)
    sim.join("user4", port=9301)
    for line in ("send user2 one", "send_all two", "table", "exit"):
        sim.type("user4", line)
    user4 = sim.clients["user4"]
    user4.handle_input(Signal.HANG_UP, sim.now)  # the script's end, right behind it
    assert sim.lines("user4") == [screen.LEAVING] and user4.lines_waiting == 3
    sim.drop.clear()
    sim.run(5.0)
    lines = sim.lines("user4")
    assert lines[-1] == screen.EXITING and sim.exits["user4"] == 0
    assert screen.received_by("user2") in lines and screen.CHANNEL_ACKED in lines
    assert lines.index(screen.TABLE_UPDATED) < lines.index(screen.CHANNEL_ACKED)
    assert any(line.startswith("[user1 ") for line in lines)  # the table, as it came
    assert "user4 : one" in sim.lines("user2")
    assert "Channel_Message user4 : two" in sim.lines("user3")


def test_lines_wait_for_the_first_table_as_long_as_the_server_tries_to_send_it() -> None:
    """Registered, but every table to it lost: the lines wait (past the limit, refused
    as before) until the server's tries of the table would have run out, then go
    without it (a send to a name not in the table asks the server)."""
    sim = trio_of_clients()
    sim.drop.append(lambda src, send: isinstance(send.message, Table) and send.addr[1] == 9301)
    user4 = sim.join("user4", port=9301)
    assert user4.state is ClientState.ONLINE and not user4.table
    start = sim.now
    for n in range(WAITING_LINES_LIMIT):
        sim.type("user4", f"send user1 {n}")
    sim.type("user4", "send user1 one too many")
    assert sim.lines("user4") == [screen.STILL_JOINING]
    sim.run(2.4)
    assert user4.lines_waiting == WAITING_LINES_LIMIT
    sim.run(0.2)  # 2.5 s: the server's five tries of the table would be over
    assert user4.lines_waiting == 0
    [lookup, *_] = sim.datagrams(Lookup, src="user4")
    assert lookup.at == start + 2.5
    sim.run(5.0)
    assert sim.lines("user1").count("user4 : 0") == 1


def test_a_refused_registration_ends_a_script_that_waits() -> None:
    """The lines that wait for a registration that is refused are never carried out:
    the client exits 1 with the refusal, as before."""
    sim = trio_of_clients()
    sim.drop.append(lambda src, send: src == SERVER and isinstance(send.message, Registered))
    sim.join("user1", label="impostor", port=9401)  # another key for user1's name
    sim.type("impostor", "send_all not mine")
    sim.drop.clear()
    sim.run(5.0)
    assert sim.exits["impostor"] == 1
    assert not sim.datagrams(ChannelPost, src="impostor")


# --- a node fed a script at once, in virtual time ----------------------------------------

SERVER_ADDR = ("127.0.0.1", 8001)


async def test_a_node_fed_a_script_at_once_sends_it_all_and_then_leaves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_server(nursery, network, SERVER_ADDR)
        y = await start_client(nursery, network, "user2", ("127.0.0.1", 9101), SERVER_ADDR)
        await y.idle()
        x = await start_client(nursery, network, "user1", ("127.0.0.1", 9001), SERVER_ADDR)
        for line in ("send user2 hi", "send_all hello", "exit"):
            await x.inputs.send(line)  # before its registration is answered
        await x.inputs.aclose()  # and the end of input
        with trio.fail_after(10):
            await x.done.wait()
        assert x.status == 0
        assert x.lines[-1] == screen.EXITING
        assert screen.received_by("user2") in x.lines and screen.CHANNEL_ACKED in x.lines
        assert "user1 : hi" in y.lines and "Channel_Message user1 : hello" in y.lines
        nursery.cancel_scope.cancel()


# --- real processes: pipes and a terminal ------------------------------------------------------


def _piped(script: bytes, name: str, server_port: int, port: int, env: dict[str, str]) -> str:
    """``printf SCRIPT | chatapp join NAME ...``, written all at once: what it showed."""
    done = subprocess.run(
        [*chatapp_command(), *join_args(name, server_port, port)],
        input=script,
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == b"", done.stderr
    return done.stdout.decode()


@pytest.mark.e2e
def test_printf_send_all_and_exit_into_chatapp_join_delivers_before_leaving(
    tmp_path: Path,
) -> None:
    env = chatapp_env(tmp_path)
    server_port, x_port, y_port = free_udp_ports(3)
    server = serve(server_port, env)
    y = join("user2", server_port, y_port, env)
    try:
        y.expect(screen.TABLE_UPDATED)
        shown = _piped(b"send_all hi\nexit\n", "user1", server_port, x_port, env)
        y.expect("Channel_Message user1 : hi")
        shown += _piped(b"send user2 hi\n", "user3", server_port, free_udp_ports(1)[0], env)
        y.expect("user3 : hi")
    finally:
        y.stop()
        server.stop()
    lines = shown.splitlines()
    assert lines[lines.index(screen.CHANNEL_ACKED) + 1] == screen.EXITING
    assert screen.received_by("user2") in lines


@pytest.mark.e2e
def test_a_script_to_a_peer_that_is_gone_waits_for_the_server_to_save_it(
    tmp_path: Path,
) -> None:
    """user2 is stopped (SIGSTOP, its port still bound): no ACK, so the message goes to
    the server; the script's client leaves once the server has saved it."""
    env = chatapp_env(tmp_path)
    server_port, x_port, y_port = free_udp_ports(3)
    server = serve(server_port, env)
    y = join("user2", server_port, y_port, env)
    try:
        y.expect(screen.TABLE_UPDATED)
        y.popen.send_signal(19)  # SIGSTOP
        shown = _piped(b"send user2 are you there?\n", "user1", server_port, x_port, env)
        y.popen.send_signal(18)  # SIGCONT
    finally:
        y.stop()
        server.stop()
    lines = shown.splitlines()
    assert lines[-2:] == [screen.no_ack("user2"), screen.SAVED_BY_SERVER], lines


@pytest.mark.e2e
def test_a_line_typed_at_a_terminal_before_the_registration_waits_for_it(
    tmp_path: Path,
) -> None:
    """In a real terminal: lines typed before the server has answered wait for it, and
    `exit` waits for their answers (the line that says so first)."""
    env = chatapp_env(tmp_path)
    server_port, x_port, y_port = free_udp_ports(3)
    server = serve(server_port, env)
    y = join("user2", server_port, y_port, env)
    child: pexpect.spawn[str] | None = None
    try:
        y.expect(screen.TABLE_UPDATED)
        args = join_args("user1", server_port, x_port)
        child = pexpect.spawn(
            sys.executable,
            ["-m", "chatapp", *args],
            env={**env, "TERM": "dumb"},
            encoding="utf-8",
            timeout=10,
        )
        child.sendline("send_all typed early")
        child.sendline("exit")
        child.expect_exact(screen.CHANNEL_ACKED)
        child.expect_exact(screen.EXITING)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        y.expect("Channel_Message user1 : typed early")
    finally:
        if child is not None and child.isalive():
            child.terminate(force=True)
        y.stop()
        server.stop()
