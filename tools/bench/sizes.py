"""How much each benchmark does, in each mode, and the scratch directory it works in."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sizes:
    """How much each benchmark does; one set per mode."""

    rtt_rounds: int
    load_seconds: float
    load_clients: int
    window: int
    fanout: tuple[tuple[int, int], ...]
    fanout_trials: int
    memory_clients: tuple[int, ...]
    mailbox_messages: int
    rounds: int  # capacity: the loads take turns this many times; the best round counts
    bursts: int  # capacity: bursts of BURST saves per round (the saturated figures)
    online: tuple[int, ...]  # registrations: the N one registration is measured at
    samples: int  # registrations: how many at each N
    storm: int  # registrations: how many at once
    flood_junk: int  # flood: junk datagrams from one address
    flood_registrations: int  # flood: registrations from one address (hellos, answered)


TINY = Sizes(30, 0.2, 8, 2, ((10, 0), (10, 2)), 1, (2000,), 300, 1, 1, (50,), 3, 50, 20_000, 1_000)
QUICK = Sizes(
    300,
    0.5,
    32,
    4,
    ((10, 0), (100, 0), (1000, 0), (1000, 10), (1000, 100)),
    1,
    (10_000,),
    10_000,
    2,
    4,
    (1000, 5000),
    3,
    5000,
    200_000,
    5_000,
)
FULL = Sizes(
    2000,
    3.0,
    32,
    4,
    tuple((n, d) for n in (10, 100, 1000) for d in (0, 10, 100)),
    3,
    (10_000, 100_000),
    10_000,
    3,
    15,
    (1000, 5000, 10_000),
    10,
    10_000,
    1_000_000,
    20_000,
)


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="chatapp-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
