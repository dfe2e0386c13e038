"""As an attacker would, with real processes on loopback: an impostor with keys of its
own after an offline and an online name (with and without a flood at the holder's
port); direct messages and ACKs copied from captured traffic, altered, replayed and
sent from elsewhere or from a forged source address; forged and replayed server
datagrams. Nothing may be shown, accepted or counted as delivered."""

from __future__ import annotations

import base64
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _attack import (
    LOCALHOST,
    altered,
    can_forge,
    captured,
    flood,
    send_forged,
    send_from_elsewhere,
)
from _harness import Proc, chatapp_env, free_udp_ports, join, serve

from chatapp import screen
from chatapp.protocol.crypto import REKEY_DOMAIN, Identity
from chatapp.protocol.sealing import TO_CLIENT, Session
from chatapp.wire import (
    ChannelDelivery,
    Mailbox,
    Refused,
    Rekey,
    Table,
    TableEntry,
    encode,
)

pytestmark = pytest.mark.e2e

TU = screen.TABLE_UPDATED
REFUSED = "[Registration refused: the name user1 belongs to another key. Choose another name.]"


def _impostor(server_port: int, port: int, env: dict[str, str], state: Path) -> Proc:
    """``chatapp join user1`` by someone else: another state directory, so another key."""
    return join("user1", server_port, port, env, "--state-dir", str(state))


def _refused(impostor: Proc) -> None:
    impostor.expect(REFUSED)
    impostor.popen.wait(10)
    assert impostor.stop() == 1


def _new_lines(proc: Proc, before: list[str]) -> list[str]:
    lines = proc.lines()
    assert lines[: len(before)] == before
    return lines[len(before) :]


def test_an_impostor_with_its_own_key_cannot_take_an_offline_name(tmp_path: Path) -> None:
    env = chatapp_env(tmp_path)
    server_port, p1, p2, p3, p4 = free_udp_ports(5)
    server = serve(server_port, env, db=tmp_path / "server.sqlite3")
    procs = [server]
    try:
        user1 = join("user1", server_port, p1, env)
        procs.append(user1)
        user1.expect(TU)
        user2 = join("user2", server_port, p2, env)
        procs.append(user2)
        user1.expect(TU, count=2)
        user1.type("dereg user1")
        user1.expect(screen.YOU_ARE_OFFLINE)
        user2.type("send user1 for user1 only")
        user2.expect(screen.SAVED_BY_SERVER)
        _refused(_impostor(server_port, p3, env, tmp_path / "mallory"))
        user1.kill()  # the holder's process is gone too: the name is still its key's
        _refused(_impostor(server_port, p3, env, tmp_path / "mallory"))
        # the holder comes back (its key, another port) and gets what was kept for it
        again = join("user1", server_port, p4, env)
        procs.append(again)
        again.expect(screen.YOU_HAVE_MESSAGE)
        again.wait_for(
            lambda lines: any(line.endswith(") user2 : for user1 only") for line in lines),
            10,
            "the stored message",
        )
    finally:
        for proc in procs:
            proc.stop()
    assert server.output.count("refused user1 from") == 2


@pytest.mark.parametrize("flooded", [False, True], ids=["quiet", "flooded"])
def test_an_impostor_cannot_take_an_online_name_even_with_junk_flooding_the_holder(
    tmp_path: Path, flooded: bool
) -> None:
    env = chatapp_env(tmp_path)
    server_port, p1, p2, p3 = free_udp_ports(4)
    server = serve(server_port, env, db=tmp_path / "server.sqlite3")
    procs = [server]
    try:
        holder = join("user1", server_port, p1, env)
        procs.append(holder)
        holder.expect(TU)
        with flood((LOCALHOST, p1), seconds=60 if flooded else 0) as sent:
            for attempt in range(5):
                _refused(_impostor(server_port, p3, env, tmp_path / f"mallory{attempt}"))
            if flooded:
                assert sent[0] > 1000
            user2 = join("user2", server_port, p2, env)
            procs.append(user2)
            user2.expect(TU)
            user2.type("send user1 is it still you?")
            # live, or (the flood may cost the direct try and the relay) stored and
            # delivered when the holder is heard from again: once either way
            holder.wait_for(
                lambda lines: any(line.endswith("user2 : is it still you?") for line in lines),
                20,
                "the message, live or stored",
            )
            assert sum(line.endswith("user2 : is it still you?") for line in holder.lines()) == 1
    finally:
        for proc in procs:
            proc.stop()
    registered = [line for line in server.lines() if "registered user1 at" in line]
    assert len(registered) == 1 and f":{p1}" in registered[0]
    assert server.output.count("refused user1 from") == 5


def _two_clients_with_traces(
    tmp_path: Path,
) -> tuple[list[Proc], int, tuple[int, int], tuple[Path, Path]]:
    env = chatapp_env(tmp_path)
    server_port, p1, p2 = free_udp_ports(3)
    server = serve(server_port, env, db=tmp_path / "server.sqlite3")
    traces = (tmp_path / "user1.jsonl", tmp_path / "user2.jsonl")
    user1 = join("user1", server_port, p1, env, "--trace", str(traces[0]))
    user1.expect(TU)
    user2 = join("user2", server_port, p2, env, "--trace", str(traces[1]))
    user1.expect(TU, count=2)
    user2.expect(TU)
    return [server, user1, user2], server_port, (p1, p2), traces


def test_captured_and_altered_direct_messages_and_acks_are_never_shown_or_counted(
    tmp_path: Path,
) -> None:
    procs, _, (p1, p2), (trace1, trace2) = _two_clients_with_traces(tmp_path)
    _, user1, user2 = procs
    rng = random.Random(11)
    try:
        user1.type("send user2 hello, the real one")
        user1.expect("[Message has been received by user2.]")
        user2.expect("user1 : hello, the real one")  # its ACK may come through before its line
        (chat,) = captured(trace1, "send", "chat")
        acks = [data for data in captured(trace2, "send", "ack") if data[:1] == b"\x02"]
        assert chat[:1] == b"\x02" and b"the real one" not in chat  # sealed on the wire
        before = user2.lines()
        for data in altered(chat, rng):  # not one opens: no answer at all
            assert send_from_elsewhere(data, (LOCALHOST, p2)) == []
            if can_forge():
                send_forged(data, (LOCALHOST, p1), (LOCALHOST, p2))
        # the very datagram again: shown before, so not again (its ACK, boxed for user1,
        # goes to whoever sent the copy: it is of no use to anyone else)
        for answer in send_from_elsewhere(chat, (LOCALHOST, p2)):
            assert answer[:1] == b"\x02" and b"user2" in answer[:32]
        time.sleep(0.5)
        assert _new_lines(user2, before) == []

        # user2 goes offline: it no longer ACKs. Forged, altered and old ACKs from it
        # (and from its address) must not say that user1's next message was received.
        user2.type("dereg user2")
        user2.expect(screen.YOU_ARE_OFFLINE)
        user1.expect(TU, count=3)
        before = user1.lines()
        user1.type("send user2 are you there?")
        deadline = time.monotonic() + 0.4
        while time.monotonic() < deadline:
            for data in [*acks, *(a for ack in acks for a in altered(ack, rng, 3))]:
                send_from_elsewhere(data, (LOCALHOST, p1))
                if can_forge():
                    send_forged(data, (LOCALHOST, p2), (LOCALHOST, p1))
        user1.expect(screen.SAVED_BY_SERVER)
        shown = _new_lines(user1, before)
        assert shown == [screen.no_ack("user2"), screen.SAVED_BY_SERVER], shown
    finally:
        for proc in procs:
            proc.stop()


def test_forged_altered_and_replayed_server_datagrams_show_nothing(tmp_path: Path) -> None:
    procs, server_port, (p1, _), (trace1, _) = _two_clients_with_traces(tmp_path)
    server, user1, user2 = procs
    rng = random.Random(12)
    try:
        user2.type("send_all first")
        user1.expect("Channel_Message user2 : first")
        session = [data for kind in ("table", "channel") for data in captured(trace1, "recv", kind)]
        assert session and all(data[:1] == b"\x01" for data in session)
        sid = base64.b64decode(_registered(trace1)["sid"])
        mallory = Identity(b"M" * 32)
        entry = TableEntry("user2", LOCALHOST, 6666, True, mallory.public, bytes(8))
        fakes = [
            Table("f.1", 10**15, 1, 0, 1, [entry]),
            ChannelDelivery("f.2", "user2", "f.2", "forged", mallory.sign(b"x"), bytes(32)),
            Mailbox("f.3", "f.4", []),
            Refused("f.5", "you are banned"),
        ]
        forged = [encode(fake) for fake in fakes]  # in the clear
        forged += [Session(sid, b"k" * 32).seal(TO_CLIENT, fake) for fake in fakes]  # no key
        sig = mallory.sign(REKEY_DOMAIN, sid, b"b" * 8)
        forged.append(encode(Rekey("f.6", sid, b"b" * 8, sig)))  # signed by another key
        forged += [a for data in session for a in altered(data, rng, 4)]
        forged += session  # replayed as they were
        before = user1.lines()
        for data in forged:
            send_from_elsewhere(data, (LOCALHOST, p1))
            if can_forge():
                send_forged(data, (LOCALHOST, server_port), (LOCALHOST, p1))
        time.sleep(0.5)
        assert _new_lines(user1, before) == []
        user2.type("send_all still the real server")
        user1.expect("Channel_Message user2 : still the real server")
        user1.type("table")
        user1.wait_for(
            lambda lines: any("user2" in row and ":6666" not in row for row in lines[-3:]),
            5,
            "the real table",
        )
    finally:
        for proc in procs:
            proc.stop()
    # never asked to register again: the forged rekey was not taken
    assert sum("registered user1 at" in line for line in server.lines()) == 1


def _registered(trace: Path) -> dict[str, object]:
    for line in trace.read_text(encoding="utf-8").splitlines()[1:]:
        event = json.loads(line)
        if event.get("ev") == "recv" and (event.get("msg") or {}).get("t") == "registered":
            return event["msg"]  # type: ignore[no-any-return]
    raise AssertionError("no registered answer in the trace")


def test_an_operator_releases_a_name_on_a_stopped_server(tmp_path: Path) -> None:
    env = chatapp_env(tmp_path)
    server_port, p1, p2, p3 = free_udp_ports(4)
    db = tmp_path / "server.sqlite3"
    server = serve(server_port, env, db=db)
    procs = [server]
    try:
        user1 = join("user1", server_port, p1, env)
        procs.append(user1)
        user1.expect(TU)
        user2 = join("user2", server_port, p2, env)
        procs.append(user2)
        user1.expect(TU, count=2)
        user1.type("dereg user1")
        user1.expect(screen.YOU_ARE_OFFLINE)
        user2.type("send user1 kept for the old user1")
        user2.expect(screen.SAVED_BY_SERVER)
        user1.stop()
        user2.stop()
        busy = _release("user1", db, env)  # the running server holds the database
        assert busy.returncode == 1 and "is another chatapp server using it?" in busy.stderr
        server.stop()
        done = _release("user1", db, env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("released user1 (it was bound to key ")
        assert "1 stored messages for it deleted" in done.stdout
        again = _release("user1", db, env)
        assert again.returncode == 1
        assert again.stdout == "user1 is not bound on this server: nothing to release.\n"
        server = serve(server_port, env, db=db)
        procs.append(server)
        newcomer = _impostor(server_port, p3, env, tmp_path / "new-owner")
        procs.append(newcomer)
        newcomer.expect(TU)  # the name is free: bound to the newcomer's key now
        time.sleep(0.5)
        assert screen.YOU_HAVE_MESSAGE not in newcomer.lines()  # nothing of the old holder's
    finally:
        for proc in procs:
            proc.stop()


def _release(name: str, db: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chatapp", "release", name, "--db", str(db)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
