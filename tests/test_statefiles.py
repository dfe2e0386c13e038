"""A client's state files: its key (made once, 0600, refused when it is not what chatapp
wrote), the pinned server keys, and the delivery marks (written whole or not at all)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from chatapp import screen
from chatapp.launch import ClientOptions, StartupError, run_node
from chatapp.protocol.changes import DeliveryMarked, ServerPinned
from chatapp.protocol.crypto import Identity, short_fingerprint
from chatapp.statefiles import (
    ClientFiles,
    StateError,
    default_state_dir,
    load_identity,
    read_marks,
    read_pins,
)
from chatapp.testing import MemoryNetwork


def test_the_first_join_makes_a_key_and_later_ones_read_it(tmp_path: Path) -> None:
    identity, new = load_identity(tmp_path, "user1")
    assert new
    path = tmp_path / "keys" / "user1.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_bytes() == identity.seed
    again, new = load_identity(tmp_path, "user1")
    assert not new and again.public == identity.public
    other, _ = load_identity(tmp_path, "user2")
    assert other.public != identity.public


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        ("mode", "can be read by others (mode 0o644; chatapp makes it 0600)"),
        ("size", "holds 31 bytes, not a 32-byte key"),
        ("directory", "is not a regular file"),
    ],
)
def test_a_key_file_that_is_not_what_chatapp_wrote_is_refused_never_replaced(
    tmp_path: Path, damage: str, why: str
) -> None:
    load_identity(tmp_path, "user1")
    path = tmp_path / "keys" / "user1.key"
    before = path.read_bytes()
    if damage == "mode":
        path.chmod(0o644)
    elif damage == "size":
        path.write_bytes(before[:31])
    else:
        path.unlink()
        path.mkdir()
    with pytest.raises(StateError) as caught:
        load_identity(tmp_path, "user1")
    assert str(caught.value) == screen.bad_key_file(str(path), why)
    assert "It was not changed" in str(caught.value)
    if damage == "mode":
        assert path.read_bytes() == before


async def test_a_client_with_a_bad_key_file_stops_at_start_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir(mode=0o700)
    (tmp_path / "keys" / "user1.key").write_bytes(b"short")
    os.chmod(tmp_path / "keys" / "user1.key", 0o600)
    options = ClientOptions("user1", "127.0.0.1", 8001, 0, state_dir=str(tmp_path))
    with pytest.raises(StartupError, match="holds 5 bytes, not a 32-byte key"):
        await run_node(options, network=MemoryNetwork())


def test_pins_and_marks_are_written_and_read_back(tmp_path: Path) -> None:
    files = ClientFiles(tmp_path, "user1")
    key = Identity(b"S" * 32).public
    files.pin_server(ServerPinned(("127.0.0.1", 8001), key))
    files.pin_server(ServerPinned(("127.0.0.1", 8002), b"k" * 32))
    assert read_pins(tmp_path) == {"127.0.0.1:8001": key, "127.0.0.1:8002": b"k" * 32}
    assert stat.S_IMODE((tmp_path / "known_servers").stat().st_mode) == 0o600
    files.mark_delivered(DeliveryMarked(key, (("o1", 7), ("o2", 3))))
    files.mark_delivered(DeliveryMarked(key, (("o1", 9), ("o2", 3))))
    assert read_marks(tmp_path, "user1") == {short_fingerprint(key): {"o1": 9, "o2": 3}}
    assert files.load_marks([key]) == {key: {"o1": 9, "o2": 3}}
    assert files.load_marks([b"x" * 32]) == {}
    # written whole: no temporary file is left behind
    assert [p.name for p in (tmp_path / "delivered").iterdir()] == [
        f"user1@{short_fingerprint(key)}.json"
    ]


@pytest.mark.parametrize(
    "line", ["127.0.0.1:8001", "127.0.0.1:8001 not-base64!", "127.0.0.1:8001 c2hvcnQ="]
)
def test_a_known_servers_line_chatapp_did_not_write_is_refused(tmp_path: Path, line: str) -> None:
    (tmp_path / "known_servers").write_text(f"# a comment\n\n{line}\n")
    with pytest.raises(StateError, match=r"known_servers:3 is not a line chatapp wrote"):
        read_pins(tmp_path)


def test_marks_chatapp_did_not_write_are_refused(tmp_path: Path) -> None:
    (tmp_path / "delivered").mkdir()
    (tmp_path / "delivered" / "user1@ABCD.json").write_text('{"o1": "seven"}')
    with pytest.raises(StateError, match="is not a file chatapp wrote"):
        read_marks(tmp_path, "user1")


def test_the_default_state_directory_follows_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "/somewhere/state")
    assert default_state_dir() == Path("/somewhere/state/chatapp")
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_state_dir() == Path.home() / ".local" / "state" / "chatapp"


async def test_a_client_started_without_a_state_dir_never_touches_a_test_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    network = MemoryNetwork()
    options = ClientOptions("user1", "127.0.0.1", 8001, 9001, host="127.0.0.1")
    with trio.move_on_after(0.1):
        await run_node(options, network=network)
    assert (tmp_path / "chatapp" / "keys" / "user1.key").exists()
