"""Clean ends: the end of a piped script, and a trace file on a full disk, end in a clean
exit or a clear line, never in an internal error (real processes).

(A closed terminal and Ctrl-D are in ``tests/test_e2e.py``.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _harness import chatapp_env, free_udp_ports, join, join_args, serve, wait_until_serving

from chatapp import screen

pytestmark = pytest.mark.e2e

#: A file every write to fails with ENOSPC, as on a full disk.
FULL = "/dev/full"


def _piped(
    script: bytes, args: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "chatapp", *args],
        input=script,
        capture_output=True,
        env=env,
        timeout=30,
    )


@pytest.mark.parametrize(
    "script",
    [
        b"send_all hi\n",  # the end of input right behind the last line
        b"exit\n" + b"help\n" * 200,  # lines left unread when the client leaves
        b"send_all no newline at the end",
    ],
    ids=["end-of-input", "exit-with-lines-left", "no-final-newline"],
)
def test_a_client_fed_from_a_pipe_ends_cleanly(tmp_path: Path, script: bytes) -> None:
    env = chatapp_env(tmp_path)
    server_port, client_port = free_udp_ports(2)
    server = serve(server_port, env)
    try:
        done = _piped(script, join_args("user1", server_port, client_port), env)
    finally:
        server.stop()
    output = (done.stdout + done.stderr).decode()
    assert done.returncode == 0, output
    assert "internal error" not in output and "Traceback" not in output


@pytest.mark.skipif(not Path(FULL).exists(), reason=f"no {FULL} here")
def test_a_trace_on_a_full_disk_gets_one_line_and_the_chat_goes_on(tmp_path: Path) -> None:
    env = chatapp_env(tmp_path)
    server_port, x_port, y_port = free_udp_ports(3)
    server = serve(server_port, env, "--trace", FULL)
    procs = [server]
    try:
        x = join("user1", server_port, x_port, env, "--trace", FULL)
        procs.append(x)
        x.expect(screen.TABLE_UPDATED)
        y = join("user2", server_port, y_port, env)
        procs.append(y)
        x.expect(screen.TABLE_UPDATED, count=2)
        for n in range(3):
            x.type(f"send_all still chatting {n}")
            y.expect(f"Channel_Message user1 : still chatting {n}")
        x.expect(screen.trace_stopped("No space left on device"))
        wait_until_serving(server_port)
    finally:
        statuses = [proc.stop() for proc in procs]
    assert statuses == [0, 0, 0]
    assert x.lines().count(screen.trace_stopped("No space left on device")) == 1
    assert server.output.count("trace not written (No space left on device)") == 1
    for proc in procs:
        assert "internal error" not in proc.output and "Traceback" not in proc.output
