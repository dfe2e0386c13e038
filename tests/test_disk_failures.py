"""Real processes, real disks that fill and database files that vanish: no client is ever
told ``saved`` (or ``received``) for a message that is not in the database after a restart.

A full disk comes two ways: a size-limited tmpfs in a private mount namespace
(``unshare``; skipped where user namespaces are not allowed) and the server's own file
size limit (RLIMIT_FSIZE, which every Linux allows). The database is then read again by
a new server, started on the files as the killed one left them.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _harness import (
    Proc,
    chatapp_env,
    free_udp_ports,
    join,
    serve,
    serve_args,
    shown_messages,
    wait_until_serving,
)

from chatapp import screen

pytestmark = pytest.mark.e2e

#: Texts long enough to fill a small disk in a few dozen messages.
FILL = "x" * 5700


@dataclass
class Disk:
    """Where the server's database lives, and how the server is started to use it."""

    directory: Path
    prefix: list[str] = field(default_factory=list)  # a command that runs chatapp there
    preexec_fn: Callable[[], None] | None = None
    #: Copies the database files (as the killed server left them) to a directory.
    copy_out: Callable[[Path], None] | None = None


def _unshare_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return False
    done = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10)
    return done.returncode == 0


@contextlib.contextmanager
def tmpfs_disk(tmp_path: Path, size_kib: int) -> Iterator[Disk]:
    """A tmpfs of ``size_kib`` in a mount namespace of its own, held by a sleeping
    process; chatapp runs in it through ``nsenter``."""
    directory = tmp_path / "small-disk"
    directory.mkdir()
    script = 'mount -t tmpfs -o size="$1"k tmpfs "$0" && echo mounted && exec sleep 600'
    holder = subprocess.Popen(
        [
            "unshare",
            "-rm",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            directory,
            str(size_kib),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"mounted", "could not mount the tmpfs"
        prefix = ["nsenter", "-t", str(holder.pid), "-U", "-m", "--preserve-credentials"]

        def copy_out(to: Path) -> None:
            files = f"{directory}/db.sqlite3 {directory}/db.sqlite3-wal"
            subprocess.run([*prefix, "sh", "-c", f"cp {files} {to}/ 2>/dev/null; true"], check=True)

        yield Disk(directory, prefix=prefix, copy_out=copy_out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()


@contextlib.contextmanager
def limited_files(tmp_path: Path, limit: int) -> Iterator[Disk]:
    """No file the server writes may grow past ``limit`` bytes (RLIMIT_FSIZE; Python
    ignores SIGXFSZ, so a write past it fails with EFBIG, as on a full disk)."""

    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    def copy_out(to: Path) -> None:
        for name in ("db.sqlite3", "db.sqlite3-wal"):
            with contextlib.suppress(FileNotFoundError):
                shutil.copyfile(tmp_path / name, to / name)

    yield Disk(tmp_path, preexec_fn=set_limit, copy_out=copy_out)


@pytest.fixture(params=["tmpfs", "rlimit"])
def small_disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Disk]:
    if request.param == "tmpfs":
        if not _unshare_works():
            pytest.skip("unshare -rm is not allowed here (no user namespaces)")
        with tmpfs_disk(tmp_path, size_kib=320) as disk:
            yield disk
    else:
        with limited_files(tmp_path, limit=200 * 1024) as disk:
            yield disk


ANSWERS = (screen.CHANNEL_ACKED, screen.SAVED_BY_SERVER, screen.CANNOT_STORE)


def _answers(proc: Proc) -> list[str]:
    """The answers a client was given, in order: one per message it sent."""
    return [line for line in proc.lines() if line in ANSWERS]


def _send(proc: Proc, command: str, sent: list[str]) -> str:
    """Type ``command`` (a send or send_all of the text last in ``sent``); its answer."""
    proc.type(command)
    proc.wait_for(lambda lines: len(_answers(proc)) >= len(sent), 10, f"answer {len(sent)}")
    return _answers(proc)[len(sent) - 1]


def test_a_full_disk_never_loses_a_message_the_sender_was_told_was_stored(
    small_disk: Disk, tmp_path: Path
) -> None:
    env = chatapp_env(tmp_path)
    server_port, x_port, y_port = free_udp_ports(3)
    db = small_disk.directory / "db.sqlite3"
    server = Proc(
        serve_args(server_port, db=db),
        env,
        prefix=small_disk.prefix,
        preexec_fn=small_disk.preexec_fn,
    )
    procs = [server]
    sent: list[str] = []
    try:
        wait_until_serving(server_port)
        x = join("user1", server_port, x_port, env)
        procs.append(x)
        x.expect(screen.TABLE_UPDATED)
        y = join("user2", server_port, y_port, env)
        procs.append(y)
        x.expect(screen.TABLE_UPDATED, count=2)
        x.type("dereg user1")
        x.expect(screen.YOU_ARE_OFFLINE)

        # Channel messages, each stored for user1, until the disk is full...
        for n in range(120):
            sent.append(f"fill {n} {FILL}")
            _send(y, f"send_all {sent[-1]}", sent)
            if _answers(y)[-3:] == [screen.CANNOT_STORE] * 3:
                break
        # ...and a direct message, handed to the server after no ACK.
        sent.append("direct while full")
        _send(y, f"send user1 {sent[-1]}", sent)
        server.wait_for(lambda lines: any("database write failed" in x for x in lines), 5, "")
        server.kill()  # SIGKILL: only what is on disk counts

        answers = dict(zip(sent, _answers(y), strict=True))
        stored = [text for text, answer in answers.items() if answer != screen.CANNOT_STORE]
        assert stored and answers["direct while full"] == screen.CANNOT_STORE, y.output[-2000:]

        # A new server on the files as the killed one left them.
        after = tmp_path / "after"
        after.mkdir()
        assert small_disk.copy_out is not None
        small_disk.copy_out(after)
        server = serve(server_port, env, db=after / "db.sqlite3")
        procs.append(server)
        x.type("reg user1")
        x.expect(screen.YOU_HAVE_MESSAGE, timeout=20)
        wanted = {("user2", text) for text in stored}
        x.wait_for(lambda lines: wanted <= set(shown_messages(lines)), 20, "every stored message")
    finally:
        for proc in procs:
            proc.stop()
    shown = [text for sender, text in shown_messages(x.lines()) if sender == "user2"]
    assert sorted(shown) == sorted(stored)  # all of them, once, and nothing refused
    for proc in procs:
        assert "Traceback" not in proc.output and "internal error" not in proc.output


@dataclass
class Running:
    server: Proc
    x: Proc
    y: Proc
    procs: list[Proc]


@contextlib.contextmanager
def _two_clients(tmp_path: Path, db: Path) -> Iterator[Running]:
    """A server on ``db``, user1 (deregistered: what is sent to it is stored) and user2."""
    env = chatapp_env(tmp_path)
    server_port, x_port, y_port = free_udp_ports(3)
    server = serve(server_port, env, db=db)
    procs = [server]
    try:
        x = join("user1", server_port, x_port, env)
        procs.append(x)
        x.expect(screen.TABLE_UPDATED)
        y = join("user2", server_port, y_port, env)
        procs.append(y)
        x.expect(screen.TABLE_UPDATED, count=2)
        x.type("dereg user1")
        x.expect(screen.YOU_ARE_OFFLINE)
        yield Running(server, x, y, procs)
    finally:
        for proc in procs:
            proc.stop()
        for proc in procs:
            assert "Traceback" not in proc.output and "internal error" not in proc.output


def test_a_database_deleted_under_the_server_stops_every_acknowledgement(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    with _two_clients(tmp_path, db) as run:
        sent = ["before"]
        assert _send(run.y, "send user1 before", sent) == screen.SAVED_BY_SERVER
        for name in ("db.sqlite3", "db.sqlite3-wal"):
            (tmp_path / name).unlink(missing_ok=True)
        for text, command in [("after", "send user1 after"), ("all", "send_all after all")]:
            sent.append(text)
            assert _send(run.y, command, sent) == screen.CANNOT_STORE
        run.server.wait_for(
            lambda lines: any("db.sqlite3 was deleted while the server ran" in x for x in lines),
            5,
            "the line about the deleted file",
        )
        # It still serves what needs no database: a direct message between the clients.
        run.x.type("reg user1")  # refused too (nothing can be stored): user1 stays offline
        run.x.expect(screen.CANNOT_STORE)
        run.y.type("send user2 to myself")
        run.y.expect("user2 : to myself")
        run.server.kill()
        # Restarted: a new, empty database. What the deleted file held went with it; what
        # was refused is nowhere either.
        restarted = serve(int(run.server.args[1]), chatapp_env(tmp_path), db=db)
        run.procs.append(restarted)
        restarted.wait_for(
            lambda lines: any("(0 known clients, 0 stored messages;" in x for x in lines),
            5,
            "an empty database",
        )


def test_a_database_replaced_under_the_server_is_not_written_behind_the_new_file(
    tmp_path: Path,
) -> None:
    db = tmp_path / "db.sqlite3"
    with _two_clients(tmp_path, db) as run:
        sent = ["before"]
        assert _send(run.y, "send user1 before", sent) == screen.SAVED_BY_SERVER
        # A restore from a backup: another file moved to the database's name.
        backup = tmp_path / "backup.sqlite3"
        shutil.copyfile(db, backup)
        os.replace(backup, db)
        sent.append("after")
        assert _send(run.y, "send user1 after", sent) == screen.CANNOT_STORE
        run.server.wait_for(
            lambda lines: any(
                "was replaced by another file while the server ran" in x for x in lines
            ),
            5,
            "the line about the replaced file",
        )
        run.server.kill()
        restarted = serve(int(run.server.args[1]), chatapp_env(tmp_path), db=db)
        run.procs.append(restarted)
        shown = len(run.x.lines())
        run.x.type("reg user1")  # back online, or refused if the copy predates user1
        run.x.wait_for(lambda lines: len(lines) > shown, 10, "an answer to reg")
        time.sleep(1)  # whatever the restarted server holds for user1 is delivered
    assert ("user2", "after") not in shown_messages(run.x.lines())
