"""What every part of the client's state machine stands on: its state, how it seals
what it sends, and the handshake (joining, pinning the server's key, and
registering again when the server asks for it with a ``rekey``).

The client's rules are split over three modules, each a layer of one class:
``client_core`` (this), ``client_delivery`` (what arrives unasked: direct and
channel messages, relays, stored messages, tables) and ``client`` (the
commands, the answers, and the table of handlers).
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass

from chatapp import screen
from chatapp.protocol.changes import ServerPinned
from chatapp.protocol.codecs import ClientCodec, Sender, Via
from chatapp.protocol.common import Effect, Exit, Log, Pending, SeenIds, Send, Show, Timers
from chatapp.protocol.crypto import (
    REGISTER_DOMAIN,
    Entropy,
    Identity,
    fingerprint,
    new_message_id,
)
from chatapp.protocol.machine import Machine
from chatapp.protocol.sealing import Session
from chatapp.protocol.tables import TableCopy
from chatapp.protocol.waits import ClientWait, ServerWait
from chatapp.wire import (
    Address,
    Challenge,
    Chat,
    Hello,
    Message,
    Refused,
    Register,
    Registered,
    Rekey,
    TableEntry,
    encode,
    fmt_addr,
)


class ClientState(enum.Enum):
    JOINING = "joining"
    ONLINE = "online"
    DEREGISTERING = "deregistering"
    OFFLINE = "offline"
    REJOINING = "rejoining"
    EXITED = "exited"


@dataclass(frozen=True, slots=True)
class Waiting:
    """A pending request: its row in the table of waits; ``to`` and ``text`` for messages."""

    kind: ClientWait
    to: str = ""
    text: str = ""
    challenges: int = 0  # REGISTER: fresh challenges answered so far (a stale cookie)
    moves: int = 0  # the other servers this wait moved to after the first (``--server``)


#: Messages that are never sealed in the session: the same bytes on every try.
_UNSEALED = (Hello, Register, Chat)


class ClientCore(Machine[Waiting]):
    codec: ClientCodec

    def __init__(
        self,
        name: str,
        server: Address,
        port: int,
        *,
        identity: Identity,
        entropy: Entropy,
        pinned: bytes | None,
        marks: dict[bytes, dict[str, int]],
        timers: Timers,
        pins_file: str,
        other_servers: tuple[Address, ...] = (),
    ) -> None:
        """``other_servers``: servers sharing the first one's database (and its key),
        moved to in turn when the current one stops answering."""
        super().__init__(timers)
        self.name = name
        self.server = server
        self.servers = [server, *(s for s in dict.fromkeys(other_servers) if s != server)]
        self.port = port
        self.identity = identity
        self.entropy = entropy
        self.pinned = pinned
        self.pins_file = pins_file  # where a person removes a pin (for the changed-key line)
        self.state = ClientState.JOINING
        self.copy = TableCopy()  # the server's table as this client has it
        self.codec = ClientCodec(identity, name, self._peer_key, entropy)
        self.codec.server_key = pinned
        self.rekeying = False  # registering again in a new session, as the server asked
        self.boot = b""
        self._offered: bytes | None = None  # a different key than the pinned one, offered
        self._marks = marks  # server key -> origin -> the highest stored n shown
        self._seen = SeenIds()  # (sender, id) of every message shown
        #: Lines typed while the state was settling, waiting for their turn (``client``).
        self._waiting_lines: collections.deque[str] = collections.deque()
        #: Leaving (``exit``, the end of input): the lines to show when it goes, once
        #: nothing it waits for is left. None: not leaving.
        self._leaving: tuple[str, ...] | None = None
        #: Registered, the first table still to come: until when lines wait for it.
        self._table_due: float | None = None
        self._pinned_now: bytes | None = None  # pinned since the checkpoint (not yet on disk)

    @property
    def table(self) -> dict[str, TableEntry]:
        """The client table, by name."""
        return self.copy.entries

    def _peer_key(self, name: str) -> bytes | None:
        entry = self.table.get(name)
        return entry.key if entry is not None else None

    @property
    def session(self) -> Session | None:
        return self.codec.session

    @property
    def sid(self) -> bytes:
        return self.codec.session.sid if self.codec.session is not None else b""

    def new_id(self) -> str:
        return new_message_id(self.entropy)

    # --- sending ----------------------------------------------------------------------

    def _to_server(self, message: Message) -> Send:
        return Send(message, self.codec.to_server(message), self.server)

    def _request(self, message: Message, now: float, waiting: Waiting) -> list[Effect]:
        """Send ``message`` to the server in the session and wait for its answer (while
        the client registers again, it waits to go in the new session)."""
        effect = self._wait(message.id, self._to_server(message), now, waiting)
        return [] if self.rekeying else [effect]

    def _reseal(self, pending: Pending[Waiting]) -> Send | None:
        message = pending.send.message
        if isinstance(message, _UNSEALED):
            return pending.send
        if self.rekeying or self.session is None:
            return None  # the try passes; the new session sends it
        return self._to_server(message)

    def _from_addressee(self, pending: Pending[Waiting], message: Message, sender: Sender) -> bool:
        if isinstance(pending.send.message, Chat):  # a direct message: its peer answers
            return sender.via is Via.PEER and sender.name == pending.context.to
        if isinstance(message, Challenge):
            return sender.via is Via.PLAIN and sender.addr == self.server
        return sender.via is Via.SERVER

    def _may_give_up(self, pending: Pending[Waiting]) -> bool:
        return self.state is not ClientState.EXITED

    def _exit(self, status: int, *lines: str) -> list[Effect]:
        self.state = ClientState.EXITED
        return [*(Show(line) for line in lines), Exit(status)]

    # --- the handshake ----------------------------------------------------------------

    def start(self, now: float) -> list[Effect]:
        return self._hello(now)

    def _hello(self, now: float, moves: int = 0) -> list[Effect]:
        hello = Hello(self.new_id(), self.name, self.port, self.identity.public)
        send = Send(hello, encode(hello), self.server)
        return [self._wait(hello.id, send, now, Waiting(ClientWait.HELLO, moves=moves))]

    def _on_challenge(self, message: Challenge, sender: Sender, now: float) -> list[Effect]:
        if self.pinned is not None and message.server_key != self.pinned:
            # Not the server this client pinned: ignored, so that a forged challenge
            # cannot make it give up; remembered for the line if only such keys answer.
            self._offered = message.server_key
            offered = fingerprint(message.server_key)
            why = f"a challenge with another key ({offered}) than the one pinned: ignored"
            return [Log(why, "warning")]
        return self._answered(message.id, message, sender, now)

    def _challenged(self, pending: Pending[Waiting], answer: Challenge, now: float) -> list[Effect]:
        return self._register(answer, now, challenges=0)

    def _register(self, challenge: Challenge, now: float, challenges: int) -> list[Effect]:
        self.codec.server_key = challenge.server_key  # the one the answer must be boxed with
        port = str(self.port).encode()
        signed = (challenge.server_key, challenge.cookie, self.name.encode(), port)
        sig = self.identity.sign(REGISTER_DOMAIN, *signed)
        register = Register(
            self.new_id(), self.name, self.port, self.identity.public, challenge.cookie, sig
        )
        send = Send(register, encode(register), self.server)
        return [
            self._wait(register.id, send, now, Waiting(ClientWait.REGISTER, challenges=challenges))
        ]

    def _registered(
        self, pending: Pending[Waiting], answer: Registered | Challenge, now: float
    ) -> list[Effect]:
        if isinstance(answer, Challenge):  # the cookie was stale: answer the new challenge
            if pending.context.challenges >= self.timers.tries:
                return self._register_lost(pending, now)
            return self._register(answer, now, pending.context.challenges + 1)
        self.codec.session = Session(answer.sid, answer.session_key)
        self.boot = answer.boot
        effects: list[Effect] = []
        if self.pinned is None and self.codec.server_key is not None:
            # Trust on first use: the registered answer proved the key; pinned now.
            self.pinned = self._pinned_now = self.codec.server_key
            log = Log(
                f"pinned the key of the server {fmt_addr(self.server)}: {fingerprint(self.pinned)}"
            )
            effects += [ServerPinned(self.server, self.pinned), log]
        if self.rekeying:
            self.rekeying = False
            return [*effects, Log("registered again in a new session"), *self._resend_pending()]
        self.state = ClientState.ONLINE
        # The registration is complete with the first table, which the server sends at
        # once (and tries as its row of waits says): lines that wait, wait for it too.
        table = ServerWait.TABLE.rule
        self._table_due = now + table.tries_for(self.timers) * table.timeout_for(self.timers)
        return effects

    def _resend_pending(self) -> list[Effect]:
        """The requests that waited for the new session, with their original ids."""
        effects: list[Effect] = []
        for pending in self._retry.values():
            if not isinstance(pending.send.message, _UNSEALED):
                pending.send = self._to_server(pending.send.message)
                effects.append(pending.send)
        return effects

    def _join_refused(self, pending: Pending[Waiting], answer: Refused, now: float) -> list[Effect]:
        if answer.cause == "storage" and self.rekeying:
            # Registering again, silently: the old session stays; the server's next rekey
            # (it answers the old session with one) makes this client try again.
            self.rekeying = False
            return [Log("the server could not store the new session: tried again later")]
        if answer.cause == "storage":  # the server's database failed: nothing was done
            return self._exit(1, screen.CANNOT_STORE, screen.EXITING)
        return self._exit(1, screen.refused(answer.reason))

    def _hello_lost(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        if self.rekeying:
            self.rekeying = False
            return [Log("the server did not answer: still in the old session", "warning")]
        if self._offered is not None and self.pinned is not None:
            changed = screen.server_key_changed(
                fmt_addr(self.server), fingerprint(self.pinned), fingerprint(self._offered),
                self.pins_file,
            )  # fmt: skip
            return self._exit(1, changed, screen.EXITING)
        return self._exit(1, screen.join_not_answered(fmt_addr(self.server)), screen.EXITING)

    def _register_lost(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        return self._hello_lost(pending, now)

    def _on_rekey(self, message: Rekey, sender: Sender, now: float) -> list[Effect]:
        """The server (its signature says so) no longer has this session: register again,
        silently, then send what waits in the new session. From another of this client's
        servers (they share the key): its server stopped, and that one took its clients
        over: register there. From another address the client was not given: that
        server is tried if the client's own does not answer."""
        if self.session is None or message.sid != self.session.sid:
            return [Log("a rekey for another session: ignored", "debug")]
        if self.rekeying:
            return []
        if sender.addr != self.server and sender.addr in self.servers:
            return self._move_to(sender.addr, now, 0)
        if sender.addr != self.server:
            # Another server holding the key: one sharing the database, which took this
            # client over when its own server was taken for stopped. The client registers
            # again at its own server, and moves to that one if its own does not answer.
            self.servers.append(sender.addr)
        self.rekeying = True
        return [Log("the server asked to register again (it restarted)"), *self._hello(now)]

    # --- moving to another server (``--server``) ----------------------------------------

    def _give_up(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        """A wait for the server that ran out goes to the next server, if there is one it
        has not been to yet (the client registers there, with the key every server
        shares, and sends what waits in the new session); the row's handler runs once
        none is left."""
        waiting = pending.context
        if waiting.kind is ClientWait.DIRECT or waiting.moves + 1 >= len(self.servers):
            return super()._give_up(pending, now)
        effects: list[Effect] = []
        if pending.send.addr == self.server:  # the current server stopped answering
            at = self.servers.index(self.server) if self.server in self.servers else -1
            effects += self._move_to(
                self.servers[(at + 1) % len(self.servers)], now, waiting.moves + 1
            )
        if waiting.kind in (ClientWait.HELLO, ClientWait.REGISTER):
            return effects  # the move's own hello is the next try
        moved = Waiting(waiting.kind, waiting.to, waiting.text, moves=waiting.moves + 1)
        self._wait(pending.key, self._moved_send(pending.send), now, moved)
        return effects

    def _moved_send(self, send: Send) -> Send:
        """``send`` for the server moved to (sealed in the new session once it is made)."""
        return Send(send.message, send.data, self.server)

    def _move_to(self, server: Address, now: float, moves: int) -> list[Effect]:
        old, self.server = self.server, server
        self.rekeying = self.session is not None  # joining: the move is the join itself
        line = screen.moving_server(fmt_addr(old), fmt_addr(server))
        return [Show(line), *self._hello(now, moves)]
