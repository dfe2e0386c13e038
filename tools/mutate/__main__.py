"""``python -m chatapp_tools.mutate``: how many deliberate protocol changes the replay
oracle catches.

Each mutant of the catalogue (``catalogue.py``) is applied alone to a temporary
copy of the repository, and every shipped trace is replayed against it as
``chat-replay TRACE`` would be: a mutant is killed when one replay fails. The
unmutated copy must pass first. Exit status: 0 if every mutant was killed, 1 if
any survived or is stale, 2 if the run could not be made.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TextIO

from .catalogue import CATALOGUE
from .engine import STALE, Outcome, Workspace, baseline, run_mutant, shipped_traces
from .mutant import KINDS, Mutant

#: The tests ``--confirm`` runs against a survivor (fast, in virtual time).
DEFAULT_TESTS = (
    "tests/test_protocol_client.py",
    "tests/test_protocol_server.py",
    "tests/test_protocol_stream.py",
    "tests/test_protocol_trust.py",
    "tests/test_tables.py",
    "tests/test_virtual.py",
    "tests/test_replay.py",
    "tests/test_cli.py",
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chatapp_tools.mutate",
        description="Apply each mutant of the catalogue to a copy of the repository, one at a"
        " time, replay every shipped trace against it, and say which mutants survive.",
    )
    parser.add_argument("--only", metavar="ID/KIND", action="append", default=[],
                        help="Only these mutants, by id or kind (repeatable; comma-separated)."
                        f" Kinds: {', '.join(KINDS)}.")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="List the catalogue and stop.")
    parser.add_argument("--jobs", type=int, default=2, help="Mutants at once (default: 2).")
    parser.add_argument("--timeout", type=float, default=300.0, metavar="S",
                        help="Seconds for a mutant's replays, all (default: 300).")  # fmt: skip
    parser.add_argument("--isolated", action="store_true",
                        help="A process per trace, exactly as `chat-replay TRACE` runs (slower);"
                        " by default one process replays a mutant's traces in turn.")  # fmt: skip
    parser.add_argument("--json", metavar="FILE", help="Also write the outcomes to FILE.")
    parser.add_argument("--confirm", action="store_true",
                        help="Run tests against each survivor: an oracle gap, or maybe an"
                        " equivalent mutant.")  # fmt: skip
    parser.add_argument("--tests", nargs="+", metavar="FILE", default=list(DEFAULT_TESTS),
                        help="The test files --confirm runs (default: the protocol and"
                        " replay tests).")  # fmt: skip
    parser.add_argument("--root", default=".", help="The repository (default: here).")
    return parser


def select(words: Iterable[str]) -> list[Mutant]:
    """The mutants ``--only`` names (all without it); ValueError for a name that is none."""
    wanted = [w.strip() for word in words for w in word.split(",") if w.strip()]
    if not wanted:
        return list(CATALOGUE)
    ids = {m.id for m in CATALOGUE}
    unknown = [w for w in wanted if w not in ids and w not in KINDS]
    if unknown:
        raise ValueError(f"--only: no mutant or kind named {', '.join(unknown)}")
    return [m for m in CATALOGUE if m.id in wanted or m.kind in wanted]


def _list(mutants: list[Mutant]) -> None:
    width = max(len(m.id) for m in mutants)
    for m in mutants:
        print(f"{m.id:<{width}}  {m.kind:<9} {m.file}: {m.what}")
    print(f"{len(mutants)} mutants")


def _row(outcome: Outcome, width: int) -> str:
    m = outcome.mutant
    where = outcome.detail if outcome.status == STALE else outcome.killer
    line = f"{m.id:<{width}}  {m.kind:<9} {outcome.status:<9} {where or '-'}"
    if outcome.tests:
        line += f"  [tests: {outcome.tests}]"
    return line


def _summary(outcomes: list[Outcome], traces: int, seconds: float) -> str:
    killed = sum(o.killed for o in outcomes)
    stale = sum(o.status == STALE for o in outcomes)
    text = f"{killed}/{len(outcomes)} killed by replaying {traces} traces"
    if stale:
        text += f" ({stale} stale: fix their snippets in tools/mutate/catalogue.py)"
    return text + f" in {seconds:.0f} s"


def _write_json(path: str, outcomes: list[Outcome], traces: list[str]) -> None:
    rows = [
        {"id": o.mutant.id, "kind": o.mutant.kind, "file": o.mutant.file, "what": o.mutant.what,
         "status": o.status, "killed": o.killed, "killer": o.killer, "detail": o.detail,
         "tests": o.tests, "seconds": round(o.seconds, 2)}
        for o in outcomes
    ]  # fmt: skip
    killed = sum(o.killed for o in outcomes)
    document = {"traces": traces, "killed": killed, "total": len(outcomes), "mutants": rows}
    Path(path).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def run(
    root: Path,
    mutants: list[Mutant],
    *,
    jobs: int,
    timeout: float,
    tests: list[str] | None,
    out: TextIO | None = sys.stdout,
    traces: list[str] | None = None,
    isolated: bool = False,
) -> tuple[list[Outcome], list[str]] | str:
    """Every mutant's outcome (in catalogue order) and the traces replayed (``traces``:
    these only), or why the run could not be made. Progress goes to ``out`` (None:
    nowhere)."""
    workspace = Workspace.of(root)
    workspace.isolated = isolated
    workspace.traces = [t for t in shipped_traces(workspace.files) if not traces or t in traces]
    if not workspace.traces:
        return f"no traces under {root / 'traces'}: nothing to replay"
    passing, problems = baseline(workspace, timeout)
    for line in problems if out else ():
        print(line, file=sys.stderr)
    if any(line.startswith("FAILS") for line in problems) or not passing:
        return "the unmutated copy does not pass its own traces: no mutant can be judged"
    workspace.traces = passing
    if out:
        print(f"unmutated: {len(passing)} traces pass; {len(mutants)} mutants, {jobs} at once",
              file=out)  # fmt: skip
    width = max(len(m.id) for m in mutants)
    done: dict[str, Outcome] = {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(run_mutant, workspace, m, timeout, tests) for m in mutants]
        for future in as_completed(futures):
            outcome = future.result()
            done[outcome.mutant.id] = outcome
            if out:
                print(_row(outcome, width), file=out, flush=True)
    return [done[m.id] for m in mutants], passing


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        mutants = select(args.only)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.list:
        _list(mutants)
        return 0
    started = time.monotonic()
    tests = args.tests if args.confirm else None
    result = run(Path(args.root).resolve(), mutants, jobs=args.jobs, timeout=args.timeout,
                 tests=tests, isolated=args.isolated)  # fmt: skip
    if isinstance(result, str):
        print(result, file=sys.stderr)
        return 2
    outcomes, traces = result
    width = max(len(m.id) for m in mutants)
    print(f"\n{'mutant':<{width}}  {'kind':<9} {'outcome':<9} first trace that failed")
    for outcome in outcomes:
        print(_row(outcome, width))
    survivors = [o for o in outcomes if not o.killed]
    if survivors:
        print("\nsurvivors (no shipped trace tells them from the real protocol):")
        for o in survivors:
            print(f"  {o.mutant.id}: {o.mutant.what}" + (f" ({o.tests})" if o.tests else ""))
    print("\n" + _summary(outcomes, len(traces), time.monotonic() - started))
    if args.json:
        _write_json(args.json, outcomes, traces)
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
