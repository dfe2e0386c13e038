"""The protocol's rules, with no I/O: the client's and the server's state machines."""

from chatapp.protocol.changes import (
    Change,
    ClientRecord,
    ClientRemoved,
    ClientSaved,
    MessagesRemoved,
    MessageStored,
    Presence,
)
from chatapp.protocol.client import ClientProtocol, ClientState
from chatapp.protocol.common import Effect, Exit, Log, Received, Send, Show, Timers
from chatapp.protocol.inputs import BadInput, ClientInput, Signal
from chatapp.protocol.server import ServerProtocol
from chatapp.protocol.waits import ClientWait, ServerWait

__all__ = [
    "BadInput",
    "Change",
    "ClientInput",
    "ClientProtocol",
    "ClientRecord",
    "ClientRemoved",
    "ClientSaved",
    "ClientState",
    "ClientWait",
    "Effect",
    "Exit",
    "Log",
    "MessageStored",
    "MessagesRemoved",
    "Presence",
    "Received",
    "Send",
    "ServerProtocol",
    "ServerWait",
    "Show",
    "Signal",
    "Timers",
]
