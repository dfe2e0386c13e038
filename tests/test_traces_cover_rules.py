"""The shipped traces cover the protocol's rules: traces/README.md maps each rule to a
trace, every message type and every wait has a row, each trace holds what its row
says, and every shipped trace replays to PASS. Also the faults and restarts that
those traces are made with: scenario steps in virtual time, and a replay that
fails when one behaviour changes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import trio
import trio.testing
from chatapp_tools.replay.cli import main
from chatapp_tools.replay.traces import read_trace

from chatapp.protocol.common import Timers
from chatapp.protocol.waits import ROLES, WaitRule
from chatapp.testing import MemoryNetwork, ScenarioError, parse_scenario, play_scenario
from chatapp.trace import Fault, Recv, Send, Shown, Start, Trace

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "traces"
README = (ROOT / "README.md").read_text(encoding="utf-8")
TABLE = (TRACES / "README.md").read_text(encoding="utf-8").partition("## Rules and")[2]
SHIPPED = sorted(path.stem for path in TRACES.glob("*.jsonl"))
COVERAGE = [name for name in SHIPPED if not name.startswith("test")]


def rows() -> list[tuple[str, str, str]]:
    found = []
    for line in TABLE.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("rule", "---"):
            found.append((cells[0], cells[1].strip("`"), cells[2]))
    return found


def readme_message_types() -> set[str]:
    """The `t` of each row of the README's table of messages, and the handshake's."""
    types: set[str] = set()
    messages = README.partition("| `t` | from → to |")[2].partition("\n\n")[0]
    for line in messages.splitlines()[1:]:
        types |= set(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    handshake = README.partition("| `{` | handshake")[2].partition("\n")[0]
    return types | set(re.findall(r"`([a-z_]+)`", handshake))


def holds(trace: Trace, item: str) -> bool:
    events = trace.events
    if item.startswith("t:"):
        kind = item[2:]
        return any(isinstance(e, Send | Recv) and e.msg and e.msg.get("t") == kind for e in events)
    if item.startswith("fault:"):
        _, what, kind = item.split(":")
        return any(isinstance(e, Fault) and e.what == what and e.of == kind for e in events)
    if item.startswith("ev:"):
        return any(type(e).__name__.lower().startswith(item[3:6]) for e in events)
    return any(isinstance(e, Shown) and item.strip('"') in e.line for e in events)


def items(shows: str) -> list[str]:
    return re.findall(r'`[^`]+`|"[^"]+"', shows)


def test_every_message_type_has_a_row() -> None:
    shown = {item[3:-1] for _, _, shows in rows() for item in items(shows) if item[1:3] == "t:"}
    missing = readme_message_types() - shown
    assert readme_message_types() >= {"hello", "rekey", "table", "delta", "chat", "lookup"}
    assert not missing, f"traces/README.md has no row for the messages {sorted(missing)}"


def test_every_wait_has_a_row() -> None:
    rules = {rule for rule, _, _ in rows()}
    for table in ROLES.values():
        for wait in table:
            assert f"wait: {wait.rule.what}" in rules, f"no row for the wait {wait.rule.what!r}"


@pytest.mark.parametrize("row", rows(), ids=lambda row: row[0][:50])
def test_each_row_is_shown_by_its_trace(row: tuple[str, str, str]) -> None:
    rule, name, shows = row
    path = TRACES / name
    assert path.exists(), f"{rule}: {name} is not in traces/"
    trace = read_trace(str(path))
    listed = items(shows)
    assert listed, f"{rule}: the row lists nothing"
    for item in listed:
        assert holds(trace, item.strip("`")), f"{rule}: {name} does not hold {item}"


@pytest.mark.parametrize("name", COVERAGE)
def test_coverage_traces_come_from_their_scenarios(name: str) -> None:
    trace = read_trace(str(TRACES / f"{name}.jsonl"))
    assert trace.header.scenario == f"traces/scenarios/{name}.txt"
    assert trace.header.clock == "virtual"
    assert f"`{name}.jsonl`" in TABLE
    assert len(trace.events) < 500  # small: each replays in well under a second


@pytest.mark.parametrize("name", COVERAGE)
def test_coverage_trace_replays(capsys: pytest.CaptureFixture[str], name: str) -> None:
    code, out = chat_replay(capsys, str(TRACES / f"{name}.jsonl"))
    assert code == 0, out
    assert "PASS" in out


def chat_replay(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        main(list(args))
    captured = capsys.readouterr()
    code = done.value.code
    return (code if isinstance(code, int) else 0), captured.out + captured.err


# --- faults and restarts ---------------------------------------------------------------


def test_a_replay_with_restarts_and_faults_fails_when_a_wait_has_fewer_tries(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = read_trace(str(TRACES / "restarts.jsonl"))
    starts = [e.node for e in trace.events if isinstance(e, Start)]
    assert starts.count("user2") == 3 and starts.count("server") == 3
    assert any(isinstance(e, Fault) for e in trace.events)
    original = WaitRule.tries_for

    def fewer(self: WaitRule, timers: Timers) -> int:
        return max(1, original(self, timers) - 1)

    monkeypatch.setattr(WaitRule, "tries_for", fewer)
    code, out = chat_replay(capsys, str(TRACES / "restarts.jsonl"))
    assert code == 1, out
    assert "First divergence:" in out


def test_a_restarted_server_replays_from_the_database_its_replay_left(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build whose database never deletes what was ACKed: only the restart shows it
    (what was delivered before it comes again), and the replay fails there."""
    from chatapp import sqlite_store

    monkeypatch.setattr(sqlite_store._Transaction, "remove_messages", lambda self, change: None)
    code, out = chat_replay(capsys, str(TRACES / "restarts.jsonl"))
    assert code == 1, out
    assert "First divergence:" in out


def test_a_replay_without_its_faults_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text = (TRACES / "direct.jsonl").read_text(encoding="utf-8")
    kept = [line for line in text.splitlines() if '"ev":"fault"' not in line]
    path = tmp_path / "no-faults.jsonl"
    path.write_text("\n".join(kept) + "\n", encoding="utf-8")
    code, out = chat_replay(capsys, str(path))
    assert code == 1, out


SCENARIO = """
serve
join user1
expect user1 [Client Table Updated]
join user2
expect user2 [Client Table Updated]
drop user1 -> user2 chat
type user1 send user2 lost
expect user1 [No ACK from user2, message sent to server.]
expect user2 user1 : lost
expect user1 [Message has been received by user2.]
dup user1 -> * chat
type user1 send user2 twice
expect user2 user1 : twice
kill user2
join user2 same-port
expect user2 [Client Table Updated]
stop server
serve
delay user1 -> server save 0.2
drop user1 -> user2 chat
type user1 send user2 late
expect user1 [No ACK from user2, message sent to server.]
expect user2 user1 : late
"""


async def test_fault_steps_and_restarts_in_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    network = MemoryNetwork()
    cluster = await play_scenario(parse_scenario(SCENARIO), network)
    user1, user2 = cluster.clients["user1"], cluster.clients["user2"]
    assert "[No ACK from user2, message sent to server.]" in user1.screen.lines
    assert user2.screen.lines.count("user1 : twice") == 0  # that was the first process
    assert "user1 : late" in user2.screen.lines
    # the last chat was lost, its save went 0.2 s late to the restarted server, which
    # relayed it to the new user2 process
    assert cluster.store is not None and cluster.store.load().clients  # kept over the restart


def test_fault_steps_are_checked() -> None:
    for bad in ("drop user1 user2 chat", "delay a -> b save", "dup a -> b t x", "faults 1 2"):
        with pytest.raises(ScenarioError):
            parse_scenario(bad)
    assert parse_scenario("faults 0.1 0.05 7")[0].kind == "faults"
