"""Applying a mutant to a copy of the repository and running the replay oracle on it.

The copy holds the files git knows of (tracked, and new ones not ignored); the
replay runs as a grader would run ``chat-replay TRACE`` against a mutated build,
through its entry point with ``PYTHONPATH`` at the copy (its ``chatapp`` package,
and its ``tools`` folder as ``chatapp_tools``): by default the traces one after
the other in one Python process per mutant (``batch``), or (``--isolated``) in a
fresh process per trace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .mutant import Mutant, StaleMutant

KILLED = "killed"
SURVIVED = "survived"
STALE = "stale"
TIMEOUT = "timeout"  # counted as killed: the replay did not finish
#: With --confirm: what the tests say of a survivor.
CAUGHT_BY_TESTS = "survived, caught by tests (oracle gap)"
NO_TEST_FAILS = "survived, no test fails either (maybe equivalent)"


@dataclass
class Outcome:
    mutant: Mutant
    status: str
    killer: str = ""  # the first trace whose replay failed
    detail: str = ""  # the replay's last line, or why the mutant is stale
    seconds: float = 0.0
    tests: str = ""  # --confirm: the test run's verdict line

    @property
    def killed(self) -> bool:
        return self.status in (KILLED, TIMEOUT)


@dataclass
class Workspace:
    """The repository's files, and the traces the oracle replays."""

    root: Path
    files: list[str] = field(default_factory=list)
    traces: list[str] = field(default_factory=list)
    #: A process per trace (as a grader runs ``chat-replay TRACE``), not one for all.
    isolated: bool = False

    @classmethod
    def of(cls, root: Path) -> Workspace:
        files = _git_files(root)
        return cls(root, files, [])

    def copy(self, into: Path) -> Path:
        """The repository's files under ``into``, with ``chatapp_tools`` beside ``chatapp``."""
        for name in self.files:
            source = self.root / name
            if not source.is_file():
                continue  # deleted in the work tree
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        (into / "chatapp_tools").symlink_to("tools", target_is_directory=True)
        return into


def _git_files(root: Path) -> list[str]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        # Not a git checkout: the folders the replay needs.
        wanted = ("chatapp", "tools", "traces", "tests")
        return [
            str(path.relative_to(root))
            for folder in wanted
            for path in (root / folder).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts
        ]
    return sorted({name for name in listed.decode().split("\0") if name})


def shipped_traces(files: list[str]) -> list[str]:
    """Every trace under traces/ (top level and subfolders), in order."""
    return sorted(name for name in files if name.startswith("traces/") and name.endswith(".jsonl"))


def environment(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["NO_COLOR"] = "1"
    env.pop("FORCE_COLOR", None)
    return env


@dataclass(frozen=True, slots=True)
class Replayed:
    status: int  # the replay's exit status (-1: it ran out of time)
    last_line: str


def _verdict(status: int, output: str) -> Replayed:
    lines = [line for line in output.splitlines() if line.strip()]
    at = next((i for i, line in enumerate(lines) if line.startswith(("PASS", "FAIL"))), None)
    if at is None:
        return Replayed(status, lines[-1] if lines else "")
    # The verdict, and the first line of the report after it (what diverged)
    return Replayed(status, " ".join(lines[at : at + 2]))


def _run(copy: Path, command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """COMMAND in the copy (its own environment), output captured; raises
    ``subprocess.TimeoutExpired`` after ``timeout`` seconds (at least one)."""
    return subprocess.run(
        command,
        cwd=copy,
        env=environment(copy),
        capture_output=True,
        text=True,
        timeout=max(timeout, 1.0),
    )


def replay(copy: Path, trace: str, timeout: float) -> Replayed:
    """``chat-replay TRACE`` on the copy, in a process of its own."""
    command = [sys.executable, "-m", "chatapp_tools.replay", trace]
    try:
        done = _run(copy, command, timeout)
    except subprocess.TimeoutExpired:
        return Replayed(-1, f"no verdict in {timeout:.0f} s")
    return _verdict(done.returncode, done.stdout + done.stderr)


def replay_batch(
    copy: Path, traces: list[str], timeout: float, *, every: bool = False
) -> list[tuple[str, Replayed]]:
    """``chat-replay TRACE`` for each trace, one after the other in one process on the
    copy, until one fails (``every``: all of them); each trace's verdict. A trace that
    was replaying when the time ran out gets status -1."""
    command = [sys.executable, "-m", "chatapp_tools.mutate.batch", *(["--all"] if every else []),
               *traces]  # fmt: skip
    try:
        done = _run(copy, command, timeout)
        stdout, stderr, ran_out = done.stdout, done.stderr, False
    except subprocess.TimeoutExpired as exc:
        stdout, stderr, ran_out = _text(exc.stdout), _text(exc.stderr), True
    verdicts: list[tuple[str, Replayed]] = []
    for line in stdout.splitlines():
        try:
            row = json.loads(line)
            verdicts.append((row["trace"], _verdict(int(row["status"]), str(row["out"]))))
        except (ValueError, KeyError, TypeError):
            continue  # a line a mutant printed on its own
    left = [trace for trace in traces if trace not in {name for name, _ in verdicts}]
    if left and (every or not any(v.status for _, v in verdicts)):
        # The batch died (or ran out of time) in the middle of the next trace.
        why = f"no verdict in {timeout:.0f} s" if ran_out else _last_line(stderr)
        verdicts.append((left[0], Replayed(-1 if ran_out else 1, why)))
    return verdicts


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "the replay process died"


def run_mutant(
    workspace: Workspace, mutant: Mutant, timeout: float, tests: list[str] | None = None
) -> Outcome:
    """Apply ``mutant`` to a fresh copy, replay every trace until one fails."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chatapp-mutant-") as scratch:
        copy = workspace.copy(Path(scratch))
        try:
            mutant.apply(copy)
        except StaleMutant as exc:
            return Outcome(mutant, STALE, detail=str(exc))
        outcome = Outcome(mutant, SURVIVED)
        for trace, result in _verdicts(workspace, copy, timeout - (time.monotonic() - started)):
            if result.status != 0:
                status = TIMEOUT if result.status < 0 else KILLED
                outcome = Outcome(mutant, status, trace, result.last_line)
                break
        if outcome.status == SURVIVED and tests:
            outcome.tests = run_tests(copy, tests, timeout)
            outcome.status = CAUGHT_BY_TESTS if "failed" in outcome.tests else NO_TEST_FAILS
    outcome.seconds = time.monotonic() - started
    return outcome


def _verdicts(
    workspace: Workspace, copy: Path, timeout: float, *, every: bool = False
) -> list[tuple[str, Replayed]]:
    """Each trace's verdict on the copy, until one fails (``every``: all), in one process
    or (``workspace.isolated``) in a process per trace, as ``chat-replay`` is run."""
    if not workspace.isolated:
        return replay_batch(copy, workspace.traces, timeout, every=every)
    started = time.monotonic()
    verdicts: list[tuple[str, Replayed]] = []
    for trace in workspace.traces:
        verdicts.append((trace, replay(copy, trace, timeout - (time.monotonic() - started))))
        if verdicts[-1][1].status and not every:
            break
    return verdicts


def run_tests(copy: Path, tests: list[str], timeout: float) -> str:
    """pytest on ``tests`` in the copy: its summary line ("failed" in it if any failed)."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:randomly", "-p",
               "no:cacheprovider", *tests]  # fmt: skip
    try:
        done = subprocess.run(
            command,
            cwd=copy,
            env=environment(copy),
            capture_output=True,
            text=True,
            timeout=max(timeout * 4, 60.0),
        )
    except subprocess.TimeoutExpired:
        return "failed: the tests ran out of time"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else f"pytest exited {done.returncode}"
    if done.returncode not in (0, 5) and "failed" not in summary:
        summary = f"failed: pytest exited {done.returncode} ({summary})"
    return summary


def baseline(workspace: Workspace, timeout: float) -> tuple[list[str], list[str]]:
    """Replay every trace on an unmutated copy: (the traces that pass, the lines saying
    which do not; a trace the replay cannot use at all, status 2, is left out with a
    line; one that fails makes the run meaningless)."""
    passing: list[str] = []
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="chatapp-unmutated-") as scratch:
        copy = workspace.copy(Path(scratch))
        for trace, result in _verdicts(workspace, copy, timeout, every=True):
            if result.status == 0:
                passing.append(trace)
            elif result.status == 2:
                problems.append(f"left out {trace}: the replay cannot use it ({result.last_line})")
            else:
                problems.append(f"FAILS UNMUTATED: {trace}: {result.last_line}")
    return passing, problems
