"""The server's mailbox: messages kept for clients that are offline, and its rules.

At most ``limit`` messages per client; the same message (by id) is kept once;
a message leaves only when its recipient has ACKed the batch that carried it.
"""

from __future__ import annotations

from chatapp.protocol.changes import MessagesRemoved, MessageStored
from chatapp.protocol.common import Effect, Log
from chatapp.protocol.packing import fitting
from chatapp.wire import StoredItem

DEFAULT_MAILBOX_LIMIT = 1000
#: The most ``--mailbox-limit`` allows (the benchmarks use it for "no limit").
MAX_MAILBOX_LIMIT = 100_000_000


class Mailboxes:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: recipient -> stored messages, oldest first (a recipient with none has no entry)
        self.boxes: dict[str, list[StoredItem]] = {}
        #: recipient -> the delivery id of the batches being sent to it
        self.in_flight: dict[str, str] = {}

    def restore(self, boxes: dict[str, list[StoredItem]]) -> None:
        self.boxes = {name: list(items) for name, items in boxes.items() if items}

    def reload(self, boxes: dict[str, list[StoredItem]], *, delivering: set[str]) -> None:
        """The messages as ``boxes`` have them (the database's); a delivery goes on only to
        the recipients ``delivering`` names (a batch of theirs is still waited on)."""
        self.restore(boxes)
        self.in_flight = {name: d for name, d in self.in_flight.items() if name in delivering}

    def is_full(self, recipient: str) -> bool:
        return len(self.boxes.get(recipient, [])) >= self.limit

    def store(self, recipient: str, item: StoredItem, *, enforce_limit: bool) -> list[Effect]:
        """Keep ``item`` for ``recipient`` (``enforce_limit``: not if the box is full)."""
        box = self.boxes.setdefault(recipient, [])
        if enforce_limit and len(box) >= self.limit:
            return [Log(f"mailbox of {recipient} is full: dropped a channel message", "warning")]
        for stored in box[-8:]:  # a loop, not any(<genexpr>): this runs for every save
            if stored.id == item.id:
                return []  # the same message stored twice (a retry raced a timeout)
        box.append(item)
        return [MessageStored(recipient, item), Log(f"stored a message for {recipient}")]

    def next_batch(self, recipient: str) -> list[StoredItem]:
        """The oldest messages for ``recipient`` that fit in one datagram."""
        box = self.boxes[recipient]
        return box[: fitting(box)]

    def remove(self, recipient: str, ids: tuple[str, ...]) -> MessagesRemoved:
        """The batch of ``ids`` was ACKed: they go."""
        box = self.boxes.get(recipient, [])
        count = len(ids)
        if tuple(item.id for item in box[:count]) == ids:
            # The usual case, the batch still at the front: a slice, not a scan of the whole
            # mailbox per batch (10,000 stored messages would cost 150 scans of thousands).
            remaining = box[count:]
        else:
            delivered = set(ids)
            remaining = [item for item in box if item.id not in delivered]
        self.boxes[recipient] = remaining
        return MessagesRemoved(recipient, ids)

    def delivered_all(self, recipient: str) -> None:
        """The delivery to ``recipient`` is over (an empty box goes)."""
        self.in_flight.pop(recipient, None)
        if not self.boxes.get(recipient):
            self.boxes.pop(recipient, None)
