"""A mutant: one small, deliberate change of the protocol's source, and how to apply it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: The kinds of change, for ``--only KIND`` and the report.
KINDS = (
    "retries",  # the number of tries of a wait
    "timers",  # a timeout, a deadline
    "dedup",  # a duplicate shown or redone
    "ordering",  # the order of stored messages, of effects
    "storage",  # what is stored, committed or deleted, and when
    "refusals",  # what is refused, and the reason given
    "tables",  # the client table, its versions and deltas
    "checks",  # identity and crypto checks, who may answer
    "delivery",  # the delivery stream, relays, batches
    "screen",  # a line a client shows
    "cli",  # a default of the command line
    "lookups",  # a name looked up at the server
    "presence",  # online, offline, silent, deregistered
    "restarts",  # rekeys, registrations again
)


@dataclass(frozen=True, slots=True)
class Mutant:
    """``old`` (which must occur exactly once in ``file``) becomes ``new``."""

    id: str
    kind: str
    file: str  # relative to the repository's root
    old: str
    new: str
    what: str  # one line: the change, as a reviewer would describe it

    def occurrences(self, root: Path) -> int:
        """How often ``old`` occurs in the file under ``root`` (-1: no such file)."""
        path = root / self.file
        if not path.is_file():
            return -1
        return path.read_text(encoding="utf-8").count(self.old)

    def apply(self, root: Path) -> None:
        """Change the file under ``root``; ``StaleMutant`` unless ``old`` occurs once."""
        found = self.occurrences(root)
        if found != 1:
            where = "no such file" if found < 0 else f"found {found} times, not once"
            raise StaleMutant(f"{self.id}: the snippet in {self.file}: {where}")
        path = root / self.file
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace(self.old, self.new), encoding="utf-8")


class StaleMutant(Exception):
    """A mutant whose snippet is not in the code exactly once (the code changed)."""


def mutant(id: str, kind: str, file: str, old: str, new: str, what: str) -> Mutant:
    """A catalogue row (checked: a known kind, a real change)."""
    if kind not in KINDS:
        raise ValueError(f"{id}: unknown kind {kind!r}")
    if old == new or not old:
        raise ValueError(f"{id}: the change changes nothing")
    return Mutant(id, kind, file, old, new, what)
