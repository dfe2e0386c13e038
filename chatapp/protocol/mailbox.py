"""The server's mailbox: every recipient's delivery stream, and its rules.

Everything stored for a recipient is one stream in the order it was stored:
each item gets a sequence number ``(origin, n)`` (``origin``: the store that
keeps it; ``n``: its counter, which never goes back), and the items of one
origin are delivered in ``n`` order. At most ``limit`` items per recipient,
checked whenever anything is stored; the same message (by sender and id) is
kept once; an item leaves only when its recipient has ACKed the batch or the
relay that carried it. At most one batch or relay is in flight per recipient.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass
from itertools import islice
from typing import Literal

import msgspec

from chatapp.protocol.changes import MessagesRemoved, MessageStored
from chatapp.protocol.packing import ENVELOPE_ALLOWANCE
from chatapp.protocol.sealing import SESSION_OVERHEAD
from chatapp.wire import MAX_DATAGRAM, Seq, StoredItem

DEFAULT_MAILBOX_LIMIT = 1000
#: The most ``--mailbox-limit`` allows (the benchmarks use it for "no limit").
MAX_MAILBOX_LIMIT = 100_000_000
#: The most items a batch looks at when it packs a datagram.
_BATCH_SCAN = 256
#: Bytes of a sender's entry in a batch's keys, besides its name: "": "<44 base64>",
_KEY_ENTRY = 52
_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class Flight:
    """A recipient's delivery under way: its id (the client shows ``[You have message]``
    once per delivery) and the wait of the batch or relay in flight, if any."""

    delivery: str
    wait: Hashable | None = None


class Mailboxes:
    def __init__(self, limit: int, origin: str, last_n: int = 0) -> None:
        self.limit = limit
        self.origin = origin
        self.last_n = last_n
        #: recipient -> (sender, id) -> item, oldest first (a recipient with none has no entry)
        self.boxes: dict[str, dict[tuple[str, str], StoredItem]] = {}
        #: recipient -> its delivery under way
        self.flights: dict[str, Flight] = {}
        self._sent: Counter[str] = Counter()  # sender -> items of its stored

    def restore(self, boxes: dict[str, list[StoredItem]]) -> None:
        self.boxes = {
            name: {(item.sender, item.id): item for item in items}
            for name, items in boxes.items()
            if items
        }
        self._sent = Counter(sender for box in self.boxes.values() for sender, _ in box)

    def sent_by(self, sender: str) -> int:
        """How many stored items ``sender`` sent."""
        return self._sent[sender]

    def items(self, recipient: str) -> list[StoredItem]:
        return list(self.boxes.get(recipient, {}).values())

    def count(self, recipient: str) -> int:
        return len(self.boxes.get(recipient, ()))

    def reload(self, boxes: dict[str, list[StoredItem]], *, delivering: set[str]) -> None:
        """The messages as ``boxes`` have them (the database's); a delivery goes on only to
        the recipients ``delivering`` names (a batch of theirs is still waited on). The
        counter stays where it is: it never goes back."""
        self.restore(boxes)
        self.flights = {name: f for name, f in self.flights.items() if name in delivering}

    def is_full(self, recipient: str) -> bool:
        return self.count(recipient) >= self.limit

    def holds(self, recipient: str, sender: str, msg_id: str) -> bool:
        return (sender, msg_id) in self.boxes.get(recipient, {})

    def store(
        self,
        recipient: str,
        kind: Literal["direct", "channel"],
        sender: str,
        msg_id: str,
        stored_at: float,
        *,
        text: str = "",
        sig: bytes = b"",
        sealed: bytes = b"",
    ) -> MessageStored | None:
        """Keep a message for ``recipient`` with the next sequence number; None if it is
        kept already or the box is full (the caller checks ``is_full`` to tell which)."""
        box = self.boxes.setdefault(recipient, {})
        key = (sender, msg_id)
        if key in box or len(box) >= self.limit:
            if not box:
                del self.boxes[recipient]
            return None
        self.last_n += 1
        seq = Seq(self.origin, self.last_n)
        item = StoredItem(seq, msg_id, kind, sender, stored_at, text, sig, sealed)
        box[key] = item
        self._sent[sender] += 1
        return MessageStored(recipient, item)

    def adopt(self, recipient: str, item: StoredItem) -> bool:
        """Hold ``item``, which another server sharing the database stored (and committed)
        for ``recipient``; False if it is held already."""
        box = self.boxes.setdefault(recipient, {})
        key = (item.sender, item.id)
        if key in box:
            return False
        box[key] = item
        self._sent[item.sender] += 1
        return True

    def forget(self, recipient: str, seqs: tuple[Seq, ...]) -> None:
        """The items ``seqs`` left the database (another server's client ACKed them)."""
        box = self.boxes.get(recipient, {})
        gone = set(seqs)
        for key in [key for key, item in box.items() if item.seq in gone]:
            del box[key]
            self._sent[key[0]] -= 1
        if not box:
            self.boxes.pop(recipient, None)

    def head(self, recipient: str) -> StoredItem | None:
        box = self.boxes.get(recipient)
        return next(iter(box.values())) if box else None

    def next_batch(self, recipient: str) -> list[StoredItem]:
        """The oldest messages for ``recipient`` that fit in one datagram, with the key of
        each of their senders (at least one message, so that a batch is never empty)."""
        budget = MAX_DATAGRAM - ENVELOPE_ALLOWANCE - SESSION_OVERHEAD
        batch: list[StoredItem] = []
        senders: set[str] = set()
        for item in islice(self.boxes.get(recipient, {}).values(), _BATCH_SCAN):
            cost = len(_encoder.encode(item)) + 1
            if item.sender not in senders:
                cost += len(item.sender) + _KEY_ENTRY
            if cost > budget and batch:
                break
            budget -= cost
            batch.append(item)
            senders.add(item.sender)
        return batch

    def remove(self, recipient: str, items: list[StoredItem]) -> MessagesRemoved:
        """The batch (or relay) of ``items`` was ACKed: they go."""
        box = self.boxes.get(recipient, {})
        for item in items:
            if box.pop((item.sender, item.id), None) is not None:
                self._sent[item.sender] -= 1
        if not box:
            self.boxes.pop(recipient, None)
        return MessagesRemoved(recipient, tuple(item.seq for item in items))

    def drop(self, recipient: str) -> None:
        """Everything kept for ``recipient`` goes (its name left the table)."""
        for sender, _ in self.boxes.pop(recipient, {}):
            self._sent[sender] -= 1
        self.flights.pop(recipient, None)
