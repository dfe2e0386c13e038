"""Hostile datagrams in scenarios (``attack`` steps, chatapp.testing.attacker): played in
virtual time, recorded as an attacker node of role ``raw``, replayed from the recorded
bytes; a victim that stops refusing them makes the attack traces fail."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing
from chatapp_tools.replay.cli import main

from chatapp.protocol import server_delivery
from chatapp.protocol.common import Timers
from chatapp.testing import MemoryNetwork, ScenarioError, parse_scenario, play_scenario
from chatapp.trace import MemoryRecorder, Recv, Send, Start

TRACES = Path(__file__).resolve().parent.parent / "traces"

FLOOD = """
serve --join-limit 1
attack mallory hellos 5
wait 31
attack mallory hellos 2
wait 1
"""


def test_attack_steps_are_checked() -> None:
    with pytest.raises(ScenarioError, match="attack takes NAME"):
        parse_scenario("serve\nattack mallory flood 3\n")
    with pytest.raises(ScenarioError, match="attack takes NAME"):
        parse_scenario("serve\nattack mallory hellos many\n")
    with pytest.raises(ScenarioError, match="--join-limit"):
        parse_scenario("serve --join-limit x\n")


async def test_a_handshake_flood_in_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    recorder = MemoryRecorder(timers=Timers())
    await play_scenario(parse_scenario(FLOOD), MemoryNetwork(), recorder=recorder)
    events = recorder.events
    roles = {e.node: e.role for e in events if isinstance(e, Start)}
    assert roles["mallory"] == "raw"
    hellos = [e for e in events if isinstance(e, Send) and e.node == "mallory"]
    challenges = [e for e in events if isinstance(e, Recv) and e.node == "mallory"]
    assert len(hellos) == 7
    # 2 handshake datagrams at once, then one every 30 s
    assert [e.msg and e.msg["t"] for e in challenges] == ["challenge"] * 3


def replay(capsys: pytest.CaptureFixture[str], name: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        main([str(TRACES / name)])
    return int(done.value.code or 0), capsys.readouterr().out


@pytest.mark.parametrize("name", ["attacks.jsonl", "attacks-sealed.jsonl"])
def test_attack_traces_replay(capsys: pytest.CaptureFixture[str], name: str) -> None:
    code, out = replay(capsys, name)
    assert code == 0, out


def test_a_server_that_takes_a_forged_save_fails_the_replay(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_delivery, "_sealed_by", lambda sealed, name: True)
    code, out = replay(capsys, "attacks-sealed.jsonl")
    assert code == 1, out
