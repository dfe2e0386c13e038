"""chat-replay: the shipped traces replay to PASS, and a changed trace or a changed
build fails with a diff that points at the change."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _harness import chat_replay
from chatapp_tools.replay.cli import main
from chatapp_tools.replay.traces import read_trace

from chatapp.node import Node
from chatapp.protocol.common import Timers
from chatapp.protocol.sealing import TO_SERVER, Session
from chatapp.protocol.waits import WaitRule
from chatapp.wire import ChannelPost, TableDelta

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "traces"
SEED_TESTS = ["test1", "test2", "test3"]


def trace_path(name: str) -> str:
    return str(TRACES / f"{name}.jsonl")


def edited(tmp_path: Path, name: str, edit: object) -> str:
    """A copy of a shipped trace, its lines (as dicts) passed through ``edit``."""
    lines = [json.loads(line) for line in Path(trace_path(name)).read_text().splitlines()]
    lines = edit(lines)  # type: ignore[operator]
    path = tmp_path / f"{name}-edited.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def renumbered(lines: list[dict]) -> list[dict]:  # type: ignore[type-arg]
    for seq, line in enumerate(lines[1:], 1):
        line["seq"] = seq
    return lines


# --- the shipped traces -------------------------------------------------------------------


def test_traces_are_recorded_from_the_seed_scenarios() -> None:
    for name in SEED_TESTS:
        trace = read_trace(trace_path(name))
        assert trace.header.scenario == f"chatapp/scenarios/{name}.txt"
        assert (ROOT / trace.header.scenario).exists()
        assert trace.header.source == "chat-replay record"
        for event in trace.events:
            for field in ("local", "peer"):
                address = getattr(event, field, None)
                assert address is None or address.startswith("127.0.0.1:")
        for info in trace.nodes().values():
            assert not any(arg.startswith("/") for arg in info.argv)


@pytest.mark.parametrize("name", SEED_TESTS)
def test_shipped_trace_replays_in_virtual_time(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    # How fast a replay is, is the benchmarks' figure (replay test1.jsonl), not asserted here.
    code, out = chat_replay(capsys, trace_path(name))  # the subcommand-less form
    assert code == 0, out
    assert "PASS" in out


@pytest.mark.parametrize("name", SEED_TESTS)
def test_shipped_trace_replays_on_real_udp(capsys: pytest.CaptureFixture[str], name: str) -> None:
    code, out = chat_replay(capsys, "replay", "--real", trace_path(name))
    assert code == 0, out
    assert "on real UDP sockets" in out and "PASS" in out


@pytest.mark.parametrize("name", SEED_TESTS)
def test_check_holds_on_shipped_traces(capsys: pytest.CaptureFixture[str], name: str) -> None:
    code, out = chat_replay(capsys, "check", trace_path(name))
    assert code == 0, out
    assert "0 lost" in out and "FAIL" not in out


def test_check_counts_test1(capsys: pytest.CaptureFixture[str]) -> None:
    _, out = chat_replay(capsys, "check", trace_path("test1"))
    assert "8 sent (8 direct, 0 channel), 6 delivered, 2 stored, 0 lost" in out


@pytest.mark.parametrize("name", ["test1", "test3"])
def test_each_node_alone_against_the_recording(
    capsys: pytest.CaptureFixture[str], name: str
) -> None:
    for node in read_trace(trace_path(name)).nodes():
        code, out = chat_replay(capsys, trace_path(name), "--node", node)
        assert code == 0, out
        assert f"PASS: {node} behaved as recorded" in out


def test_faults_lose_and_repeat_no_message(capsys: pytest.CaptureFixture[str]) -> None:
    for seed in (1, 2):
        code, out = chat_replay(
            capsys, trace_path("test1"), "--loss", "0.2", "--dup", "0.2", "--seed", str(seed)
        )
        assert code == 0, out
        twice = re.search(r"(\d+) received twice", out)
        assert twice is not None and int(twice.group(1)) > 0, out  # the faults did duplicate


def test_faults_need_the_virtual_network(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = chat_replay(capsys, trace_path("test1"), "--real", "--loss", "0.1")
    assert code == 2
    assert "--virtual" in out


# --- a changed trace fails, pointing at the change --------------------------------------


def test_a_changed_shown_line_fails_at_that_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def change(lines: list[dict]) -> list[dict]:  # type: ignore[type-arg]
        for line in lines:
            if line.get("ev") == "show" and line.get("line") == "user3 : hi~":
                line["line"] = "user3 : hi!"
                return lines
        raise AssertionError("no such line")

    code, out = chat_replay(capsys, edited(tmp_path, "test1", change))
    assert code == 1
    assert "First divergence: lines user1 showed" in out
    assert re.search(
        r"^  recorded \(\S+test1-edited\.jsonl:\d+, seq \d+, t=[\d.]+\): 'user3 : hi!'$", out, re.M
    ), out
    assert re.search(r"^  replay   \(seq \d+, t=[\d.]+\): 'user3 : hi~'$", out, re.M), out


def test_a_removed_datagram_fails_at_that_datagram(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def remove(lines: list[dict]) -> list[dict]:  # type: ignore[type-arg]
        for index, line in enumerate(lines):
            msg = line.get("msg") or {}
            if line.get("ev") == "send" and msg.get("t") == "chat" and msg["text"] == "hello":
                del lines[index]
                return renumbered(lines)
        raise AssertionError("no such datagram")

    code, out = chat_replay(capsys, edited(tmp_path, "test1", remove))
    assert code == 1
    assert "First divergence: datagrams user2 sent to user3" in out
    assert "the replay has an event the recording does not" in out
    assert 'chat "hello"' in out


def test_an_altered_ciphertext_in_a_trace_is_refused_as_it_would_be_live(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A played node sends the recorded bytes: one byte changed in user3's sealed chat to
    user1 does not open, and user1 takes nothing from it, as it would take nothing live."""

    def alter(lines: list[dict]) -> list[dict]:  # type: ignore[type-arg]
        for line in lines:
            msg = line.get("msg") or {}
            if line.get("ev") == "send" and line["node"] == "user3" and msg.get("t") == "chat":
                data = bytearray(base64.b64decode(line["raw_b64"]))
                data[-5] ^= 0x20  # inside the box
                line["raw_b64"] = base64.b64encode(bytes(data)).decode()
                return lines
        raise AssertionError("no such datagram")

    code, out = chat_replay(capsys, trace_path("test1"), "--node", "user1")
    assert code == 0, out  # unaltered, the played bytes fit the node as they are
    code, out = chat_replay(capsys, edited(tmp_path, "test1", alter), "--node", "user1")
    assert code == 1, out
    assert "FAIL" in out and "does not open" in out, out


def test_an_altered_signature_in_a_trace_is_refused_as_it_would_be_live(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """user1's channel message of test3 with its signature changed, sealed again in its
    session (the trace holds the session's key: it holds secrets) so that only the
    signature is wrong: the server under test refuses it, as it would live."""

    def alter(lines: list[dict]) -> list[dict]:  # type: ignore[type-arg]
        session = None
        for line in lines:
            msg = line.get("msg") or {}
            if line.get("node") == "user1" and msg.get("t") == "registered":
                sid, key = base64.b64decode(msg["sid"]), base64.b64decode(msg["session_key"])
                session = Session(sid, key)
            if line.get("ev") == "send" and line["node"] == "user1" and msg.get("t") == "send_all":
                assert session is not None
                data = base64.b64decode(line["raw_b64"])
                session.sent = int.from_bytes(data[9:17], "big") - 1  # the same counter
                sig = bytearray(base64.b64decode(msg["sig"]))
                sig[0] ^= 1
                post = ChannelPost(msg["id"], msg["text"], bytes(sig))
                line["raw_b64"] = base64.b64encode(session.seal(TO_SERVER, post)).decode()
                msg["sig"] = base64.b64encode(bytes(sig)).decode()  # msg says what the bytes do
                return lines
        raise AssertionError("no such datagram")

    code, out = chat_replay(capsys, edited(tmp_path, "test3", alter), "--node", "server")
    assert code == 1, out
    assert "the message's signature does not verify" in out, out


def test_a_build_with_a_doubled_ack_timeout_fails_on_timing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = WaitRule.timeout_for

    def doubled(self: WaitRule, timers: Timers) -> float:
        return 2 * original(self, timers)

    monkeypatch.setattr(WaitRule, "timeout_for", doubled)
    code, out = chat_replay(capsys, trace_path("test2"))
    assert code == 1
    assert "First divergence:" in out and "user1" in out
    assert "timing: 1.0" in out and "recorded 0.5" in out


def test_a_build_that_skips_a_table_broadcast_fails_at_it(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Node._send

    async def skip_fourth_table(self: Node, effect: object) -> None:
        message = getattr(effect, "message", None)
        if isinstance(message, TableDelta) and message.to == 4 and not getattr(self, "_skipped", 0):
            self._skipped = 1  # type: ignore[attr-defined]
            return
        await original(self, effect)  # type: ignore[arg-type]

    monkeypatch.setattr(Node, "_send", skip_fourth_table)
    code, out = chat_replay(capsys, trace_path("test1"))
    assert code == 1
    assert "First divergence: datagrams server sent to user" in out
    assert "delta v3->v4" in out


def test_an_unreadable_trace_is_one_line_and_status_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"hello": 1}\n')
    code, out = chat_replay(capsys, str(path))
    assert code == 2
    assert out.count("\n") == 1 and "Traceback" not in out
    code, out = chat_replay(capsys, str(tmp_path / "missing.jsonl"))
    assert code == 2 and "no such trace" in out


Line = dict[str, Any]
Edit = Callable[[list[Line]], list[Line]]


def _changed(kind: str, **changes: object) -> Edit:
    """An edit that changes the message of the first datagram of ``kind``."""

    def edit(lines: list[Line]) -> list[Line]:
        line = next(x for x in lines[1:] if (x.get("msg") or {}).get("t") == kind)
        line["msg"] = dict(line["msg"], **changes)
        return lines

    return edit


def _timers(ack_timeout: float, tries: int) -> Edit:
    return lambda lines: [
        dict(lines[0], timers={"ack_timeout": ack_timeout, "tries": tries}),
        *lines[1:],
    ]


def _restored(clients: list[list[object]], mailbox: dict[str, list[object]]) -> Edit:
    """An edit that puts a ``restore`` event before the server's start."""

    def edit(lines: list[Line]) -> list[Line]:
        restore = {"ev": "restore", "seq": 0, "t": 0.0, "node": "server", "clients": clients}
        lines.insert(1, dict(restore, mailbox=mailbox))
        return renumbered(lines)

    return edit


def _start_without_port(lines: list[Line]) -> list[Line]:
    next(x for x in lines if x.get("ev") == "start")["local"] = "noport"
    return lines


def _chat_without_id(lines: list[Line]) -> list[Line]:
    for line in lines:
        if (line.get("msg") or {}).get("t") == "chat":
            del line["msg"]["id"]
    return lines


_ITEM = {"id": "user2.9", "kind": "direct", "sender": "user2", "text": "hi", "stored_at": 1.5}
_NO_ID = {key: value for key, value in _ITEM.items() if key != "id"}

#: A trace that is not one, and the command that reads it: each must be one line, exit 2.
BAD_TRACES: dict[str, tuple[str, Edit]] = {
    "start-without-port": ("replay", _start_without_port),
    "zero-ack-timeout": ("replay", _timers(0, 5)),
    "no-tries": ("replay", _timers(0.5, 0)),
    "bogus-presence": ("replay", _restored([["user1", "127.0.0.1", 40999, "tok", "bogus"]], {})),
    "stored-item-without-id": ("replay", _restored([], {"user1": [_NO_ID]})),
    "chat-without-id": ("check", _chat_without_id),
    "text-stored-at": ("check", _changed("mailbox", items=[dict(_ITEM, stored_at="soon")])),
    "short-table-entry": ("check", _changed("table", entries=[["user1", "127.0.0.1", 1]])),
}


@pytest.mark.parametrize("case", sorted(BAD_TRACES))
def test_a_bad_trace_is_one_line_and_status_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str
) -> None:
    command, edit = BAD_TRACES[case]
    assert_one_line_error(capsys, command, edited(tmp_path, "test1", edit))


@pytest.mark.parametrize(
    "args",
    [
        ["replay", "{test1}", "-o", "/nonexistent/x.jsonl"],
        ["merge", "{test1}", "-o", "{tmp}/dir"],
        ["show", "{test1}", "--mermaid", "/nonexistent/x.mmd"],
        ["record", "{scenario}", "-o", "/nonexistent/x.jsonl", "--virtual"],
        ["record", "{scenario}", "-o", "{tmp}/dir", "--virtual"],
        ["record", "{garbage}", "-o", "{tmp}/x.jsonl"],
    ],
    ids=["replay-o", "merge-o-dir", "show-mermaid", "record-o", "record-o-dir", "record-binary"],
)
def test_a_bad_path_is_one_line_and_status_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str]
) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(bytes(range(128, 256)))
    (tmp_path / "dir").mkdir()
    paths = {
        "test1": trace_path("test1"),
        "tmp": str(tmp_path),
        "scenario": str(ROOT / "chatapp/scenarios/test3.txt"),
        "garbage": str(garbage),
    }
    assert_one_line_error(capsys, *(arg.format(**paths) for arg in args))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "garbage.bin"]  # nothing more


def assert_one_line_error(capsys: pytest.CaptureFixture[str], *args: str) -> None:
    with pytest.raises(SystemExit) as done:
        main(list(args))
    captured = capsys.readouterr()
    assert done.value.code == 2, captured.out + captured.err
    assert "Traceback" not in captured.err
    assert captured.err.startswith("chat-replay: error: ") and captured.err.count("\n") == 1, (
        captured.err
    )


# --- check, show, merge, record --------------------------------------------------------------


def test_check_finds_a_message_shown_twice(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def repeat(lines: list[dict]) -> list[dict]:  # type: ignore[type-arg]
        # user3 gets user1's "hi!" twice and shows it both times
        for index, line in enumerate(lines):
            if line.get("ev") == "show" and line.get("line") == "user1 : hi!":
                arrival = next(
                    x for x in reversed(lines[:index]) if x["node"] == "user3" and x["ev"] == "recv"
                )
                lines[index + 1 : index + 1] = [dict(arrival), dict(line)]
                return renumbered(lines)
        raise AssertionError("no such line")

    code, out = chat_replay(capsys, "check", edited(tmp_path, "test1", repeat))
    assert code == 1
    assert "FAIL no message shown twice" in out
    assert "user3 showed message user1#" in out


def test_check_finds_retries_too_close(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    def hurry(lines: list[dict]) -> list[dict]:  # type: ignore[type-arg]
        saves = [line for line in lines if (line.get("msg") or {}).get("t") == "save"]
        sends = [line for line in saves if line["ev"] == "send"]
        sends[2]["t"] = sends[1]["t"] + 0.1
        return lines

    code, out = chat_replay(capsys, "check", edited(tmp_path, "test2", hurry))
    assert code == 1
    assert "user1 re-sent save" in out and "the timeout is 0.5 s" in out


def test_show_draws_a_timeline_and_mermaid(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out = chat_replay(capsys, "show", trace_path("test3"))
    assert code == 0
    header = out.splitlines()[0]
    for node in ("server", "user1", "user2", "user3"):
        assert node in header
    assert "send_all" in out and "Channel_Message user1 : hello guys" in out
    diagram = tmp_path / "test3.mmd"
    code, out = chat_replay(capsys, "show", trace_path("test3"), "--mermaid", str(diagram))
    text = diagram.read_text()
    assert code == 0 and text.startswith("sequenceDiagram\n")
    assert "    participant user2\n" in text
    assert "user1->>server: send_all" in text
    assert "server-xuser2" in text  # the channel message to the user2 that left


def test_merge_of_per_node_traces_with_a_skewed_clock_replays(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lines = [json.loads(line) for line in Path(trace_path("test3")).read_text().splitlines()]
    header, events = lines[0], lines[1:]
    paths = []
    for node in ("server", "user1", "user2", "user3"):
        mine = [dict(e) for e in events if e["node"] == node]
        node_header = dict(header, nodes={node: header["nodes"][node]})
        # user2's machine runs 3 s behind; the others agree
        node_header["started"] = header["started"] - (3.0 if node == "user2" else 0.0)
        path = tmp_path / f"{node}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in [node_header, *mine]))
        paths.append(str(path))
    merged = tmp_path / "merged.jsonl"
    code, out = chat_replay(capsys, "merge", *paths, "-o", str(merged))
    assert code == 0, out
    assert "clocks disagree" in out
    code, out = chat_replay(capsys, str(merged))
    assert code == 0, out


def test_record_a_scenario_then_replay_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_path = tmp_path / "t3.jsonl"
    scenario = str(ROOT / "chatapp/scenarios/test3.txt")
    code, out = chat_replay(capsys, "record", scenario, "-o", str(out_path), "--virtual")
    assert code == 0, out
    trace = read_trace(str(out_path))
    assert trace.header.clock == "virtual"
    assert set(trace.header.nodes) == {"server", "user1", "user2", "user3"}
    assert not trace.header.scenario.startswith("/")
    code, out = chat_replay(capsys, str(out_path))
    assert code == 0, out


def test_help_says_which_mode_is_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = chat_replay(capsys, "replay", "--help")
    assert code == 0
    assert "--virtual" in out and "(the default)" in out


# --- real processes --------------------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_installed_command_checks_a_running_server_black_box(tmp_path: Path) -> None:
    port = free_udp_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatapp",
            "serve",
            str(port),
            "--host",
            "127.0.0.1",
            "--db",
            ":memory:",
        ],
        stderr=subprocess.PIPE,  # its log
        env={**os.environ, "CHATAPP_TRACE": ""},
    )
    try:
        assert server.stderr is not None
        assert b"listening" in server.stderr.readline()  # bound: the clients may start
        installed = Path(sys.executable).with_name("chat-replay")
        command = [str(installed)]
        if not installed.exists():
            command = [sys.executable, "-m", "chatapp_tools.replay"]
        result = subprocess.run(
            [*command, trace_path("test1"), "--target", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=10)
        if server.stderr is not None:
            server.stderr.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS: server behaved as recorded" in result.stdout


def test_chatapp_demo_records_traces_that_replay(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import trio

    from chatapp.demo import run_demo

    assert trio.run(run_demo, [3], str(tmp_path)) == 0
    capsys.readouterr()
    trace = read_trace(str(tmp_path / "test3.jsonl"))
    assert trace.header.source == "chatapp demo"
    assert set(trace.header.nodes) == {"server", "user1", "user2", "user3"}
    code, out = chat_replay(capsys, str(tmp_path / "test3.jsonl"))
    assert code == 0, out
    # the server alone against the recorded clients (their bytes as recorded)
    code, out = chat_replay(capsys, str(tmp_path / "test3.jsonl"), "--node", "server")
    assert code == 0, out
    assert "PASS: server behaved as recorded" in out


def test_a_replayed_server_starts_with_the_epoch_it_had_in_the_recording() -> None:
    # Played clients send their recorded table_acks as they are (sealed): they name the
    # recorded server's epoch, which a live server drew from the clock. The replayed
    # server starts with it: the first epoch the recording shows it sending after its
    # start (edited here in the readable ``msg``: the sealed bytes cannot be).
    from chatapp_tools.replay.plan import ReplayOptions
    from chatapp_tools.replay.runner import Runner
    from chatapp_tools.replay.traces import parse_trace

    from chatapp.trace import Start

    lines = Path(trace_path("test1")).read_text(encoding="utf-8").splitlines()
    edited = []
    for line in lines:
        event = json.loads(line)
        msg = event.get("msg")
        if event.get("node") == "server" and isinstance(msg, dict) and "epoch" in msg:
            msg["epoch"] = 1_796_207_601_234
        edited.append(json.dumps(event))
    trace = parse_trace("\n".join(edited) + "\n")
    runner = Runner(trace, ReplayOptions(node="server"))
    (start,) = [e for e in trace.events if isinstance(e, Start) and e.node == "server"]
    assert runner._recorded_epoch(start) == 1_796_207_601_234
