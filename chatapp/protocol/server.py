"""The server's rules, as a state machine with no I/O.

The server keeps the client table and a mailbox for clients that are offline.
Everything it must remember across a crash is announced as a change
(``chatapp.protocol.changes``), placed before the ACK that depends on it: the
runtime commits it before it sends anything that follows. What happens to
each pending request is in its row of ``chatapp.protocol.waits.ServerWait``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import msgspec

from chatapp.protocol.changes import ClientRecord, MessageStored, Presence
from chatapp.protocol.common import Effect, Log, Pending, Send, dropped
from chatapp.protocol.server_state import Waiting
from chatapp.protocol.sharing import ServerSharing
from chatapp.protocol.waits import ServerWait
from chatapp.wire import (
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
    TableAck,
    TableDelta,
    fmt_addr,
)


class ServerProtocol(ServerSharing):
    """The server's rules: the requests' (what it holds: ``ServerState``; who is online
    and every client's copy of the table: ``ServerPresence``; the changes of other servers
    sharing its database: ``ServerSharing``)."""

    # --- entry points -----------------------------------------------------------------

    def handle_timer(self, now: float) -> list[Effect]:
        effects = self._expired(now)
        self._slow_down_if_resent(effects, now)
        return effects + self._flush_table(now)

    def _may_give_up(self, pending: Pending[Waiting]) -> bool:
        # A registration undone meanwhile: nothing is left to do for that name, except
        # answering a sender who waits on a message's fate.
        waiting = pending.context
        return waiting.recipient in self.clients or waiting.kind is ServerWait.DELIVER

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
            if holder.name in self.elsewhere:
                # Another server's client: that server checks on it; this one cannot.
                return self._refuse_claim(holder, message, addr)
            return self._challenge_holder(holder, message, addr, now)
        return self._register(message, addr, now)

    def _challenge_holder(
        self, holder: ClientRecord, claim: Register, addr: Address, now: float
    ) -> list[Effect]:
        """Someone else asks for an online name. Its holder may have left without a word
        (Ctrl-C) and be about to come back from another port: ask the holder first, with a
        delta that changes nothing (ACKed, not shown), and refuse the claim only if it
        answers."""
        self._recent.remember((addr, claim.id), None)  # the claim's retries wait for the answer
        version = self.roster.version
        probe = TableDelta(self._new_id(), self.roster.epoch, version, version, 0, 1, [], [])
        waiting = Waiting(ServerWait.CLAIM, holder.name, reply_to=addr, claim=claim)
        return [
            Log(f"{claim.name} asked for from {fmt_addr(addr)}: checking on its holder", "debug"),
            self._wait((holder.addr, probe.id), self.send(probe, holder.addr), now, waiting),
        ]

    def _refuse_claim(self, holder: ClientRecord, claim: Register, addr: Address) -> list[Effect]:
        reason = f"the name {claim.name} is online at {fmt_addr(holder.addr)}. Choose another name."
        reply = self.send(Refused(claim.id, reason), addr)
        self._recent.remember((addr, claim.id), [reply])
        return [Log(f"refused {claim.name} from {fmt_addr(addr)}: name in use"), reply]

    def _register(self, message: Register, addr: Address, now: float) -> list[Effect]:
        displaced = self.roster.name_at(addr)
        effects: list[Effect] = []
        if displaced is not None and displaced != message.name:
            effects += self._displace(self.clients[displaced])
        # New: unknown, or brought by a registration that has not completed either.
        new = message.name not in self.clients or self.followers.joined_new(message.name)
        record = ClientRecord(message.name, addr, self._new_token())
        self.roster.add(record)
        self._end_waits(self.followers.joined(record.name, new=new))
        registered = self.send(Registered(message.id, record.token), addr)
        self._recent.remember((addr, message.id), [registered])
        return [
            *effects,
            self._saved(record),
            Log(f"registered {record.name} at {fmt_addr(addr)}"),
            registered,
            *self._start_mailbox(record, now),
        ]

    def _on_deregister(self, message: Deregister, addr: Address, now: float) -> list[Effect]:
        record, refusal = self._authenticate(message.name, message.token, message.id, addr)
        if record is None:
            return refusal
        ack = self.send(Ack(message.id), addr)
        self._recent.remember((addr, message.id), [ack])
        if record.presence is Presence.DEREGISTERED:
            return [ack]
        self._set_presence(record, Presence.DEREGISTERED)
        return [self._saved(record), Log(f"{record.name} deregistered"), ack]

    def _on_reregister(self, message: Reregister, addr: Address, now: float) -> list[Effect]:
        record, refusal = self._authenticate(message.name, message.token, message.id, addr)
        if record is None:
            return refusal
        effects: list[Effect] = []
        if not record.online:
            self._set_presence(record, Presence.ONLINE)
            effects += [self._saved(record), Log(f"{record.name} is back online")]
        ack = self.send(Ack(message.id), addr)
        self._recent.remember((addr, message.id), [ack])
        effects.append(ack)
        return effects + self._start_mailbox(record, now)

    def _on_lookup(self, message: Lookup, addr: Address, now: float) -> list[Effect]:
        record, refusal = self._authenticate(None, message.token, message.id, addr)
        if record is None:
            return refusal
        found = self.clients.get(message.name)
        return [self.send(LookupResult(message.id, found.entry() if found else None), addr)]

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
            chat = self.send(Chat(message.id, message.sender, message.text), recipient.addr)
            waiting = Waiting(ServerWait.DELIVER, recipient.name, item, reply_to=addr)
            return [self._wait((recipient.addr, message.id), chat, now, waiting)]
        return self._store_and_answer(recipient.name, item, addr, message.id)

    def _store_and_answer(
        self, recipient: str, item: StoredItem, sender_addr: Address, request_id: str
    ) -> list[Effect]:
        key = (sender_addr, request_id)
        if self.mailboxes.is_full(recipient):
            limit = self.mailboxes.limit
            return self._refuse(
                key, f"the mailbox of {recipient} is full ({limit} messages). Try later."
            )
        answer = self.send(Saved(request_id, "stored"), sender_addr)
        self._recent.remember(key, [answer])
        return [*self.mailboxes.store(recipient, item, enforce_limit=False), answer]

    def _on_channel_post(self, message: ChannelPost, addr: Address, now: float) -> list[Effect]:
        sender, refusal = self._authenticate(message.sender, message.token, message.id, addr)
        if sender is None:
            return refusal
        ack = self.send(Ack(message.id), addr)
        self._recent.remember((addr, message.id), [ack])
        item = StoredItem(message.id, "channel", message.sender, message.text, self._wall(now))
        delivery = ChannelDelivery(message.id, message.sender, message.text)
        delivery_data = self.codec.encode(delivery)  # once for every receiver
        stored: list[Effect] = []
        sent: list[Effect] = []
        for record in self.clients.values():
            if record.name == sender.name:
                continue
            if record.online and record.name not in self.elsewhere:
                waiting = Waiting(ServerWait.CHANNEL, record.name, item)
                effect = Send(delivery, delivery_data, record.addr)
                sent.append(self._wait((record.addr, message.id), effect, now, waiting))
            else:
                stored += self.mailboxes.store(record.name, item, enforce_limit=True)
        log = Log(
            f"channel message from {sender.name}: sent to {len(sent)},"
            f" stored for {sum(isinstance(e, MessageStored) for e in stored)}"
        )
        return [*stored, log, ack, *sent]

    # --- ACKs: the ``on_answer`` handlers of ServerWait ----------------------------------

    def _on_ack(self, message: Ack | TableAck, addr: Address, now: float) -> list[Effect]:
        return self._answered((addr, message.id), message, addr, now)

    def _channel_delivered(self, pending: Pending[Waiting], ack: Ack, now: float) -> list[Effect]:
        if pending.context.item_ids:  # stored already (by another server): delivered now
            return [self.mailboxes.remove(pending.context.recipient, pending.context.item_ids)]
        return []

    def _delivered(self, pending: Pending[Waiting], answer: Ack, now: float) -> list[Effect]:
        waiting = pending.context
        assert waiting.item is not None
        log = Log(f"delivered {waiting.item.sender}'s message to {waiting.recipient}")
        return [log, self._answer_saved(waiting, "delivered")]

    def _holder_answered(self, pending: Pending[Waiting], answer: Ack, now: float) -> list[Effect]:
        """The holder of a claimed name is there: the claim is refused."""
        waiting = pending.context
        assert waiting.claim is not None and waiting.reply_to is not None
        holder = self.clients[waiting.recipient]
        return self._refuse_claim(holder, waiting.claim, waiting.reply_to)

    # --- giving up: the ``on_give_up`` handlers of ServerWait ---------------------------

    def _channel_lost(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        record = self.clients[pending.context.recipient]
        marked = self._no_ack_from(record, pending)
        if pending.context.item_ids:  # stored already: it stays
            return marked
        return marked + self._store_late(record, pending.context, now, enforce_limit=True)

    def _undelivered(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        """A saved message the server could not deliver itself: stored, and the sender
        told so."""
        record = self.clients.get(pending.context.recipient)
        if record is None:  # the recipient's registration was undone meanwhile
            waiting = pending.context
            assert waiting.item is not None and waiting.reply_to is not None
            reason = f"there is no user named {waiting.recipient}."
            return self._refuse((waiting.reply_to, waiting.item.id), reason)
        marked = self._no_ack_from(record, pending)
        stored = self._store_late(record, pending.context, now, enforce_limit=False)
        return [*marked, *stored, self._answer_saved(pending.context, "stored")]

    def _holder_gone(self, pending: Pending[Waiting], now: float) -> list[Effect]:
        """The holder of a claimed name did not answer: it is offline, and the claim wins."""
        waiting = pending.context
        assert waiting.claim is not None and waiting.reply_to is not None
        holder = self.clients[waiting.recipient]
        effects: list[Effect] = []
        if holder.online:
            self._set_presence(holder, Presence.SILENT)
            effects += [
                Log(f"no ACK from {holder.name} (claim): marked offline", "warning"),
                self._saved(holder),
            ]
        current = self.clients.get(waiting.claim.name)
        if current is not None and current.online and current.addr != waiting.reply_to:
            return effects + self._refuse_claim(current, waiting.claim, waiting.reply_to)
        return effects + self._register(waiting.claim, waiting.reply_to, now)

    def _store_late(
        self, record: ClientRecord, waiting: Waiting, now: float, *, enforce_limit: bool
    ) -> list[Effect]:
        # Stamped now, when it is stored: a message stored at once while this wait ran
        # is older, and the mailbox must stay oldest first by the times it shows.
        assert waiting.item is not None
        item = msgspec.structs.replace(waiting.item, stored_at=self._wall(now))
        return self.mailboxes.store(record.name, item, enforce_limit=enforce_limit)

    def _answer_saved(self, waiting: Waiting, outcome: str) -> Send:
        assert waiting.item is not None and waiting.reply_to is not None
        answer = self.send(Saved(waiting.item.id, outcome), waiting.reply_to)  # type: ignore[arg-type]
        self._recent.remember((waiting.reply_to, waiting.item.id), [answer])
        return answer

    # --- the mailbox ------------------------------------------------------------------

    def _start_mailbox(self, record: ClientRecord, now: float) -> list[Effect]:
        if not self.mailbox.get(record.name) or record.name in self.mailboxes.in_flight:
            return []
        delivery = self._new_id()
        self.mailboxes.in_flight[record.name] = delivery
        return [
            Log(f"delivering {len(self.mailbox[record.name])} stored messages to {record.name}"),
            self._send_batch(record, delivery, now),
        ]

    def _relay_channel(self, record: ClientRecord, item: StoredItem, now: float) -> list[Effect]:
        delivery = ChannelDelivery(item.id, item.sender, item.text)
        waiting = Waiting(ServerWait.CHANNEL, record.name, item, item_ids=(item.id,))
        return [self._wait((record.addr, item.id), self.send(delivery, record.addr), now, waiting)]

    def _send_batch(self, record: ClientRecord, delivery: str, now: float) -> Effect:
        items = self.mailboxes.next_batch(record.name)
        batch = Mailbox(self._new_id(), delivery, items)
        ids = tuple(item.id for item in items)
        waiting = Waiting(ServerWait.MAILBOX, record.name, item_ids=ids)
        return self._wait((record.addr, batch.id), self.send(batch, record.addr), now, waiting)

    def _mailbox_acked(self, pending: Pending[Waiting], answer: Ack, now: float) -> list[Effect]:
        name = pending.context.recipient
        effects: list[Effect] = [self.mailboxes.remove(name, pending.context.item_ids)]
        record = self.clients[name]
        delivery = self.mailboxes.in_flight.get(name)
        if self.mailbox[name] and delivery is not None and record.online:
            effects.append(self._send_batch(record, delivery, now))
        else:
            self.mailboxes.delivered_all(name)
        return effects

    # --- presence ---------------------------------------------------------------------

    def _presence_by_contact(self, message: Message, addr: Address, now: float) -> list[Effect]:
        """A client marked offline because it stopped ACKing is online again once it speaks."""
        name = self.roster.name_at(addr)
        if name is None or isinstance(message, (Register, Deregister)):
            return []  # a registration speaks for itself; a dereg is not a return
        record = self.clients[name]
        if record.presence is Presence.SILENT:
            line = f"heard from {name} again: back online"
        elif name in self.elsewhere and record.online:
            line = f"{name} moved here from another server"
        else:
            return []
        self._set_presence(record, Presence.ONLINE)
        return [
            Log(line),
            self._saved(record),
            *self._start_mailbox(record, now),
        ]

    # --- helpers ----------------------------------------------------------------------

    def _authenticate(
        self, name: str | None, token: str, request_id: str, addr: Address
    ) -> tuple[ClientRecord | None, list[Effect]]:
        """The record of the client at ``addr`` if ``token`` is its token (and ``name``
        its name); else the refusal."""
        record = self.roster.authenticated(name, token, addr)
        if record is not None:
            return record, []
        who, where = name or "a client", fmt_addr(addr)
        reason = f"{who} is not registered from {where}. Restart the client to join again."
        log = Log(f"refused a request for {who} from {where}: wrong address or token", "warning")
        return None, [log, self.send(Refused(request_id, reason), addr)]

    def _refuse(self, key: tuple[Address, str], reason: str) -> list[Effect]:
        answer = self.send(Refused(key[1], reason), key[0])
        self._recent.remember(key, [answer])
        return [Log(f"refused a request from {fmt_addr(key[0])}: {reason}"), answer]

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
        TableAck: _on_ack,
    }


#: Requests whose answers the server remembers, so that a repeat is answered, not redone.
_REQUESTS = (Register, Deregister, Reregister, SaveMessage, ChannelPost)
