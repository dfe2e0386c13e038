"""``chat-replay``: replay a recorded chatapp run and say whether the protocol behaved the same.

chat-replay TRACE                 replay and compare (the same as ``chat-replay replay TRACE``)
chat-replay check TRACE           the protocol's invariants over the history, with counts
chat-replay show TRACE            the run as a timeline (--markdown/--svg/--html FILE: a diagram)
chat-replay merge A B -o OUT      one trace from per-node traces
chat-replay record SCENARIO -o TRACE
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import trio
import trio.testing
import typer

from chatapp.testing import Step
from chatapp.trace import Send, Trace, TraceError, write_trace
from chatapp.typer_support import (
    UsageError,
    WordsCommand,
    new_app,
    usage_error_line,
    version_option,
)

from .traces import merge_traces, read_trace

if TYPE_CHECKING:
    from .plan import ReplayOptions
    from .runner import Runner

PROG = "chat-replay"
COMMANDS = ("replay", "check", "show", "merge", "record")

app = new_app(
    PROG,
    (
        "Replay a recorded chatapp run (a JSONL trace) and say whether the protocol behaved"
        " the same.\n\n`chat-replay TRACE` is short for `chat-replay replay TRACE`."
    ),
)


@app.callback()
def _root(version: Annotated[bool, version_option(PROG)] = False) -> None:
    pass


class Failed(Exception):
    """A trace that cannot be used as asked: one line, exit status 2."""


def _load(path: str) -> Trace:
    try:
        return read_trace(path)
    except FileNotFoundError:
        raise Failed(f"no such trace: {path}") from None
    except (TraceError, OSError) as exc:
        raise Failed(str(exc)) from None


def _write(path: str, write: Callable[[str], object]) -> None:
    """``write(path)``; a file that cannot be written (a missing directory, a directory)
    is one line."""
    try:
        write(path)
    except OSError as exc:
        raise Failed(f"cannot write {path}: {exc.strerror or exc}") from None


def _target(value: str | None) -> tuple[str, int] | None:
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise Failed(f"--target must be HOST:PORT, such as 127.0.0.1:8001, not {value!r}")
    from chatapp.net import resolve_ipv4

    try:
        return (resolve_ipv4(host), int(port))
    except OSError:
        raise Failed(f"--target: {host!r} is not an IPv4 address or localhost") from None


def _probability(value: float, what: str) -> float:
    if not 0.0 <= value < 1.0:
        raise Failed(f"{what} is a probability from 0 to 1 (exclusive), not {value}")
    return value


TraceArgument = Annotated[
    str, typer.Argument(metavar="TRACE", help="A trace recorded by chatapp (JSONL).")
]
VirtualOption = Annotated[
    bool,
    typer.Option(
        "--virtual/--real",
        help="--virtual (the default): the in-memory network in virtual time, instant and"
        " deterministic. --real: real UDP sockets on 127.0.0.1 in real time.",
    ),
]
NodeOption = Annotated[
    str | None,
    typer.Option(
        metavar="NAME",
        help="Test this node alone: every other node is played from the recording,"
        " answering what this one actually sends.",
    ),
]
TargetOption = Annotated[
    str | None,
    typer.Option(
        metavar="HOST:PORT",
        help="A running server to test black-box (implies --node <the server> and --real):"
        " the clients are played from the recording. Start it with an empty database.",
    ),
]
LossOption = Annotated[
    float, typer.Option(metavar="P", help="Drop each datagram with probability P (virtual only).")
]
DupOption = Annotated[
    float,
    typer.Option(metavar="P", help="Duplicate each datagram with probability P (virtual only)."),
]
SeedOption = Annotated[int, typer.Option(metavar="N", help="Seed of the fault injection.")]
OutOption = Annotated[
    str | None,
    typer.Option("--out", "-o", metavar="FILE", help="Also write the replay's own trace to FILE."),
]


@app.command(cls=WordsCommand)
def replay(
    trace: TraceArgument,
    virtual: VirtualOption = True,
    node: NodeOption = None,
    target: TargetOption = None,
    loss: LossOption = 0.0,
    dup: DupOption = 0.0,
    seed: SeedOption = 0,
    out: OutOption = None,
) -> None:
    """Replay TRACE with fresh nodes and compare their behaviour with the recording.

    Prints PASS (exit 0), or the first divergence with its context and the nearest
    recorded candidates (exit 1).
    """
    from .plan import ReplayError, ReplayOptions, server_name

    recorded = _load(trace)
    target_address = _target(target)
    if target_address is not None:
        try:
            node = node or server_name(recorded)
        except ReplayError as exc:
            raise Failed(str(exc)) from None
        virtual = False
    options = ReplayOptions(
        virtual=virtual,
        node=node,
        target=target_address,
        loss=_probability(loss, "--loss"),
        dup=_probability(dup, "--dup"),
        seed=seed,
    )
    _announce(trace, recorded, options, target)
    if not _consistent(recorded):
        raise typer.Exit(1)
    replayed, run, elapsed = _run_replay(recorded, options)
    if out:
        _write(out, lambda path: write_trace(replayed, path))
    for stall in run.stalls[:3]:
        typer.echo(f"  note: {stall}")
    passed = (
        _judge_faults(recorded, replayed, elapsed)
        if options.faults
        else _judge_comparison(recorded, replayed, options, elapsed)
    )
    if not passed:
        raise typer.Exit(1)


def _announce(trace: str, recorded: Trace, options: ReplayOptions, target: str | None) -> None:
    where = (
        "in virtual time on the in-memory network"
        if options.virtual
        else "on real UDP sockets on 127.0.0.1"
    )
    if options.faults:
        where += (
            f", losing {options.loss:g} and duplicating {options.dup:g} of the datagrams"
            f" (seed {options.seed})"
        )
    who = (
        "every node"
        if options.node is None
        else f"{options.node} alone, the others played from the recording"
    )
    if options.target is not None:
        who = f"the server at {target}, the clients played from the recording"
    typer.echo(
        f"replaying {trace}: {len(recorded.nodes())} nodes, {len(recorded.events)} events;"
        f" {who}, {where}"
    )
    for note in recorded.header.notes:
        typer.echo(f"  note: {note}")


def _consistent(recorded: Trace) -> bool:
    """Whether every datagram's msg in the trace is what its bytes say; if not, FAIL
    with the file and line of each that is not."""
    from .integrity import mismatches
    from .report import where_recorded

    found = list(mismatches(recorded))
    if not found:
        return True
    many = len(found) > 1
    typer.echo(
        f"FAIL: {len(found)} datagram{'s' if many else ''} of the trace"
        f" say{'' if many else 's'} one thing in msg and another in raw/raw_b64 (the bytes"
        " are what was on the wire):"
    )
    for mismatch in found[:10]:
        event = mismatch.event
        arrow = "->" if isinstance(event, Send) else "<-"
        typer.echo(
            f"  {where_recorded(recorded, event)}: {event.node} {arrow} {event.peer}:"
            f" {mismatch.why}"
        )
    return False


def _run_replay(recorded: Trace, options: ReplayOptions) -> tuple[Trace, Runner, float]:
    from .plan import ReplayError
    from .runner import run_replay

    started = time.perf_counter()
    try:
        replayed, run = run_replay(recorded, options)
    except ReplayError as exc:
        raise Failed(str(exc)) from None
    except OSError as exc:
        raise Failed(f"the replay could not use the network: {exc}") from None
    return replayed, run, time.perf_counter() - started


def _judge_faults(recorded: Trace, replayed: Trace, elapsed: float) -> bool:
    from .verdict import judge_faults

    verdict = judge_faults(recorded, replayed)
    for note in verdict.notes:
        typer.echo(f"  note: {note}")
    counts = verdict.counts
    typer.echo(
        f"  replay: {counts.get('datagrams sent', 0)} datagrams sent,"
        f" {counts.get('retries', 0)} retries, {counts.get('duplicate datagrams', 0)}"
        f" received twice; messages: {counts.get('delivered', 0)} delivered,"
        f" {counts.get('stored', 0)} stored, {counts.get('lost', 0)} lost"
    )
    if not verdict.passed:
        typer.echo("FAIL: with these faults the protocol lost or repeated messages:")
        for problem in verdict.problems[:20]:
            typer.echo(f"  - {problem}")
        return False
    typer.echo(
        "PASS: no message shown twice, none missing that its sender was told was"
        f" received, every invariant holds ({elapsed:.2f} s)"
    )
    return True


def _judge_comparison(
    recorded: Trace, replayed: Trace, options: ReplayOptions, elapsed: float
) -> bool:
    from .compare import compare
    from .report import report

    black_box = options.target is not None
    comparison = compare(recorded, replayed, under_test=options.node, black_box=black_box)
    if comparison.passed:
        typer.echo(
            f"PASS: {'every node' if options.node is None else options.node} behaved as"
            f" recorded ({comparison.compared} events compared in {len(comparison.streams)}"
            f" streams; {elapsed:.2f} s)"
        )
        return True
    typer.echo(f"FAIL: the replay diverged from the recording ({elapsed:.2f} s)\n")
    typer.echo(report(comparison))
    return False


@app.command("check", cls=WordsCommand)
def check_command(
    trace: Annotated[str, typer.Argument(metavar="TRACE", help="A chatapp trace (JSONL).")],
) -> None:
    """Check the protocol's invariants over the whole history, and count what happened.

    No message shown twice; every chat message ACKed, stored or reported as not
    delivered; retries spaced by the timeout and never more than allowed; stored
    messages delivered oldest first; every online client got each channel message
    or had it stored. Exit 1 when one does not hold.
    """
    from .check import check, render

    result = check(_load(trace))
    typer.echo(render(result, trace))
    if not result.ok:
        raise typer.Exit(1)


def _file_option(flag: str, what: str) -> object:
    return typer.Option(flag, metavar="FILE", help=f"Write {what} to FILE.")


def _write_text(path: str, text: str) -> None:
    Path(path).write_text(text, encoding="utf-8")


def _colour(choice: bool | None) -> bool:
    """Colours: as asked, else on a terminal unless NO_COLOR is set (no-color.org)."""
    if choice is not None:
        return choice
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")


@app.command(cls=WordsCommand)
def show(
    trace: Annotated[str, typer.Argument(metavar="TRACE", help="A chatapp trace (JSONL).")],
    mermaid: Annotated[
        str | None,
        typer.Option(
            "--mermaid",
            metavar="FILE",
            help="Write a Mermaid sequence diagram to FILE ('-': stdout).",
        ),
    ] = None,
    markdown: Annotated[
        str | None, _file_option("--markdown", "a Markdown file with the Mermaid diagram")
    ] = None,
    svg: Annotated[str | None, _file_option("--svg", "the diagram as SVG (works offline)")] = None,
    html: Annotated[
        str | None, _file_option("--html", "an HTML page with the SVG diagram (works offline)")
    ] = None,
    acks: Annotated[bool, typer.Option("--acks/--no-acks", help="Show the ACK datagrams.")] = True,
    width: Annotated[
        int | None,
        typer.Option(
            min=40, max=1000, help="Width of the timeline (default: the terminal's width)."
        ),
    ] = None,
    color: Annotated[
        bool | None,
        typer.Option(
            "--color/--no-color",
            help="Colour each node (default: on a terminal, unless NO_COLOR is set).",
        ),
    ] = None,
) -> None:
    """Print the run as a timeline (one column per node, time going down), or write it as
    a diagram to open: --markdown (Mermaid), --mermaid, --svg, --html."""
    from . import pictures
    from . import show as draw

    recorded = _load(trace)
    makers: list[tuple[str | None, str, Callable[[Trace], str]]] = [
        (mermaid, "a Mermaid sequence diagram", partial(draw.mermaid, acks=acks)),
        (markdown, "a Markdown file (Mermaid)", partial(pictures.markdown, acks=acks)),
        (svg, "an SVG sequence diagram", partial(pictures.svg, acks=acks)),
        (html, "an HTML page (SVG)", partial(pictures.html, acks=acks)),
    ]
    files = [(path, what, make) for path, what, make in makers if path is not None]
    for path, what, make in files:
        text = make(recorded)
        if path == "-":
            typer.echo(text, nl=False)
            continue
        _write(path, partial(_write_text, text=text))
        typer.echo(f"wrote {what} to {path}")
    if files:
        return
    columns = width or shutil.get_terminal_size().columns
    colour = _colour(color)
    typer.echo(draw.timeline(recorded, width=columns, acks=acks, colour=colour), color=colour)


@app.command(cls=WordsCommand)
def merge(
    traces: Annotated[list[str], typer.Argument(metavar="TRACE", help="Per-node traces.")],
    output: Annotated[str, typer.Option("--output", "-o", metavar="OUT", help="The merged trace.")],
) -> None:
    """Merge per-node traces into one, ordered by wall clock.

    When the clocks disagree (a datagram received before it was sent) the later
    trace is shifted and the merged header says so.
    """
    loaded = [_load(path) for path in traces]
    merged = merge_traces(loaded)
    _write(output, lambda path: write_trace(merged, path))
    typer.echo(
        f"merged {len(loaded)} traces ({len(merged.events)} events,"
        f" {len(merged.nodes())} nodes) into {output}"
    )
    for note in merged.header.notes:
        typer.echo(f"  note: {note}")


@app.command(cls=WordsCommand)
def record(
    scenario: Annotated[
        str, typer.Argument(metavar="SCENARIO", help="A scenario file (see chatapp/scenarios/).")
    ],
    output: Annotated[
        str, typer.Option("--output", "-o", metavar="TRACE", help="Where to write the trace.")
    ],
    virtual: Annotated[
        bool,
        typer.Option(
            "--virtual/--real",
            help="--real (the default): real UDP sockets on 127.0.0.1."
            " --virtual: the in-memory network in virtual time.",
        ),
    ] = False,
    check_stable: Annotated[
        int,
        typer.Option(
            metavar="N",
            min=0,
            max=1000,
            help="Then replay the trace N times; unless every replay passes, remove it and exit 1.",
        ),
    ] = 0,
) -> None:
    """Play a scenario with a real server and clients and record every datagram and line."""
    from chatapp.testing import ScenarioError, load_scenario

    try:
        steps = load_scenario(scenario)
    except OSError as exc:
        raise Failed(f"cannot read the scenario {scenario}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise Failed(f"cannot read the scenario {scenario}: not UTF-8 text") from None
    except ScenarioError as exc:
        raise Failed(str(exc)) from None
    try:
        events = _record_scenario(steps, scenario, output, virtual)
    except ScenarioError as exc:
        typer.echo(
            f"{PROG}: the scenario failed: {exc} (the trace so far is in {output})", err=True
        )
        raise typer.Exit(1) from None
    typer.echo(f"recorded {scenario} ({events} events) to {output}")
    if check_stable and not _stable(output, check_stable):
        raise typer.Exit(1)


def _record_scenario(steps: list[Step], scenario: str, output: str, virtual: bool) -> int:
    if not virtual:
        return trio.run(_record, steps, _shareable(scenario), output, virtual)
    from chatapp.testing.determinism import deterministic_scheduling

    with deterministic_scheduling():
        clock = trio.testing.MockClock(autojump_threshold=0)
        return trio.run(_record, steps, _shareable(scenario), output, virtual, clock=clock)


def _stable(output: str, runs: int) -> bool:
    """Whether the trace at ``output`` replays PASS ``runs`` times in ``runs``; if not, it
    is removed, and the first failing run's report says why."""
    from .compare import compare
    from .plan import ReplayError, ReplayOptions
    from .report import report
    from .runner import run_replay

    recorded = _load(output)
    for run in range(1, runs + 1):
        try:
            replayed, _ = run_replay(recorded, ReplayOptions())
        except ReplayError as exc:
            why = str(exc)
        else:
            comparison = compare(recorded, replayed)
            if comparison.passed:
                continue
            why = report(comparison)
        os.unlink(output)
        typer.echo(
            f"UNSTABLE: replay {run} of {runs} failed; {output} removed (record it again,"
            f" or make the scenario wait for what it depends on):\n{why}"
        )
        return False
    typer.echo(f"stable: {runs} replays of {runs} passed")
    return True


def _shareable(path: str) -> str:
    """The scenario's path as it may appear in a shared trace: relative, or just its name."""
    relative = os.path.relpath(os.path.abspath(path))
    return (
        path
        if not os.path.isabs(path)
        else (relative if not relative.startswith("..") else os.path.basename(path))
    )


async def _record(steps: list[Step], scenario: str, output: str, virtual: bool) -> int:
    from chatapp.net import UDP
    from chatapp.protocol.common import Timers
    from chatapp.store import MemoryStore
    from chatapp.testing import Cluster, Faults, MemoryNetwork, ScenarioError
    from chatapp.testing.stores import InlineSqliteStore
    from chatapp.trace import JsonlRecorder, complete_header

    from .plan import TRANSIT

    failed: ScenarioError | None = None
    try:
        recorder = JsonlRecorder.open(
            output,
            timers=Timers(),
            append=False,
            clock="virtual" if virtual else "real",
            source="chat-replay record",
            scenario=scenario,
        )
    except OSError as exc:
        raise Failed(f"cannot write {output}: {exc.strerror or exc}") from None
    try:
        # the clients' keys: made for this recording, in a directory removed after it
        with tempfile.TemporaryDirectory(prefix="chat-replay-record-") as state_dir:
            async with trio.open_nursery() as nursery:
                cluster = Cluster(
                    nursery,
                    # in virtual time every datagram takes what a replay gives it
                    MemoryNetwork(Faults(min_delay=TRANSIT[0], max_delay=TRANSIT[0]))
                    if virtual
                    else UDP,
                    recorder=recorder,
                    wall_offset=time.time() - trio.current_time(),
                    state_dir=Path(state_dir),
                    # the real database code, in the event loop's thread in virtual time
                    store_factory=InlineSqliteStore if virtual else MemoryStore,
                )
                try:
                    await cluster.play(steps)
                except ScenarioError as exc:
                    failed = exc  # raised after the nursery, not inside its exception group
                finally:
                    await cluster.shutdown()
    finally:
        recorder.close()
        trace = complete_header(output)
    if failed is not None:
        raise failed
    return len(trace.events)


_ROOT_OPTIONS = ("-h", "--help", "--version", "--install-completion", "--show-completion")


def main(argv: list[str] | None = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        args = ["--help"]
    elif args[0] not in COMMANDS and args[0] not in _ROOT_OPTIONS:
        args.insert(0, "replay")  # `chat-replay TRACE` is the everyday form
    try:
        result = app(args=args, prog_name=PROG, standalone_mode=False)
    except typer.Exit as done:
        raise SystemExit(done.exit_code) from None
    except typer.Abort:
        raise SystemExit(1) from None
    except Failed as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except UsageError as exc:
        print(usage_error_line(exc, PROG), file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
