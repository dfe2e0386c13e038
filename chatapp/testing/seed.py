"""The user's seed transcripts: what each client shows in each of the three tests.

Each screen is written once, whole: every line the client shows when the
scenario of that test is played (``chatapp/scenarios/testN.txt``). The lines
marked ``+`` are ones the seed's transcript leaves out: a table that the rules
send (rule 2), the scenario's closing Ctrl-C, and in Test 3 the server's ACK of
``send_all hi`` (rule 7). Typed lines are left out (a terminal echoes them;
the client does not show them). ``{time}`` stands for the Unix time at which
the server stored a message.

``SEED_SCREENS``: the whole screens. ``SEED_LINES``: the transcript's lines
only; a screen passes a test when they appear on it in this order
(``unmatched_seed_lines``), whatever comes between them.
"""

from __future__ import annotations

import re

_SCREENS: dict[int, dict[str, str]] = {
    1: {
        "user1": """
              [Client Table Updated]
              [Client Table Updated]
            + [Client Table Updated]
              [Message has been received by user2.]
              [Message has been received by user3.]
              user2 : hello, nice to meet you, too!
              user3 : hi~
              [You are now offline. Bye.]
              [You have message]
              ({time}) user2 : hello?
              ({time}) user3 : are you still there?
            + [Client Table Updated]
              Caught keyboard interrupt. Exiting
        """,
        "user2": """
              [Client Table Updated]
            + [Client Table Updated]
              user1 : hello nice to meet you.
              [Message has been received by user1.]
              [Message has been received by user3.]
              user3 : hello!
              [Client Table Updated]
              [No ACK from user1, message sent to server.]
              [Messages received by the server and saved.]
            + [Client Table Updated]
              Caught keyboard interrupt. Exiting
        """,
        "user3": """
            + [Client Table Updated]
              user1 : hi!
              user2 : hello
              [Message has been received by user1.]
              [Message has been received by user2.]
              [Client Table Updated]
              [No ACK from user1, message sent to server.]
              [Messages received by the server and saved.]
            + [Client Table Updated]
              Caught keyboard interrupt. Exiting
        """,
    },
    2: {
        "user1": """
              [Client Table Updated]
              [Client Table Updated]
            + [Client Table Updated]
              [No ACK from user2, message sent to server.]
              [Message sent failed]
              [Server is shut down]
              [Exiting]
        """,
        "user2": """
            + [Client Table Updated]
              [You are now offline. Bye.]
        """,
    },
    3: {
        "user1": """
              [Client Table Updated]
              [Client Table Updated]
            + [Client Table Updated]
              [Message received by the server.]
            + [Message received by the server.]
              [Client Table Updated]
            + Caught keyboard interrupt. Exiting
        """,
        "user2": """
              [Client Table Updated]
            + [Client Table Updated]
              Channel_Message user1 : hello guys
              Caught keyboard interrupt. Exiting
        """,
        "user3": """
            + [Client Table Updated]
              Channel_Message user1 : hello guys
              Channel_Message user1 : hi
              [Client Table Updated]
            + Caught keyboard interrupt. Exiting
        """,
    },
}

TIME_PLACEHOLDER = "{time}"


def _lines(screen: str, *, all_lines: bool) -> list[str]:
    rows = [row.strip() for row in screen.strip().splitlines()]
    return [row.removeprefix("+ ") for row in rows if all_lines or not row.startswith("+ ")]


#: test -> client -> every line it shows.
SEED_SCREENS: dict[int, dict[str, list[str]]] = {
    test: {name: _lines(screen, all_lines=True) for name, screen in screens.items()}
    for test, screens in _SCREENS.items()
}
#: test -> client -> the lines the seed's transcript shows.
SEED_LINES: dict[int, dict[str, list[str]]] = {
    test: {name: _lines(screen, all_lines=False) for name, screen in screens.items()}
    for test, screens in _SCREENS.items()
}


def line_matches(expected: str, line: str) -> bool:
    """``expected`` equals ``line``, where ``{time}`` stands for a Unix time (seconds)."""
    if TIME_PLACEHOLDER not in expected:
        return expected == line
    pattern = r"\d+(?:\.\d+)?".join(re.escape(part) for part in expected.split(TIME_PLACEHOLDER))
    return re.fullmatch(pattern, line) is not None


def unmatched_seed_lines(expected: list[str], shown: list[str]) -> list[str]:
    """The expected lines that do not appear in ``shown`` in order (empty when all do)."""
    position = 0
    for index, line in enumerate(expected):
        while position < len(shown) and not line_matches(line, shown[position]):
            position += 1
        if position == len(shown):
            return expected[index:]
        position += 1
    return []
