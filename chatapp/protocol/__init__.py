"""The protocol's rules, with no I/O: the client's and the server's state machines."""

from chatapp.protocol.client import ClientProtocol, ClientState
from chatapp.protocol.common import Effect, Exit, Log, Persist, Send, Show, Timers
from chatapp.protocol.server import ClientRecord, Presence, ServerProtocol

__all__ = [
    "ClientProtocol",
    "ClientRecord",
    "ClientState",
    "Effect",
    "Exit",
    "Log",
    "Persist",
    "Presence",
    "Send",
    "ServerProtocol",
    "Show",
    "Timers",
]
