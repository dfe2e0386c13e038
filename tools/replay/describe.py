"""A datagram in a few words, for timelines and reports."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def describe(msg: Mapping[str, Any] | None) -> str:
    """A datagram in a few words, for timelines and diffs: ``table v2``, ``chat "hi"``."""
    if not msg:
        return "(undecodable)"
    kind = str(msg.get("t", "?"))
    if kind == "table":
        parts = msg.get("parts", 1)
        return f"table v{msg.get('version')}" + (f" ({parts} parts)" if parts != 1 else "")
    if kind == "delta":
        return f"delta v{msg.get('from')}->v{msg.get('to')}"
    if kind == "table_ack":
        return f"table_ack v{msg.get('version')}"
    if kind in ("chat", "channel", "send_all"):
        text = str(msg.get("text", ""))
        if len(text) > 24:
            text = text[:21] + "..."
        return f'{kind} "{text}"'
    if kind == "save":
        return f"save to {msg.get('to')} (sealed)"
    if kind == "relay":
        return "relay (sealed)"
    if kind == "mailbox":
        return f"mailbox ({len(msg.get('items', []))} stored)"
    if kind == "saved":
        return f"saved ({msg.get('outcome')})"
    if kind == "not_stored":
        return f"not_stored ({', '.join(map(str, msg.get('names', [])))})"
    if kind in ("hello", "register", "dereg", "reg", "lookup"):
        return f"{kind} {msg.get('name', '')}".rstrip()
    return kind


def is_content(line: str) -> bool:
    """Whether a shown line is a content line: what a person typed to another, as the
    receiver shows it (``screen.chat``, ``screen.channel_message``), not a bracketed
    status line."""
    return " : " in line and not line.startswith("[")
