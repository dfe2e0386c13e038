"""``chat-replay show``: the timeline fits the width and never cuts a message's type,
colours only a terminal, and the files it writes open as what they claim to be."""

from __future__ import annotations

import os
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pexpect
import pytest
from chatapp_tools.replay import pictures, show
from chatapp_tools.replay.cli import main
from chatapp_tools.replay.show import fit_label, timeline
from chatapp_tools.replay.traces import read_trace

ROOT = Path(__file__).resolve().parent.parent
TEST3 = ROOT / "traces" / "test3.jsonl"
LONG = "hello_with_a_long_type"  # longer than a column, shorter than a line
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SVG = "{http://www.w3.org/2000/svg}"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as done:
        main(["show", *args])
    code = done.value.code
    return (code if isinstance(code, int) else 0), capsys.readouterr().out


@pytest.fixture
def long_types(monkeypatch: pytest.MonkeyPatch) -> Path:
    """test3, with every hello described by a type longer than a column is wide."""
    plain = show.describe

    def described(msg: Mapping[str, Any] | None) -> str:
        if msg and msg.get("t") == "hello":
            return f"{LONG} {msg.get('name')} and more fields"
        return plain(msg)

    monkeypatch.setattr(show, "describe", described)
    return TEST3


def test_a_label_is_cut_after_its_type_never_in_it() -> None:
    assert fit_label('chat "hello there"', 40) == 'chat "hello there"'
    assert fit_label('chat "hello there"', 10) == 'chat "hel~'
    assert fit_label("registered", 4) == "registered"
    assert fit_label("table v2 (3 parts)", 7) == "table"
    assert fit_label("table v2 (3 parts)", 8) == "table v~"


@pytest.mark.parametrize("width", [40, 60, 80, 133])
def test_every_line_fits_the_width_and_every_type_is_whole(long_types: Path, width: int) -> None:
    trace = read_trace(str(long_types))
    text = timeline(trace, width=width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    hellos = sum(1 for line in lines if LONG in line)
    assert hellos == 3  # each client's hello, its type whole
    assert not ANSI.search(text)
    # the names of the nodes head their columns
    for node in ("server", "user1", "user2", "user3"):
        assert node[:3] in lines[0]


def test_width_option_and_a_pipe_give_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, str(TEST3), "--width", "64")
    assert code == 0
    assert max(len(line) for line in out.splitlines()) <= 64
    assert not ANSI.search(out)  # captured: not a terminal
    code, out = run(capsys, str(TEST3), "--width", "64", "--color")
    assert ANSI.search(out) and max(len(ANSI.sub("", line)) for line in out.splitlines()) <= 64


def _on_a_terminal(*args: str, columns: int, env: dict[str, str]) -> str:
    child = pexpect.spawn(
        sys.executable, ["-m", "chatapp_tools.replay", "show", str(TEST3), *args],
        env=env, dimensions=(24, columns), encoding="utf-8", timeout=60,
    )  # fmt: skip
    out = child.read()
    child.close()
    assert child.exitstatus == 0, out
    return str(out).replace("\r\n", "\n")


def test_on_a_terminal_each_node_has_its_colour_and_the_terminals_width() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS", "LINES")}
    out = _on_a_terminal(columns=72, env=env)
    header = out.splitlines()[0]
    colours = re.findall(r"\x1b\[(\d+)m(\w+)", header)
    assert [name for _, name in colours] == ["server", "user1", "user2", "user3"]
    assert len({code for code, _ in colours}) == 4
    assert max(len(ANSI.sub("", line)) for line in out.splitlines()) <= 72
    assert not ANSI.search(_on_a_terminal(columns=72, env={**env, "NO_COLOR": "1"}))
    assert not ANSI.search(_on_a_terminal("--no-color", columns=72, env=env))


def test_markdown_svg_and_html_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    md, svg, page = tmp_path / "run.md", tmp_path / "run.svg", tmp_path / "run.html"
    code, out = run(capsys, str(TEST3), "--markdown", str(md), "--svg", str(svg),
                    "--html", str(page))  # fmt: skip
    assert code == 0 and out.count("wrote ") == 3
    nodes = ("server", "user1", "user2", "user3")
    text = md.read_text(encoding="utf-8")
    block = re.search(r"```mermaid\n(.*?)```", text, re.DOTALL)
    assert block is not None and block.group(1).startswith("sequenceDiagram\n")
    for node in nodes:
        assert f"    participant {node}\n" in block.group(1)
    drawing = ET.parse(svg).getroot()
    assert drawing.tag == f"{SVG}svg"
    texts = ["".join(t.itertext()) for t in drawing.iter(f"{SVG}text")]
    assert all(node in texts for node in nodes)
    arrows = list(drawing.iter(f"{SVG}g"))
    assert any("send_all" in "".join(g.itertext()) for g in arrows)
    assert any(line.get("stroke-dasharray") for line in drawing.iter(f"{SVG}line"))  # lost
    html = page.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html
    assert "src=" not in html and "href=" not in html.replace('href="#', "")
    embedded = html[html.index("<svg") : html.index("</svg>") + len("</svg>")]
    assert ET.fromstring(embedded).tag == f"{SVG}svg"


def test_a_file_that_cannot_be_written_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as done:
        main(["show", str(TEST3), "--svg", str(tmp_path / "no" / "such.svg")])
    assert done.value.code == 2
    assert "cannot write" in capsys.readouterr().err


def test_control_characters_in_a_trace_reach_neither_the_terminal_nor_the_svg(
    tmp_path: Path,
) -> None:
    lines = TEST3.read_text(encoding="utf-8").splitlines()
    edited = [
        line.replace('"line":"[Client Table Updated]"', '"line":"\\u001b[2J\\u0001 bell\\u0007"')
        for line in lines
    ]
    path = tmp_path / "hostile.jsonl"
    path.write_text("\n".join(edited) + "\n", encoding="utf-8")
    trace = read_trace(str(path))
    text = timeline(trace, width=100)
    assert "\\x1b[2J\\x01 bell\\x07" in text and "\x1b" not in text and "\x07" not in text
    ET.fromstring(pictures.svg(trace))  # no character XML refuses
