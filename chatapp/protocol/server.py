"""The server's rules, as a state machine with no I/O.

The server keeps the client table and a mailbox for clients that are offline.
Everything it must remember across a crash is announced as a ``Persist``
effect, placed before the ACK that depends on it: the runtime commits it
before it sends anything that follows.
"""

from __future__ import annotations

import enum
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import msgspec

from chatapp.protocol.common import (
    Effect,
    IdFactory,
    Log,
    Machine,
    Pending,
    Persist,
    RetryQueue,
    Send,
    Timers,
    dropped,
    send,
)
from chatapp.wire import (
    MAX_DATAGRAM,
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
    StoredItem,
    Table,
    TableEntry,
    encode,
    fmt_addr,
)

#: Bytes of a datagram kept for the envelope when packing entries or stored items.
_ENVELOPE_ALLOWANCE = 256
DEFAULT_MAILBOX_LIMIT = 1000
#: The most ``--mailbox-limit`` allows (the benchmarks use it for "no limit").
MAX_MAILBOX_LIMIT = 100_000_000


class Presence(enum.Enum):
    ONLINE = "online"
    DEREGISTERED = "deregistered"  # went offline with dereg: only reg brings it back
    SILENT = "silent"  # stopped ACKing: any word from its address brings it back


@dataclass(slots=True)
class ClientRecord:
    name: str
    addr: Address
    token: str
    presence: Presence = Presence.ONLINE

    @property
    def online(self) -> bool:
        return self.presence is Presence.ONLINE

    def entry(self) -> TableEntry:
        return TableEntry(self.name, self.addr[0], self.addr[1], self.online)


class WaitKind(enum.Enum):
    TABLE = "table"  # a part of the table, 5 tries
    CHANNEL = "channel"  # a channel message, 1 try
    DELIVER = "deliver"  # a saved direct message the server delivers itself, 1 try
    MAILBOX = "mailbox"  # a batch of stored messages, 5 tries
    CLAIM = "claim"  # is the holder of a name someone else asks for still there? 1 try


@dataclass(frozen=True, slots=True)
class Wait:
    kind: WaitKind
    recipient: str
    item: StoredItem | None = None  # CHANNEL and DELIVER: what to store if it is not ACKed
    reply_to: Address | None = None  # DELIVER: the sender waiting for Saved
    item_ids: tuple[str, ...] = ()  # MAILBOX: the items in the batch
    claim: Register | None = None  # CLAIM: the registration waiting on the answer


@dataclass
class _RecentRequests:
    """Answers to recent requests, by (address, id): a retry is answered again, not redone."""

    capacity: int = 65536
    answers: OrderedDict[tuple[Address, str], list[Send] | None] = field(
        default_factory=OrderedDict
    )

    def lookup(self, key: tuple[Address, str]) -> tuple[bool, list[Send] | None]:
        if key in self.answers:
            return True, self.answers[key]
        return False, None

    def remember(self, key: tuple[Address, str], answer: list[Send] | None) -> None:
        self.answers[key] = answer
        self.answers.move_to_end(key)
        if len(self.answers) > self.capacity:
            self.answers.popitem(last=False)


class ServerProtocol(Machine):
    def __init__(
        self,
        *,
        timers: Timers = Timers(),
        id_prefix: str = "s",
        epoch: int = 0,
        wall_offset: float = 0.0,
        token_factory: Callable[[], str] = lambda: secrets.token_hex(8),
        mailbox_limit: int = DEFAULT_MAILBOX_LIMIT,
    ) -> None:
        """``wall_offset`` turns ``now`` into Unix time for the stored messages' timestamps;
        ``epoch`` orders tables across restarts (a larger one on every start)."""
        self.timers = timers
        self.epoch = epoch
        self.wall_offset = wall_offset
        self.mailbox_limit = mailbox_limit
        self.clients: dict[str, ClientRecord] = {}
        self.mailbox: dict[str, list[StoredItem]] = {}
        self._by_addr: dict[Address, str] = {}
        self._new_id = IdFactory(id_prefix)
        self._new_token = token_factory
        self._retry: RetryQueue[Wait] = RetryQueue(timers)
        self._recent = _RecentRequests()
        self._table_version = 0
        self._table_dirty = False
        self._table_waits: dict[str, list[tuple[Address, str]]] = {}
        self._mailbox_in_flight: dict[str, str] = {}  # recipient -> delivery id
        self._last_table: list[Table] = []  # the parts of the newest table, for claim checks
        self._probes: set[str] = set()  # marked offline in this event: sent the table as a probe

    # --- restoring from the database --------------------------------------------------

    def restore(
        self, clients: Iterable[ClientRecord], mailbox: dict[str, list[StoredItem]]
    ) -> None:
        for record in clients:
            self.clients[record.name] = record
            self._by_addr[record.addr] = record.name
        self.mailbox = {name: list(items) for name, items in mailbox.items() if items}

    def start(self, now: float) -> list[Effect]:
        """After a restart, tell the clients that were online (they may have missed tables)."""
        if any(record.online for record in self.clients.values()):
            self._table_dirty = True
        return self._flush_table(now)

    # --- entry points -----------------------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._retry.next_deadline()

    def handle_timer(self, now: float) -> list[Effect]:
        resends, given_up = self._retry.expire(now)
        effects: list[Effect] = list(resends)
        for pending in given_up:
            effects += self._give_up(pending, now)
        return effects + self._flush_table(now)

    def handle_message(self, message: Message, addr: Address, now: float) -> list[Effect]:
        handler = self._handlers.get(type(message))
        if handler is None:
            return [dropped(message, addr, "the server does not take it")]
        effects = self._presence_by_contact(message, addr, now)
        done, answer = self._recent.lookup((addr, message.id))
        if done and isinstance(message, _REQUESTS):
            # A retry or a late duplicate: answered again (or still waited on), never
            # redone; an old dereg must not take offline a client that has since come back.
            effects += answer or []
        else:
            effects += handler(self, message, addr, now)
        return effects + self._flush_table(now)

    # --- registration -----------------------------------------------------------------

    def _on_register(self, message: Register, addr: Address, now: float) -> list[Effect]:
        holder = self.clients.get(message.name)
        if holder is not None and holder.online and holder.addr != addr:
            return self._challenge_holder(holder, message, addr, now)
        return self._register(message, addr, now)

    def _challenge_holder(
        self, holder: ClientRecord, claim: Register, addr: Address, now: float
    ) -> list[Effect]:
        """Someone else asks for an online name. Its holder may have left without a word
        (Ctrl-C) and be about to come back from another port: ask the holder first, with a
        table it already has (ACKed, not shown), and refuse the claim only if it answers."""
        if not self._last_table:
            return self._refuse_claim(holder, claim, addr)
        self._recent.remember((addr, claim.id), None)  # the claim's retries wait for the answer
        part = self._last_table[0]
        probe = Table(self._new_id(), part.epoch, part.version, part.part, part.parts, part.entries)
        wait = Wait(WaitKind.CLAIM, holder.name, reply_to=addr, claim=claim)
        effect = send(probe, holder.addr)
        return [
            Log(f"{claim.name} asked for from {fmt_addr(addr)}: checking on its holder", "debug"),
            self._retry.start((holder.addr, probe.id), effect, now, wait, tries=1),
        ]

    def _refuse_claim(self, holder: ClientRecord, claim: Register, addr: Address) -> list[Effect]:
        reason = f"the name {claim.name} is online at {fmt_addr(holder.addr)}. Choose another name."
        reply = send(Refused(claim.id, reason), addr)
        self._recent.remember((addr, claim.id), [reply])
        return [Log(f"refused {claim.name} from {fmt_addr(addr)}: name in use"), reply]

    def _register(self, message: Register, addr: Address, now: float) -> list[Effect]:
        holder = self.clients.get(message.name)
        displaced = self._by_addr.get(addr)
        persist_displaced: list[Effect] = []
        if displaced is not None and displaced != message.name:
            self._mark_silent(displaced)
            # Stored too: after a restart the displaced name must not come back online here.
            persist_displaced.append(self._persist_client(self.clients[displaced]))
        if holder is not None:
            self._by_addr.pop(holder.addr, None)
        record = ClientRecord(message.name, addr, self._new_token())
        self.clients[record.name] = record
        self._by_addr[addr] = record.name
        registered = send(Registered(message.id, record.token), addr)
        self._recent.remember((addr, message.id), [registered])
        self._table_dirty = True
        return [
            *persist_displaced,
            self._persist_client(record),
            Log(f"registered {record.name} at {fmt_addr(addr)}"),
            registered,
            *self._start_mailbox(record, now),
        ]

    def _on_deregister(self, message: Deregister, addr: Address, now: float) -> list[Effect]:
        record, refusal = self._authenticate(message.name, message.token, message.id, addr)
        if record is None:
            return refusal
        ack = send(Ack(message.id), addr)
        self._recent.remember((addr, message.id), [ack])
        if record.presence is Presence.DEREGISTERED:
            return [ack]
        self._set_presence(record, Presence.DEREGISTERED)
        return [self._persist_client(record), Log(f"{record.name} deregistered"), ack]

    def _on_reregister(self, message: Reregister, addr: Address, now: float) -> list[Effect]:
        record, refusal = self._authenticate(message.name, message.token, message.id, addr)
        if record is None:
            return refusal
        effects: list[Effect] = []
        if not record.online:
            self._set_presence(record, Presence.ONLINE)
            effects += [self._persist_client(record), Log(f"{record.name} is back online")]
        ack = send(Ack(message.id), addr)
        self._recent.remember((addr, message.id), [ack])
        effects.append(ack)
        return effects + self._start_mailbox(record, now)

    def _on_lookup(self, message: Lookup, addr: Address, now: float) -> list[Effect]:
        record, refusal = self._authenticate(None, message.token, message.id, addr)
        if record is None:
            return refusal
        found = self.clients.get(message.name)
        return [send(LookupResult(message.id, found.entry() if found else None), addr)]

    # --- messages ---------------------------------------------------------------------

    def _on_save(self, message: SaveMessage, addr: Address, now: float) -> list[Effect]:
        key = (addr, message.id)
        sender, refusal = self._authenticate(message.sender, message.token, message.id, addr)
        if sender is None:
            return refusal
        recipient = self.clients.get(message.to)
        if recipient is None:
            return self._refuse(key, f"there is no user named {message.to}.")
        item = StoredItem(message.id, "direct", message.sender, message.text, self._wall(now))
        if recipient.online:
            self._recent.remember(key, None)
            chat = send(Chat(message.id, message.sender, message.text), recipient.addr)
            wait = Wait(WaitKind.DELIVER, recipient.name, item, reply_to=addr)
            return [self._retry.start((recipient.addr, message.id), chat, now, wait, tries=1)]
        return self._store_and_answer(recipient.name, item, addr, message.id)

    def _store_and_answer(
        self, recipient: str, item: StoredItem, sender_addr: Address, request_id: str
    ) -> list[Effect]:
        key = (sender_addr, request_id)
        box = self.mailbox.get(recipient, [])
        if len(box) >= self.mailbox_limit:
            return self._refuse(
                key,
                f"the mailbox of {recipient} is full ({self.mailbox_limit} messages). Try later.",
            )
        answer = send(Saved(request_id, "stored"), sender_addr)
        self._recent.remember(key, [answer])
        return [*self._store(recipient, item), answer]

    def _on_channel_post(self, message: ChannelPost, addr: Address, now: float) -> list[Effect]:
        sender, refusal = self._authenticate(message.sender, message.token, message.id, addr)
        if sender is None:
            return refusal
        ack = send(Ack(message.id), addr)
        self._recent.remember((addr, message.id), [ack])
        item = StoredItem(message.id, "channel", message.sender, message.text, self._wall(now))
        delivery = ChannelDelivery(message.id, message.sender, message.text)
        delivery_data = encode(delivery)  # once for every receiver
        stored: list[Effect] = []
        sent: list[Effect] = []
        for record in self.clients.values():
            if record.name == sender.name:
                continue
            if record.online:
                wait = Wait(WaitKind.CHANNEL, record.name, item)
                effect = Send(delivery, delivery_data, record.addr)
                sent.append(
                    self._retry.start((record.addr, message.id), effect, now, wait, tries=1)
                )
            else:
                stored += self._store(record.name, item, enforce_limit=True)
        log = Log(
            f"channel message from {sender.name}: sent to {len(sent)},"
            f" stored for {sum(isinstance(e, Persist) for e in stored)}"
        )
        return [*stored, log, ack, *sent]

    # --- ACKs -------------------------------------------------------------------------

    def _on_ack(self, message: Ack, addr: Address, now: float) -> list[Effect]:
        pending = self._retry.ack((addr, message.id))
        if pending is None:
            return [
                Log(f"ignored a late or unknown ack {message.id} from {fmt_addr(addr)}", "debug")
            ]
        wait = pending.context
        if wait.kind is WaitKind.TABLE:
            waits = self._table_waits.get(wait.recipient, [])
            if (addr, message.id) in waits:
                waits.remove((addr, message.id))
            return []
        if wait.kind is WaitKind.DELIVER:
            assert wait.item is not None and wait.reply_to is not None
            answer = send(Saved(wait.item.id, "delivered"), wait.reply_to)
            self._recent.remember((wait.reply_to, wait.item.id), [answer])
            return [Log(f"delivered {wait.item.sender}'s message to {wait.recipient}"), answer]
        if wait.kind is WaitKind.MAILBOX:
            return self._mailbox_acked(wait, now)
        if wait.kind is WaitKind.CLAIM:
            assert wait.claim is not None and wait.reply_to is not None
            return self._refuse_claim(self.clients[wait.recipient], wait.claim, wait.reply_to)
        return []

    def _give_up(self, pending: Pending[Wait], now: float) -> list[Effect]:
        wait = pending.context
        record = self.clients.get(wait.recipient)
        if record is None:
            return []
        if wait.kind is WaitKind.CLAIM:
            return self._holder_gone(record, wait, now)
        effects: list[Effect] = []
        if wait.kind in (WaitKind.CHANNEL, WaitKind.DELIVER):
            assert wait.item is not None
            # Stamped now, when it is stored: a message stored at once while this wait ran
            # is older, and the mailbox must stay oldest first by the times it shows.
            item = msgspec.structs.replace(wait.item, stored_at=self._wall(now))
            effects += self._store(record.name, item, enforce_limit=wait.kind is WaitKind.CHANNEL)
        if pending.send.addr == record.addr and record.online:
            self._set_presence(record, Presence.SILENT)
            self._probes.add(record.name)
            effects[:0] = [
                Log(f"no ACK from {record.name} ({wait.kind.value}): marked offline", "warning"),
                self._persist_client(record),
            ]
        if wait.kind is WaitKind.DELIVER:
            assert wait.item is not None and wait.reply_to is not None
            answer = send(Saved(wait.item.id, "stored"), wait.reply_to)
            self._recent.remember((wait.reply_to, wait.item.id), [answer])
            effects.append(answer)
        return effects

    # --- the mailbox ------------------------------------------------------------------

    def _store(self, recipient: str, item: StoredItem, enforce_limit: bool = False) -> list[Effect]:
        box = self.mailbox.setdefault(recipient, [])
        if enforce_limit and len(box) >= self.mailbox_limit:
            return [Log(f"mailbox of {recipient} is full: dropped a channel message", "warning")]
        for stored in box[-8:]:  # a loop, not any(<genexpr>): this runs for every save
            if stored.id == item.id:
                return []  # the same message stored twice (a retry raced a timeout)
        box.append(item)
        return [Persist("store", (recipient, item)), Log(f"stored a message for {recipient}")]

    def _start_mailbox(self, record: ClientRecord, now: float) -> list[Effect]:
        if not self.mailbox.get(record.name) or record.name in self._mailbox_in_flight:
            return []
        delivery = self._new_id()
        self._mailbox_in_flight[record.name] = delivery
        return [
            Log(f"delivering {len(self.mailbox[record.name])} stored messages to {record.name}"),
            self._send_batch(record, delivery, now),
        ]

    def _send_batch(self, record: ClientRecord, delivery: str, now: float) -> Effect:
        box = self.mailbox[record.name]
        items = box[: _fitting(box)]
        batch = Mailbox(self._new_id(), delivery, items)
        wait = Wait(WaitKind.MAILBOX, record.name, item_ids=tuple(item.id for item in items))
        effect = send(batch, record.addr)
        return self._retry.start((record.addr, batch.id), effect, now, wait, self.timers.tries)

    def _mailbox_acked(self, wait: Wait, now: float) -> list[Effect]:
        box = self.mailbox.get(wait.recipient, [])
        count = len(wait.item_ids)
        if tuple(item.id for item in box[:count]) == wait.item_ids:
            # The usual case, the batch still at the front: a slice, not a scan of the whole
            # mailbox per batch (10,000 stored messages would cost 150 scans of thousands).
            remaining = box[count:]
        else:
            delivered = set(wait.item_ids)
            remaining = [item for item in box if item.id not in delivered]
        self.mailbox[wait.recipient] = remaining
        effects: list[Effect] = [Persist("remove", (wait.recipient, wait.item_ids))]
        record = self.clients[wait.recipient]
        delivery = self._mailbox_in_flight.get(wait.recipient)
        if self.mailbox[wait.recipient] and delivery is not None and record.online:
            effects.append(self._send_batch(record, delivery, now))
        else:
            self._mailbox_in_flight.pop(wait.recipient, None)
            if not self.mailbox[wait.recipient]:
                del self.mailbox[wait.recipient]
        return effects

    # --- the table --------------------------------------------------------------------

    def _flush_table(self, now: float) -> list[Effect]:
        """Send the table to every online client, once for all the changes of one event."""
        if not self._table_dirty:
            return []
        self._table_dirty = False
        self._table_version += 1
        entries = [record.entry() for record in sorted(self.clients.values(), key=_by_name)]
        parts = _split(entries)
        messages = [
            Table(self._new_id(), self.epoch, self._table_version, index, len(parts), part)
            for index, part in enumerate(parts)
        ]
        self._last_table = messages
        encoded = [(message, encode(message)) for message in messages]  # once for everyone
        effects: list[Effect] = []
        recipients = 0
        probes, self._probes = self._probes, set()
        for record in self.clients.values():
            # A client just marked offline for not ACKing gets the table too: if it is
            # alive after all (a lost datagram), its ACK brings it back by contact.
            if not record.online and not (
                record.name in probes and record.presence is Presence.SILENT
            ):
                continue
            recipients += 1
            self._cancel_table_waits(record.name)
            keys = self._table_waits.setdefault(record.name, [])
            for message, data in encoded:
                key = (record.addr, message.id)
                keys.append(key)
                wait = Wait(WaitKind.TABLE, record.name)
                effect = Send(message, data, record.addr)
                effects.append(self._retry.start(key, effect, now, wait, self.timers.tries))
        effects.insert(
            0, Log(f"table version {self._table_version} sent to {recipients} clients", "debug")
        )
        return effects

    def _cancel_table_waits(self, name: str) -> None:
        for key in self._table_waits.pop(name, []):
            self._retry.cancel(key)

    # --- presence ---------------------------------------------------------------------

    def _set_presence(self, record: ClientRecord, presence: Presence) -> None:
        record.presence = presence
        self._table_dirty = True
        if presence is not Presence.ONLINE:
            self._cancel_table_waits(record.name)
            self._mailbox_in_flight.pop(record.name, None)

    def _holder_gone(self, holder: ClientRecord, wait: Wait, now: float) -> list[Effect]:
        """The holder of a claimed name did not answer: it is offline, and the claim wins."""
        assert wait.claim is not None and wait.reply_to is not None
        effects: list[Effect] = []
        if holder.online:
            self._set_presence(holder, Presence.SILENT)
            effects += [
                Log(f"no ACK from {holder.name} (claim): marked offline", "warning"),
                self._persist_client(holder),
            ]
        current = self.clients.get(wait.claim.name)
        if current is not None and current.online and current.addr != wait.reply_to:
            return effects + self._refuse_claim(current, wait.claim, wait.reply_to)
        return effects + self._register(wait.claim, wait.reply_to, now)

    def _mark_silent(self, name: str) -> None:
        record = self.clients.get(name)
        if record is not None and record.online:
            self._set_presence(record, Presence.SILENT)

    def _presence_by_contact(self, message: Message, addr: Address, now: float) -> list[Effect]:
        """A client marked offline because it stopped ACKing is online again once it speaks."""
        name = self._by_addr.get(addr)
        if name is None or isinstance(message, (Register, Deregister)):
            return []  # a registration speaks for itself; a dereg is not a return
        record = self.clients[name]
        if record.presence is not Presence.SILENT:
            return []
        self._set_presence(record, Presence.ONLINE)
        return [
            Log(f"heard from {name} again: back online"),
            self._persist_client(record),
            *self._start_mailbox(record, now),
        ]

    # --- helpers ----------------------------------------------------------------------

    def _authenticate(
        self, name: str | None, token: str, request_id: str, addr: Address
    ) -> tuple[ClientRecord | None, list[Effect]]:
        """The record of the client at ``addr`` if ``token`` is its token (and ``name``
        its name)."""
        registered_name = self._by_addr.get(addr)
        record = self.clients.get(registered_name) if registered_name else None
        if record is None or record.token != token or (name is not None and record.name != name):
            who = name or "a client"
            reason = (
                f"{who} is not registered from {fmt_addr(addr)}. Restart the client to join again."
            )
            return None, [
                Log(
                    f"refused a request for {who} from {fmt_addr(addr)}: wrong address or token",
                    "warning",
                ),
                send(Refused(request_id, reason), addr),
            ]
        return record, []

    def _refuse(self, key: tuple[Address, str], reason: str) -> list[Effect]:
        answer = send(Refused(key[1], reason), key[0])
        self._recent.remember(key, [answer])
        return [Log(f"refused a request from {fmt_addr(key[0])}: {reason}"), answer]

    def _persist_client(self, record: ClientRecord) -> Persist:
        return Persist(
            "client",
            (record.name, record.addr[0], record.addr[1], record.token, record.presence.value),
        )

    def _wall(self, now: float) -> float:
        return now + self.wall_offset

    _handlers: ClassVar[dict[type, Callable[..., list[Effect]]]] = {
        Register: _on_register,
        Deregister: _on_deregister,
        Reregister: _on_reregister,
        Lookup: _on_lookup,
        SaveMessage: _on_save,
        ChannelPost: _on_channel_post,
        Ack: _on_ack,
    }


#: Requests whose answers the server remembers, so that a repeat is answered, not redone.
_REQUESTS = (Register, Deregister, Reregister, SaveMessage, ChannelPost)


def _by_name(record: ClientRecord) -> str:
    return record.name


_item_encoder = msgspec.json.Encoder()
T = TypeVar("T", TableEntry, StoredItem)


def _fitting(items: list[T], start: int = 0) -> int:
    """The end of the run of ``items`` from ``start`` that fits in one datagram (at
    least one item, so that a part is never empty)."""
    budget = MAX_DATAGRAM - _ENVELOPE_ALLOWANCE
    end = start
    while end < len(items):
        budget -= len(_item_encoder.encode(items[end])) + 1  # the item and its comma
        if budget < 0 and end > start:
            break
        end += 1
    return end


def _split(entries: list[TableEntry]) -> list[list[TableEntry]]:
    """The table in parts that each fit in one datagram (always at least one part)."""
    parts: list[list[TableEntry]] = []
    start = 0
    while start < len(entries) or not parts:
        end = _fitting(entries, start)
        parts.append(entries[start:end])
        start = end
    return parts
