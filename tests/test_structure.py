"""The code's own rules: one place for each rule, and the limits the project keeps.

The table of waits is the one place that says what happens to a pending request:
the README's table is made from it, and every handler a row names exists. No
module reaches into another's private names; no function or module grows past
the limits; installing the project adds no top-level ``tools`` package.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatapp.protocol.client import ClientProtocol
from chatapp.protocol.inputs import BadInput, ClientInput, Signal
from chatapp.protocol.server import ServerProtocol
from chatapp.protocol.waits import ClientWait, ServerWait, Wait, wait_table_markdown
from chatapp.trace import input_line, parse_input_line
from chatapp.wire import Refused

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [*sorted((ROOT / "chatapp").rglob("*.py")), *sorted((ROOT / "tools").rglob("*.py"))]
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500

MACHINES: list[tuple[type[Wait], type]] = [
    (ClientWait, ClientProtocol),
    (ServerWait, ServerProtocol),
]


def test_the_readme_table_of_waits_is_made_from_the_rows() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = wait_table_markdown()
    assert table in readme, (
        "the README's table of waits differs from chatapp/protocol/waits.py; put this in"
        f" its place:\n{table}"
    )


@pytest.mark.parametrize(("table", "machine"), MACHINES, ids=["client", "server"])
def test_every_handler_a_row_names_exists_and_takes_what_it_is_given(
    table: type[Wait], machine: type
) -> None:
    for wait in table:
        rule = wait.rule
        answers = [rule.on_answer] + ([rule.on_refusal] if rule.on_refusal else [])
        for name, parameters in [*((a, ["pending", "answer", "now"]) for a in answers),
                                 (rule.on_give_up, ["pending", "now"])]:  # fmt: skip
            handler = getattr(machine, name, None)
            assert callable(handler), f"{wait}: {machine.__name__} has no {name}"
            given = list(inspect.signature(handler).parameters)[1:]
            assert len(given) == len(parameters), f"{wait}: {name}{given}"


#: The handlers that look a pending request's row up (``Machine._answered``), and the one
#: that checks a challenge's key against the pin first.
ROUTERS = {"_on_answer", "_on_ack", "_on_peer_ack", "_on_challenge"}


@pytest.mark.parametrize(("table", "machine"), MACHINES, ids=["client", "server"])
def test_every_answer_a_row_takes_reaches_the_rows_lookup(table: type[Wait], machine: type) -> None:
    """An answer type a row names but the machine does not route to the table would
    leave its waits to run out: each one goes to a handler that looks the row up, by
    whichever way its sender is authenticated."""
    handlers = machine._message_handlers if machine is ClientProtocol else machine._handlers
    routed = {kind for (kind, _via), handler in handlers.items() if handler.__name__ in ROUTERS}
    for wait in table:
        taken = [*wait.rule.answers, *([Refused] if wait.rule.on_refusal else [])]
        for answer in taken:
            assert answer in routed, f"{wait}: {answer.__name__} never reaches {machine}'s rows"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name}"
                for alias in node.names
                if _private(alias.name)
            ]
        elif isinstance(node, ast.Import):
            found += [
                f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name}"
                for alias in node.names
                if any(_private(part) for part in alias.name.split("."))
            ]
    return found


#: The one module allowed to reach into another's private names: Trio's switch for
#: deterministic scheduling, which replays need and Trio offers no public way to set.
PRIVATE_ON_PURPOSE = {"chatapp/testing/determinism.py"}


def test_no_module_imports_another_modules_private_names() -> None:
    found = [
        line
        for path in SOURCES
        if str(path.relative_to(ROOT)) not in PRIVATE_ON_PURPOSE
        for line in _private_imports(path)
    ]
    assert found == []


def test_no_function_or_module_is_over_the_limits() -> None:
    too_long = []
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(ROOT)
        if where.parts[0] == "chatapp" and len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{where}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{where}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []


def test_the_installed_project_has_no_top_level_tools_package(tmp_path: Path) -> None:
    """The repository's tools/ folder installs as chatapp_tools: a bare `tools` would
    clash with any other project's in site-packages."""
    script = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('tools') is None, 'tools is importable'\n"
        "import chatapp_tools.replay.cli, chatapp_tools.bench\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


inputs = st.one_of(
    st.text(max_size=40),
    st.sampled_from(list(Signal)),
    st.builds(BadInput, st.text(max_size=40)),
)


@given(inputs)
def test_an_input_reads_back_from_its_trace_line(item: ClientInput) -> None:
    line = input_line(item)
    if isinstance(item, str) and parse_input_line(line) != item:
        # A typed line that looks like an input the trace writes in brackets: the one
        # case the format cannot tell apart.
        assert line.startswith("<") and line.endswith(">")
        return
    assert parse_input_line(line) == item
