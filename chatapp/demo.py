"""``chatapp demo``: the seed's tests, played on loopback with every screen shown."""

from __future__ import annotations

import os
import sys
import time

import trio

from chatapp.net import UDP
from chatapp.protocol.common import Timers
from chatapp.testing import (
    SEED_LINES,
    Cluster,
    ScenarioError,
    load_scenario,
    play_scenario,
    scenario_path,
    unmatched_seed_lines,
)
from chatapp.trace import JsonlRecorder, NullRecorder, Recorder, complete_header

_COLUMN = 7


def _print(node: str, text: str) -> None:
    print(f"{node:<{_COLUMN}}| {text}", flush=True)


def _show(node: str, line: str) -> None:
    if line.startswith("<typed> "):
        _print(node, ">>> " + line[len("<typed> ") :])
    else:
        _print(node, ">>> " + line)


async def play_seed_test(test: int, recorder: Recorder | None = None, echo: bool = True) -> Cluster:
    """Play seed test ``test`` on real UDP sockets on 127.0.0.1; the cluster keeps every screen."""
    return await play_scenario(
        load_scenario(scenario_path(f"test{test}")),
        UDP,
        recorder=recorder,
        on_line=_show if echo else None,
        wall_offset=_wall_offset(),
    )


def _wall_offset() -> float:
    """Turns Trio's clock into Unix time, for the stored messages' timestamps."""
    return time.time() - trio.current_time()


async def run_demo(tests: list[int], trace_dir: str | None) -> int:
    failures = 0
    for test in tests:
        print(f"\n=== Seed test {test} " + "=" * 50, flush=True)
        recorder: Recorder = NullRecorder()
        if trace_dir:
            os.makedirs(trace_dir, exist_ok=True)
            path = os.path.join(trace_dir, f"test{test}.jsonl")
            recorder = JsonlRecorder.open(
                path,
                timers=Timers(),
                append=False,
                source="chatapp demo",
                scenario=f"chatapp/scenarios/test{test}.txt",
            )
        try:
            cluster = await play_seed_test(test, recorder)
        except ScenarioError as exc:
            print(f"Test {test}: FAILED: {exc}", flush=True)
            failures += 1
            continue
        finally:
            recorder.close()
            if isinstance(recorder, JsonlRecorder):
                complete_header(recorder.path)
        failures += _report(test, cluster)
    print(flush=True)
    print(
        "demo: every seed line matched" if not failures else f"demo: {failures} test(s) failed",
        flush=True,
    )
    return 0 if not failures else 1


def _report(test: int, cluster: Cluster) -> int:
    failed = 0
    summary = []
    for name, expected in SEED_LINES[test].items():
        shown = cluster.clients[name].screen.lines
        missing = unmatched_seed_lines(expected, shown)
        summary.append(f"{name} {len(expected) - len(missing)}/{len(expected)}")
        if missing:
            failed = 1
            print(
                f"Test {test}: {name} did not show, in order: {missing!r}",
                file=sys.stderr,
                flush=True,
            )
    verdict = "every seed line matched" if not failed else "MISMATCH"
    print(f"--- Test {test}: {verdict} ({', '.join(summary)})", flush=True)
    return failed
