"""A client's screen that keeps its lines, for tests, scenarios and the replay."""

from __future__ import annotations

from collections.abc import Callable

import trio


class CapturedScreen:
    """Collects the lines a client shows; ``changed`` is set at each new line."""

    def __init__(self, on_line: Callable[[str], None] | None = None) -> None:
        self.lines: list[str] = []
        self._on_line = on_line
        self.changed = trio.Event()

    def show(self, line: str) -> None:
        self.lines.append(line)
        if self._on_line is not None:
            self._on_line(line)
        self.changed.set()
        self.changed = trio.Event()

    def typed(self) -> None:
        pass

    def close(self) -> None:
        pass
