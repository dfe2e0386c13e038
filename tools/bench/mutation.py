"""The mutation score of the replay oracle (full run only: it takes minutes).

Every mutant of ``chatapp_tools.mutate``'s catalogue is applied alone to a copy of
the repository and every shipped trace replayed against it; the figure is how
many mutants some replay catches, beside how many there are (the goal: all). The
quick run only checks that it works, on two mutants; the tiny run on one, replaying
one trace.
"""

from __future__ import annotations

from pathlib import Path

from .report import Figure, unavailable
from .sizes import FULL, TINY, Sizes

KEY = "mutants_killed"
LABEL = "protocol mutants the shipped traces catch"
BASELINE = "mutants in the catalogue"
#: The mutants of a quick or tiny run (both caught by the seed's traces).
SAMPLE = ("screen-table-updated", "screen-exiting")


def bench_mutation(sizes: Sizes) -> list[Figure]:
    from ..mutate.__main__ import run
    from ..mutate.catalogue import CATALOGUE

    root = Path.cwd()
    if not (root / "traces").is_dir() or not (root / "chatapp").is_dir():
        why = "no traces/ here (run from the repository)"
        return [unavailable(KEY, LABEL, "mutants", BASELINE, why)]
    sample = SAMPLE[:1] if sizes is TINY else SAMPLE
    mutants = [m for m in CATALOGUE if sizes is FULL or m.id in sample]
    traces = ["traces/test1.jsonl"] if sizes is TINY else None
    result = run(root, mutants, jobs=2, timeout=300.0, tests=None, out=None, traces=traces)
    if isinstance(result, str):
        return [unavailable(KEY, LABEL, "mutants", BASELINE, result)]
    outcomes, replayed = result
    killed = sum(outcome.killed for outcome in outcomes)
    survivors = [outcome.mutant.id for outcome in outcomes if not outcome.killed]
    return [
        Figure(
            KEY, LABEL, float(killed), "mutants", float(len(outcomes)), BASELINE, "higher",
            goal="all", goal_on="ratio", goal_limit=1.0,
            note=(f"{len(replayed)} traces; survivors: {', '.join(survivors) or 'none'}"
                  if sizes is FULL else
                  f"{len(mutants)} of the catalogue only (all of it: the full run)"),
            extra={"survivors": survivors, "traces": replayed},
        )
    ]  # fmt: skip
