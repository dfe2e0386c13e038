"""What every part of the server's state machine stands on: its state, how it seals
what it sends, presence, and the table.

The server's rules are split over five modules, each a layer of one class:
``server_core`` (this), ``presence`` (who is online, the table's updates),
``sharing`` (other servers' changes to a shared database), ``server_delivery``
(saves, relays, the delivery stream, channel messages) and ``server`` (the
handshake, the requests, and the table of handlers).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

from chatapp.protocol.changes import ClientRecord
from chatapp.protocol.codecs import Sender, ServerCodec, UnknownSession, Via
from chatapp.protocol.common import (
    Effect,
    Log,
    Pending,
    RecentAnswers,
    Send,
    Timers,
    TokenBucket,
)
from chatapp.protocol.crypto import (
    KEY_BYTES,
    REKEY_DOMAIN,
    SID_BYTES,
    Entropy,
    Identity,
    new_message_id,
)
from chatapp.protocol.machine import Machine
from chatapp.protocol.mailbox import Mailboxes
from chatapp.protocol.roster import Roster
from chatapp.protocol.sealing import SESSION_KIND, Session
from chatapp.protocol.tables import Followers, Window
from chatapp.protocol.waits import ServerWait
from chatapp.wire import (
    Address,
    Message,
    Refused,
    Rekey,
    StoredItem,
    WireError,
    encode,
    fmt_addr,
)

#: Rekeys the server signs for sessions it does not know, at most, per second (and at once).
REKEY_RATE = (100.0, 100.0)


@dataclass(frozen=True, slots=True)
class Waiting:
    """A pending request: its row in the table of waits, and what its handlers need."""

    kind: ServerWait
    recipient: str
    items: tuple[StoredItem, ...] = ()  # MAILBOX, RELAY: the stored items in flight
    reply_to: str = ""  # RELAY: who waits on `saved`; CHANNEL: who posted it
    request_id: str = ""  # RELAY: the save's id


class ServerCore(Machine[Waiting]):
    codec: ServerCodec

    def __init__(
        self,
        *,
        identity: Identity,
        entropy: Entropy,
        timers: Timers,
        epoch: int,
        wall_offset: float,
        mailboxes: Mailboxes,
        table_window: Window,
    ) -> None:
        """``table_window`` bounds the table's updates unanswered at once (their ACKs must
        fit in the socket's receive buffer)."""
        super().__init__(timers)
        self.identity = identity
        self.entropy = entropy
        self.codec = ServerCodec(identity)
        self.roster = Roster(epoch)
        self.followers = Followers(table_window)  # who holds which version of the table
        self.wall_offset = wall_offset
        self.mailboxes = mailboxes
        self.boot = entropy.token_bytes(SID_BYTES)  # this run of the server, in every rekey
        self.cookie_secret = entropy.token_bytes(KEY_BYTES)
        self.started_at = 0.0  # the cookies' clock starts here
        self._recent = RecentAnswers()
        self._rekeys = TokenBucket(*REKEY_RATE)
        self._returning: set[str] = set()  # asked to rekey after a restart, not yet back
        #: The keys of the clients whose registrations were answered since the checkpoint
        #: (a refusal must be boxed to the key, should the commit fail).
        self._registering: dict[Hashable, bytes] = {}
        self._sessions_ended: dict[bytes, Session] = {}  # since the checkpoint
        #: The clients that other servers sharing the database serve (``sharing``).
        self.elsewhere: set[str] = set()

    @property
    def clients(self) -> dict[str, ClientRecord]:
        """Every client's record, by name."""
        return self.roster.clients

    def new_id(self) -> str:
        return new_message_id(self.entropy)

    # --- sealing what the server sends ----------------------------------------------

    def _session_of(self, record: ClientRecord) -> Session | None:
        return self.codec.sessions.get(record.sid) if record.sid else None

    def _to_client(self, record: ClientRecord, message: Message) -> Send | None:
        """``message`` sealed in ``record``'s session (None: it has none, as after a restart)."""
        session = self._session_of(record)
        if session is None:
            return None
        return Send(message, self.codec.seal(session, message), record.addr)

    def _answer(self, record: ClientRecord, answer: Message) -> list[Effect]:
        """The answer to ``record``'s request ``answer.id``, remembered for its retries."""
        send = self._to_client(record, answer)
        self._recent.remember((record.name, answer.id), [send] if send else [])
        return [send] if send else []

    def _replay_answer(self, record: ClientRecord, answer: list[Send] | None) -> list[Effect]:
        """A remembered answer again, sealed afresh (a session never repeats a counter)."""
        sends = [self._to_client(record, send.message) for send in answer or []]
        return [send for send in sends if send is not None]

    def _refuse(self, record: ClientRecord, request_id: str, reason: str) -> list[Effect]:
        log = Log(f"refused a request from {record.name}: {reason}")
        return [log, *self._answer(record, Refused(request_id, reason))]

    def _reseal(self, pending: Pending[Waiting]) -> Send | None:
        message = pending.send.message
        if isinstance(message, Rekey):
            return pending.send  # signed, not sealed: the same bytes again
        record = self.clients.get(pending.context.recipient)
        return self._to_client(record, message) if record is not None else None

    def _from_addressee(self, pending: Pending[Waiting], message: Message, sender: Sender) -> bool:
        return sender.via is Via.CLIENT and sender.name == pending.context.recipient

    def _may_give_up(self, pending: Pending[Waiting]) -> bool:
        return pending.context.recipient in self.clients

    def _undecodable(self, error: WireError, addr: Address, now: float) -> list[Effect]:
        """A session the server does not know (it restarted, or forgot): tell the client
        to register again, in a rekey signed by the server's key (rate-limited: a
        signature costs more than a forged datagram)."""
        if not isinstance(error, UnknownSession) or not self._rekeys.take(now):
            return super()._undecodable(error, addr, now)
        sig = self.identity.sign(REKEY_DOMAIN, error.sid, self.boot)
        rekey = Rekey(self.new_id(), error.sid, self.boot, sig)
        log = Log(f"{error} from {fmt_addr(addr)}: asked it to rekey", "debug")
        return [log, Send(rekey, encode(rekey), addr)]

    def _sent_in_current_session(self, pending: Pending[Waiting], record: ClientRecord) -> bool:
        data = pending.send.data
        if data[:1] != bytes((SESSION_KIND,)):
            return pending.send.addr == record.addr
        return data[1 : 1 + SID_BYTES] == record.sid

    def _stop_stream(self, name: str) -> list[Effect]:
        """Nothing more goes to ``name`` in its delivery under way (overridden by the
        delivery layer: a relay's sender is told the message is stored)."""
        self.mailboxes.flights.pop(name, None)
        return []

    def _end_session(self, record: ClientRecord) -> None:
        session = self.codec.sessions.pop(record.sid, None) if record.sid else None
        if session is not None:  # given back if the database still names it (a rollback)
            self._sessions_ended.setdefault(session.sid, session)

    def _new_session(self, record: ClientRecord) -> Session:
        session = Session(
            self.entropy.token_bytes(SID_BYTES), self.entropy.token_bytes(KEY_BYTES), record.name
        )
        self._end_session(record)
        record.sid = session.sid
        self.codec.sessions[session.sid] = session
        return session

    def _wall(self, now: float) -> float:
        return now + self.wall_offset
