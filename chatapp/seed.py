"""The user's seed transcripts: what each client shows in each of the three tests.

Typed lines are left out (a terminal echoes them; the client does not show
them). ``{time}`` stands for the Unix time at which the server stored a
message. A client's screen passes a test when these lines appear on it, in
this order (the transcripts omit some ``[Client Table Updated]`` lines that
the rules require, so other lines may come between them).
"""

from __future__ import annotations

from chatapp.scenario import line_matches

SEED_LINES: dict[int, dict[str, list[str]]] = {
    1: {
        "user1": [
            "[Client Table Updated]",
            "[Client Table Updated]",
            "[Message has been received by user2.]",
            "[Message has been received by user3.]",
            "user2 : hello, nice to meet you, too!",
            "user3 : hi~",
            "[You are now offline. Bye.]",
            "[You have message]",
            "({time}) user2 : hello?",
            "({time}) user3 : are you still there?",
            "Caught keyboard interrupt. Exiting",
        ],
        "user2": [
            "[Client Table Updated]",
            "user1 : hello nice to meet you.",
            "[Message has been received by user1.]",
            "[Message has been received by user3.]",
            "user3 : hello!",
            "[Client Table Updated]",
            "[No ACK from user1, message sent to server.]",
            "[Messages received by the server and saved.]",
            "Caught keyboard interrupt. Exiting",
        ],
        "user3": [
            "user1 : hi!",
            "user2 : hello",
            "[Message has been received by user1.]",
            "[Message has been received by user2.]",
            "[Client Table Updated]",
            "[No ACK from user1, message sent to server.]",
            "[Messages received by the server and saved.]",
            "Caught keyboard interrupt. Exiting",
        ],
    },
    2: {
        "user1": [
            "[Client Table Updated]",
            "[Client Table Updated]",
            "[No ACK from user2, message sent to server.]",
            "[Message sent failed]",
            "[Server is shut down]",
            "[Exiting]",
        ],
        "user2": [
            "[You are now offline. Bye.]",
        ],
    },
    3: {
        "user1": [
            "[Client Table Updated]",
            "[Client Table Updated]",
            "[Message received by the server.]",
            "[Client Table Updated]",
        ],
        "user2": [
            "[Client Table Updated]",
            "Channel_Message user1 : hello guys",
            "Caught keyboard interrupt. Exiting",
        ],
        "user3": [
            "Channel_Message user1 : hello guys",
            "Channel_Message user1 : hi",
            "[Client Table Updated]",
        ],
    },
}


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
