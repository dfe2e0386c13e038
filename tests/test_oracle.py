"""The replay as an oracle: a small change to the protocol, the command line's defaults or
a trace is a divergence that the report names, and the shipped traces pass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from chatapp_tools.replay.cli import main

from chatapp import screen
from chatapp.protocol.changes import MessagesRemoved
from chatapp.protocol.common import Effect, Pending
from chatapp.protocol.mailbox import Flight
from chatapp.protocol.server_core import ServerCore, Waiting
from chatapp.protocol.server_delivery import ServerDelivery
from chatapp.wire import StoredItem

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "traces"


def chat_replay(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        main([str(arg) for arg in args])
    captured = capsys.readouterr()
    code = done.value.code
    return (code if isinstance(code, int) else 0), captured.out + captured.err


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
    import msgspec

    from chatapp.protocol import server_delivery

    real = server_delivery.Mailbox

    def shifted(msg_id: str, delivery: str, items: list[StoredItem], keys: Any) -> Any:
        items = [msgspec.structs.replace(item, stored_at=item.stored_at + 60) for item in items]
        return real(msg_id, delivery, items, keys)

    monkeypatch.setattr(server_delivery, "Mailbox", shifted)
    code, out = chat_replay(capsys, shipped("test1"))
    assert code == 1, out
    assert "not the stored time" in out
