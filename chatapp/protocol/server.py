"""The server's rules, as a state machine with no I/O.

The server keeps the client table, the binding of each name to its key, and a
delivery stream per recipient. Everything it must remember across a crash is
announced as a change (``chatapp.protocol.changes``), placed before the answer
that depends on it: the runtime commits it before it sends anything that
follows. What happens to each pending request is in its row of
``chatapp.protocol.waits.ServerWait``. This module holds the handshake, the
requests and the table of handlers; ``server_core`` and ``server_delivery``
the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import ClassVar

from chatapp.protocol.changes import ClientRecord, ClientSaved, Presence
from chatapp.protocol.codecs import Sender, Via
from chatapp.protocol.common import Effect, Exit, Log, Pending, Send, Timers, dropped
from chatapp.protocol.crypto import (
    BOX_NONCE_BYTES,
    REGISTER_DOMAIN,
    REKEY_DOMAIN,
    BadKey,
    Entropy,
    Identity,
    SystemEntropy,
    cookie,
    fingerprint,
    verify,
)
from chatapp.protocol.mailbox import DEFAULT_MAILBOX_LIMIT, Mailboxes
from chatapp.protocol.server_core import Waiting
from chatapp.protocol.server_delivery import ServerDelivery
from chatapp.protocol.sharing import Disk
from chatapp.protocol.tables import Window
from chatapp.protocol.waits import ServerWait
from chatapp.wire import (
    Ack,
    Address,
    Challenge,
    ChannelPost,
    Deregister,
    Hello,
    Lookup,
    LookupResult,
    Message,
    Refused,
    Register,
    Registered,
    Rekey,
    Reregister,
    Saved,
    SaveMessage,
    StoredItem,
    TableAck,
    encode,
    fmt_addr,
)

#: Seconds a cookie's time bucket lasts; a cookie is good in its bucket and the next.
COOKIE_PERIOD = 30.0
#: The reason given with a ``storage`` refusal.
CANNOT_STORE = "the server cannot store anything right now (its database failed)."


class ServerProtocol(ServerDelivery):
    def __init__(
        self,
        *,
        identity: Identity,
        entropy: Entropy | None = None,
        timers: Timers = Timers(),
        epoch: int = 0,
        wall_offset: float = 0.0,
        mailbox_limit: int = DEFAULT_MAILBOX_LIMIT,
        origin: str = "",
        last_n: int = 0,
        table_window: Window = Window(),
    ) -> None:
        """``wall_offset`` turns ``now`` into Unix time for the stored messages' timestamps;
        ``epoch`` tells tables of one start from another's (a new one on every start);
        ``origin`` and ``last_n`` are the store's sequence numbers (a fresh origin by
        default); ``table_window`` bounds the table's updates unanswered at once."""
        entropy = entropy or SystemEntropy()
        origin = origin or entropy.token_bytes(8).hex()
        super().__init__(
            identity=identity,
            entropy=entropy,
            timers=timers,
            epoch=epoch,
            wall_offset=wall_offset,
            mailboxes=Mailboxes(mailbox_limit, origin, last_n),
            table_window=table_window,
        )
        self._unstored = {}

    # --- restoring from the database --------------------------------------------------

    def restore(
        self,
        clients: Iterable[ClientRecord],
        mailbox: dict[str, list[StoredItem]],
        elsewhere: Iterable[str] = (),
    ) -> None:
        """``elsewhere``: the clients other servers sharing the database serve."""
        self.roster.restore(clients)
        self.mailboxes.restore(mailbox)
        self.elsewhere = set(elsewhere)

    @property
    def mailbox(self) -> dict[str, list[StoredItem]]:
        """The stored messages, by recipient, oldest first."""
        return {name: list(box.values()) for name, box in self.mailboxes.boxes.items()}

    def checkpoint(self) -> None:
        super().checkpoint()
        self._recent.checkpoint()
        self.roster.checkpoint()
        self.followers.checkpoint()
        self._registering.clear()
        self._sessions_ended.clear()

    def rollback(self, disk: Disk, now: float) -> list[Effect]:
        """The database did not take the changes made since the last checkpoint, and none
        of their effects went out: forget them, go back to what ``disk`` (the database)
        holds, and refuse every request that asked for a change (never "done"; a retry
        is redone). What goes back: the records, with each name's binding to its key and
        its session id; the sessions (made since: forgotten; ended since: back); the
        table, to its version at the checkpoint, and what the server knows of each
        client's copy (the updates started since are dropped: no client hears of a
        change the database does not hold); the stored messages; the deliveries under
        way. The sequence counter does not go back (a number given and lost is skipped,
        never given twice). A database that is not this server's any more (another
        key, another origin) stops it."""
        if disk.key != self.identity.seed or disk.origin != self.mailboxes.origin:
            why = "the database holds another server's key or counter now: stopping"
            return [Log(why, "warning", summary=True), Exit(1)]
        ended = self._end_waits_since_checkpoint()
        self.roster.reload(disk.clients)
        self.elsewhere = set(disk.elsewhere)
        online = {r.name for r in disk.clients if r.online and r.name not in self.elsewhere}
        self._end_waits(self.followers.reload(online, self.roster.clients, ended))
        # The sessions the database names: those made since are forgotten, those ended
        # since (a registration again, a displacement) come back.
        sids = {record.sid for record in self.clients.values()}
        sessions = {**self._sessions_ended, **self.codec.sessions}
        self.codec.sessions = {s: v for s, v in sessions.items() if s in sids}
        self._sessions_ended.clear()
        flights = self.mailboxes.flights
        delivering = {name for name, f in flights.items() if f.wait in self._retry}
        self.mailboxes.reload(disk.mailbox, delivering=delivering)
        self.mailboxes.last_n = max(self.mailboxes.last_n, disk.last_n)
        answers = self._recent.forget_since_checkpoint(self._storage_refusal)
        self._registering.clear()
        refused = sum(
            isinstance(send.message, Refused) and send.message.cause == "storage"
            for send in answers
        )
        log = Log(f"rolled back to what the database holds; refused {refused} requests it needed")
        # What is stored goes on to the recipients online (a batch whose ACK the database
        # did not take comes again: the client ACKs it and shows nothing twice).
        resumed = [
            e for r in self.clients.values() if r.name not in self.elsewhere
            for e in self._start_stream(r, now)
        ]  # fmt: skip
        return [log, *answers, *self._flush_table(now), *resumed]

    def _storage_refusal(self, key: tuple[Hashable, str], answer: list[Send]) -> Send | None:
        """None if ``answer`` stands without the database (a refusal; a message delivered,
        or stored by an earlier commit), else the refusal that replaces it: in the
        client's session, or boxed to its key (a registration)."""
        if all(self._stands(send.message, key) for send in answer):
            return None
        refusal = Refused(key[1], CANNOT_STORE, "storage")
        who = key[0]
        if isinstance(who, str):
            record = self.clients.get(who)
            return self._to_client(record, refusal) if record is not None else None
        client_key = self._registering.get(key)
        if client_key is None:
            return None
        nonce = self.entropy.token_bytes(BOX_NONCE_BYTES)
        return Send(refusal, self.codec.box_answer(client_key, nonce, refusal), answer[0].addr)

    def _stands(self, answer: Message, key: tuple[Hashable, str]) -> bool:
        if isinstance(answer, Refused):
            return True
        if not isinstance(answer, Saved):
            return False
        # "stored" for a message the database holds (a relay cut short by this event)
        stored = any(key in box for box in self.mailboxes.boxes.values())
        return answer.outcome == "delivered" or stored

    def start(self, now: float) -> list[Effect]:
        """After a restart, ask every client that was online to register again: the
        sessions' keys were not kept. One that does not is marked offline. The table
        goes out once they are all back (or their waits ran out), not once for each."""
        self.started_at = now
        effects: list[Effect] = []
        for record in self.clients.values():
            if record.online and record.sid and record.name not in self.elsewhere:
                effects.append(self._ask_to_rekey(record, now))
                self._returning.add(record.name)
        return effects

    def _ask_to_rekey(self, record: ClientRecord, now: float) -> Effect:
        """A rekey to ``record``'s session, signed: register again (here)."""
        sig = self.identity.sign(REKEY_DOMAIN, record.sid, self.boot)
        rekey = Rekey(self.new_id(), record.sid, self.boot, sig)
        send = Send(rekey, encode(rekey), record.addr)
        waiting = Waiting(ServerWait.REKEY, record.name)
        return self._wait(("rekey", record.name), send, now, waiting)

    # --- entry points -----------------------------------------------------------------

    def handle_timer(self, now: float) -> list[Effect]:
        effects = self._expired(now)
        self._slow_down_if_resent(effects, now)
        return effects + self._flushed(now)

    def _flushed(self, now: float) -> list[Effect]:
        """What goes once for all the changes of one event: the table, the notices."""
        return self._flush_table(now) + self._flush_notices(now)

    def handle_message(self, message: Message, sender: Sender, now: float) -> list[Effect]:
        handler = self._handlers.get((type(message), sender.via))
        if handler is None:
            why = f"the server does not take it ({sender.via.value})"
            return [dropped(message, sender.addr, why)]
        if sender.via is Via.CLIENT:
            effects = self._from_client(handler, message, self.clients[sender.name], now)
        else:
            effects = handler(self, message, sender, now)
        return effects + self._flushed(now)

    def _from_client(
        self,
        handler: Callable[..., list[Effect]],
        message: Message,
        record: ClientRecord,
        now: float,
    ) -> list[Effect]:
        effects = self._presence_by_contact(message, record, now)
        done, answer = self._recent.lookup((record.name, message.id))
        if done and isinstance(message, _REQUESTS):
            # A retry or a late duplicate: answered again (or still waited on), never
            # redone; an old dereg must not take offline a client that has since come back.
            return effects + self._replay_answer(record, answer)
        return effects + handler(self, message, record, now)

    # --- the handshake ----------------------------------------------------------------

    def _on_hello(self, message: Hello, sender: Sender, now: float) -> list[Effect]:
        return [self._challenge(message, sender.addr, now)]

    def _challenge(self, asked: Hello | Register, addr: Address, now: float) -> Send:
        """A challenge, and nothing kept: the cookie remembers for the server. No bigger
        than the hello, so that a forged source address gains an attacker nothing."""
        challenge = Challenge(
            asked.id, self.identity.public, self._cookie(asked, addr, self._bucket(now))
        )
        return Send(challenge, encode(challenge), addr)

    def _cookie(self, asked: Hello | Register, addr: Address, bucket: int) -> bytes:
        fields = (addr[0].encode(), str(addr[1]).encode(), asked.name.encode(), asked.key)
        return cookie(self.cookie_secret, *fields, str(asked.port).encode(), str(bucket).encode())

    def _bucket(self, now: float) -> int:
        return int((now - self.started_at) // COOKIE_PERIOD)

    def _on_register(self, message: Register, sender: Sender, now: float) -> list[Effect]:
        addr = sender.addr
        done, answer = self._recent.lookup((addr, message.id))
        if done:
            return list(answer or [])  # the same answer (the same session) for a retry
        bucket = self._bucket(now)
        if message.cookie not in (self._cookie(message, addr, b) for b in (bucket, bucket - 1)):
            log = Log(f"a stale cookie from {fmt_addr(addr)}: challenged again", "debug")
            return [log, self._challenge(message, addr, now)]
        port = str(message.port).encode()
        signed = (self.identity.public, message.cookie, message.name.encode(), port)
        if not verify(message.key, message.sig, REGISTER_DOMAIN, *signed):
            return [Log(f"a register from {fmt_addr(addr)} whose signature fails", "warning")]
        holder = self.clients.get(message.name)
        if holder is not None and holder.key != message.key:
            # Bound to another key: refused, and the holder is not disturbed at all.
            why = f"the name {message.name} belongs to another key. Choose another name."
            return self._refuse_registration(message, addr, why)
        return self._register(message, addr, now)

    def _register(self, message: Register, addr: Address, now: float) -> list[Effect]:
        effects: list[Effect] = []
        displaced = self.roster.name_at(addr)
        if displaced is not None and displaced != message.name:
            effects += self._displace(self.clients[displaced])
        holder = self.clients.get(message.name)
        # New: unbound, or bound by a registration that has not completed either.
        new = holder is None or self.followers.joined_new(message.name)
        record = ClientRecord(message.name, addr, message.key, holder.sid if holder else b"")
        session = self._new_session(record)
        self.elsewhere.discard(record.name)  # a client of another server moved here
        effects += self._stop_stream(message.name)  # what went in the old session is lost
        self.roster.add(record)
        self._end_waits(self.followers.joined(record.name, new=new))
        self._end_rekey_wait(message, now)
        granted = Registered(message.id, session.sid, session.key, self.boot)
        nonce = self.entropy.token_bytes(BOX_NONCE_BYTES)
        registered = Send(granted, self.codec.box_answer(message.key, nonce, granted), addr)
        self._recent.remember((addr, message.id), [registered])
        self._registering[(addr, message.id)] = message.key
        bound = "" if holder else f" (name bound to key {fingerprint(message.key)})"
        log = Log(f"registered {record.name} at {fmt_addr(addr)}{bound}")
        effects += [ClientSaved.of(record), log, registered]
        return effects + self._start_stream(record, now)

    def _refuse_registration(self, message: Register, addr: Address, why: str) -> list[Effect]:
        refusal = Refused(message.id, why)
        try:
            boxed = self.codec.box_answer(
                message.key, self.entropy.token_bytes(BOX_NONCE_BYTES), refusal
            )
        except BadKey:
            return [Log(f"a register from {fmt_addr(addr)} with a key that is not one", "warning")]
        reply = Send(refusal, boxed, addr)
        self._recent.remember((addr, message.id), [reply])
        return [Log(f"refused {message.name} from {fmt_addr(addr)}: {why}"), reply]

    def _end_rekey_wait(self, message: Register, now: float) -> None:
        pending = self._retry.end(("rekey", message.name))
        if pending is not None:
            getattr(self, pending.context.kind.rule.on_answer)(pending, message, now)

    def _rekeyed(self, pending: Pending[Waiting], answer: Register, now: float) -> list[Effect]:
        return []  # the registration that ended the wait did the rest

    def _rekey_lost(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        record = self.clients[pending.context.recipient]
        if not record.online or record.name in self.elsewhere:  # another server has it
            return []
        effects = self._set_presence(record, Presence.SILENT)
        log = Log(f"{record.name} did not come back after the restart: marked offline")
        return [log, ClientSaved.of(record), *effects]

    # --- requests in a session ------------------------------------------------------

    def _on_deregister(self, message: Deregister, record: ClientRecord, now: float) -> list[Effect]:
        if message.name != record.name:
            return self._refuse(record, message.id, f"you can only deregister {record.name}.")
        ack = self._answer(record, Ack(message.id))
        if record.presence is Presence.DEREGISTERED:
            return ack
        stopped = self._set_presence(record, Presence.DEREGISTERED)
        return [ClientSaved.of(record), Log(f"{record.name} deregistered"), *stopped, *ack]

    def _on_reregister(self, message: Reregister, record: ClientRecord, now: float) -> list[Effect]:
        if message.name != record.name:
            return self._refuse(record, message.id, f"you can only register {record.name}.")
        effects: list[Effect] = []
        if not record.online:
            effects += self._set_presence(record, Presence.ONLINE)
            effects += [ClientSaved.of(record), Log(f"{record.name} is back online")]
        effects += self._answer(record, Ack(message.id))
        return effects + self._restart_stream(record, now)

    def _on_lookup(self, message: Lookup, record: ClientRecord, now: float) -> list[Effect]:
        found = self.clients.get(message.name)
        result = LookupResult(message.id, found.entry() if found else None)
        send = self._to_client(record, result)
        return [send] if send else []

    def _on_ack(self, message: Ack | TableAck, record: ClientRecord, now: float) -> list[Effect]:
        sender = Sender(Via.CLIENT, record.addr, record.name)
        return self._answered((record.name, message.id), message, sender, now)

    def _presence_by_contact(
        self, message: Message, record: ClientRecord, now: float
    ) -> list[Effect]:
        """A client marked offline because it stopped ACKing is online again once it speaks."""
        if record.presence is not Presence.SILENT or isinstance(message, Deregister):
            return []  # a dereg is not a return
        self._set_presence(record, Presence.ONLINE)
        return [
            Log(f"heard from {record.name} again: back online"),
            ClientSaved.of(record),
            *self._restart_stream(record, now),
        ]

    #: What the server takes, by message type and how its sender was authenticated:
    #: anything else is dropped (a handshake message in a session, a request in the clear).
    _handlers: ClassVar[dict[tuple[type, Via], Callable[..., list[Effect]]]] = {
        (Hello, Via.PLAIN): _on_hello,
        (Register, Via.PLAIN): _on_register,
        (Deregister, Via.CLIENT): _on_deregister,
        (Reregister, Via.CLIENT): _on_reregister,
        (Lookup, Via.CLIENT): _on_lookup,
        (SaveMessage, Via.CLIENT): ServerDelivery._on_save,
        (ChannelPost, Via.CLIENT): ServerDelivery._on_channel_post,
        (Ack, Via.CLIENT): _on_ack,
        (TableAck, Via.CLIENT): _on_ack,
    }


#: Requests whose answers the server remembers, so that a repeat is answered, not redone.
_REQUESTS = (Deregister, Reregister, SaveMessage, ChannelPost)
