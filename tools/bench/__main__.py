"""``python -m tools.bench`` / ``chatapp-bench``: run the benchmarks, print a table, write JSON."""

from __future__ import annotations

import argparse
import sys
import time
import traceback

from tools.bench.benches import BENCHMARKS, FULL, QUICK, TINY
from tools.bench.report import Figure, machine_info, render_table, unavailable, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chatapp-bench",
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
    sizes = {"tiny": TINY, "quick": QUICK, "full": FULL}[mode]
    names = list(BENCHMARKS)
    if args.only:
        names = [name.strip() for name in args.only.split(",") if name.strip()]
        unknown = [name for name in names if name not in BENCHMARKS]
        if unknown:
            parser.error(
                f"unknown benchmark {', '.join(unknown)} (choose from {', '.join(BENCHMARKS)})"
            )

    info = machine_info()
    print(
        f"chatapp-bench ({mode}) on {info['cpu']}, {info['cores']} cores, {info['os']},"
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
    if args.json:
        write_json(args.json, mode, figures, elapsed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
