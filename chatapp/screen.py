"""Every line a client shows, in one place.

The lines marked SEED are the contract: the user's test transcripts show them
word for word. The others are ours; they keep the seed's bracketed style and
say what happened and what to do.
"""

from __future__ import annotations

from collections.abc import Iterable

PROMPT = ">>> "

# --- SEED lines ----------------------------------------------------------------
TABLE_UPDATED = "[Client Table Updated]"
YOU_ARE_OFFLINE = "[You are now offline. Bye.]"
YOU_HAVE_MESSAGE = "[You have message]"
SAVED_BY_SERVER = "[Messages received by the server and saved.]"
CHANNEL_ACKED = "[Message received by the server.]"
SEND_FAILED = "[Message sent failed]"
SERVER_SHUT_DOWN = "[Server is shut down]"
EXITING = "[Exiting]"
SERVER_NOT_RESPONDING = "[Server not responding]"
SERVER_NOT_RESPONDING_CHANNEL = "[Server not responding.]"
KEYBOARD_INTERRUPT = "Caught keyboard interrupt. Exiting"


def printable(text: str) -> str:
    """``text`` from the network made safe for a terminal: a control character (a line
    break, an escape sequence) could otherwise fake lines or move the cursor."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def chat(sender: str, text: str) -> str:
    return f"{sender} : {printable(text)}"


def received_by(name: str) -> str:
    return f"[Message has been received by {name}.]"


def no_ack(name: str) -> str:
    return f"[No ACK from {name}, message sent to server.]"


def channel_message(sender: str, text: str) -> str:
    return f"Channel_Message {sender} : {printable(text)}"


def time_prefix(stored_at: float) -> str:
    """The prefix of a stored message's line (``stored_direct``, ``stored_channel``): when
    the server stored it, in Unix time. The replay checks each shown prefix against it."""
    return f"({stored_at!r}) "


def stored_direct(stored_at: float, sender: str, text: str) -> str:
    return f"({stored_at!r}) {sender} : {printable(text)}"


def stored_channel(stored_at: float, sender: str, text: str) -> str:
    return f"({stored_at!r}) Channel_Message {sender} : {printable(text)}"


# --- our lines ------------------------------------------------------------------

HELP = (
    "[Commands: send NAME MESSAGE | send_all MESSAGE | dereg NAME | reg NAME | table"
    " | fingerprint [NAME] | exit. help COMMAND explains one.]"
)
OFFLINE_ONLY_REG = "[You are offline. The only command now is: reg NAME (or exit).]"
ALREADY_ONLINE = "[You are already online.]"
STILL_JOINING = "[Still waiting for the server to accept the registration. Try again in a moment.]"
BUSY_DEREGISTERING = "[Going offline is in progress. Wait for the server's answer.]"
LEAVING = "[Leaving once the requests in flight are answered (Ctrl-C leaves now).]"
REG_NOT_ANSWERED = "[Server not responding. You are still offline; try reg again later.]"
EMPTY_TABLE = "[The client table is empty.]"
CANNOT_STORE = "[The server cannot store anything right now. Nothing was saved; try again later.]"


#: ``help COMMAND``: one line on each command (aliases share their command's line).
_TABLE_HELP = "[table (or list): the client table, with who is online.]"
_EXIT_HELP = (
    "[exit (or quit, Ctrl-D): leave, once the requests in flight are answered; Ctrl-C"
    " leaves at once. Leaving does not deregister: the server finds out when you stop"
    " answering.]"
)
_FINGERPRINT_HELP = (
    "[fingerprint (or key): your key's fingerprint. fingerprint NAME: NAME's, and the"
    " safety number to compare with NAME out of band (the same on both sides: no one is"
    " in between).]"
)
COMMAND_HELP = {
    "send": (
        "[send NAME MESSAGE: a direct message to NAME (yourself too), straight to its address."
        " Without an ACK in 500 ms it goes to the server, which delivers or stores it.]"
    ),
    "send_all": "[send_all MESSAGE: a channel message to every other client, through the server.]",
    "dereg": (
        "[dereg NAME: go offline (your own NAME only). The client keeps running;"
        " reg NAME brings you back.]"
    ),
    "reg": "[reg NAME: come back online after dereg, and receive what was stored for you.]",
    "table": _TABLE_HELP,
    "list": _TABLE_HELP,
    "fingerprint": _FINGERPRINT_HELP,
    "key": _FINGERPRINT_HELP,
    "help": "[help COMMAND: what COMMAND does; help alone lists the commands.]",
    "exit": _EXIT_HELP,
    "quit": _EXIT_HELP,
}

#: The terminal's own limit on a line it passes on when it edits the line itself (a
#: terminal in canonical mode, when the client's output is not a terminal).
CUT_BY_TERMINAL = "the terminal passes at most 4095 characters of a line and may have cut it"


def _did_you_mean(suggestion: str | None) -> str:
    return f" Did you mean {suggestion!r}?" if suggestion else ""


def unknown_command(word: str, suggestion: str | None = None) -> str:
    return f"[Unknown command {word!r}.{_did_you_mean(suggestion)} Type help for the commands.]"


def no_help(word: str, suggestion: str | None = None) -> str:
    return f"[No command {word!r} to explain.{_did_you_mean(suggestion)} Type help for the list.]"


def usage(form: str) -> str:
    return f"[Usage: {form}]"


def only_yourself(command: str, own_name: str) -> str:
    return f"[You can only {command} yourself ({own_name}).]"


def unknown_user(name: str) -> str:
    return f"[Unknown user {name}: not in the client table and not known to the server.]"


def lookup_not_answered(name: str) -> str:
    return (
        f"[{name} is not in the client table and the server is not responding. Nothing was sent.]"
    )


def too_long(size: int, limit: int) -> str:
    return f"[Message too long: {size} bytes, the limit is {limit}. Nothing was sent.]"


def refused(reason: str) -> str:
    return f"[Registration refused: {reason}]"


def request_refused(reason: str) -> str:
    return f"[The server refused: {reason}]"


def moving_server(old: str, new: str) -> str:
    """A client given several servers (``--server``) leaves one that stopped answering."""
    return f"[Server {old} not responding. Moving to server {new}.]"


def join_not_answered(server: str) -> str:
    return f"[Server {server} not responding. Is `chatapp serve` running there?]"


def table_lines(rows: Iterable[tuple[str, str, int, bool]]) -> list[str]:
    lines = [
        f"[{name:<16} {ip}:{port:<6} {'online' if online else 'offline'}]"
        for name, ip, port, online in rows
    ]
    return lines or [EMPTY_TABLE]


def trace_stopped(reason: str) -> str:
    return f"[The trace could not be written ({reason}). Recording stopped; the chat goes on.]"


def bad_input(detail: str) -> str:
    return f"[Could not read that line: {detail}. Nothing was sent.]"


# --- keys and trust ----------------------------------------------------------------


def server_key_changed(server: str, pinned: str, offered: str, pins_file: str) -> str:
    return (
        f"[The server at {server} answered with a different key than the one pinned for it:"
        f" pinned {pinned}, offered {offered}. Someone may be in the middle, or the server's"
        f" key was changed. If you know it was changed on purpose, remove the line for"
        f" {server} from {pins_file} and join again.]"
    )


def own_fingerprint(name: str, fingerprint: str) -> str:
    return f"[Your key ({name}): {fingerprint}]"


def peer_fingerprint(name: str, fingerprint: str) -> str:
    return f"[{name}'s key: {fingerprint}]"


def safety_number(name: str, number: str) -> str:
    return (
        f"[Safety number with {name}: {number}. Compare it with {name} out of band:"
        " the same number on both sides means no one is in between.]"
    )


def no_key_for(name: str) -> str:
    return f"[{name} is not in the client table: no key to show.]"


def not_stored(names: list[str], more: int) -> str:
    who = ", ".join(names) + (f" and {more} more" if more else "")
    return (
        f"[Your channel message could not be stored for {who} (mailbox full):"
        " they will not see it.]"
    )


def bad_key_file(path: str, why: str) -> str:
    return (
        f"the key file {path} {why}. It was not changed; fix it (or move it away to make"
        " a new key, which the server will refuse for a name bound to the old one)"
    )
