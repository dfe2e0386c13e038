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

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from chatapp import screen
from chatapp.trace import (
    ClientDropped,
    ClientPut,
    Commit,
    Event,
    Input,
    ItemsDeleted,
    ItemStored,
    KeyPinned,
    Marked,
    Recv,
    Restored,
    Send,
    Start,
    parse_addr,
)
from chatapp.wire import StoredItem, fmt_addr

_TIME_PREFIX = re.compile(r"^\(\d+(?:\.\d+)?(?:e[+-]?\d+)?\) ")
_ADDRESS = re.compile(r"\b(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5})\b")
_ID_FIELDS = ("id", "delivery", "post")
#: Seconds between a commit and the time it gives a stored item (wall clock and trace
#: clock are read a moment apart).
STORED_AT_SLACK = 0.01
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
    #: Unix time of the trace's t = 0 (its header's ``started``): a stored item's time is
    #: checked against the time of the commit that stored it.
    started: float = 0.0
    #: Whether the trace records commits (format 3): then every stored time must be one
    #: the store gave, and a shown time prefix one of a stored message the node received.
    strict_times: bool = True
    #: Whether the trace records the settings each node ran with (format 3): then they are
    #: compared.
    settings: bool = True
    #: Stored times by (origin, n), from the commits and the server's restore.
    stored_times: dict[tuple[str, int], float] = field(default_factory=dict)
    #: The time prefixes (``screen.time_prefix``) of the stored messages each node received.
    prefixes: dict[str, set[str]] = field(default_factory=dict)
    #: What each commit was the effect of, by its seq (``commit_cause``).
    commit_causes: dict[int, str] = field(default_factory=dict)
    _latest_cause: dict[str, str] = field(default_factory=dict)
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
        # the stored items a played server kept (its commits are not in this run)
        self.stored_times.update(other.stored_times)

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
            for items in event.mailbox.values():
                for item in items:
                    self.stored_times[(item.seq.origin, item.seq.n)] = item.stored_at
        elif isinstance(event, Commit):
            for change in event.changes:
                if isinstance(change, ItemStored):
                    seq = change.item.seq
                    self.stored_times[(seq.origin, seq.n)] = change.item.stored_at
            self.commit_causes[event.seq] = (
                self._latest_cause.get(event.node, "")
                if event.cause in ("datagram", "input")
                else event.cause
            )
        elif isinstance(event, Input):
            self._latest_cause[event.node] = f"typed {event.line!r}"
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
            if isinstance(event, Recv):
                self._learn_received(event)
        elif isinstance(event, Recv):
            self._latest_cause[event.node] = f"undecodable from {self.address(event.peer)}"

    def _learn_received(self, event: Recv) -> None:
        msg = event.msg or {}
        items = msg.get("items")
        if isinstance(items, list):
            prefixes = self.prefixes.setdefault(event.node, set())
            for item in items:
                stored_at = item.get("stored_at") if isinstance(item, dict) else None
                if isinstance(stored_at, int | float) and not isinstance(stored_at, bool):
                    prefixes.add(screen.time_prefix(float(stored_at)))
        cause = self.message(msg, self.other_end(event))
        self._latest_cause[event.node] = (
            f"{cause.get('t')} from {self.address(event.peer)} {json.dumps(cause, sort_keys=True)}"
        )

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
                result[key] = self._stored_time(item.get("seq"), value)
            else:
                result[key] = _OPAQUE.get(key, value) if key in _OPAQUE and value else value
        return result

    def _stored_time(self, seq: Any, value: Any) -> str:
        """A stored item's time in a datagram: the one its store gave it (in the commit
        that stored it, or the restore that read it)."""
        if not self.strict_times:
            return "<time>"
        if isinstance(seq, list) and len(seq) == 2:
            stored = self.stored_times.get((str(seq[0]), int(seq[1])))
            if stored is not None and stored == value:
                return "<stored time>"
            if stored is not None:
                return f"<{value!r}: not the stored time, {stored!r}>"
        return f"<{value!r}: no such stored item>"

    def text(self, line: str, node: str | None = None) -> str:
        """A shown line (or a refusal's reason) with Unix times and addresses replaced.

        With ``node`` (a line it showed, in a trace with commits), a time prefix is
        replaced only when it is, as ``screen.time_prefix`` writes it, the time of a
        stored message that node received; any other is left as it is (and differs)."""
        if node is not None and self.strict_times:
            for prefix in self.prefixes.get(node, ()):
                if line.startswith(prefix):
                    line = "({time}) " + line[len(prefix) :]
                    break
        else:
            line = _TIME_PREFIX.sub("({time}) ", line)
        return _ADDRESS.sub(lambda match: "<" + self.address(match.group(0)) + ">", line)

    def change(self, record: Any, at: float) -> dict[str, Any]:
        """A change of a ``commit`` event (at ``at`` seconds into the trace), normalised."""
        if isinstance(record, ClientPut):
            return {
                "op": "client", "name": record.name, "address": self.address(record.address),
                "key": record.key, "sid": "<sid>" if record.sid else "",
                "presence": record.presence.value,
            }  # fmt: skip
        if isinstance(record, ClientDropped):
            return {"op": "client_removed", "name": record.name}
        if isinstance(record, ItemStored):
            item = self._stored_item(record.item)
            lag = record.item.stored_at - (self.started + at)
            item["stored_at"] = "<now>" if abs(lag) <= STORED_AT_SLACK else f"<now {lag:+.3f} s>"
            return {"op": "stored", "to": record.to, "item": item}
        if isinstance(record, ItemsDeleted):
            return {
                "op": "deleted",
                "to": record.to,
                "seqs": [[s.origin, s.n] for s in record.seqs],
            }
        if isinstance(record, KeyPinned):
            return {"op": "pinned", "server": self.address(record.server), "key": "<server key>"}
        if isinstance(record, Marked):
            return {"op": "marked", "server_key": "<server key>", "marks": record.marks}
        return {"op": "?"}

    def _stored_item(self, item: StoredItem) -> dict[str, Any]:
        """A stored item of a commit or a restore: its place (origin, n) compared as it is."""
        return {**self._item(msgspec.to_builtins(item), ""), "seq": [item.seq.origin, item.seq.n]}

    def restore(self, event: Restored) -> dict[str, Any]:
        """What a server read from its database at a start, as compared: its clients in the
        order it read them, its stored messages oldest first."""
        return {
            "server_key": event.server_key,
            "origin": event.origin,
            "last_n": event.last_n,
            "clients": [
                [
                    name,
                    self.address(fmt_addr((ip, port))),
                    key,
                    "<sid>" if sid else "",
                    getattr(presence, "value", presence),
                ]
                for name, ip, port, key, sid, presence in event.clients
            ],
            "mailbox": {
                to: [
                    {
                        **self._item(msgspec.to_builtins(item), ""),
                        "seq": [item.seq.origin, item.seq.n],
                    }
                    for item in items
                ]
                for to, items in event.mailbox.items()
            },
        }

    def commit(self, event: Commit) -> dict[str, Any]:
        """A ``commit`` event as compared: what it wrote, and what it was the effect of."""
        return {
            "after": self.commit_causes.get(event.seq, event.cause),
            "changes": [self.change(record, event.t) for record in event.changes],
        }


def _ids_in(msg: Mapping[str, Any]) -> list[str]:
    found = [msg[key] for key in _ID_FIELDS if isinstance(msg.get(key), str)]
    items = msg.get("items")
    if isinstance(items, list):
        found += [item["id"] for item in items if isinstance(item, dict) and "id" in item]
    return found
