"""``chatapp-bench`` (``python -m chatapp_tools.bench``): run the benchmarks, print a table,
write JSON."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn, TextIO

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from chatapp.typer_support import UsageError, WordsCommand, new_app, usage_error_line
from chatapp.typer_support import version_option as _version_option

from .benches import BENCHMARKS
from .postgres import bench_postgres, bench_servers
from .report import Figure, machine_info, rich_table, unavailable, write_json
from .sizes import FULL, QUICK, TINY

PROG = "chatapp-bench"
#: The table's width when stdout is not a terminal (a file keeps every column whole).
FILE_WIDTH = 160

app = new_app(
    PROG,
    "chatapp's benchmarks, each beside a baseline measured in the same run"
    " (loopback only; every load is bounded in count and time).",
    no_args_is_help=False,  # chatapp-bench alone is the full run
)


#: Run only when ``--only`` names them: each starts a throwaway PostgreSQL cluster.
ON_REQUEST = {"postgres": bench_postgres, "servers": bench_servers}
ALL = {**BENCHMARKS, **ON_REQUEST}


class Refused(Exception):
    """A bad argument or output file, said in one line before anything runs: status 2."""


def _selected(only: str | None) -> list[str]:
    """The benchmarks ``--only`` names, in order."""
    if only is None:
        return list(BENCHMARKS)
    names = list(dict.fromkeys(name.strip() for name in only.split(",") if name.strip()))
    choices = ", ".join(ALL)
    if not names:
        raise Refused(f"--only needs at least one benchmark name (choose from {choices})")
    unknown = [name for name in names if name not in ALL]
    if unknown:
        raise Refused(f"--only: unknown benchmark {', '.join(unknown)} (choose from {choices})")
    return names


@app.command(cls=WordsCommand)
def run(
    quick: Annotated[bool, typer.Option("--quick", help="A short run (under a minute).")] = False,
    tiny: Annotated[
        bool, typer.Option("--tiny", help="A few seconds: only checks that every benchmark runs.")
    ] = False,
    json: Annotated[
        str | None, typer.Option("--json", metavar="FILE", help="Also write the figures to FILE.")
    ] = None,
    only: Annotated[
        str | None,
        typer.Option(
            "--only",
            metavar="NAMES",
            help=f"Comma-separated subset of: {', '.join(ALL)} (the last two only when named).",
        ),
    ] = None,
    version: Annotated[bool, _version_option(PROG)] = False,
) -> int:
    """Run chatapp's benchmarks, each beside a baseline measured in the same run."""
    if quick and tiny:
        raise Refused("--quick and --tiny cannot be used together")
    names = _selected(only)
    # The output file is opened now, so that a path that cannot be written is said at once,
    # not after the whole run.
    try:
        out = open(json, "w", encoding="utf-8") if json else None  # noqa: SIM115
    except OSError as exc:
        raise Refused(f"cannot write {json}: {exc.strerror or exc}") from None
    try:
        return _run("tiny" if tiny else "quick" if quick else "full", names, out)
    finally:
        if out:
            out.close()


@contextmanager
def _progress(total: int) -> Iterator[Progress | None]:
    """A live line on a terminal (which benchmark runs, for how long); nothing otherwise
    (each benchmark's time is then said when it ends)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        yield progress


def _run(mode: str, names: list[str], out: TextIO | None) -> int:
    sizes = {"tiny": TINY, "quick": QUICK, "full": FULL}[mode]
    info = machine_info()
    stdout = Console(width=None if sys.stdout.isatty() else FILE_WIDTH, highlight=False)
    stdout.print(
        f"{PROG} ({mode}) on {info['cpu']}, {info['cores']} cores, {info['os']},"
        f" {info['python']}, Trio {info['trio']}"
    )
    started = time.monotonic()
    figures: list[Figure] = []
    failed = False
    with _progress(len(names)) as progress:
        task = progress.add_task("", total=len(names)) if progress else None
        for index, name in enumerate(names, 1):
            if progress is not None and task is not None:
                progress.update(task, description=f"[{index}/{len(names)}] {name}")
            began = time.monotonic()
            try:
                figures += ALL[name](sizes)
            except Exception as exc:  # one broken benchmark must not hide the others' figures
                failed = True
                traceback.print_exc(file=sys.stderr)
                figures.append(unavailable(name, name, "", "", f"failed: {exc}"))
            took = f"  {name}: {time.monotonic() - began:.1f} s"
            if progress is not None:
                progress.console.print(took)
            else:
                print(took, file=sys.stderr, flush=True)
    elapsed = time.monotonic() - started
    stdout.print()
    stdout.print(rich_table(figures))
    stdout.print(f"\n{len(figures)} figures in {elapsed:.1f} s")
    if out:
        try:
            write_json(out, mode, figures, elapsed)
        except OSError as exc:
            print(f"{PROG}: error: cannot write {out.name}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app(args=args, prog_name=PROG, standalone_mode=False)
    except typer.Exit as done:
        raise SystemExit(done.exit_code) from None
    except Refused as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except UsageError as exc:
        print(usage_error_line(exc, PROG), file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    raise SystemExit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
