"""Packing entries and stored messages into datagrams that fit."""

from __future__ import annotations

from typing import TypeVar

import msgspec

from chatapp.wire import MAX_DATAGRAM, StoredItem, TableEntry

#: Bytes of a datagram kept for the envelope when packing entries or stored items.
ENVELOPE_ALLOWANCE = 256

_item_encoder = msgspec.json.Encoder()
T = TypeVar("T", TableEntry, StoredItem)


def fitting(items: list[T], start: int = 0) -> int:
    """The end of the run of ``items`` from ``start`` that fits in one datagram (at
    least one item, so that a part is never empty)."""
    budget = MAX_DATAGRAM - ENVELOPE_ALLOWANCE
    end = start
    while end < len(items):
        budget -= len(_item_encoder.encode(items[end])) + 1  # the item and its comma
        if budget < 0 and end > start:
            break
        end += 1
    return end
