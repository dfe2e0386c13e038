"""``chat-replay check``: the protocol's invariants over a whole history, whatever the run.

Like Maelstrom's checkers, these look at every send and receive of a trace
and say what was delivered, stored, lost or duplicated; they hold for any
correct run, recorded or replayed, with or without injected faults.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from chatapp import screen
from chatapp.protocol.common import Timers
from chatapp.protocol.waits import answer_tags, longest_wait, retry_interval, tries_allowed
from chatapp.trace import Event, Exited, Recv, Send, Shown, Trace

from .describe import is_content
from .normalise import Normaliser

#: Messages that answer a request (sent again for each retry of it): not retries themselves.
ANSWERS = answer_tags()


@dataclass
class Invariant:
    name: str
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


@dataclass
class CheckResult:
    invariants: list[Invariant]
    counts: dict[str, int]
    nodes: int
    events: int
    duration: float

    @property
    def ok(self) -> bool:
        return all(invariant.ok for invariant in self.invariants)


def check(trace: Trace) -> CheckResult:
    names = Normaliser.of(trace.events)
    timers = trace.header.timers
    counts: Counter[str] = Counter()
    events = trace.events
    for event in events:
        if isinstance(event, Send):
            counts["datagrams sent"] += 1
        elif isinstance(event, Recv):
            counts["datagrams received"] += 1
            if event.msg is None:
                counts["undecodable"] += 1
    invariants = [
        _shown_once(events, names, counts),
        _messages_answered(trace, names, counts),
        _retries(events, names, timers.timers(), counts),
        _oldest_first(events),
        _channel_reaches_everyone(events, names, counts),
    ]
    duration = events[-1].t - events[0].t if events else 0.0
    return CheckResult(invariants, dict(counts), len(trace.nodes()), len(events), duration)


def _shown_once(events: list[Event], names: Normaliser, counts: Counter[str]) -> Invariant:
    """Each message (by id) is shown at most once by each node, whatever arrived twice."""
    invariant = Invariant("no message shown twice")
    arriving: dict[str, list[str]] = {}
    last_shown: dict[str, str] = {}
    shown: dict[tuple[str, str], int] = {}
    received: set[tuple[str, str, bytes]] = set()
    saved: dict[str, str] = {}  # a saved message's sealed datagram -> its id
    for event in events:
        if isinstance(event, Send | Recv) and event.msg and event.msg.get("t") == "save":
            saved[str(event.msg.get("sealed"))] = str(event.msg.get("id"))
        if isinstance(event, Recv) and event.msg:
            key = (event.node, event.peer, event.data)
            if key in received:
                counts["duplicate datagrams"] += 1
            received.add(key)
            arriving[event.node] = _arriving(event.msg, saved) or arriving.get(event.node, [])
        elif isinstance(event, Shown) and is_content(event.line):
            pending = arriving.get(event.node) or []
            if pending:
                msg_id = pending.pop(0)
            elif event.node in last_shown:
                msg_id = last_shown[event.node]  # nothing new arrived: a repeat of the last
            else:
                continue
            last_shown[event.node] = msg_id
            if (event.node, msg_id) in shown:
                counts["shown twice"] += 1
                invariant.violations.append(
                    f"{event.node} showed message {names.id_labels.get(msg_id, msg_id)} again at"
                    f" seq {event.seq} (first at seq {shown[(event.node, msg_id)]}): {event.line!r}"
                )
            else:
                shown[(event.node, msg_id)] = event.seq
    return invariant


def _arriving(msg: dict[str, Any], saved: dict[str, str]) -> list[str]:
    """The ids of the messages a datagram brings to be shown (a message has one id
    whichever way it comes: direct, relayed, stored)."""
    kind = msg.get("t")
    if kind == "chat":
        return [str(msg["id"])]
    if kind == "channel":
        return [str(msg["post"])]
    if kind == "relay":
        return [saved.get(str(msg.get("sealed")), str(msg["id"]))]
    if kind == "mailbox":
        return [str(item["id"]) for item in msg.get("items", [])]
    return []


def _messages_answered(trace: Trace, names: Normaliser, counts: Counter[str]) -> Invariant:
    """Every direct message is ACKed by its peer, saved by the server (delivered or
    stored), or reported as not delivered; every send_all is ACKed or reported."""
    invariant = Invariant("every chat message ACKed, stored or reported as not delivered")
    events = trace.events
    timers = trace.header.timers.timers()
    # The sender is still waiting until its longest wait (and a try before it) is over.
    patience = longest_wait(timers) + 2 * timers.ack_timeout
    first_sent: dict[tuple[str, str], Send] = {}
    outcome: dict[tuple[str, str], str] = {}
    last_seen: dict[str, float] = {}
    exited: dict[str, float] = {}
    reported: dict[str, list[float]] = defaultdict(list)
    nodes = trace.nodes()
    for event in events:
        last_seen[event.node] = event.t
        if isinstance(event, Exited):
            exited[event.node] = event.t
        if isinstance(event, Shown) and event.line in (
            screen.SEND_FAILED,
            screen.SERVER_NOT_RESPONDING_CHANNEL,
        ):
            reported[event.node].append(event.t)
        if isinstance(event, Send) and event.msg and event.msg.get("t") in ("chat", "send_all"):
            client = nodes.get(event.node)
            if client is not None and client.role == "client":
                first_sent.setdefault((event.node, event.msg["id"]), event)
        if isinstance(event, Recv) and event.msg:
            key = (event.node, str(event.msg.get("id")))
            kind = event.msg.get("t")
            if kind == "ack" and key in first_sent:
                outcome.setdefault(key, "delivered")
            elif kind == "saved" and key in first_sent:
                outcome[key] = str(event.msg.get("outcome"))
    for key, send in first_sent.items():
        node, msg_id = key
        kind = "channel" if send.msg and send.msg.get("t") == "send_all" else "direct"
        counts[f"{kind} messages"] += 1
        result = outcome.get(key)
        if result is None and any(t >= send.t for t in reported[node]):
            result = "reported"
        if result is None:
            if node in exited and exited[node] - send.t < patience:
                result = "abandoned"  # the sender left before the answer could come
            elif last_seen.get(node, send.t) - send.t < patience:
                result = "in flight"
        if result is None:
            counts["lost"] += 1
            label = names.id_labels.get(msg_id, msg_id)
            invariant.violations.append(
                f"{node}'s {kind} message {label} (seq {send.seq}) was neither ACKed nor saved,"
                f" and no line said it was not delivered"
            )
            continue
        if kind == "direct" or result != "delivered":
            counts[result if result != "reported" else "reported not delivered"] += 1
    return invariant


def _retries(
    events: list[Event], names: Normaliser, timers: Timers, counts: Counter[str]
) -> Invariant:
    """Sends of the same request are spaced by its wait's timeout, and never more than its
    wait's tries (the protocol's table of waits says both)."""
    invariant = Invariant(
        f"retries spaced by the timeout ({timers.ack_timeout:g} s), at most {timers.tries} tries"
    )
    sends: dict[tuple[str, str, str, str], list[Send]] = defaultdict(list)
    for event in events:
        if isinstance(event, Send) and event.msg and event.msg.get("t") not in ANSWERS:
            key = (
                event.node,
                names.address(event.peer),
                str(event.msg["t"]),
                str(event.msg.get("id")),
            )
            sends[key].append(event)
    for (node, peer, kind, msg_id), group in sends.items():
        allowed = tries_allowed(kind, timers)
        interval = retry_interval(kind, timers)
        counts["retries"] += len(group) - 1
        label = names.id_labels.get(msg_id, msg_id)
        if len(group) > allowed:
            invariant.violations.append(
                f"{node} sent {kind} {label} to {peer} {len(group)} times (at most {allowed})"
                f" at seq {', '.join(str(e.seq) for e in group)}"
            )
        for earlier, later in itertools.pairwise(group):
            gap = later.t - earlier.t
            if gap < interval * 0.98 - 0.002 or gap > interval * 1.5 + 0.05:
                invariant.violations.append(
                    f"{node} re-sent {kind} {label} to {peer} {gap:.3f} s after the previous try"
                    f" (seq {earlier.seq} -> {later.seq}); the timeout is {interval:g} s"
                )
    return invariant


def _oldest_first(events: list[Event]) -> Invariant:
    invariant = Invariant("stored messages delivered oldest first")
    last: dict[tuple[str, str], tuple[float, int]] = {}
    batches: set[tuple[str, str]] = set()
    for event in events:
        if not (isinstance(event, Recv) and event.msg and event.msg.get("t") == "mailbox"):
            continue
        batch = (event.node, str(event.msg.get("id")))
        if batch in batches:
            continue  # the same batch again (a retry or a duplicate), not a later one
        batches.add(batch)
        key = (event.node, str(event.msg.get("delivery")))
        for item in event.msg.get("items", []):
            stored_at = float(item.get("stored_at", 0))
            previous = last.get(key)
            if previous is not None and stored_at < previous[0]:
                invariant.violations.append(
                    f"{event.node} got a message stored at {stored_at} after one stored at"
                    f" {previous[0]} (seq {previous[1]} -> {event.seq})"
                )
            last[key] = (stored_at, event.seq)
    return invariant


def _channel_reaches_everyone(
    events: list[Event], names: Normaliser, counts: Counter[str]
) -> Invariant:
    """Each channel message goes to every client the server had online (which ACKs it,
    or is marked offline so that it is stored); the others get it stored."""
    invariant = Invariant("every online client got each channel message or had it stored")
    server = next((e.node for e in events if getattr(e, "role", "") == "server"), "server")
    table: dict[str, bool] = {}
    posts: dict[str, tuple[Recv, dict[str, bool]]] = {}
    sent_to: dict[str, set[str]] = defaultdict(set)
    acked_by: dict[str, set[str]] = defaultdict(set)
    offline_after: dict[str, list[tuple[int, set[str]]]] = defaultdict(list)
    deliveries: dict[str, str] = {}  # the server's id of a channel delivery -> the post's
    for event in events:
        if event.node != server or not isinstance(event, Send | Recv) or not event.msg:
            continue
        msg: dict[str, Any] = event.msg
        kind = msg.get("t")
        if isinstance(event, Send) and kind in ("table", "delta"):
            # Every table and delta carries entries as they are now: applied in the
            # order sent, they keep the server's view of who is online.
            if kind == "table" and msg.get("part") == 0:
                table = {}
            for entry in msg.get("entries", []):
                table[entry[0]] = bool(entry[3])
            for name in msg.get("gone", []):
                table.pop(name, None)
            for post_id in posts:
                offline_after[post_id].append((event.seq, {n for n, on in table.items() if not on}))
        elif isinstance(event, Recv) and kind == "send_all" and msg["id"] not in posts:
            posts[msg["id"]] = (event, dict(table))
        elif isinstance(event, Send) and kind == "channel":
            deliveries[msg["id"]] = msg["post"]
            sent_to[msg["post"]].add(names.address(event.peer))
        elif isinstance(event, Recv) and kind == "ack" and msg["id"] in deliveries:
            acked_by[deliveries[msg["id"]]].add(names.address(event.peer))
    for post_id, (post, online) in posts.items():
        sender = names.address(post.peer)
        label = names.id_labels.get(post_id, post_id)
        for client, was_online in online.items():
            if client == sender:
                continue
            if not was_online:
                counts["stored"] += 1
                continue
            if client in acked_by[post_id]:
                counts["delivered"] += 1
            elif client not in sent_to[post_id]:
                invariant.violations.append(
                    f"channel message {label} (seq {post.seq}) was never sent to {client},"
                    f" which was online"
                )
            elif any(client in offline for _, offline in offline_after[post_id]):
                counts["stored"] += 1
            else:
                invariant.violations.append(
                    f"{client} never ACKed channel message {label} (seq {post.seq}) and was"
                    f" not marked offline (so it was not stored for it)"
                )
    return invariant


def render(result: CheckResult, path: str) -> str:
    counts = Counter(result.counts)
    direct, channel = counts["direct messages"], counts["channel messages"]
    lines = [
        f"check {path}: {result.nodes} nodes, {result.events} events, {result.duration:.3f} s",
        f"  datagrams: {counts['datagrams sent']} sent, {counts['datagrams received']} received,"
        f" {counts['retries']} retries, {counts['duplicate datagrams']} received twice,"
        f" {counts['undecodable']} undecodable",
        f"  messages: {direct + channel} sent ({direct} direct, {channel} channel),"
        f" {counts['delivered']} delivered, {counts['stored']} stored, {counts['lost']} lost,"
        f" {counts['shown twice']} duplicated (shown twice)"
        + (
            f", {counts['reported not delivered']} reported not delivered"
            if counts["reported not delivered"]
            else ""
        )
        + (
            f", {counts['in flight'] + counts['abandoned']} unanswered when the sender stopped"
            if counts["in flight"] + counts["abandoned"]
            else ""
        ),
        "  invariants:",
    ]
    for invariant in result.invariants:
        lines.append(f"    {'ok  ' if invariant.ok else 'FAIL'} {invariant.name}")
        lines += [f"         {violation}" for violation in invariant.violations[:10]]
        if len(invariant.violations) > 10:
            lines.append(f"         ... and {len(invariant.violations) - 10} more")
    lines.append("PASS" if result.ok else "FAIL")
    return "\n".join(lines)
