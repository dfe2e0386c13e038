"""The client's rules, as a state machine with no I/O.

Feed it datagrams (``handle_datagram``), what the person does (``handle_input``:
a typed line, Ctrl-C, a hang-up, a line that could not be read) and timer
expiries (``handle_timer``), each with the current time; it returns the effects
to carry out (datagrams to send, lines to show, an exit) and says when it next
needs to wake (``next_deadline``). What happens to each pending request is in
its row of ``chatapp.protocol.waits.ClientWait``.
"""

from __future__ import annotations

import difflib
import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from chatapp import screen
from chatapp.protocol.common import (
    Codec,
    Effect,
    Exit,
    IdFactory,
    Log,
    Pending,
    SeenIds,
    Show,
    Timers,
    dropped,
)
from chatapp.protocol.inputs import BadInput, ClientInput, Signal
from chatapp.protocol.machine import Machine
from chatapp.protocol.tables import TableCopy
from chatapp.protocol.waits import ClientWait
from chatapp.wire import (
    MAX_DATAGRAM,
    NAME_PATTERN,
    Ack,
    Address,
    ChannelDelivery,
    ChannelPost,
    Chat,
    Deregister,
    Lookup,
    LookupResult,
    Mailbox,
    Message,
    Refused,
    Register,
    Registered,
    Reregister,
    Saved,
    SaveMessage,
    Table,
    TableAck,
    TableDelta,
    TableEntry,
    fmt_addr,
    tag_of,
)


class ClientState(enum.Enum):
    JOINING = "joining"
    ONLINE = "online"
    DEREGISTERING = "deregistering"
    OFFLINE = "offline"
    REJOINING = "rejoining"
    EXITED = "exited"


#: States in which the client is (or is about to be) online: it shows and ACKs what arrives.
_LISTENING = {
    ClientState.JOINING,
    ClientState.ONLINE,
    ClientState.DEREGISTERING,
    ClientState.REJOINING,
}


@dataclass(frozen=True, slots=True)
class Waiting:
    """A pending request: its row in the table of waits; ``to`` and ``text`` for messages."""

    kind: ClientWait
    to: str = ""
    text: str = ""
    moves: int = 0  # the other servers this request was sent to after the first


# Room left in a datagram for the envelope of the largest message that carries text.
_ENVELOPE_ALLOWANCE = 64


class ClientProtocol(Machine[Waiting]):
    def __init__(
        self,
        name: str,
        server: Address,
        port: int,
        *,
        timers: Timers = Timers(),
        id_prefix: str = "c",
        codec: Codec | None = None,
        other_servers: tuple[Address, ...] = (),
    ) -> None:
        """``other_servers``: servers sharing the first one's database, moved to in turn
        when the current one stops answering."""
        super().__init__(timers, codec)
        self.name = name
        self.server = server
        self.servers = [server, *(s for s in other_servers if s != server)]
        self.port = port
        self.state = ClientState.JOINING
        self.copy = TableCopy()  # the server's table as this client has it
        self.token = ""
        self._new_id = IdFactory(id_prefix)
        self._seen = SeenIds()
        self._deliveries_shown = SeenIds(capacity=1024)

    @property
    def table(self) -> dict[str, TableEntry]:
        """The client table, by name."""
        return self.copy.entries

    # --- entry points -----------------------------------------------------------------

    def start(self, now: float) -> list[Effect]:
        register = Register(self._new_id(), self.name, self.port)
        return [self._request(register, now, Waiting(ClientWait.JOIN))]

    def handle_timer(self, now: float) -> list[Effect]:
        return self._expired(now)

    def _may_give_up(self, pending: Pending[Waiting]) -> bool:
        return self.state is not ClientState.EXITED

    def handle_message(self, message: Message, addr: Address, now: float) -> list[Effect]:
        if self.state is ClientState.EXITED:
            return []
        handler = self._message_handlers.get(type(message))
        if handler is None:
            return [dropped(message, addr, "a client does not take it")]
        return handler(self, message, addr, now)

    def handle_input(self, item: ClientInput, now: float) -> list[Effect]:
        """A typed line, a signal, or a line that could not be read."""
        if item is Signal.INTERRUPT:
            return self._exit(0, screen.KEYBOARD_INTERRUPT)  # a silent leave: no dereg
        if item is Signal.HANG_UP:
            return self._exit(0)  # end of input or a closed terminal: leave quietly
        if self.state is ClientState.EXITED:
            return []
        if isinstance(item, BadInput):
            return [Show(screen.bad_input(item.detail))]
        return self._command(item, now)

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
            lookup = Lookup(self._new_id(), to, self.token)
            return [self._request(lookup, now, Waiting(ClientWait.LOOKUP, to, text))]
        return [self._send_direct(entry, text, now)]

    def _cmd_send_all(self, rest: str, now: float) -> list[Effect]:
        if not rest:
            return [Show(screen.usage("send_all MESSAGE"))]
        if refusal := self._refuse_unless_online():
            return refusal
        if refusal := self._refuse_if_too_long(rest, self.name):
            return refusal
        post = ChannelPost(self._new_id(), self.name, rest, self.token)
        return [self._request(post, now, Waiting(ClientWait.CHANNEL, text=rest))]

    def _cmd_dereg(self, rest: str, now: float) -> list[Effect]:
        if not rest:
            return [Show(screen.usage("dereg NAME"))]
        if rest != self.name:
            return [Show(screen.only_yourself("deregister", self.name))]
        if refusal := self._refuse_unless_online():
            return refusal
        self.state = ClientState.DEREGISTERING
        dereg = Deregister(self._new_id(), self.name, self.token)
        return [self._request(dereg, now, Waiting(ClientWait.DEREG))]

    def _cmd_reg(self, rest: str, now: float) -> list[Effect]:
        if not rest:
            return [Show(screen.usage("reg NAME"))]
        if rest != self.name:
            return [Show(screen.only_yourself("register", self.name))]
        if self.state is not ClientState.OFFLINE:
            return [Show(self._busy_line())]
        self.state = ClientState.REJOINING
        reg = Reregister(self._new_id(), self.name, self.token)
        return [self._request(reg, now, Waiting(ClientWait.REG))]

    def _cmd_table(self, rest: str, now: float) -> list[Effect]:
        entries = sorted(self.table.values(), key=lambda e: e.name)
        rows = [(e.name, e.ip, e.port, e.online) for e in entries]
        return [Show(line) for line in screen.table_lines(rows)]

    def _cmd_help(self, rest: str, now: float) -> list[Effect]:
        if not rest:
            return [Show(screen.HELP)]
        word = rest.split()[0]
        if word in screen.COMMAND_HELP:
            return [Show(screen.COMMAND_HELP[word])]
        return [Show(screen.no_help(word, nearest_command(word)))]

    def _cmd_exit(self, rest: str, now: float) -> list[Effect]:
        return self._exit(0, screen.EXITING)

    _command_handlers: ClassVar[dict[str, Callable[[ClientProtocol, str, float], list[Effect]]]] = {
        "send": _cmd_send,
        "send_all": _cmd_send_all,
        "dereg": _cmd_dereg,
        "reg": _cmd_reg,
        "table": _cmd_table,
        "list": _cmd_table,
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
        # The save form is the largest datagram that carries a message's text.
        probe = SaveMessage("x" * 32, self.name, to if len(to) <= 32 else self.name, text, "t" * 32)
        size = len(self.codec.encode(probe)) + _ENVELOPE_ALLOWANCE
        if size <= MAX_DATAGRAM:
            return []
        limit = MAX_DATAGRAM - (size - len(text.encode()))
        return [Show(screen.too_long(len(text.encode()), max(limit, 0)))]

    # --- sending ----------------------------------------------------------------------

    def _request(self, message: Message, now: float, waiting: Waiting) -> Effect:
        return self._wait(message.id, self.send(message, self.server), now, waiting)

    def _send_direct(self, entry: TableEntry, text: str, now: float) -> Effect:
        chat = Chat(self._new_id(), self.name, text)
        waiting = Waiting(ClientWait.DIRECT, entry.name, text)
        return self._wait(chat.id, self.send(chat, (entry.ip, entry.port)), now, waiting)

    def _exit(self, status: int, *lines: str) -> list[Effect]:
        self.state = ClientState.EXITED
        return [*(Show(line) for line in lines), Exit(status)]

    # --- answers: the ``on_answer`` and ``on_refusal`` handlers of ClientWait ---------------

    def _on_answer(self, message: Message, addr: Address, now: float) -> list[Effect]:
        return self._answered(message.id, message, addr, now)

    def _joined(self, pending: Pending[Waiting], answer: Registered, now: float) -> list[Effect]:
        self.token = answer.token
        self.state = ClientState.ONLINE
        return []

    def _join_refused(self, pending: Pending[Waiting], answer: Refused, now: float) -> list[Effect]:
        if answer.cause == "storage":
            return self._exit(1, screen.CANNOT_STORE, screen.EXITING)
        return self._exit(1, screen.refused(answer.reason))

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
        return [self._send_direct(answer.entry, waiting.text, now)]

    def _refused(self, pending: Pending[Waiting], answer: Refused, now: float) -> list[Effect]:
        if answer.cause == "storage":  # the database failed: nothing was done
            return [Show(screen.CANNOT_STORE)]
        return [Show(screen.request_refused(answer.reason))]

    # --- giving up: the ``on_give_up`` handlers of ClientWait ----------------------------

    def _give_up(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        """A request to a server that is not answered goes to the next server, if there is
        one it was not sent to; the row's handler runs once none is left."""
        waiting = pending.context
        if waiting.kind is ClientWait.DIRECT or waiting.moves + 1 >= len(self.servers):
            return super()._give_up(pending, now)
        effects: list[Effect] = []
        if pending.send.addr == self.server:  # the current server stopped answering
            old = self.server
            self.server = self.servers[(self.servers.index(old) + 1) % len(self.servers)]
            # The next server's tables are numbered on its own: its first whole table
            # replaces this copy, whatever its version (the entries serve until then).
            self.copy.epoch, self.copy.version = -1, -1
            effects.append(Show(screen.moving_server(fmt_addr(old), fmt_addr(self.server))))
        moved = Waiting(waiting.kind, waiting.to, waiting.text, waiting.moves + 1)
        send = self.send(pending.send.message, self.server)
        return [*effects, self._wait(pending.key, send, now, moved)]

    def _hand_to_server(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        """No ACK from the peer: the server delivers the message or stores it (same id)."""
        waiting = pending.context
        save = SaveMessage(str(pending.key), self.name, waiting.to, waiting.text, self.token)
        return [
            Show(screen.no_ack(waiting.to)),
            self._request(save, now, Waiting(ClientWait.SAVE, waiting.to)),
        ]

    def _save_lost(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        return self._exit(1, screen.SEND_FAILED, screen.SERVER_SHUT_DOWN, screen.EXITING)

    def _dereg_lost(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        return self._exit(1, screen.SERVER_NOT_RESPONDING, screen.EXITING)

    def _join_lost(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        return self._exit(1, screen.join_not_answered(fmt_addr(self.server)), screen.EXITING)

    def _post_lost(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        return [Show(screen.SERVER_NOT_RESPONDING_CHANNEL)]

    def _reg_lost(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        self.state = ClientState.OFFLINE
        return [Show(screen.REG_NOT_ANSWERED)]

    def _lookup_lost(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        return [Show(screen.lookup_not_answered(pending.context.to))]

    # --- what arrives unasked -----------------------------------------------------------

    def _on_chat(self, message: Chat, addr: Address, now: float) -> list[Effect]:
        if self.state not in _LISTENING:
            return [Log(f"offline: ignored a message from {message.sender}", "debug")]
        effects: list[Effect] = [self.send(Ack(message.id), addr)]
        if self._seen.add(message.id):
            effects.append(Show(screen.chat(message.sender, message.text)))
        return effects

    def _on_channel(self, message: ChannelDelivery, addr: Address, now: float) -> list[Effect]:
        if refusal := self._refuse_unless_from_server(message, addr):
            return refusal
        effects: list[Effect] = [self.send(Ack(message.id), addr)]
        if self._seen.add(message.id):
            effects.append(Show(screen.channel_message(message.sender, message.text)))
        return effects

    def _on_mailbox(self, message: Mailbox, addr: Address, now: float) -> list[Effect]:
        if refusal := self._refuse_unless_from_server(message, addr):
            return refusal
        effects: list[Effect] = [self.send(Ack(message.id), addr)]
        for item in message.items:
            if not self._seen.add(item.id):
                continue
            if self._deliveries_shown.add(message.delivery):
                effects.append(Show(screen.YOU_HAVE_MESSAGE))
            format_line = screen.stored_direct if item.kind == "direct" else screen.stored_channel
            effects.append(Show(format_line(item.stored_at, item.sender, item.text)))
        return effects

    def _on_table(self, message: Table | TableDelta, addr: Address, now: float) -> list[Effect]:
        """A part of the whole table or of a delta: ACKed with the version held after
        taking it; shown once when it completes an update that was applied."""
        if refusal := self._refuse_unless_from_server(message, addr):
            return refusal
        applied = self.copy.take(message)
        ack = TableAck(message.id, self.copy.epoch, self.copy.version)
        effects: list[Effect] = [self.send(ack, addr)]
        if applied:
            effects.append(Show(screen.TABLE_UPDATED))
        return effects

    def _refuse_unless_from_server(self, message: Message, addr: Address) -> list[Effect]:
        if addr != self.server:
            return [dropped(message, addr, "it did not come from the server")]
        if self.state not in _LISTENING:
            return [Log(f"offline: ignored a {tag_of(message)} from the server", "debug")]
        return []

    _message_handlers: ClassVar[dict[type, Callable[..., list[Effect]]]] = {
        Ack: _on_answer,
        Registered: _on_answer,
        Refused: _on_answer,
        Saved: _on_answer,
        LookupResult: _on_answer,
        Chat: _on_chat,
        ChannelDelivery: _on_channel,
        Mailbox: _on_mailbox,
        Table: _on_table,
        TableDelta: _on_table,
    }


#: The commands typed at the client's prompt (for completion and suggestions).
COMMANDS: tuple[str, ...] = tuple(ClientProtocol._command_handlers)


def nearest_command(word: str) -> str | None:
    """The command ``word`` was most likely meant to be (a typo), if any is close."""
    matches = difflib.get_close_matches(word, COMMANDS, n=1)
    return matches[0] if matches else None
