"""What a person does at a client, as the client's state machine takes it.

``ClientProtocol.handle_input`` is the one entry for all of them; the trace
format writes them as lines (``chatapp.trace.format.input_line``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Signal(enum.Enum):
    """Inputs that are not lines."""

    INTERRUPT = "interrupt"  # Ctrl-C
    HANG_UP = "hang_up"  # Ctrl-D, end of input, SIGHUP, SIGTERM


@dataclass(frozen=True)
class BadInput:
    """A line that could not be read as text (not UTF-8, or far too long)."""

    detail: str


#: A typed line (``str``), a signal, or a line that could not be read.
ClientInput = str | Signal | BadInput
