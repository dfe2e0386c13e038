"""The client's rules, as a state machine with no I/O.

Feed it datagrams (``handle_datagram``), what the person does (``handle_input``:
a typed line, Ctrl-C, a hang-up, a line that could not be read) and timer
expiries (``handle_timer``), each with the current time; it returns the effects
to carry out (datagrams to send, lines to show, changes to write, an exit) and
says when it next needs to wake (``next_deadline``). What happens to each
pending request is in its row of ``chatapp.protocol.waits.ClientWait``. This
module holds the commands, the answers and the table of handlers;
``client_core`` and ``client_delivery`` the rest.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from typing import ClassVar

from chatapp import screen
from chatapp.protocol.changes import NO_TAG
from chatapp.protocol.client_core import ClientState, Waiting
from chatapp.protocol.client_delivery import ClientDelivery
from chatapp.protocol.codecs import Sender, Via
from chatapp.protocol.common import Effect, Log, Pending, SeenIds, Send, Show, Timers, dropped
from chatapp.protocol.crypto import (
    CHANNEL_DOMAIN,
    SIGNATURE_BYTES,
    BadKey,
    Entropy,
    Identity,
    SystemEntropy,
    fingerprint,
    safety_number,
)
from chatapp.protocol.inputs import BadInput, ClientInput, Signal
from chatapp.protocol.sealing import PEER_OVERHEAD, SESSION_OVERHEAD
from chatapp.protocol.waits import ClientWait
from chatapp.wire import (
    MAX_DATAGRAM,
    NAME_PATTERN,
    Ack,
    Address,
    Challenge,
    ChannelDelivery,
    ChannelPost,
    Chat,
    Deregister,
    Lookup,
    LookupResult,
    Mailbox,
    Message,
    NotStored,
    Refused,
    Registered,
    Rekey,
    Relay,
    Reregister,
    Saved,
    SaveMessage,
    Seq,
    StoredItem,
    Table,
    TableDelta,
    TableEntry,
    encode,
)

__all__ = ["ClientProtocol", "ClientState", "Waiting"]

# Room left in a datagram beyond the largest form a message's text travels in.
_ENVELOPE_ALLOWANCE = 64
#: Characters that fit in every datagram whatever they are (each JSON-escaped to 6 bytes
#: at most, then base64 in a save or a batch): no need to work the sizes out.
_SURELY_FITS = 800
#: While the client waits for the server to settle its state (the registration, a
#: dereg, a reg), the lines typed meanwhile wait their turn, at most this many; past
#: that a line is refused, as it was before lines could wait.
WAITING_LINES_LIMIT = 100
#: The states in which a typed line waits for the server's answer before it is carried out.
SETTLING = frozenset({ClientState.JOINING, ClientState.DEREGISTERING, ClientState.REJOINING})


class ClientProtocol(ClientDelivery):
    def __init__(
        self,
        name: str,
        server: Address,
        port: int,
        *,
        identity: Identity,
        entropy: Entropy | None = None,
        pinned: bytes | None = None,
        marks: dict[bytes, dict[str, int]] | None = None,
        timers: Timers = Timers(),
        pins_file: str = "known_servers",
        other_servers: tuple[Address, ...] = (),
    ) -> None:
        """``pinned``: the key pinned for ``server`` (None: trust on first use); ``marks``:
        per server key, the highest stored message shown per origin; ``other_servers``:
        servers sharing ``server``'s database, moved to when it stops answering."""
        super().__init__(
            name, server, port,
            identity=identity, entropy=entropy or SystemEntropy(), pinned=pinned,
            marks=marks if marks is not None else {}, timers=timers, pins_file=pins_file,
            other_servers=other_servers,
        )  # fmt: skip
        self._deliveries_shown = SeenIds(capacity=1024)
        self._marks_moved = []

    # --- entry points -----------------------------------------------------------------

    def handle_timer(self, now: float) -> list[Effect]:
        return self._expired(now) + self._settled(now)

    def next_deadline(self) -> float | None:
        deadline = super().next_deadline()
        if self._table_due is None or not self._waiting_lines:
            return deadline
        return self._table_due if deadline is None else min(deadline, self._table_due)

    def handle_message(self, message: Message, sender: Sender, now: float) -> list[Effect]:
        if self.state is ClientState.EXITED:
            return []
        handler = self._message_handlers.get((type(message), sender.via))
        if handler is None:
            return [
                dropped(message, sender.addr, f"a client does not take it ({sender.via.value})")
            ]
        return handler(self, message, sender, now) + self._settled(now)

    def handle_input(self, item: ClientInput, now: float) -> list[Effect]:
        """A typed line, a signal, or a line that could not be read. A line typed while
        the state settles waits its turn (``_settled``)."""
        if item is Signal.INTERRUPT:
            return self._exit(0, screen.KEYBOARD_INTERRUPT)  # a silent leave: no dereg
        if self.state is ClientState.EXITED:
            return []
        if item is Signal.HANG_UP:
            return self._leave(())  # end of input, a closed terminal: quietly
        if self._leaving is not None:
            return [Log("leaving: a line typed after exit is not carried out", "debug")]
        if isinstance(item, BadInput):
            return [Show(screen.bad_input(item.detail))]
        if self._must_wait(item, now):
            if len(self._waiting_lines) >= WAITING_LINES_LIMIT:  # refused, as before
                busy = self.state is ClientState.DEREGISTERING
                return [Show(screen.BUSY_DEREGISTERING if busy else screen.STILL_JOINING)]
            self._waiting_lines.append(item)
            return []
        return self._command(item, now) + self._settled(now)

    # --- lines that wait, and leaving ----------------------------------------------------

    @property
    def lines_waiting(self) -> int:
        """How many typed lines wait for their turn."""
        return len(self._waiting_lines)

    @property
    def leaving(self) -> bool:
        """Whether the client leaves once what it waits for is done."""
        return self._leaving is not None

    def _must_wait(self, line: str, now: float) -> bool:
        """Whether ``line`` waits: a request to the server while the state settles, and
        any line behind one that waits (in order). ``exit`` never does: it leaves once
        those are done."""
        word = line.strip().partition(" ")[0]
        if not word or self._command_handlers.get(word) is ClientProtocol._cmd_exit:
            return False
        return bool(self._waiting_lines) or (
            self._settling(now) and word in self._requests_to_server
        )

    def _settling(self, now: float) -> bool:
        """Whether the client waits for the server to settle its state: its registration
        (and the first table, for as long as the server tries to send it), a ``dereg``,
        a ``reg``."""
        if self._table_due is not None and now >= self._table_due:
            self._table_due = None  # no table came: what waited goes without it
        return self.state in SETTLING or self._table_due is not None

    def _settled(self, now: float) -> list[Effect]:
        """What follows every handling: the lines that waited are carried out, in order,
        once the state has settled (until one unsettles it again: a ``dereg``); then a
        client that is leaving goes, once nothing it waits for is left."""
        effects: list[Effect] = []
        while (
            self._waiting_lines and self.state is not ClientState.EXITED and not self._settling(now)
        ):
            effects += self._command(self._waiting_lines.popleft(), now)
        if self._leaving is not None and self._nothing_holds_exit():
            effects += self._exit(0, *self._leaving)
        return effects

    def _nothing_holds_exit(self) -> bool:
        """Whether a leaving client may go: no line waits, and no request in flight is
        one whose answer it waits for (its row says ``holds_exit``)."""
        if self.state is ClientState.EXITED or self._waiting_lines:
            return False
        return not any(pending.context.kind.rule.holds_exit for pending in self._retry.values())

    def _leave(self, lines: tuple[str, ...]) -> list[Effect]:
        """Leave (showing ``lines`` as it goes) once the lines that wait are carried out
        and the requests in flight answered or given up; at once if there are none."""
        if self._leaving is not None:
            return []  # leaving already (an exit, then the end of the script's input)
        self._leaving = lines
        if self._nothing_holds_exit():
            return self._exit(0, *lines)
        return [Show(screen.LEAVING)] if lines else []

    def _command(self, line: str, now: float) -> list[Effect]:
        line = line.strip()
        if not line:
            return []
        word, _, rest = line.partition(" ")
        handler = self._command_handlers.get(word)
        if handler is None:
            return [Show(screen.unknown_command(word, nearest_command(word)))]
        return handler(self, rest.strip(), now)

    # --- commands ---------------------------------------------------------------------

    def _cmd_send(self, rest: str, now: float) -> list[Effect]:
        to, _, text = rest.partition(" ")
        text = text.strip()
        if not to or not text:
            return [Show(screen.usage("send NAME MESSAGE"))]
        if refusal := self._refuse_unless_online():
            return refusal
        if refusal := self._refuse_if_too_long(text, to):
            return refusal
        entry = self.table.get(to)
        if entry is None and re.fullmatch(NAME_PATTERN, to) is None:
            # The server drops a Lookup for such a name as malformed: asking would only
            # end, 2.5 s later, in a false "server is not responding".
            return [Show(screen.unknown_user(to))]
        if entry is None:
            lookup = Lookup(self.new_id(), to)
            return self._request(lookup, now, Waiting(ClientWait.LOOKUP, to, text))
        return self._send_direct(entry, text, now)

    def _cmd_send_all(self, rest: str, now: float) -> list[Effect]:
        if not rest:
            return [Show(screen.usage("send_all MESSAGE"))]
        if refusal := self._refuse_unless_online():
            return refusal
        if refusal := self._refuse_if_too_long(rest, self.name):
            return refusal
        post_id = self.new_id()
        signed = (self.name.encode(), post_id.encode(), rest.encode())
        post = ChannelPost(post_id, rest, self.identity.sign(CHANNEL_DOMAIN, *signed))
        return self._request(post, now, Waiting(ClientWait.CHANNEL, text=rest))

    def _cmd_dereg(self, rest: str, now: float) -> list[Effect]:
        if not rest:
            return [Show(screen.usage("dereg NAME"))]
        if rest != self.name:
            return [Show(screen.only_yourself("deregister", self.name))]
        if refusal := self._refuse_unless_online():
            return refusal
        self.state = ClientState.DEREGISTERING
        return self._request(Deregister(self.new_id(), self.name), now, Waiting(ClientWait.DEREG))

    def _cmd_reg(self, rest: str, now: float) -> list[Effect]:
        if not rest:
            return [Show(screen.usage("reg NAME"))]
        if rest != self.name:
            return [Show(screen.only_yourself("register", self.name))]
        if self.state is not ClientState.OFFLINE:
            return [Show(self._busy_line())]
        self.state = ClientState.REJOINING
        return self._request(Reregister(self.new_id(), self.name), now, Waiting(ClientWait.REG))

    def _cmd_table(self, rest: str, now: float) -> list[Effect]:
        entries = sorted(self.table.values(), key=lambda e: e.name)
        rows = [(e.name, e.ip, e.port, e.online) for e in entries]
        return [Show(line) for line in screen.table_lines(rows)]

    def _cmd_fingerprint(self, rest: str, now: float) -> list[Effect]:
        own = self.identity.public
        if not rest or rest == self.name:
            return [Show(screen.own_fingerprint(self.name, fingerprint(own)))]
        entry = self.table.get(rest)
        if entry is None:
            return [Show(screen.no_key_for(rest))]
        return [
            Show(screen.peer_fingerprint(rest, fingerprint(entry.key))),
            Show(screen.safety_number(rest, safety_number(own, entry.key))),
        ]

    def _cmd_help(self, rest: str, now: float) -> list[Effect]:
        if not rest:
            return [Show(screen.HELP)]
        word = rest.split()[0]
        if word in screen.COMMAND_HELP:
            return [Show(screen.COMMAND_HELP[word])]
        return [Show(screen.no_help(word, nearest_command(word)))]

    def _cmd_exit(self, rest: str, now: float) -> list[Effect]:
        return self._leave((screen.EXITING,))

    #: The commands that ask the server something, or whose answer depends on the state
    #: the server settles (the others, such as ``help``, are answered here and now).
    _requests_to_server: ClassVar[frozenset[str]] = frozenset({"send", "send_all", "dereg", "reg"})

    _command_handlers: ClassVar[dict[str, Callable[[ClientProtocol, str, float], list[Effect]]]] = {
        "send": _cmd_send,
        "send_all": _cmd_send_all,
        "dereg": _cmd_dereg,
        "reg": _cmd_reg,
        "table": _cmd_table,
        "list": _cmd_table,
        "fingerprint": _cmd_fingerprint,
        "key": _cmd_fingerprint,
        "help": _cmd_help,
        "exit": _cmd_exit,
        "quit": _cmd_exit,
    }

    def _refuse_unless_online(self) -> list[Effect]:
        if self.state is ClientState.ONLINE:
            return []
        return [Show(self._busy_line())]

    def _busy_line(self) -> str:
        return {
            ClientState.ONLINE: screen.ALREADY_ONLINE,
            ClientState.OFFLINE: screen.OFFLINE_ONLY_REG,
            ClientState.DEREGISTERING: screen.BUSY_DEREGISTERING,
        }.get(self.state, screen.STILL_JOINING)

    def _refuse_if_too_long(self, text: str, to: str) -> list[Effect]:
        to = to if len(to) <= 32 else self.name
        if len(text) <= _SURELY_FITS or _fits(text, self.name, to):
            return []
        low, high = 0, len(text.encode())  # the longest plain text that fits, for the line
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if _fits("x" * middle, self.name, to) else (low, middle - 1)
        return [Show(screen.too_long(len(text.encode()), low))]

    # --- sending ----------------------------------------------------------------------

    def _send_direct(self, entry: TableEntry, text: str, now: float) -> list[Effect]:
        chat = Chat(self.new_id(), text, entry.tag if entry.tag else NO_TAG)
        try:
            data = self.codec.to_peer(entry.key, chat)
        except BadKey:
            return [Show(screen.unknown_user(entry.name))]
        waiting = Waiting(ClientWait.DIRECT, entry.name, text)
        return [self._wait(chat.id, Send(chat, data, (entry.ip, entry.port)), now, waiting)]

    # --- answers: the ``on_answer`` and ``on_refusal`` handlers of ClientWait ---------------

    def _on_answer(self, message: Message, sender: Sender, now: float) -> list[Effect]:
        return self._answered(message.id, message, sender, now)

    def _direct_acked(self, pending: Pending[Waiting], answer: Ack, now: float) -> list[Effect]:
        return [Show(screen.received_by(pending.context.to))]

    def _saved(self, pending: Pending[Waiting], answer: Saved, now: float) -> list[Effect]:
        if answer.outcome == "delivered":
            return [Show(screen.received_by(pending.context.to))]
        return [Show(screen.SAVED_BY_SERVER)]

    def _deregistered(self, pending: Pending[Waiting], answer: Ack, now: float) -> list[Effect]:
        self.state = ClientState.OFFLINE
        return [Show(screen.YOU_ARE_OFFLINE)]

    def _dereg_refused(
        self, pending: Pending[Waiting], answer: Refused, now: float
    ) -> list[Effect]:
        self.state = ClientState.ONLINE
        return self._refused(pending, answer, now)

    def _reregistered(self, pending: Pending[Waiting], answer: Ack, now: float) -> list[Effect]:
        self.state = ClientState.ONLINE
        return []

    def _reg_refused(self, pending: Pending[Waiting], answer: Refused, now: float) -> list[Effect]:
        self.state = ClientState.OFFLINE
        return self._refused(pending, answer, now)

    def _posted(self, pending: Pending[Waiting], answer: Ack, now: float) -> list[Effect]:
        return [Show(screen.CHANNEL_ACKED)]

    def _looked_up(
        self, pending: Pending[Waiting], answer: LookupResult, now: float
    ) -> list[Effect]:
        waiting = pending.context
        if answer.entry is None or answer.entry.name != waiting.to:
            return [Show(screen.unknown_user(waiting.to))]
        self.table[waiting.to] = answer.entry
        return self._send_direct(answer.entry, waiting.text, now)

    def _refused(self, pending: Pending[Waiting], answer: Refused, now: float) -> list[Effect]:
        if answer.cause == "storage":  # the database failed: nothing was done
            return [Show(screen.CANNOT_STORE)]
        return [Show(screen.request_refused(answer.reason))]

    # --- giving up: the ``on_give_up`` handlers of ClientWait ----------------------------

    def _hand_to_server(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        """No ACK from the peer: the same sealed datagram goes to the server, which delivers
        or stores it without being able to read it (same id)."""
        waiting = pending.context
        save = SaveMessage(str(pending.key), waiting.to, pending.send.data)
        return [
            Show(screen.no_ack(waiting.to)),
            *self._request(save, now, Waiting(ClientWait.SAVE, waiting.to)),
        ]

    def _save_lost(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        return self._exit(1, screen.SEND_FAILED, screen.SERVER_SHUT_DOWN, screen.EXITING)

    def _dereg_lost(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        return self._exit(1, screen.SERVER_NOT_RESPONDING, screen.EXITING)

    def _post_lost(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        return [Show(screen.SERVER_NOT_RESPONDING_CHANNEL)]

    def _reg_lost(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        self.state = ClientState.OFFLINE
        return [Show(screen.REG_NOT_ANSWERED)]

    def _lookup_lost(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        return [Show(screen.lookup_not_answered(pending.context.to))]

    #: What a client takes, by message type and how its sender was authenticated:
    #: anything else is dropped (a table from a peer, a chat in the clear, ...).
    _message_handlers: ClassVar[dict[tuple[type, Via], Callable[..., list[Effect]]]] = {
        (Challenge, Via.PLAIN): ClientDelivery._on_challenge,
        (Registered, Via.SERVER): _on_answer,
        (Refused, Via.SERVER): _on_answer,
        (Ack, Via.SERVER): _on_answer,
        (Saved, Via.SERVER): _on_answer,
        (LookupResult, Via.SERVER): _on_answer,
        (Rekey, Via.SERVER): ClientDelivery._on_rekey,
        (Ack, Via.PEER): ClientDelivery._on_peer_ack,
        (Chat, Via.PEER): ClientDelivery._on_chat,
        (ChannelDelivery, Via.SERVER): ClientDelivery._on_channel,
        (Relay, Via.SERVER): ClientDelivery._on_relay,
        (Mailbox, Via.SERVER): ClientDelivery._on_mailbox,
        (NotStored, Via.SERVER): ClientDelivery._on_not_stored,
        (Table, Via.SERVER): ClientDelivery._on_table,
        (TableDelta, Via.SERVER): ClientDelivery._on_table,
    }


def _fits(text: str, sender: str, to: str) -> bool:
    return _largest_datagram(text, sender, to) + _ENVELOPE_ALLOWANCE <= MAX_DATAGRAM


def _largest_datagram(text: str, sender: str, to: str) -> int:
    """The largest datagram ``text`` travels in, from ``sender`` to ``to``: a batch of stored
    messages holding it alone (sealed for a peer, or signed for the channel)."""
    msg_id = "i" * 16
    peer = PEER_OVERHEAD + len(sender) + len(encode(Chat(msg_id, text, NO_TAG)))
    seq = Seq("o" * 16, 10**12)
    stored_at = 1e9 + 0.123456789
    direct = StoredItem(seq, msg_id, "direct", sender, stored_at, sealed=b"s" * peer)
    channel = StoredItem(
        seq, msg_id, "channel", sender, stored_at, text=text, sig=b"s" * SIGNATURE_BYTES
    )
    save = SaveMessage(msg_id, to, b"s" * peer)
    sizes = [len(encode(Mailbox(msg_id, msg_id, [item]))) for item in (direct, channel)]
    return SESSION_OVERHEAD + max(*sizes, len(encode(save)))


#: The commands typed at the client's prompt (for completion and suggestions).
COMMANDS: tuple[str, ...] = tuple(ClientProtocol._command_handlers)


def nearest_command(word: str) -> str | None:
    """The command ``word`` was most likely meant to be (a typo), if any is close."""
    matches = difflib.get_close_matches(word, COMMANDS, n=1)
    return matches[0] if matches else None
