"""The replay as an oracle: a small change to the protocol, the command line's defaults or
a trace is a divergence that the report names, and the shipped traces pass."""

from __future__ import annotations

import functools
import inspect
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from _harness import chat_replay
from chatapp_tools.replay.compare import compare
from chatapp_tools.replay.plan import ReplayOptions
from chatapp_tools.replay.report import report
from chatapp_tools.replay.runner import run_replay
from chatapp_tools.replay.traces import read_trace

from chatapp import cli, launch, screen
from chatapp.argv import options_from_argv
from chatapp.launch import ClientOptions, ServerOptions
from chatapp.protocol.changes import MessagesRemoved
from chatapp.protocol.common import Effect, Pending, Timers
from chatapp.protocol.mailbox import Flight
from chatapp.protocol.server_core import ServerCore, Waiting
from chatapp.protocol.server_delivery import ServerDelivery
from chatapp.testing.determinism import deterministic_scheduling
from chatapp.trace import Shown, Trace
from chatapp.typer_support import UsageError
from chatapp.wire import StoredItem

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "traces"


def shipped(name: str) -> str:
    return str(TRACES / f"{name}.jsonl")


def lines_of(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def write_lines(path: Path, lines: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


# --- 1. what the server wrote ------------------------------------------------------------


def test_shipped_traces_record_the_commits() -> None:
    for name in ("test1", "test2", "test3"):
        commits = [line for line in lines_of(shipped(name))[1:] if line["ev"] == "commit"]
        assert any(line["node"] == "server" for line in commits), name
    ops = {
        change["op"]
        for line in lines_of(shipped("test1"))[1:]
        if line["ev"] == "commit"
        for change in line["changes"]
    }
    assert {"client", "stored", "deleted", "pinned", "marked"} <= ops


def test_deleting_stored_messages_before_the_ack_diverges(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mailbox's items deleted when the batch is sent, not when the client ACKs it:
    the datagrams and lines are the same, the commits are not."""
    send_batch = ServerDelivery._send_batch
    batch_acked = ServerDelivery._batch_acked

    def deleted_first(
        self: ServerDelivery, record: Any, flight: Flight, now: float
    ) -> list[Effect]:
        items = self.mailboxes.next_batch(record.name)
        early = MessagesRemoved(record.name, tuple(item.seq for item in items))
        return [early, *send_batch(self, record, flight, now)]

    def not_after(
        self: ServerDelivery, pending: Pending[Waiting], answer: Any, now: float
    ) -> list[Effect]:
        effects = batch_acked(self, pending, answer, now)
        return [effect for effect in effects if not isinstance(effect, MessagesRemoved)]

    monkeypatch.setattr(ServerDelivery, "_send_batch", deleted_first)
    monkeypatch.setattr(ServerDelivery, "_batch_acked", not_after)
    code, out = chat_replay(capsys, shipped("test1"))
    assert code == 1, out
    assert "First divergence: what server committed" in out
    assert '"op":"deleted"' in out.replace(" ", "")


def test_a_wrong_stored_time_diverges(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stores a time a second off: the commit says so, though the line shown
    carries that same time."""
    wall_time = ServerCore._wall

    def later(self: ServerCore, now: float) -> float:
        return wall_time(self, now) + 1.0

    monkeypatch.setattr(ServerCore, "_wall", later)
    code, out = chat_replay(capsys, shipped("test1"))
    assert code == 1, out
    assert "<now +1.000 s>" in out


def test_an_edited_stored_item_in_a_commit_diverges(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lines = lines_of(shipped("test1"))
    stored = next(
        line
        for line in lines[1:]
        if line["ev"] == "commit" and line["changes"][0]["op"] == "stored"
    )
    stored["changes"][0]["to"] = "user2"
    code, out = chat_replay(capsys, write_lines(tmp_path / "t.jsonl", lines))
    assert code == 1, out
    assert "First divergence: what server committed" in out


def test_a_trace_of_format_2_replays_without_commits(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lines = [line for line in lines_of(shipped("test1")) if line.get("ev") != "commit"]
    lines[0]["version"] = 2
    for line in lines[1:]:
        line.pop("settings", None)
    for seq, line in enumerate(lines[1:], 1):
        line["seq"] = seq
    code, out = chat_replay(capsys, write_lines(tmp_path / "v2.jsonl", lines))
    assert code == 0, out


# --- 2. the time prefix of a stored message ---------------------------------------------


def test_a_changed_time_format_diverges(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Still numeric, a millisecond less precise: not the stored time."""

    def rounded(stored_at: float, sender: str, text: str) -> str:
        return f"({stored_at:.3f}) {sender} : {screen.printable(text)}"

    monkeypatch.setattr(screen, "stored_direct", rounded)
    code, out = chat_replay(capsys, shipped("test1"))
    assert code == 1, out
    assert "First divergence: lines user1 showed" in out


def test_a_shown_time_other_than_the_stored_one_diverges(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lines = lines_of(shipped("test1"))
    shown = next(
        line for line in lines[1:] if line["ev"] == "show" and line["line"].startswith("(")
    )
    stamp = shown["line"][1 : shown["line"].index(")")]
    shown["line"] = shown["line"].replace(stamp, repr(float(stamp) + 0.5), 1)
    code, out = chat_replay(capsys, write_lines(tmp_path / "t.jsonl", lines))
    assert code == 1, out
    assert "lines user1 showed" in out


def test_a_stored_time_sent_other_than_stored_diverges(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mailbox carries a time other than the one stored (the line shows it)."""

    from chatapp.protocol import server_delivery

    real = server_delivery.Mailbox

    def shifted(msg_id: str, delivery: str, items: list[StoredItem], keys: Any) -> Any:
        items = [msgspec.structs.replace(item, stored_at=item.stored_at + 60) for item in items]
        return real(msg_id, delivery, items, keys)

    monkeypatch.setattr(server_delivery, "Mailbox", shifted)
    code, out = chat_replay(capsys, shipped("test1"))
    assert code == 1, out
    assert "not the stored time" in out


# --- 3. timing, 4. nodes built from their command lines --------------------------------


def with_default(
    monkeypatch: pytest.MonkeyPatch, command: Callable[..., Any], option: str, value: object
) -> None:
    """``command``'s default for ``option`` changed, as an edit of chatapp/cli.py would."""
    params = list(inspect.signature(command).parameters)
    defaults = list(command.__defaults__ or ())
    defaults[params.index(option) - (len(params) - len(defaults))] = value
    monkeypatch.setattr(command, "__defaults__", tuple(defaults))


def test_the_command_line_gives_the_options_nodes_run_with() -> None:
    server = options_from_argv(["chatapp", "serve", "8001", "--mailbox-limit", "7"])
    assert isinstance(server, ServerOptions)
    assert (server.port, server.mailbox_limit, server.timers) == (8001, 7, Timers())
    client = options_from_argv(["chatapp", "-c", "u1", "localhost", "8001", "9001"])
    assert isinstance(client, ClientOptions)
    assert (client.name, client.server_ip, client.port) == ("u1", "127.0.0.1", 9001)
    with pytest.raises(UsageError):
        options_from_argv(["chatapp", "serve", "80"])


@pytest.mark.parametrize(
    ("command", "option", "value", "said"),
    [
        (
            "join",
            "ack_timeout",
            0.6,
            "the default of --ack-timeout is now 0.6; the recording ran with 0.5",
        ),
        ("join", "tries", 4, "the default of --tries is now 4; the recording ran with 5"),
        ("serve", "ack_timeout", 0.6, "the default of --ack-timeout is now 0.6"),
        (
            "serve",
            "mailbox_limit",
            999,
            "the default of --mailbox-limit is now 999; the recording ran with 1000",
        ),
        (
            "serve",
            "rate_limit",
            400,
            "--rate-limit now gives per_address_burst 400, per_address_rate 400",
        ),
        (
            "serve",
            "join_limit",
            100,
            "--join-limit now gives handshakes_per_ip_burst 200",
        ),
    ],
)
def test_a_changed_default_of_the_command_line_diverges_and_is_named(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    option: str,
    value: object,
    said: str,
) -> None:
    with_default(monkeypatch, getattr(cli, command), option, value)
    code, out = chat_replay(capsys, shipped("test1"))
    assert code == 1, out
    assert said in out


def test_timing_alone_catches_a_longer_ack_timeout(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """0.5 s -> 0.6 s with the settings made to say 0.5: the timing of the retries and of
    the hand-over to the server diverges (a recording in real time, replayed virtually)."""
    recorded = launch.settings_of
    monkeypatch.setattr(
        launch, "settings_of", lambda options: {**recorded(options), "ack_timeout": 0.5}
    )
    with_default(monkeypatch, cli.join, "ack_timeout", 0.6)
    code, out = chat_replay(capsys, shipped("test2"))
    assert code == 1, out
    assert "timing: 0.600 s after" in out
    assert "tolerance 0.040 s" in out


def test_a_virtual_recording_is_timed_to_the_millisecond(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    trace = tmp_path / "virtual.jsonl"
    code, out = chat_replay(
        capsys, "record", "--virtual", ROOT / "chatapp/scenarios/test2.txt", "-o", trace
    )
    assert code == 0, out
    assert chat_replay(capsys, trace)[0] == 0
    # 10 ms longer: within a real recording's tolerance, not a virtual one's
    recorded = launch.settings_of
    monkeypatch.setattr(
        launch, "settings_of", lambda options: {**recorded(options), "ack_timeout": 0.5}
    )
    with_default(monkeypatch, cli.join, "ack_timeout", 0.51)
    code, out = chat_replay(capsys, trace)
    assert code == 1, out
    assert "tolerance 0.002 s" in out
    assert chat_replay(capsys, shipped("test1"))[0] == 0  # one timeout: 10 ms in 40


# --- 5. determinism ------------------------------------------------------------------------


def _order_of_a_tie() -> list[int]:
    """Which of ten tasks woken at the same instant ran first (Trio shuffles them)."""
    order: list[int] = []

    async def main() -> None:
        async def one(index: int) -> None:
            await trio.sleep(1)
            order.append(index)

        async with trio.open_nursery() as nursery:
            for index in range(10):
                nursery.start_soon(one, index)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return order


def test_deterministic_scheduling_repeats_the_order_of_ties() -> None:
    with deterministic_scheduling():
        first = _order_of_a_tie()
    with deterministic_scheduling():
        assert _order_of_a_tie() == first
    with deterministic_scheduling(seed=1):
        assert sorted(_order_of_a_tie()) == sorted(first)


def test_the_shipped_traces_pass_20_times_in_20(capsys: pytest.CaptureFixture[str]) -> None:
    for path in sorted(TRACES.glob("*.jsonl")):
        recorded = read_trace(str(path))
        for run in range(20):
            replayed, _ = run_replay(recorded, ReplayOptions())
            comparison = compare(recorded, replayed)
            assert comparison.passed, f"{path.name}, run {run + 1}:\n{report(comparison)}"


def test_check_stable_keeps_a_stable_recording(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    trace = tmp_path / "t.jsonl"
    scenario = ROOT / "chatapp/scenarios/test3.txt"
    code, out = chat_replay(
        capsys, "record", "--virtual", scenario, "-o", trace, "--check-stable", "5"
    )
    assert code == 0, out
    assert "stable: 5 replays of 5 passed" in out
    assert trace.exists()


def test_check_stable_refuses_a_trace_that_fails_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The third replay runs otherwise (a line fewer shown): the trace is removed."""
    from chatapp_tools.replay import compare as comparing

    real = comparing.compare
    runs = []

    def third_differs(recorded: Trace, replayed: Trace, **options: Any) -> Any:
        runs.append(1)
        if len(runs) == 3:
            last = max(i for i, e in enumerate(replayed.events) if isinstance(e, Shown))
            del replayed.events[last]
        return real(recorded, replayed, **options)

    monkeypatch.setattr(comparing, "compare", third_differs)
    trace = tmp_path / "t.jsonl"
    scenario = ROOT / "chatapp/scenarios/test3.txt"
    code, out = chat_replay(
        capsys, "record", "--virtual", scenario, "-o", trace, "--check-stable", "5"
    )
    assert code == 1, out
    assert "UNSTABLE: replay 3 of 5 failed" in out
    assert "the recording has an event the replay does not" in out
    assert not trace.exists()


# --- 6. reports like a good test failure ---------------------------------------------------


def test_a_report_marks_the_character_names_the_line_counts_the_rest_and_says_how_to_accept(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lines = lines_of(shipped("test1"))
    changed = []
    for number, line in enumerate(lines[1:], 2):
        if line["ev"] == "show" and line["line"] in ("user3 : hi~", "user1 : hi!"):
            line["line"] = line["line"][:-1] + "?"
            changed.append(number)
    assert len(changed) == 2
    path = write_lines(tmp_path / "t.jsonl", lines)
    code, out = chat_replay(capsys, path)
    assert code == 1, out
    first = min(changed)
    assert f"t.jsonl:{first}, seq {first - 1}," in out
    marker = out.splitlines()
    at = next(i for i, text in enumerate(marker) if text.lstrip().startswith("- user"))
    assert marker[at + 1].lstrip().startswith("+ user")
    assert marker[at + 2].index("^") == marker[at].index("?") == len(marker[at]) - 1
    assert "2 divergences in all, in 2 streams: this one and 1 more." in out
    assert f"chat-replay record chatapp/scenarios/test1.txt -o {path} --check-stable 20" in out


def test_a_report_counts_the_divergences_after_the_first_in_a_stream(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    lines = lines_of(shipped("test1"))
    for line in lines[1:]:
        if line["ev"] == "show" and line["node"] == "user2":
            line["line"] += "!"
    code, out = chat_replay(capsys, write_lines(tmp_path / "t.jsonl", lines))
    assert code == 1, out
    shown = sum(1 for line in lines[1:] if line["ev"] == "show" and line["node"] == "user2")
    assert f"{shown} divergences in all, in 1 stream:" in out
    assert f"({shown} in this stream)" in out


@pytest.mark.parametrize("kind", ["hello", "chat", "send_all"])
def test_a_msg_that_is_not_what_its_bytes_say_is_flagged_with_its_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str
) -> None:
    """A handshake (plain JSON), a peer datagram (opened with the clients' recorded keys)
    and a session datagram (with the session key of the registered answer)."""
    name = "test3" if kind == "send_all" else "test1"
    lines = lines_of(shipped(name))
    number, line = next(
        (n, line)
        for n, line in enumerate(lines[1:], 2)
        if line["ev"] == "send" and (line.get("msg") or {}).get("t") == kind
    )
    field = "name" if kind == "hello" else "text"
    line["msg"][field] = line["msg"][field] + "x"
    path = write_lines(tmp_path / "t.jsonl", lines)
    for mode in ([], ["--node", "server"]):
        code, out = chat_replay(capsys, path, *mode)
        assert code == 1, out
        assert f"t.jsonl:{number}, seq {number - 1}," in out
        assert f"its msg is not what its bytes say ({field}: msg " in out


@pytest.mark.e2e
def test_a_server_alone_stopped_with_ctrl_c_replays(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    trace = tmp_path / "server.jsonl"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    chatapp = Path(sys.executable).with_name("chatapp")
    server = subprocess.Popen(
        [str(chatapp), "serve", str(port), "--db", ":memory:", "--trace", str(trace)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while '"ev":"start"' not in (trace.read_text() if trace.exists() else ""):
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
    finally:
        if server.poll() is None:
            server.kill()
    code, out = chat_replay(capsys, trace)
    assert code == 0, out
    assert "PASS" in out


def test_a_changed_default_of_the_protocol_diverges_and_is_named(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timers() defaults to 0.6 s: the command line still says 0.5, but a node started
    without options (a scenario's) would run with 0.6; the header's defaults say so."""
    from chatapp.trace import recorders

    monkeypatch.setattr(recorders, "Timers", functools.partial(Timers, ack_timeout=0.6))
    code, out = chat_replay(capsys, shipped("test1"))
    assert code == 1, out
    assert "the protocol's own defaults changed" in out
    assert "ack_timeout is now 0.6, recorded 0.5" in out


# --- the replayed server's database --------------------------------------------------------


def test_what_a_restarted_server_reads_back_is_compared(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A restart goes on from the replay's own database; what it reads there must be
    what the recorded server read (here the recording is edited to say otherwise)."""
    lines = lines_of(shipped("restarts"))
    restores = [line for line in lines[1:] if line["ev"] == "restore"]
    assert len(restores) >= 2
    restores[1]["last_n"] += 1
    code, out = chat_replay(capsys, write_lines(tmp_path / "t.jsonl", lines))
    assert code == 1, out
    assert "what server read from its database when it started" in out


# --- the order of one handling's effects ----------------------------------------------------


def test_a_table_shown_before_it_is_acked_diverges(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same datagrams, the same lines, at the same instant: only their order within
    the handling of the table differs."""
    from chatapp.protocol.client import ClientProtocol
    from chatapp.protocol.codecs import Via
    from chatapp.protocol.common import Show
    from chatapp.wire import Table, TableDelta

    handlers = ClientProtocol._message_handlers
    real = handlers[(Table, Via.SERVER)]

    def shown_first(self: Any, *args: Any) -> list[Effect]:
        effects = real(self, *args)
        shows = [effect for effect in effects if isinstance(effect, Show)]
        return shows + [effect for effect in effects if not isinstance(effect, Show)]

    for kind in (Table, TableDelta):
        monkeypatch.setitem(handlers, (kind, Via.SERVER), shown_first)
    code, out = chat_replay(capsys, shipped("test1"))
    assert code == 1, out
    assert "First divergence: the order of what user1 did in one handling" in out
    assert "did the same things in another order" in out


def test_the_shipped_traces_mark_what_timers_did() -> None:
    timers = [line for line in lines_of(shipped("test2"))[1:] if line["ev"] == "timer"]
    assert timers
