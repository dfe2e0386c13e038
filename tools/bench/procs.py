"""The processes a benchmark runs: real chatapp servers and clients, and the bench's workers.

Every process gets a time limit and is ended by its own pid when the
benchmark is done with it, so nothing outlives a run.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from chatapp.wire import Hello, encode

from .loadgen import HOST

#: No benchmark process may live longer than this, whatever happens to the parent.
MAX_PROCESS_SECONDS = 240.0


class BenchError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


#: The bench's own state directory (keys, pinned server keys): never the user's.
STATE_DIR = tempfile.mkdtemp(prefix="chatapp-bench-state-")
atexit.register(shutil.rmtree, STATE_DIR, ignore_errors=True)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["XDG_STATE_HOME"] = STATE_DIR
    env.pop("CHATAPP_TRACE", None)  # a trace is on only where a benchmark asks for one
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stop(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """SIGTERM (a chatapp node stops cleanly on it), then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_server(port: int, timeout: float = 15.0) -> None:
    """Until the server answers: a hello gets a challenge back (and changes nothing)."""
    probe = encode(Hello("bench-probe", "probe", 1024, bytes(32)))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        s.settimeout(0.05)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.sendto(probe, (HOST, port))
            try:
                s.recvfrom(65536)
                return
            except (TimeoutError, ConnectionRefusedError):
                continue
    raise BenchError(f"the chatapp server on port {port} did not answer within {timeout:g} s")


def _serve_argv(port: int, options: dict[str, Any]) -> list[str]:
    argv = [sys.executable, "-m", "chatapp", "serve", str(port), "--host", HOST]
    argv += ["--db", options.get("db", ":memory:")]
    argv += ["--mailbox-limit", str(options.get("mailbox_limit", 1000))]
    if options.get("unlimited", True):
        argv += ["--rate-limit", "0", "--join-limit", "0"]
    if options.get("trace"):
        argv += ["--trace", options["trace"]]
    return argv


@contextlib.contextmanager
def chatapp_servers(*settings: dict[str, Any]) -> Iterator[list[tuple[int, int]]]:
    """Real ``chatapp serve`` processes on 127.0.0.1, started together; yields (port, pid)s.

    Each settings dict may give ``db`` (default ``:memory:``), ``trace``,
    ``mailbox_limit`` and ``unlimited`` (no per-sender rate limits, the default: the
    capacity loads send thousands of requests a second from each address, and the
    fan-out and memory benchmarks register thousands of clients from one IP, to measure
    the server's work rather than its admission policy). A server logs as it does for a user,
    to stderr: a file here, never a pipe nobody reads while it runs (a full pipe would
    stop the server).
    """
    procs: list[tuple[subprocess.Popen[bytes], int]] = []
    logs: list[Any] = []
    try:
        for options in settings:
            port = free_port()
            argv = _serve_argv(port, options)
            log = tempfile.TemporaryFile()  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(
                (
                    subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=log,
                        env=_env(),
                    ),
                    port,
                )
            )
        for (proc, port), log in zip(procs, logs, strict=True):
            try:
                wait_for_server(port)
            except BenchError:
                stop(proc)
                log.seek(0)
                err = log.read().decode(errors="replace")
                raise BenchError(f"chatapp serve did not start: {err.strip()[-500:]}") from None
        yield [(port, proc.pid) for proc, port in procs]
    finally:
        for proc, _ in procs:
            stop(proc)
        for log in logs:
            log.close()


@contextlib.contextmanager
def chatapp_server(**options: Any) -> Iterator[int]:
    """One real ``chatapp serve`` process (see ``chatapp_servers``); yields its port."""
    with chatapp_servers(options) as [(port, _)]:
        yield port


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds a process (all its threads) has used so far; None where /proc is missing.

    schedstat counts nanoseconds; stat only clock ticks (10 ms), too coarse for a
    burst of a few thousand requests."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def chatapp_client(
    name: str, server_port: int, port: int
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real ``chatapp join`` process; its screen goes to a file (yielded with the process).
    Its key and pins are in a state directory of its own (a later server on the same
    port has another key)."""
    with (
        tempfile.NamedTemporaryFile("w+b", prefix="bench-screen-", delete=False) as out,
        tempfile.TemporaryDirectory(dir=STATE_DIR) as state_dir,
    ):
        path = out.name
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "chatapp", "join", name, HOST),
                *(str(server_port), str(port), "--state-dir", state_dir),
            ],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
        try:
            yield proc, path
        finally:
            if proc.stdin:
                with contextlib.suppress(OSError):
                    proc.stdin.close()  # end of input: the client leaves on its own
            try:
                proc.wait(3)
            except subprocess.TimeoutExpired:
                stop(proc)
            os.unlink(path)


def wait_for_file_text(path: str, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, "rb") as f:
            if text.encode() in f.read():
                return
        time.sleep(0.02)
    raise BenchError(f"{text!r} did not appear within {timeout:g} s")


class Worker:
    """A ``chatapp_tools.bench.worker`` process: one JSON line of settings in, one JSON line
    back when ready, then further command lines answered with one JSON line each."""

    def __init__(self, mode: str, **settings: Any) -> None:
        settings.setdefault("max_seconds", MAX_PROCESS_SECONDS)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chatapp_tools.bench.worker", mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_env(),
        )
        self.ready = self.command(json.dumps(settings))

    def command(self, line: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise BenchError(f"the bench worker exited with status {self.proc.wait()}")
        return json.loads(answer)

    def close(self) -> None:
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            stop(self.proc)
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
