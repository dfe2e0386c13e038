"""The verdict of a replay with injected faults (``--loss``, ``--dup``).

Under loss and duplication the datagrams differ by design. What must not
happen: a message shown more often than recorded, or one missing although its
sender was told it had been received; and every invariant of ``check`` must
hold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from chatapp import screen
from chatapp.trace import Recv, Send, Shown, Trace

from .check import check
from .describe import is_content
from .normalise import Normaliser

#: The prefix of a stored message's line, once normalised (``Normaliser.text``).
_STORED_PREFIX = re.compile(r"^\(\{time\}\) ")


def content_lines(lines: Iterable[str]) -> list[str]:
    """The chat and channel lines among shown lines, stored ones in their live form."""
    found = []
    for line in lines:
        plain = _STORED_PREFIX.sub("", line)
        if is_content(plain):
            found.append(plain)
    return found


def compare_messages(recorded: Trace, replayed: Trace) -> tuple[list[str], list[str]]:
    """Under loss and duplication the datagrams differ by design. What must not happen:
    a message shown more often than recorded, or one missing although its sender was
    told it had been received. A message that is missing because it was stored, or
    because its sender was told it failed, is a note, not a failure.

    Returns (problems, notes)."""
    recorded_names = Normaliser.of(recorded.events)
    replayed_names = Normaliser.of(replayed.events)
    confirmed = _confirmed_messages(replayed, replayed_names)
    problems: list[str] = []
    notes: list[str] = []
    for node in sorted(recorded.nodes()):
        before = content_lines(
            recorded_names.text(e.line)
            for e in recorded.events
            if isinstance(e, Shown) and e.node == node
        )
        after = content_lines(
            replayed_names.text(e.line)
            for e in replayed.events
            if isinstance(e, Shown) and e.node == node
        )
        for line in sorted(set(before) | set(after)):
            want, got = before.count(line), after.count(line)
            if got > want:
                problems.append(f"{node} showed {line!r} {got}x (recorded {want}x)")
            elif got < want:
                if (node, line) in confirmed:
                    problems.append(
                        f"{node} did not show {line!r}, yet its sender was told it was received"
                    )
                else:
                    notes.append(
                        f"{node} did not show {line!r}: with these faults it was stored, or never"
                        " confirmed to its sender"
                    )
    return problems, notes


def _confirmed_messages(trace: Trace, names: Normaliser) -> set[tuple[str, str]]:
    """(receiver, line as it shows it, normalised by ``names``) of every message whose
    sender had an ACK from the receiver itself (direct), the server's word that it
    delivered it, or (channel) whose receiver ACKed it to the server."""
    sent: dict[str, tuple[str, str, str]] = {}  # id -> (kind, sender, text)
    to: dict[str, str] = {}
    confirmed: set[tuple[str, str]] = set()
    for event in trace.events:
        if not isinstance(event, Send | Recv) or not event.msg:
            continue
        msg = event.msg
        kind = msg.get("t")
        if isinstance(event, Send) and kind in ("chat", "save", "channel"):
            sender = str(msg.get("sender"))
            sent.setdefault(str(msg["id"]), (kind, sender, str(msg.get("text"))))
            if kind in ("chat", "channel"):
                to[f"{msg['id']}>{names.address(event.peer)}"] = names.address(event.peer)
        if isinstance(event, Recv) and kind in ("ack", "saved") and str(msg.get("id")) in sent:
            if kind == "saved" and msg.get("outcome") != "delivered":
                continue
            what, sender, text = sent[str(msg["id"])]
            if kind == "saved":
                receiver = next(
                    (
                        r
                        for key, r in to.items()
                        if key.startswith(f"{msg['id']}>") and r != event.node
                    ),
                    "",
                )
            else:
                receiver = names.address(event.peer)
            line = (
                screen.channel_message(sender, text)
                if what == "channel"
                else screen.chat(sender, text)
            )
            if receiver:
                confirmed.add((receiver, names.text(line)))
    return confirmed


@dataclass
class FaultVerdict:
    problems: list[str]  # each one fails the replay
    notes: list[str]
    counts: dict[str, int]  # what ``check`` counted in the replay

    @property
    def passed(self) -> bool:
        return not self.problems


def judge_faults(recorded: Trace, replayed: Trace) -> FaultVerdict:
    """No message shown twice, none missing that its sender was told was received, and
    every invariant of ``check`` holding in the replay."""
    problems, notes = compare_messages(recorded, replayed)
    result = check(replayed)
    for invariant in result.invariants:
        problems += [f"{invariant.name}: {violation}" for violation in invariant.violations]
    return FaultVerdict(problems, notes, result.counts)
