"""What arrives at a client unasked: direct messages from peers, channel messages,
relays and batches of stored messages from the server, tables, notices (a layer
of the client's state machine; see ``client_core``).

Nothing is shown unless it opens or verifies with the key the table has for
its sender, and nothing twice: a live message is shown once per (sender, id);
a stored one once per name, across restarts too, by its place in the delivery
stream (``(origin, n)``): the highest ``n`` shown per origin is written to the
client's state file before the line is shown.
"""

from __future__ import annotations

from chatapp import screen
from chatapp.protocol.changes import NO_TAG, DeliveryMarked
from chatapp.protocol.client_core import ClientCore, ClientState
from chatapp.protocol.codecs import Sender
from chatapp.protocol.common import Effect, Log, SeenIds, Send, Show
from chatapp.protocol.crypto import CHANNEL_DOMAIN, BadKey, verify
from chatapp.protocol.sealing import parse_peer
from chatapp.wire import (
    Ack,
    ChannelDelivery,
    Chat,
    Mailbox,
    NotStored,
    Relay,
    Seq,
    StoredItem,
    Table,
    TableAck,
    TableDelta,
    WireError,
)

#: States in which the client is (or is about to be) online: it shows and ACKs what arrives.
LISTENING = {
    ClientState.JOINING,
    ClientState.ONLINE,
    ClientState.DEREGISTERING,
    ClientState.REJOINING,
}


class ClientDelivery(ClientCore):
    _deliveries_shown: SeenIds
    #: (server key, origin, the mark before) of each mark moved since the checkpoint
    _marks_moved: list[tuple[bytes, str, int | None]]

    # --- rolling back what its state file did not take ----------------------------------

    def checkpoint(self) -> None:
        super().checkpoint()
        self._seen.checkpoint()
        self._deliveries_shown.checkpoint()
        self._marks_moved.clear()
        self._pinned_now = None

    def rollback(self, now: float) -> list[Effect]:
        """The state files did not take the changes: nothing that followed them was shown
        or sent. The marks of a delivery go back, and what it would have shown is new
        again, to be shown when the server sends it again; a server key pinned since is
        not pinned (the next registration pins it)."""
        self._end_waits_since_checkpoint()
        if self._pinned_now is not None and self.pinned == self._pinned_now:
            self.pinned = self._pinned_now = None
        for key, origin, before in reversed(self._marks_moved):
            marks = self._marks.setdefault(key, {})
            if before is None:
                marks.pop(origin, None)
            else:
                marks[origin] = before
        self._marks_moved.clear()
        self._seen.forget_since_checkpoint()
        self._deliveries_shown.forget_since_checkpoint()
        why = "the state files could not be written: nothing that needed them shown or sent"
        return [Log(why, "warning")]

    def _ack_server(self, msg_id: str) -> Send:
        return self._to_server(Ack(msg_id))

    def _ignored_offline(self, what: str) -> list[Effect]:
        """Nothing for a client that is offline (deregistered) but to ignore it, unACKed."""
        if self.state in LISTENING:
            return []
        return [Log(f"offline: ignored a {what}", "debug")]

    # --- from peers ---------------------------------------------------------------------

    def _on_chat(self, message: Chat, sender: Sender, now: float) -> list[Effect]:
        if self.state not in LISTENING:
            return self._ignored_offline(f"message from {sender.name}")
        if message.tag != self.sid:
            # Sealed for an earlier session of this client (a replay), or for another
            # client (a datagram reflected at its sender): not taken, not ACKed.
            why = f"a message from {sender.name} not for this session: dropped"
            return [Log(why, "warning")]
        effects: list[Effect] = self._peer_ack(sender, message.id)
        if self._seen.add((sender.name, message.id)):
            effects.append(Show(screen.chat(sender.name, message.text)))
        return effects

    def _peer_ack(self, sender: Sender, msg_id: str) -> list[Effect]:
        entry = self.table.get(sender.name)
        if entry is None:
            return []  # opened with its key, so it is in the table: never here
        ack = Ack(msg_id, entry.tag or NO_TAG)
        try:
            data = self.codec.to_peer(entry.key, ack)
        except BadKey:
            return []
        return [Send(ack, data, sender.addr)]

    def _on_peer_ack(self, message: Ack, sender: Sender, now: float) -> list[Effect]:
        if message.tag != self.sid:
            return [Log(f"an ACK from {sender.name} not for this session: ignored", "debug")]
        return self._answered(message.id, message, sender, now)

    # --- from the server ----------------------------------------------------------------

    def _on_channel(self, message: ChannelDelivery, sender: Sender, now: float) -> list[Effect]:
        if ignored := self._ignored_offline("channel message"):
            return ignored
        effects: list[Effect] = [self._ack_server(message.id)]
        # The table's key for the sender; the one the server names for a sender the table
        # does not have yet (a table still on its way): the server vouches for both alike.
        key = self._peer_key(message.sender) or message.key
        if not self._signed_by(message.sender, message.post, message.text, message.sig, key):
            why = f"a channel message from {message.sender} whose signature fails: dropped"
            return [*effects, Log(why, "warning")]
        if self._seen.add((message.sender, message.post)):
            effects.append(Show(screen.channel_message(message.sender, message.text)))
        return effects

    def _signed_by(
        self, name: str, msg_id: str, text: str, sig: bytes, key: bytes | None = None
    ) -> bool:
        key = key or self._peer_key(name)
        signed = (name.encode(), msg_id.encode(), text.encode())
        return key is not None and verify(key, sig, CHANNEL_DOMAIN, *signed)

    def _on_relay(self, message: Relay, sender: Sender, now: float) -> list[Effect]:
        """A saved message delivered at once: shown as a live line, once per name."""
        if ignored := self._ignored_offline("relayed message"):
            return ignored
        ack = self._ack_server(message.id)
        if not self._advance_mark(message.seq):
            return [ack]  # shown before (this process, or one killed before its ACK)
        lines: list[Effect] = []
        opened = self._open_stored(message.sealed, {_sender(message.sealed): message.key})
        if isinstance(opened, Log):
            lines.append(opened)
        elif self._seen.add((opened[0], opened[1].id)):
            lines.append(Show(screen.chat(opened[0], opened[1].text)))
        return [self._marks_change(), *lines, ack]

    def _on_mailbox(self, message: Mailbox, sender: Sender, now: float) -> list[Effect]:
        """A batch of stored messages: the mark goes to disk, then the lines, then the ACK
        (a kill at any point shows nothing twice)."""
        if ignored := self._ignored_offline("batch of stored messages"):
            return ignored
        ack = self._ack_server(message.id)
        lines: list[Effect] = []
        advanced = False
        for item in message.items:
            if not self._advance_mark(item.seq):
                continue
            advanced = True
            lines += self._stored_line(item, message.keys)
        if any(isinstance(line, Show) for line in lines) and self._deliveries_shown.add(
            message.delivery
        ):
            lines.insert(0, Show(screen.YOU_HAVE_MESSAGE))
        return [*([self._marks_change()] if advanced else []), *lines, ack]

    def _stored_line(self, item: StoredItem, keys: dict[str, bytes]) -> list[Effect]:
        if item.kind == "channel":
            key = keys.get(item.sender)
            if not self._signed_by(item.sender, item.id, item.text, item.sig, key):
                return [
                    Log(f"a stored channel message from {item.sender} fails: dropped", "warning")
                ]
            if not self._seen.add((item.sender, item.id)):
                return []
            return [Show(screen.stored_channel(item.stored_at, item.sender, item.text))]
        opened = self._open_stored(item.sealed, keys)
        if isinstance(opened, Log):
            return [opened]
        name, chat = opened
        if not self._seen.add((name, chat.id)):
            return []
        return [Show(screen.stored_direct(item.stored_at, name, chat.text))]

    def _open_stored(self, sealed: bytes, keys: dict[str, bytes]) -> tuple[str, Chat] | Log:
        """A direct message the server kept or relays, sealed by its sender (whose key
        the server names in ``keys``): (sender, chat), or why it cannot be shown."""
        try:
            name, message = self.codec.open_sealed(sealed, keys)
        except WireError as exc:
            return Log(f"a stored message that does not open: dropped ({exc})", "warning")
        if not isinstance(message, Chat):
            return Log(f"a stored message from {name} that is not a chat: dropped", "warning")
        return name, message

    def _advance_mark(self, seq: Seq) -> bool:
        """Whether ``seq`` is past what was shown (and it is now the mark)."""
        key = self.pinned or b""
        marks = self._marks.setdefault(key, {})
        if seq.n <= marks.get(seq.origin, 0):
            return False
        self._marks_moved.append((key, seq.origin, marks.get(seq.origin)))
        marks[seq.origin] = seq.n
        return True

    def _marks_change(self) -> DeliveryMarked:
        key = self.pinned or b""
        return DeliveryMarked(key, tuple(sorted(self._marks.get(key, {}).items())))

    def _on_not_stored(self, message: NotStored, sender: Sender, now: float) -> list[Effect]:
        effects: list[Effect] = [self._ack_server(message.id)]
        if self._seen.add(("", message.id)):
            effects.append(Show(screen.not_stored(list(message.names), message.more)))
        return effects

    def _on_table(self, message: Table | TableDelta, sender: Sender, now: float) -> list[Effect]:
        """A part of the whole table or of a delta: ACKed with the version held after
        taking it; shown once when it completes an update that was applied."""
        if ignored := self._ignored_offline("table"):
            return ignored
        applied = self.copy.take(message)
        ack = self._to_server(TableAck(message.id, self.copy.epoch, self.copy.version))
        if not applied:
            return [ack]
        self._table_due = None  # the first table: what waited for it goes now
        return [ack, Show(screen.TABLE_UPDATED)]


def _sender(sealed: bytes) -> str:
    """The sender a sealed peer datagram names ("" if it names none)."""
    try:
        return parse_peer(sealed).sender
    except WireError:
        return ""
