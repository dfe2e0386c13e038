"""The server's delivery rules: saves, relays, each recipient's delivery stream, and
channel messages (a layer of the server's state machine, on ``sharing``; see
``server_core``).

A save is stored first, with its place in the recipient's stream (the
mailbox limit is checked then, on every path), and committed before anything
that depends on it leaves. For a recipient that is online with nothing in
flight, it then goes at once as a ``relay`` (one try); otherwise it waits its
turn in the stream, delivered in batches (``mailbox``), oldest first, one in
flight at a time, each item deleted only once its batch is ACKed.
"""

from __future__ import annotations

from chatapp.protocol.changes import ClientRecord, MessageStored
from chatapp.protocol.common import Effect, Log, Pending, Send
from chatapp.protocol.crypto import CHANNEL_DOMAIN, verify
from chatapp.protocol.mailbox import Flight
from chatapp.protocol.sealing import TO_CLIENT, parse_peer
from chatapp.protocol.server_core import Waiting
from chatapp.protocol.sharing import ServerSharing
from chatapp.protocol.waits import ServerWait
from chatapp.wire import (
    NOT_STORED_NAMES,
    Ack,
    ChannelDelivery,
    ChannelPost,
    Mailbox,
    NotStored,
    Relay,
    Saved,
    SaveMessage,
    StoredItem,
    WireError,
    encode,
)


class ServerDelivery(ServerSharing):
    # (poster, post id) -> the recipients whose copy could not be stored, this event
    _unstored: dict[tuple[str, str], list[str]]

    # --- saves --------------------------------------------------------------------------

    def _on_save(self, message: SaveMessage, record: ClientRecord, now: float) -> list[Effect]:
        recipient = self.clients.get(message.to)
        if recipient is None:
            return self._refuse(record, message.id, f"there is no user named {message.to}.")
        if not _sealed_by(message.sealed, record.name):
            return self._refuse(record, message.id, "a saved message must be sealed by you.")
        if self.mailboxes.holds(recipient.name, record.name, message.id):
            # Stored already: the client re-sent it after a rekey, in a new session.
            return self._answer(record, Saved(message.id, "stored"))
        stored = self.mailboxes.store(
            recipient.name,
            "direct",
            record.name,
            message.id,
            self._wall(now),
            sealed=message.sealed,
        )
        if stored is None:
            limit = self.mailboxes.limit
            why = f"the mailbox of {recipient.name} is full ({limit} messages). Try later."
            return self._refuse(record, message.id, why)
        effects: list[Effect] = [stored, Log(f"stored a message for {recipient.name}")]
        if self._may_relay(recipient, stored.item):
            relay = self._send_relay(recipient, stored.item, record.name, message.id, now)
            if relay:
                self._recent.remember((record.name, message.id), None)  # answered by the relay
                return effects + relay
        effects += self._answer(record, Saved(message.id, "stored"))
        return effects + self._start_stream(recipient, now)

    def _may_relay(self, recipient: ClientRecord, item: StoredItem) -> bool:
        """A save goes at once to a recipient that is online when nothing is in flight to
        it and nothing older waits for it."""
        idle = recipient.name not in self.mailboxes.flights
        return recipient.online and idle and self.mailboxes.head(recipient.name) is item

    def _send_relay(
        self, recipient: ClientRecord, item: StoredItem, sender: str, request_id: str, now: float
    ) -> list[Effect]:
        relay = Relay(self.new_id(), item.seq, item.sealed, self._keys_of([item])[item.sender])
        send = self._to_client(recipient, relay)
        if send is None:
            return []
        key = (recipient.name, relay.id)
        self.mailboxes.flights[recipient.name] = Flight(relay.id, key)
        waiting = Waiting(ServerWait.RELAY, recipient.name, (item,), sender, request_id)
        return [self._wait(key, send, now, waiting)]

    def _keys_of(self, items: list[StoredItem]) -> dict[str, bytes]:
        """The senders' keys, as bound now: a client opens and verifies what it is
        delivered with them, even from a sender that joined while it was offline (its
        table is older). The server vouches for them as it does for its tables."""
        keys: dict[str, bytes] = {}
        for item in items:
            record = self.clients.get(item.sender)
            keys[item.sender] = record.key if record is not None else bytes(32)
        return keys

    def _relay_acked(self, pending: Pending[Waiting], answer: Ack, now: float) -> list[Effect]:
        waiting = pending.context
        self.mailboxes.flights.pop(waiting.recipient, None)
        removed = self.mailboxes.remove(waiting.recipient, list(waiting.items))
        log = Log(f"delivered {waiting.reply_to}'s message to {waiting.recipient}")
        effects: list[Effect] = [removed, log, *self._answer_saved(waiting, "delivered")]
        record = self.clients.get(waiting.recipient)
        return effects + (self._start_stream(record, now) if record else [])

    def _relay_lost(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        """The recipient did not ACK: it is offline, and the message stays stored."""
        self.mailboxes.flights.pop(pending.context.recipient, None)
        marked = self._no_ack_from(self.clients[pending.context.recipient], pending)
        return [*marked, *self._answer_saved(pending.context, "stored")]

    def _answer_saved(self, waiting: Waiting, outcome: str) -> list[Effect]:
        sender = self.clients.get(waiting.reply_to)
        if sender is None:
            return []
        return self._answer(sender, Saved(waiting.request_id, outcome))  # type: ignore[arg-type]

    # --- the delivery stream ------------------------------------------------------------

    def _start_stream(self, record: ClientRecord, now: float) -> list[Effect]:
        """Deliver what is stored for ``record``, oldest first, unless a delivery is under
        way already."""
        name = record.name
        if not record.online or name in self.mailboxes.flights or not self.mailboxes.count(name):
            return []
        flight = Flight(self.new_id())
        self.mailboxes.flights[name] = flight
        log = Log(f"delivering {self.mailboxes.count(name)} stored messages to {name}")
        return [log, *self._send_batch(record, flight, now)]

    def _restart_stream(self, record: ClientRecord, now: float) -> list[Effect]:
        """Start the stream again from the oldest stored item (a registration, a ``reg``,
        a return by contact: what was in flight may never have arrived)."""
        return self._stop_stream(record.name) + self._start_stream(record, now)

    def _stop_stream(self, name: str) -> list[Effect]:
        flight = self.mailboxes.flights.pop(name, None)
        pending = self._retry.end(flight.wait) if flight and flight.wait else None
        if pending is None or not pending.context.reply_to:
            return []
        return self._answer_saved(pending.context, "stored")  # a relay cut short: stored

    def _send_batch(self, record: ClientRecord, flight: Flight, now: float) -> list[Effect]:
        items = self.mailboxes.next_batch(record.name)
        batch = Mailbox(self.new_id(), flight.delivery, items, self._keys_of(items))
        send = self._to_client(record, batch)
        if send is None:
            self.mailboxes.flights.pop(record.name, None)
            return []
        flight.wait = (record.name, batch.id)
        waiting = Waiting(ServerWait.MAILBOX, record.name, tuple(items))
        return [self._wait(flight.wait, send, now, waiting)]

    def _batch_acked(self, pending: Pending[Waiting], answer: Ack, now: float) -> list[Effect]:
        name = pending.context.recipient
        effects: list[Effect] = [self.mailboxes.remove(name, list(pending.context.items))]
        flight = self.mailboxes.flights.get(name)
        record = self.clients.get(name)
        if flight and record and record.online and self.mailboxes.count(name):
            effects += self._send_batch(record, flight, now)
        else:
            self.mailboxes.flights.pop(name, None)
        return effects

    # --- channel messages ---------------------------------------------------------------

    def _on_channel_post(
        self, message: ChannelPost, record: ClientRecord, now: float
    ) -> list[Effect]:
        signed = (record.name.encode(), message.id.encode(), message.text.encode())
        if not verify(record.key, message.sig, CHANNEL_DOMAIN, *signed):
            return self._refuse(record, message.id, "the message's signature does not verify.")
        ack = self._answer(record, Ack(message.id))
        delivery = ChannelDelivery(
            self.new_id(), record.name, message.id, message.text, message.sig, record.key
        )
        plaintext = encode(delivery)  # once for every receiver
        stored: list[Effect] = []
        sent: list[Effect] = []
        for other in self.clients.values():
            session = self._session_of(other) if other.online else None
            if other.name == record.name:
                continue
            if session is not None:
                send = Send(delivery, session.seal_bytes(TO_CLIENT, plaintext), other.addr)
                waiting = Waiting(ServerWait.CHANNEL, other.name, reply_to=record.name)
                sent.append(self._wait((other.name, delivery.id), send, now, waiting))
            else:
                stored += self._store_channel(other.name, delivery, now)
        log = Log(
            f"channel message from {record.name}: sent to {len(sent)},"
            f" stored for {sum(isinstance(e, MessageStored) for e in stored)}"
        )
        return [*stored, log, *ack, *sent]

    def _store_channel(self, name: str, delivery: ChannelDelivery, now: float) -> list[Effect]:
        """Keep a channel message for ``name``; if its mailbox is full, its poster is told."""
        stored = self.mailboxes.store(
            name, "channel", delivery.sender, delivery.post, self._wall(now),
            text=delivery.text, sig=delivery.sig,
        )  # fmt: skip
        if stored is not None:
            return [stored, Log(f"stored a message for {name}")]
        if self.mailboxes.holds(name, delivery.sender, delivery.post):
            return []
        self._unstored.setdefault((delivery.sender, delivery.post), []).append(name)
        return [Log(f"mailbox of {name} is full: a channel message was not stored", "warning")]

    def _relay_channel(self, record: ClientRecord, item: StoredItem, now: float) -> list[Effect]:
        """A channel message another server stored for ``record``'s client, live, as it
        would have gone from here; it leaves the database once ACKed."""
        key = self._keys_of([item])[item.sender]
        delivery = ChannelDelivery(self.new_id(), item.sender, item.id, item.text, item.sig, key)
        send = self._to_client(record, delivery)
        if send is None:
            return []
        waiting = Waiting(ServerWait.CHANNEL, record.name, (item,), reply_to=item.sender)
        return [self._wait((record.name, delivery.id), send, now, waiting)]

    def _channel_delivered(self, pending: Pending[Waiting], ack: Ack, now: float) -> list[Effect]:
        """A channel message that was stored first (by another server) leaves once ACKed."""
        name, items = pending.context.recipient, list(pending.context.items)
        if not items or not any(self.mailboxes.holds(name, i.sender, i.id) for i in items):
            return []
        return [self.mailboxes.remove(name, items)]

    def _channel_lost(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        record = self.clients[pending.context.recipient]
        marked = self._no_ack_from(record, pending)
        delivery = pending.send.message
        assert isinstance(delivery, ChannelDelivery)
        # Stamped now, when it is stored: the stream stays oldest first by the times it shows.
        return marked + self._store_channel(record.name, delivery, now)

    def _flush_notices(self, now: float) -> list[Effect]:
        """Tell each poster which recipients' copies of its channel message could not be
        stored (their mailboxes are full), once for all of one event."""
        effects: list[Effect] = []
        unstored, self._unstored = self._unstored, {}
        for (poster, post), names in unstored.items():
            record = self.clients.get(poster)
            shown = names[:NOT_STORED_NAMES]
            notice = NotStored(self.new_id(), post, shown, len(names) - len(shown))
            send = self._to_client(record, notice) if record and record.online else None
            if record is None or send is None:
                continue
            waiting = Waiting(ServerWait.NOTICE, poster)
            effects.append(self._wait((poster, notice.id), send, now, waiting))
        return effects

    def _notice_acked(self, pending: Pending[Waiting], ack: Ack, now: float) -> list[Effect]:
        return []


def _sealed_by(sealed: bytes, name: str) -> bool:
    """Whether ``sealed`` is a peer datagram that names ``name`` as its sender (the
    recipient opens it with that name's key, so a client cannot save another's)."""
    try:
        return parse_peer(sealed).sender == name
    except WireError:
        return False
