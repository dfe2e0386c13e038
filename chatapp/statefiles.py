"""A client's files: its key, the servers' keys it pinned, and the marks of the
stored messages it has shown. All of them live in one state directory:

- ``keys/NAME.key``: the 32-byte seed of NAME's Ed25519 key, made at the first
  ``chatapp join NAME`` (file 0600, directories 0700);
- ``known_servers``: one line per server address, ``IP:PORT base64-key``, as
  SSH's ``known_hosts`` (trust on first use);
- ``delivered/NAME@FP.json``: per origin, the highest stored message shown to
  NAME by the server whose key has the fingerprint FP, written atomically
  (a temporary file, fsync, rename) before the lines it covers are shown.

The default directory is ``$XDG_STATE_HOME/chatapp`` (``~/.local/state/chatapp``);
the demo, the tests and the benchmarks give a temporary one. A file that is not
what chatapp wrote (wrong permissions, size or content) is refused at start,
never silently replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from chatapp import screen
from chatapp.protocol.changes import Change, DeliveryMarked, ServerPinned, apply_changes
from chatapp.protocol.crypto import KEY_BYTES, Identity, b64, short_fingerprint, unb64
from chatapp.wire import Address, fmt_addr

PINS_FILE = "known_servers"


class StateError(Exception):
    """A state file chatapp cannot use (said in one line)."""


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/chatapp`` (``~/.local/state/chatapp`` by default)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "chatapp"


def _make_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write_durably(path: Path, data: bytes, mode: int = 0o600) -> None:
    """``data`` in ``path``, whole or not at all: a temporary file, fsync, rename, fsync of
    the directory (so that the rename itself survives a crash)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# --- the identity -------------------------------------------------------------------------


def load_identity(state_dir: Path, name: str) -> tuple[Identity, bool]:
    """NAME's key pair, made now if it has none; (the identity, whether it is new)."""
    path = state_dir / "keys" / f"{name}.key"
    try:
        info = path.stat()
    except FileNotFoundError:
        identity = Identity.generate()
        _make_dir(path.parent)
        _write_durably(path, identity.seed)
        return identity, True
    except OSError as exc:
        why = f"cannot be read ({exc.strerror})"
        raise StateError(screen.bad_key_file(str(path), why)) from None
    if not stat.S_ISREG(info.st_mode):
        raise StateError(screen.bad_key_file(str(path), "is not a regular file"))
    if info.st_mode & 0o077:
        mode = oct(stat.S_IMODE(info.st_mode))
        raise StateError(
            screen.bad_key_file(
                str(path), f"can be read by others (mode {mode}; chatapp makes it 0600)"
            )
        )
    try:
        seed = path.read_bytes()
    except OSError as exc:
        why = f"cannot be read ({exc.strerror})"
        raise StateError(screen.bad_key_file(str(path), why)) from None
    if len(seed) != KEY_BYTES:
        raise StateError(
            screen.bad_key_file(str(path), f"holds {len(seed)} bytes, not a {KEY_BYTES}-byte key")
        )
    return Identity(seed), False


# --- pinned server keys ------------------------------------------------------------------


def read_pins(state_dir: Path) -> dict[str, bytes]:
    """Every pinned key, by ``IP:PORT``."""
    path = state_dir / PINS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise StateError(f"cannot read {path}: {exc}") from None
    pins: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            address, encoded = line.split()
            key = unb64(encoded)
            if len(key) != KEY_BYTES:
                raise ValueError("not a 32-byte key")
        except ValueError:
            raise StateError(
                f"{path}:{number} is not a line chatapp wrote (IP:PORT base64-key);"
                " fix it or remove it"
            ) from None
        pins[address] = key
    return pins


def pin_line(address: Address, key: bytes) -> str:
    return f"{fmt_addr(address)} {b64(key)}\n"


# --- delivery marks ------------------------------------------------------------------------


def read_marks(state_dir: Path, name: str) -> dict[str, dict[str, int]]:
    """NAME's marks, by the short fingerprint of the server's key."""
    found: dict[str, dict[str, int]] = {}
    directory = state_dir / "delivered"
    for path in sorted(directory.glob(f"{name}@*.json")) if directory.is_dir() else []:
        try:
            marks = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(marks, dict) or not all(
                isinstance(k, str) and type(v) is int and v >= 0 for k, v in marks.items()
            ):
                raise ValueError("not origin -> number")
        except (OSError, ValueError) as exc:
            raise StateError(f"{path} is not a file chatapp wrote ({exc}); remove it") from None
        found[path.stem.partition("@")[2]] = marks
    return found


@dataclass
class ClientFiles:
    """A client's state files as a store: the node commits the client's changes here
    (a pin, the marks) before the lines and datagrams that depend on them."""

    state_dir: Path
    name: str
    durable = False  # a client gathers no commits: nothing to batch

    def load_marks(self, server_keys: list[bytes]) -> dict[bytes, dict[str, int]]:
        by_fingerprint = read_marks(self.state_dir, self.name)
        return {
            key: dict(by_fingerprint[short_fingerprint(key)])
            for key in server_keys
            if short_fingerprint(key) in by_fingerprint
        }

    async def commit(self, changes: list[Change]) -> None:
        # Synchronous: a few bytes and one fsync. In a worker thread, a virtual clock
        # would run on while the node waits for it.
        apply_changes(changes, self)

    def close(self) -> None:
        pass

    def pin_server(self, change: ServerPinned) -> None:
        _make_dir(self.state_dir)
        line = pin_line(change.address, change.key).encode("utf-8")
        fd = os.open(self.state_dir / PINS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def mark_delivered(self, change: DeliveryMarked) -> None:
        directory = self.state_dir / "delivered"
        _make_dir(directory)
        path = directory / f"{self.name}@{short_fingerprint(change.server_key)}.json"
        _write_durably(path, json.dumps(dict(change.marks), sort_keys=True).encode("utf-8"))
