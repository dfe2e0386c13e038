"""The trace format: written without losing the last events, checked when read,
several processes into one file, volatile values normalised."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import trio
from chatapp_tools.replay.compare import compare
from chatapp_tools.replay.normalise import Normaliser
from chatapp_tools.replay.plan import ReplayOptions
from chatapp_tools.replay.runner import run_replay
from chatapp_tools.replay.traces import parse_trace, read_trace

from chatapp.protocol.common import Received, Timers
from chatapp.trace import (
    VERSION,
    Event,
    Exited,
    Input,
    JsonlRecorder,
    Recv,
    Send,
    Shown,
    Start,
    TraceError,
)
from chatapp.wire import Hello, Registered, encode, to_builtins

ROOT = Path(__file__).resolve().parent.parent


def record_a_little(path: Path) -> None:
    async def main() -> None:
        recorder = JsonlRecorder.open(str(path), timers=Timers(), append=False, source="test")
        recorder.node_started(
            "user1", "client", ["/opt/bin/chatapp", "join", "user1"], ("127.0.0.1", 9001)
        )
        hello = Hello("user1.1", "user1", 9001, b"k" * 32)
        here, there = ("127.0.0.1", 9001), ("127.0.0.1", 9002)
        recorder.sent("user1", here, there, encode(hello), hello)
        recorder.received("user1", here, there, b"\xff\x00", Received(None, "bad"))
        await trio.sleep(0.25)
        recorder.typed("user1", "send user2 hi")
        recorder.shown("user1", "[Message has been received by user2.]")
        recorder.node_exited("user1", 0)
        recorder.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_written_trace_reads_back_with_header_and_every_event(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    record_a_little(path)
    trace = read_trace(str(path))
    header = trace.header
    assert (header.format, header.version, header.source) == ("chatapp-trace", VERSION, "test")
    assert header.timers.ack_timeout == 0.5 and header.timers.tries == 5
    # the header names the node, its command line (the program's path cut to its
    # name: a trace is shared) and its address
    node = header.nodes["user1"]
    assert (node.role, node.argv, node.address) == (
        "client",
        ["chatapp", "join", "user1"],
        "127.0.0.1:9001",
    )
    kinds = [type(event) for event in trace.events]
    assert kinds[:3] == [Start, Send, Recv] and Input in kinds and Shown in kinds
    assert [event.seq for event in trace.events] == list(range(1, 7))
    assert trace.events[3].t == pytest.approx(0.25)  # virtual time, as it ran
    sent = trace.events[1]
    key = base64.b64encode(b"k" * 32).decode()
    assert isinstance(sent, Send) and sent.msg == {
        "t": "hello",
        "id": "user1.1",
        "name": "user1",
        "port": 9001,
        "key": key,
    }
    bad = trace.events[2]
    assert isinstance(bad, Recv) and bad.data == b"\xff\x00" and bad.error == "bad"
    # on disk: chatapp's own datagram as readable text, other bytes in base64
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[2]["raw"] == (
        '{"t":"hello","id":"user1.1","name":"user1","port":9001,"key":"' + key + '"}'
    )
    assert "raw" not in lines[3] and base64.b64decode(lines[3]["raw_b64"]) == b"\xff\x00"


def test_reading_checks_format_version_and_every_line(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    record_a_little(path)
    lines = path.read_text().splitlines()
    header = json.loads(lines[0])

    newer = dict(header, version=VERSION + 1)
    with pytest.raises(TraceError, match="newer"):
        parse_trace("\n".join([json.dumps(newer), *lines[1:]]))
    with pytest.raises(TraceError, match="format"):
        parse_trace("\n".join([json.dumps(dict(header, format="other")), *lines[1:]]))
    with pytest.raises(TraceError, match=":3: not a trace event"):
        parse_trace("\n".join([lines[0], lines[1], '{"seq": 2, "ev": "teleport"}']), "x.jsonl")
    with pytest.raises(TraceError, match="seq 1 does not follow 2"):
        parse_trace("\n".join([lines[0], lines[2], lines[1]]))
    with pytest.raises(TraceError, match="first line must be"):
        parse_trace(lines[1])


def test_normaliser_labels_ids_ports_times_and_the_cryptographys_values() -> None:
    registered = Registered("Zz1-ab12cd34ef56", b"s" * 8, b"k" * 32, b"b" * 8)
    msg = to_builtins(registered)
    events: list[Event] = [
        Start(1, 0.0, "server", "server", "127.0.0.1:8001"),
        Start(2, 0.0, "user1", "client", "0.0.0.0:9001"),
        Send(3, 0.0, "server", "127.0.0.1:8001", "127.0.0.1:9001", msg=msg, raw_b64="AA=="),
    ]
    names = Normaliser.of(events)
    assert names.address("127.0.0.1:9001") == "user1"
    assert names.message(msg) == {
        "t": "registered",
        "id": "server#1",
        "sid": "<sid>",
        "session_key": "<session key>",
        "boot": "<boot>",
    }
    key, tag = base64.b64encode(b"K" * 32).decode(), base64.b64encode(b"T" * 8).decode()
    table = {
        "t": "table",
        "id": "s9.3",
        "epoch": 1700000000000,
        "version": 2,
        "part": 0,
        "parts": 1,
        "entries": [
            ["user1", "127.0.0.1", 9001, True, key, tag],
            ["x", "1.2.3.4", 1, False, key, ""],
        ],
    }
    assert names.message(table)["entries"] == [
        ["user1", "user1", True, key, "<sid>"],
        ["x", "?1.2.3.4:1", False, key, ""],
    ]
    assert names.message(table)["epoch"] == "<epoch>"
    assert names.text("(1648153596.7672942) user2 : hello?") == "({time}) user2 : hello?"


def test_a_crashing_node_leaves_every_event_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "crash.jsonl"
    script = textwrap.dedent(f"""
        import trio
        from chatapp.protocol.common import Timers
        from chatapp.trace import JsonlRecorder

        async def main():
            recorder = JsonlRecorder.open({str(path)!r}, timers=Timers())
            recorder.node_started("server", "server", ["chatapp", "serve"], ("127.0.0.1", 8001))
            for number in range(500):
                recorder.shown("server", f"line {{number}}")
            raise RuntimeError("a bug")  # no close(): the node dies

        trio.run(main)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30)
    assert result.returncode == 1 and b"a bug" in result.stderr
    trace = read_trace(str(path))
    assert len(trace.events) == 501
    assert isinstance(trace.events[-1], Shown) and trace.events[-1].line == "line 499"


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(path: Path, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


def test_processes_sharing_one_trace_file_and_ctrl_c_then_replay(tmp_path: Path) -> None:
    """A server and a client started with the same CHATAPP_TRACE file, stopped with
    Ctrl-C: the file holds both, up to their last events, and it replays to PASS."""
    path = tmp_path / "run.jsonl"
    env = {**os.environ, "CHATAPP_TRACE": str(path)}
    server_port, client_port = free_udp_port(), free_udp_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatapp",
            "serve",
            str(server_port),
            "--host",
            "127.0.0.1",
            "--db",
            ":memory:",
            "-q",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    client = None
    try:
        wait_for(path, '"ev":"start"')
        client = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chatapp",
                "join",
                "user1",
                "127.0.0.1",
                str(server_port),
                str(client_port),
                "--host",
                "127.0.0.1",
            ],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
        )
        wait_for(path, "[Client Table Updated]")
        assert client.stdin is not None
        client.stdin.write(b"send user1 hello me\n")
        client.stdin.flush()
        wait_for(path, "[Message has been received by user1.]")
        client.send_signal(signal.SIGINT)
        assert client.wait(timeout=10) == 0
    finally:
        if client is not None:
            if client.poll() is None:
                client.kill()
            if client.stdin is not None:
                client.stdin.close()
        server.send_signal(signal.SIGINT)
        server.wait(timeout=10)

    trace = read_trace(str(path))
    assert set(trace.nodes()) == {"server", "user1"}
    last_at_user1 = [e for e in trace.events if e.node == "user1"][-2:]
    assert [type(e).__name__ for e in last_at_user1] == ["Shown", "Exited"]
    assert isinstance([e for e in trace.events if e.node == "server"][-1], Exited)
    replayed, _ = run_replay(trace, ReplayOptions(virtual=True))
    comparison = compare(trace, replayed)
    assert comparison.passed, comparison.divergences


def test_a_server_that_starts_from_its_database_replays_from_the_same_state(
    tmp_path: Path,
) -> None:
    """What a server read from its database is in the trace (a ``restore`` event, its
    key included), so a replay starts from it: here a stored message waiting for user1,
    sealed by user2 for user1's key."""
    from chatapp.protocol.changes import ClientSaved, MessageStored, Presence
    from chatapp.protocol.codecs import ClientCodec
    from chatapp.protocol.crypto import Identity, SystemEntropy
    from chatapp.store import MemoryStore
    from chatapp.testing import MemoryNetwork, parse_scenario, play_scenario
    from chatapp.trace import MemoryRecorder, Restored
    from chatapp.wire import Chat, Seq, StoredItem

    user1, user2 = Identity(b"1" * 32), Identity(b"2" * 32)
    (tmp_path / "keys").mkdir(mode=0o700)
    (tmp_path / "keys" / "user1.key").write_bytes(user1.seed)
    os.chmod(tmp_path / "keys" / "user1.key", 0o600)
    sealer = ClientCodec(user2, "user2", lambda name: None, SystemEntropy())
    sealed = sealer.to_peer(user1.public, Chat("user2-msg-0001", "kept for you", bytes(8)))
    item = StoredItem(
        Seq("o1", 7), "user2-msg-0001", "direct", "user2", 1648153596.5, sealed=sealed
    )
    server_key = Identity.generate().seed

    def database() -> MemoryStore:
        return MemoryStore(
            [
                ClientSaved(
                    "user1", "127.0.0.1", 40999, user1.public, b"o" * 8, Presence.DEREGISTERED
                ),
                ClientSaved(
                    "user2", "127.0.0.1", 40998, user2.public, b"p" * 8, Presence.DEREGISTERED
                ),
                MessageStored("user1", item),
            ],
            key=server_key,
            origin="o1",
            last_n=7,
        )

    steps = parse_scenario(
        "serve\njoin user1\nexpect user1 [You have message]\n"
        "expect user1 ({time}) user2 : kept for you\nexpect user1 [Client Table Updated]\n"
        "interrupt user1\nexits user1 0\nstop server\n"
    )

    async def record() -> MemoryRecorder:
        recorder = MemoryRecorder(timers=Timers())
        await play_scenario(
            steps, MemoryNetwork(), recorder=recorder, store_factory=database, state_dir=tmp_path
        )
        return recorder

    recorded = trio.run(record, clock=trio.testing.MockClock(autojump_threshold=0)).trace()
    restore = recorded.events[0]
    assert isinstance(restore, Restored) and restore.clients[0][0] == "user1"
    assert restore.mailbox["user1"][0].sealed == sealed
    assert base64.b64decode(restore.server_key) == server_key
    for virtual in (True, False):
        replayed, _ = run_replay(recorded, ReplayOptions(virtual=virtual))
        comparison = compare(recorded, replayed)
        assert comparison.passed, comparison.divergences
        assert "(1648153596.5) user2 : kept for you" in [
            e.line for e in replayed.events if isinstance(e, Shown)
        ]


def test_a_last_line_cut_short_is_dropped_but_a_bad_line_elsewhere_is_an_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t.jsonl"
    record_a_little(path)
    text = path.read_text()
    assert len(parse_trace(text + '{"ev":"show","seq":7,"t":0.3,"no').events) == 6
    with pytest.raises(TraceError, match=":2: not JSON"):
        parse_trace(text.replace("\n", '\n{"broken\n', 1))


def test_a_command_line_that_is_not_utf8_is_still_recorded() -> None:
    # Python hands such arguments over with surrogates, which JSON cannot encode: the
    # trace writer would die and the trace stay empty.
    from chatapp.trace import dump_line, public_argv

    argv = public_argv(["/usr/bin/chatapp", "serve", "--trace", "x\udcff.jsonl"])
    assert argv == ["chatapp", "serve", "--trace", "x\ufffd.jsonl"]
    assert dump_line({"argv": argv}).decode("utf-8")
