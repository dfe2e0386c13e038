"""What an attacker on the network has and does, for the real-process attack tests:
datagrams captured from a run (a node's trace), altered bytes, a flood of junk, and
datagrams with a forged source address (a raw socket: root only; the tests that need
it are skipped without it)."""

from __future__ import annotations

import base64
import contextlib
import json
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from chatapp.wire import Address

LOCALHOST = "127.0.0.1"


def captured(trace: Path, direction: str, kind: str, until: float = 5.0) -> list[bytes]:
    """The datagrams of type ``kind`` a node sent (``direction`` "send") or received
    ("recv"), as its trace has them (a trace may be written a little behind)."""
    deadline = time.monotonic() + until
    while True:
        found: list[bytes] = []
        for line in trace.read_text(encoding="utf-8").splitlines()[1:]:
            with contextlib.suppress(ValueError):
                event: dict[str, Any] = json.loads(line)
                msg = event.get("msg") or {}
                if event.get("ev") == direction and msg.get("t") == kind:
                    raw = event.get("raw")
                    found.append(
                        raw.encode() if raw is not None else base64.b64decode(event["raw_b64"])
                    )
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def altered(data: bytes, rng: random.Random, count: int = 8) -> list[bytes]:
    """``data`` with one byte changed, at ``count`` places (the first byte, the last, and
    places between)."""
    places = {0, 1, len(data) - 1, *rng.sample(range(len(data)), min(count, len(data)))}
    return [data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :] for i in places]


def send_from_elsewhere(data: bytes, to: Address) -> list[bytes]:
    """Send ``data`` from a fresh port; whatever comes back within 0.3 s."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOCALHOST, 0))
        sock.settimeout(0.05)
        sock.sendto(data, to)
        answers = []
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                answers.append(sock.recvfrom(65536)[0])
        return answers


def can_forge() -> bool:
    """Whether this process may send datagrams with a forged source (a raw socket)."""
    try:
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
    except PermissionError:
        return False
    return True


def send_forged(data: bytes, source: Address, to: Address) -> None:
    """A UDP datagram whose IP and UDP headers say it comes from ``source``."""
    length = 8 + len(data)
    udp = struct.pack("!HHHH", source[1], to[1], length, 0) + data  # checksum 0: none
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 20 + length, random.randrange(65536), 0, 64, socket.IPPROTO_UDP, 0,
        socket.inet_aton(source[0]), socket.inet_aton(to[0]),
    )  # fmt: skip
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(header + udp, (to[0], 0))


@contextlib.contextmanager
def flood(to: Address, seconds: float = 30.0) -> Iterator[list[int]]:
    """Junk at ``to`` from a thread, as fast as it goes, until the block ends; yields a
    one-item list counting what was sent."""
    sent = [0]
    stop = threading.Event()
    rng = random.Random(7)
    junk = [rng.randbytes(rng.randint(1, 1200)) for _ in range(64)]
    junk += [b"\x01" + rng.randbytes(60), b"\x02" + rng.randbytes(80), b'{"t":"ack","id":"x"}']

    def run() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((LOCALHOST, 0))
            deadline = time.monotonic() + seconds
            while not stop.is_set() and time.monotonic() < deadline:
                for data in junk:
                    with contextlib.suppress(OSError):
                        sock.sendto(data, to)
                        sent[0] += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield sent
    finally:
        stop.set()
        thread.join(5)
