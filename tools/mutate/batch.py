"""Replaying several traces in one process (run with ``PYTHONPATH`` at a mutated copy):
``python -m chatapp_tools.mutate.batch [--all] TRACE...``.

Each trace goes through ``chat-replay``'s own entry point, as ``chat-replay TRACE``
would, its output captured; one JSON line per trace says its exit status and the end
of its output. Without ``--all`` it stops at the first trace that fails. One process
for every trace saves the start-up (imports) that a process per trace pays each time.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys


def replay_one(trace: str) -> tuple[int, str]:
    from ..replay.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main([trace])
        except SystemExit as done:
            status = done.code if isinstance(done.code, int) else int(done.code is not None)
        except BaseException as exc:  # a mutant may break anything: that is a failure
            status = 1
            print(f"the replay crashed: {exc!r}")
        else:
            status = 0
    return status, out.getvalue()


def main(argv: list[str]) -> int:
    every = "--all" in argv
    for trace in (arg for arg in argv if arg != "--all"):
        status, output = replay_one(trace)
        print(json.dumps({"trace": trace, "status": status, "out": output[-4000:]}), flush=True)
        if status and not every:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
