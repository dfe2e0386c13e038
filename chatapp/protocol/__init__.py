"""The protocol's rules, with no I/O: the client's and the server's state machines."""

from chatapp.protocol.changes import (
    Change,
    ClientRecord,
    ClientRemoved,
    ClientSaved,
    DeliveryMarked,
    MessagesRemoved,
    MessageStored,
    Presence,
    ServerPinned,
)
from chatapp.protocol.client import ClientProtocol, ClientState
from chatapp.protocol.codecs import Sender, Via
from chatapp.protocol.common import Effect, Exit, Log, Received, Send, Show, Timers
from chatapp.protocol.crypto import Entropy, Identity, SeededEntropy, SystemEntropy
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
    "DeliveryMarked",
    "Effect",
    "Entropy",
    "Exit",
    "Identity",
    "Log",
    "MessageStored",
    "MessagesRemoved",
    "Presence",
    "Received",
    "SeededEntropy",
    "Send",
    "Sender",
    "ServerPinned",
    "ServerProtocol",
    "ServerWait",
    "Show",
    "Signal",
    "SystemEntropy",
    "Timers",
    "Via",
]
