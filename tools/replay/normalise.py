"""Normalising volatile values: message ids, ports, Unix times, and the cryptography's
(cookies, signatures, nonces, session ids and keys, sealed datagrams).

Volatile values differ from run to run. ``Normaliser`` maps them to stable
labels, and the replay tool applies the same normaliser to the recorded trace
and to the new one before comparing. A replayed node given its recorded seed
draws the same random values as it did, but the order of two events from
different peers a moment apart may differ, and with it which draw went where:
behaviour is what is compared, not which random bytes it used.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from chatapp.trace import Event, Recv, Restored, Send, Start, parse_addr
from chatapp.wire import fmt_addr

_TIME_PREFIX = re.compile(r"^\(\d+(?:\.\d+)?(?:e[+-]?\d+)?\) ")
_ADDRESS = re.compile(r"\b(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5})\b")
_ID_FIELDS = ("id", "delivery", "post")
#: Fields whose values are random or derived from random values: compared as present.
_OPAQUE = {
    "server_key": "<server key>",
    "cookie": "<cookie>",
    "sig": "<sig>",
    "nonce": "<nonce>",
    "box": "<box>",
    "sealed": "<sealed>",
    "session_key": "<session key>",
    "sid": "<sid>",
    "boot": "<boot>",
    "seq": "<seq>",
}


@dataclass
class Normaliser:
    """Stable labels for what changes from run to run.

    - an address becomes the name of the node bound there;
    - a message id becomes ``NODE#k``: the k-th id that NODE was first to send;
    - Unix times (stored messages' ``stored_at``, shown as ``(1648153596.77)``),
      table epochs, and the cryptography's values (``_OPAQUE``; a session id in a
      ``tag``) become placeholders.

    Feed it the events in order (``learn``) before asking for labels.

    With ``scoped`` (a node tested black-box, seen only through what the others
    received), that node's ids are labelled per receiver instead,
    ``NODE#RECEIVER.k``: arrivals at different receivers have no reliable order.
    """

    addresses: dict[str, str] = field(default_factory=dict)
    ports: dict[int, str] = field(default_factory=dict)
    id_labels: dict[str, str] = field(default_factory=dict)
    id_values: dict[str, str] = field(default_factory=dict)  # label -> latest value
    epochs: dict[str, int] = field(default_factory=dict)  # node -> the table epoch it sent last
    scoped: str = ""
    _issued: dict[str, int] = field(default_factory=dict)
    _stream_labels: dict[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        events: Iterable[Event],
        extra_addresses: Mapping[str, str] | None = None,
        scoped: str = "",
    ) -> Normaliser:
        normaliser = cls(scoped=scoped)
        for address, node in (extra_addresses or {}).items():
            normaliser.add_address(address, node)
        for event in events:
            normaliser.learn(event)
        return normaliser

    def adopt(self, other: Normaliser, *, except_issuer: str) -> None:
        """Take ``other``'s labels for every id not issued by ``except_issuer``: a node
        played from a recording sends the recorded values, and they keep the recorded
        labels even where a run shows only part of the traffic."""
        for value, label in other.id_labels.items():
            if label.partition("#")[0] != except_issuer:
                self.id_labels.setdefault(value, label)

    def add_address(self, address: str, node: str) -> None:
        self.addresses[address] = node
        host, port = parse_addr(address)
        self.ports.setdefault(port, node)
        if host in ("0.0.0.0", "127.0.0.1"):
            self.addresses.setdefault(fmt_addr(("127.0.0.1", port)), node)

    def learn(self, event: Event) -> None:
        if isinstance(event, Restored):
            # clients the server knew from before the run are named by their names
            for name, ip, port, *_ in event.clients:
                self.addresses.setdefault(fmt_addr((ip, port)), name)
                self.ports.setdefault(port, name)
        elif isinstance(event, Start):
            # A node that starts again elsewhere adds an address; an address another node
            # held before keeps that node's label, so that the labels do not depend on
            # whether the whole trace was learned first (the recording) or not (a replay).
            if event.local not in self.addresses:
                self.add_address(event.local, event.node)
                self.ports[parse_addr(event.local)[1]] = event.node
        elif isinstance(event, Send | Recv) and event.msg:
            sender = event.node if isinstance(event, Send) else self.address(event.peer)
            receiver = self.address(event.peer) if isinstance(event, Send) else event.node
            self._learn_ids(event.msg, sender, receiver)
            epoch = event.msg.get("epoch")
            if isinstance(epoch, int):
                self.epochs[sender] = epoch

    def _learn_ids(self, msg: Mapping[str, Any], sender: str, receiver: str) -> None:
        for value in _ids_in(msg):
            if self.scoped and sender == self.scoped and value not in self.id_labels:
                key = (receiver, value)
                if key not in self._stream_labels:
                    count = self._issued.get(f"{sender}#{receiver}", 0) + 1
                    self._issued[f"{sender}#{receiver}"] = count
                    self._stream_labels[key] = f"{sender}#{receiver}.{count}"
                self.id_values[self._stream_labels[key]] = value
                continue
            if self.scoped and receiver == self.scoped and (sender, value) in self._stream_labels:
                continue  # an answer to the scoped node, echoing its id
            if value not in self.id_labels:
                count = self._issued.get(sender, 0) + 1
                self._issued[sender] = count
                self.id_labels[value] = f"{sender}#{count}"
            self.id_values[self.id_labels[value]] = value

    def address(self, address: str) -> str:
        node = self.addresses.get(address)
        if node is not None:
            return node
        try:
            port = parse_addr(address)[1]
        except ValueError:
            return address
        return self.ports.get(port, f"?{address}")

    def label(self, value: Any, other_end: str = "") -> str:
        """The label of a message id; ``other_end`` is the node at the far end of the
        datagram from the scoped node."""
        scoped = self._stream_labels.get((other_end, value))
        if scoped is not None:
            return scoped
        return self.id_labels.get(value, f"?{value}")

    def other_end(self, event: Send | Recv) -> str:
        peer = self.address(event.peer)
        return event.node if peer == self.scoped else peer

    def event_message(self, event: Send | Recv) -> dict[str, Any]:
        return self.message(event.msg, self.other_end(event))

    def message(self, msg: Mapping[str, Any] | None, other_end: str = "") -> dict[str, Any]:
        if msg is None:
            return {}
        result: dict[str, Any] = {}
        for key, value in msg.items():
            if key in _ID_FIELDS:
                result[key] = self.label(value, other_end)
            elif key in _OPAQUE:
                result[key] = _OPAQUE[key] if value else value
            elif key == "tag":
                result[key] = "<sid>" if value else value
            elif key == "port" and isinstance(value, int):
                result[key] = self.ports.get(value, "?port")
            elif key == "epoch":
                result[key] = "<epoch>"
            elif key == "entries" and isinstance(value, list):
                result[key] = [self._entry(entry) for entry in value]
            elif key == "entry":
                result[key] = None if value is None else self._entry(value)
            elif key == "items" and isinstance(value, list):
                result[key] = [self._item(item, other_end) for item in value]
            elif key == "reason" and isinstance(value, str):
                result[key] = self.text(value)
            else:
                result[key] = value
        return result

    def _entry(self, entry: Any) -> Any:
        if isinstance(entry, list) and len(entry) == 6:
            name, ip, port, online, key, tag = entry
            return [name, self.address(fmt_addr((ip, port))), online, key, "<sid>" if tag else ""]
        return entry

    def _item(self, item: Any, other_end: str) -> Any:
        if not isinstance(item, dict):
            return item
        result: dict[str, Any] = {}
        for key, value in item.items():
            if key == "id":
                result[key] = self.label(value, other_end)
            elif key == "stored_at":
                result[key] = "<time>"
            else:
                result[key] = _OPAQUE.get(key, value) if key in _OPAQUE and value else value
        return result

    def text(self, line: str) -> str:
        """A shown line (or a refusal's reason) with Unix times and addresses replaced."""
        line = _TIME_PREFIX.sub("({time}) ", line)
        return _ADDRESS.sub(lambda match: "<" + self.address(match.group(0)) + ">", line)


def _ids_in(msg: Mapping[str, Any]) -> list[str]:
    found = [msg[key] for key in _ID_FIELDS if isinstance(msg.get(key), str)]
    items = msg.get("items")
    if isinstance(items, list):
        found += [item["id"] for item in items if isinstance(item, dict) and "id" in item]
    return found
