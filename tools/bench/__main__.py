"""``chatapp-bench`` (``python -m chatapp_tools.bench``): run the benchmarks, print a table,
write JSON."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import TextIO

from .benches import BENCHMARKS
from .report import Figure, machine_info, render_table, unavailable, write_json
from .sizes import FULL, QUICK, TINY

PROG = "chatapp-bench"


def _refuse(message: str) -> int:
    """A bad argument or output file, said in one line before anything runs: status 2."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _selected(only: str | None) -> list[str] | str:
    """The benchmarks ``--only`` names, in order, or why they are refused."""
    if only is None:
        return list(BENCHMARKS)
    names = list(dict.fromkeys(name.strip() for name in only.split(",") if name.strip()))
    choices = ", ".join(BENCHMARKS)
    if not names:
        return f"--only needs at least one benchmark name (choose from {choices})"
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        return f"--only: unknown benchmark {', '.join(unknown)} (choose from {choices})"
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="chatapp's benchmarks, each beside a baseline measured in the same run"
        " (loopback only; every load is bounded in count and time).",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a short run (under 30 s)")
    size.add_argument(
        "--tiny", action="store_true", help="a few seconds: only checks that every benchmark runs"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    parser.add_argument(
        "--only", metavar="NAMES", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}"
    )
    args = parser.parse_args(argv)

    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    names = _selected(args.only)
    if isinstance(names, str):
        return _refuse(names)
    # The output file is opened now, so that a path that cannot be written is said at once,
    # not after the whole run.
    try:
        out = open(args.json, "w", encoding="utf-8") if args.json else None  # noqa: SIM115
    except OSError as exc:
        return _refuse(f"cannot write {args.json}: {exc.strerror or exc}")
    try:
        return _run(mode, names, out)
    finally:
        if out:
            out.close()


def _run(mode: str, names: list[str], out: TextIO | None) -> int:
    sizes = {"tiny": TINY, "quick": QUICK, "full": FULL}[mode]
    info = machine_info()
    print(
        f"{PROG} ({mode}) on {info['cpu']}, {info['cores']} cores, {info['os']},"
        f" {info['python']}, Trio {info['trio']}",
        flush=True,
    )
    started = time.monotonic()
    figures: list[Figure] = []
    failed = False
    for name in names:
        began = time.monotonic()
        try:
            figures += BENCHMARKS[name](sizes)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            failed = True
            traceback.print_exc(file=sys.stderr)
            figures.append(unavailable(name, name, "", "", f"failed: {exc}"))
        print(f"  {name}: {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)
    elapsed = time.monotonic() - started
    print()
    print(render_table(figures))
    print(f"\n{len(figures)} figures in {elapsed:.1f} s")
    if out:
        try:
            write_json(out, mode, figures, elapsed)
        except OSError as exc:
            print(f"{PROG}: error: cannot write {out.name}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
