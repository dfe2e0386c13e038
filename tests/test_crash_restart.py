"""A message the server ACKed as saved survives SIGKILL of the server (real processes)."""

from __future__ import annotations

import re
from pathlib import Path

from _harness import Proc, chatapp_env, free_udp_ports, join, serve, serve_args

from chatapp import screen


def test_a_saved_message_survives_sigkill_and_is_delivered_after_restart(tmp_path: Path) -> None:
    env = chatapp_env(tmp_path)
    db = tmp_path / "server.sqlite3"
    server_port, x_port, y_port = free_udp_ports(3)
    server = serve(server_port, env, db=db)
    procs = [server]
    try:
        x = join("user1", server_port, x_port, env)
        procs.append(x)
        x.expect(screen.TABLE_UPDATED)
        y = join("user2", server_port, y_port, env)
        procs.append(y)
        x.expect(screen.TABLE_UPDATED, count=2)
        x.type("dereg user1")
        x.expect(screen.YOU_ARE_OFFLINE)
        y.type("send user1 hello? are you still there")
        y.expect(screen.no_ack("user1"))
        y.expect(screen.SAVED_BY_SERVER)
        server.kill()  # SIGKILL the moment the sender was told: no chance to tidy up
        assert server.popen.returncode == -9

        server = serve(server_port, env, db=db)
        procs.append(server)
        assert "1 stored message" in server.output  # restored from the file
        x.type("reg user1")
        x.expect(screen.YOU_HAVE_MESSAGE)
        stored = re.compile(r"\(\d+\.\d+\) user2 : hello\? are you still there")
        x.wait_for(lambda lines: any(map(stored.fullmatch, lines)), 10, "the saved message")
        assert y.popen.poll() is None and x.popen.poll() is None  # nobody gave up
    finally:
        for proc in procs:
            proc.stop()
    for proc in procs:
        assert "Traceback" not in proc.output, proc.output
    shown = [line for line in x.lines() if "hello? are you still there" in line]
    assert len(shown) == 1


def test_the_default_database_is_per_port_under_the_data_directory(tmp_path: Path) -> None:
    (port,) = free_udp_ports(1)
    server = serve(port, chatapp_env(tmp_path), db=None)
    assert server.stop() == 0
    assert (tmp_path / "chatapp" / f"server-{port}.sqlite3").is_file()
    assert "Traceback" not in server.output


def test_a_second_server_on_the_same_database_says_so_in_one_line(tmp_path: Path) -> None:
    env = chatapp_env(tmp_path)
    db = str(tmp_path / "shared.sqlite3")
    first_port, second_port = free_udp_ports(2)
    first = serve(first_port, env, db=db)
    try:
        second = Proc(serve_args(second_port, db=db), env)
        second.popen.wait(10)
        second.stop()
        assert second.popen.returncode == 1
        errors = [line for line in second.lines() if "error" in line]
        assert len(errors) == 1 and "another chatapp server" in errors[0], second.output
        assert "Traceback" not in second.output
    finally:
        first.stop()
