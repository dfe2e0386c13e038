"""Every wait for an answer, as one row of a table per role.

Everything that decides the life of a pending request lives here (as h11's
``_state.py`` keeps its transitions in one place): which message is waited
on, which answers end the wait, how many tries it gets and how long each
lasts, and which handler of the state machine runs on an answer, on a
refusal and on giving up. The state machines look the row up; they never
branch on the kind of a wait. The README's table of waits is made from these
rows (``wait_table_markdown``; a test keeps the two the same), and the replay
tool's checks take the tries, the timeouts and the answers from here.

To add a wait: add a row to ``ClientWait`` or ``ServerWait`` and write the
handlers it names on the state machine (a test checks that they exist). A client
that is leaving (``exit``, the end of its input) waits for the rows that say
``holds_exit``: the requests a person typed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from chatapp import screen
from chatapp.protocol.common import Timers
from chatapp.wire import (
    Ack,
    Challenge,
    ChannelDelivery,
    ChannelPost,
    Chat,
    Deregister,
    Hello,
    Lookup,
    LookupResult,
    Mailbox,
    Message,
    NotStored,
    Refused,
    Register,
    Registered,
    Rekey,
    Relay,
    Reregister,
    Saved,
    SaveMessage,
    Table,
    TableAck,
    TableDelta,
    tag_of,
)

#: The tries and the timeout that the node is configured with (``--tries``, ``--ack-timeout``).
TRIES: Literal["--tries"] = "--tries"
ACK_TIMEOUT: Literal["--ack-timeout"] = "--ack-timeout"


@dataclass(frozen=True, slots=True)
class WaitRule:
    """One kind of pending request: a row of the table."""

    request: type[Message]  # the message sent, and sent again on each try
    answers: tuple[type[Message], ...]  # the answers that end the wait (besides a refusal)
    tries: int | Literal["--tries"]
    timeout: float | Literal["--ack-timeout"]  # seconds per try
    on_answer: str  # the state machine's handler for one of ``answers``
    on_refusal: str | None  # ... for a ``refused`` (None: a refusal does not answer it)
    on_give_up: str  # ... for the last try's timeout
    what: str  # the README's name for the wait
    gives_up: str  # the README's "when it runs out"
    #: (A client's wait) whether a client that is leaving (``exit``, the end of its
    #: input) waits for its answer or its last try first: a request someone typed.
    holds_exit: bool = False

    def tries_for(self, timers: Timers) -> int:
        return timers.tries if self.tries == TRIES else self.tries

    def timeout_for(self, timers: Timers) -> float:
        return timers.ack_timeout if self.timeout == ACK_TIMEOUT else self.timeout

    def ended_by(self, answer: Message) -> str | None:
        """The handler that ``answer`` runs, or None if it does not answer this wait."""
        if isinstance(answer, Refused):
            return self.on_refusal
        return self.on_answer if isinstance(answer, self.answers) else None


class Wait(enum.Enum):
    """A table of waits: the members of a subclass are its rows."""

    _value_: WaitRule

    @property
    def rule(self) -> WaitRule:
        return self._value_

    def __str__(self) -> str:
        return self.name.lower()


def _code(line: str) -> str:
    """``line`` as Markdown code (between two backticks when it holds one)."""
    return f"`` {line} ``" if "`" in line else f"`{line}`"


def _exits(*lines: str) -> str:
    return ", ".join(_code(line) for line in lines) + ", exit 1"


# A row: the request; the answers that end the wait; its tries and the timeout of each
# try; the state machine's handlers on an answer, on a refusal and on giving up; how the
# README names the wait and what happens when it runs out.


class ClientWait(Wait):
    HELLO = WaitRule(
        Hello, (Challenge,), TRIES, ACK_TIMEOUT, "_challenged", None, "_hello_lost",
        "`hello` (joining, or after a `rekey`)",
        _exits(screen.join_not_answered("HOST:PORT"), screen.EXITING)
        + " (only other keys answered: the changed-key line, exit 1; after a `rekey`:"
        " the client keeps its session)")  # fmt: skip
    REGISTER = WaitRule(
        Register, (Registered, Challenge), TRIES, ACK_TIMEOUT, "_registered", "_join_refused",
        "_register_lost", "`register` (a stale cookie: a new `challenge`, answered again)",
        _exits(screen.join_not_answered("HOST:PORT"), screen.EXITING))  # fmt: skip
    DIRECT = WaitRule(
        Chat, (Ack,), 1, ACK_TIMEOUT, "_direct_acked", None, "_hand_to_server",
        "direct `chat` to a peer", _code(screen.no_ack("NAME")) + ", then `save`",
        holds_exit=True)  # fmt: skip
    SAVE = WaitRule(
        SaveMessage, (Saved,), TRIES, ACK_TIMEOUT, "_saved", "_refused", "_save_lost",
        "`save`", _exits(screen.SEND_FAILED, screen.SERVER_SHUT_DOWN, screen.EXITING),
        holds_exit=True)  # fmt: skip
    DEREG = WaitRule(
        Deregister, (Ack,), TRIES, ACK_TIMEOUT, "_deregistered", "_dereg_refused", "_dereg_lost",
        "`dereg`", _exits(screen.SERVER_NOT_RESPONDING, screen.EXITING),
        holds_exit=True)  # fmt: skip
    REG = WaitRule(
        Reregister, (Ack,), TRIES, ACK_TIMEOUT, "_reregistered", "_reg_refused", "_reg_lost",
        "`reg`", _code(screen.REG_NOT_ANSWERED) + "; the client stays offline",
        holds_exit=True)  # fmt: skip
    CHANNEL = WaitRule(
        ChannelPost, (Ack,), TRIES, ACK_TIMEOUT, "_posted", "_refused", "_post_lost",
        "`send_all`", _code(screen.SERVER_NOT_RESPONDING_CHANNEL),
        holds_exit=True)  # fmt: skip
    LOOKUP = WaitRule(
        Lookup, (LookupResult,), TRIES, ACK_TIMEOUT, "_looked_up", "_refused", "_lookup_lost",
        "`lookup` (a `send` to a name not in the table)",
        _code(screen.lookup_not_answered("NAME")),
        holds_exit=True)  # fmt: skip


_OFFLINE = "the client is marked offline"


class ServerWait(Wait):
    TABLE = WaitRule(
        Table, (TableAck,), TRIES, ACK_TIMEOUT, "_table_acked", None, "_went_silent",
        "server: a part of the whole `table` to a client",
        f"{_OFFLINE} (stored messages are kept) and sent its update once more; a"
        " registration whose first table is never ACKed, that time either, is undone"
        " (a name it brought leaves the table)")  # fmt: skip
    DELTA = WaitRule(
        TableDelta, (TableAck,), TRIES, ACK_TIMEOUT, "_table_acked", None, "_went_silent",
        "server: a `delta` of the table to a client",
        f"{_OFFLINE} (stored messages are kept) and sent its update once more")  # fmt: skip
    MAILBOX = WaitRule(
        Mailbox, (Ack,), TRIES, ACK_TIMEOUT, "_batch_acked", None, "_went_silent",
        "server: `mailbox` (a batch of stored messages) to a client",
        f"{_OFFLINE} (stored messages are kept)")  # fmt: skip
    RELAY = WaitRule(
        Relay, (Ack,), 1, ACK_TIMEOUT, "_relay_acked", None, "_relay_lost",
        "server: `relay` (a `save` for a client that is online, stored first)",
        f"{_OFFLINE}, the message stays stored (`saved`: `stored`), the table to the"
        " others")  # fmt: skip
    CHANNEL = WaitRule(
        ChannelDelivery, (Ack,), 1, ACK_TIMEOUT, "_channel_delivered", None, "_channel_lost",
        "server: `channel`",
        f"{_OFFLINE}, the message stored (if its mailbox is full: `not_stored` to the"
        " sender), the table to the others")  # fmt: skip
    NOTICE = WaitRule(
        NotStored, (Ack,), TRIES, ACK_TIMEOUT, "_notice_acked", None, "_went_silent",
        "server: `not_stored` (a channel message some mailboxes had no room for)",
        _OFFLINE)  # fmt: skip
    REKEY = WaitRule(
        Rekey, (), TRIES, ACK_TIMEOUT, "_rekeyed", None, "_rekey_lost",
        "server: `rekey` to each client online before a restart (ended by its"
        " registration)", f"{_OFFLINE} (silently)")  # fmt: skip


ROLES: dict[str, type[Wait]] = {"client": ClientWait, "server": ServerWait}


def all_rules() -> list[WaitRule]:
    return [wait.rule for table in ROLES.values() for wait in table]


def answer_tags() -> frozenset[str]:
    """The wire names of the messages that answer a request (sent again for each try of
    it): they are not requests, and not retries."""
    answers = {tag_of(answer) for rule in all_rules() for answer in rule.answers}
    if any(rule.on_refusal for rule in all_rules()):
        answers.add(tag_of(Refused))
    return frozenset(answers)


def tries_allowed(tag: str, timers: Timers) -> int:
    """The most tries any wait gives a request named ``tag`` on the wire."""
    tries = [rule.tries_for(timers) for rule in all_rules() if tag_of(rule.request) == tag]
    return max(tries, default=timers.tries)


def retry_interval(tag: str, timers: Timers) -> float:
    """The time between two tries of a request named ``tag`` on the wire."""
    timeouts = [rule.timeout_for(timers) for rule in all_rules() if tag_of(rule.request) == tag]
    return max(timeouts, default=timers.ack_timeout)


def longest_wait(timers: Timers) -> float:
    """The longest any one wait lasts, all its tries included."""
    return max(rule.tries_for(timers) * rule.timeout_for(timers) for rule in all_rules())


_TIMES = "\u00d7"  # the multiplication sign


def wait_table_markdown(timers: Timers = Timers()) -> str:
    """The README's table of waits, made from the rows."""
    lines = [
        f"| wait | tries {_TIMES} timeout | when it runs out | `exit` waits for it |",
        "|---|---|---|---|",
    ]
    for role, table in ROLES.items():
        for wait in table:
            rule = wait.rule
            timeout_ms = round(rule.timeout_for(timers) * 1000)
            holds = "-" if role == "server" else ("yes" if rule.holds_exit else "no")
            tries = f"{rule.tries_for(timers)} {_TIMES} {timeout_ms} ms"
            lines.append(f"| {rule.what} | {tries} | {rule.gives_up} | {holds} |")
    return "\n".join(lines) + "\n"
