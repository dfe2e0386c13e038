"""Deterministic scheduling: events at the same virtual time in the same order on every run.

Trio runs the tasks that became runnable together in a random order (it reverses the
batch half of the time, drawing from a private ``random.Random``), so that no program
comes to rely on an order Trio does not promise. In virtual time many events fall on
the same instant (a datagram's arrival and a timer's expiry, two clients' answers), and
which task runs first can change what a node does next: a replay would pass one run and
fail the next. Trio has a switch for this, used by its Hypothesis plugin: with
``_ALLOW_DETERMINISTIC_SCHEDULING`` set, each batch is sorted by the tasks' creation
order and shuffled with ``_r``, which we seed. A replay and a virtual-time recording
run under it; nothing else does (a live node keeps Trio's own scheduling).

This reaches into Trio's private ``trio._core._run`` module; this is the one place that
does, so that a Trio release that changes it needs one fix, here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from trio._core import _run as trio_run

#: The seed of the scheduler's shuffles: any fixed value makes runs repeat.
SCHEDULING_SEED = 0


@contextlib.contextmanager
def deterministic_scheduling(seed: int = SCHEDULING_SEED) -> Iterator[None]:
    """Within this block, ``trio.run`` schedules tasks in an order fixed by ``seed``."""
    allowed = trio_run._ALLOW_DETERMINISTIC_SCHEDULING
    state = trio_run._r.getstate()
    trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    trio_run._r.seed(seed)
    try:
        yield
    finally:
        trio_run._ALLOW_DETERMINISTIC_SCHEDULING = allowed  # type: ignore[misc]
        trio_run._r.setstate(state)
