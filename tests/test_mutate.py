"""The mutation test's catalogue stays true to the code, and a mutant is really applied
and caught (the whole run is slow: ``python -m chatapp_tools.mutate``, or the full
benchmark run)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from chatapp_tools.mutate.__main__ import main, select
from chatapp_tools.mutate.catalogue import CATALOGUE
from chatapp_tools.mutate.engine import (
    KILLED,
    STALE,
    SURVIVED,
    Workspace,
    baseline,
    run_mutant,
    shipped_traces,
)
from chatapp_tools.mutate.mutant import KINDS, mutant

ROOT = Path(__file__).resolve().parent.parent


def test_the_catalogue_is_well_formed_and_every_snippet_occurs_once() -> None:
    assert len(CATALOGUE) >= 60
    ids = Counter(m.id for m in CATALOGUE)
    assert [i for i, n in ids.items() if n > 1] == []
    assert {m.kind for m in CATALOGUE} <= set(KINDS)
    stale = [f"{m.id}: {m.file} has it {m.occurrences(ROOT)} times" for m in CATALOGUE
             if m.occurrences(ROOT) != 1]  # fmt: skip
    assert stale == [], "fix these snippets in tools/mutate/catalogue.py"
    # spread over the rules: the waits, the server, the client, the screen, the store
    files = {m.file for m in CATALOGUE}
    assert len(files) >= 12


def test_only_selects_by_id_and_by_kind() -> None:
    assert [m.id for m in select(["screen-exiting"])] == ["screen-exiting"]
    assert {m.kind for m in select(["cli,dedup"])} == {"cli", "dedup"}
    with pytest.raises(ValueError, match="no-such"):
        select(["no-such"])


def test_a_mutant_is_applied_to_a_copy_and_killed_and_the_original_is_untouched() -> None:
    workspace = Workspace.of(ROOT)
    assert "traces/test1.jsonl" in shipped_traces(workspace.files)
    workspace.traces = ["traces/test1.jsonl"]
    passing, problems = baseline(workspace, timeout=60)
    assert (passing, problems) == (["traces/test1.jsonl"], [])
    (changed,) = select(["screen-table-updated"])
    before = (ROOT / changed.file).read_text(encoding="utf-8")
    outcome = run_mutant(workspace, changed, timeout=60)
    assert (outcome.status, outcome.killer) == (KILLED, "traces/test1.jsonl")
    assert "FAIL" in outcome.detail
    assert (ROOT / changed.file).read_text(encoding="utf-8") == before


def test_a_change_no_trace_sees_survives_and_a_snippet_not_found_is_stale() -> None:
    workspace = Workspace.of(ROOT)
    workspace.traces = ["traces/test1.jsonl"]
    unseen = mutant("comment", "screen", "chatapp/screen.py", "# --- our lines", "# our lines",
                    "a comment")  # fmt: skip
    assert run_mutant(workspace, unseen, timeout=60).status == SURVIVED
    gone = mutant("gone", "screen", "chatapp/screen.py", "no such text", "x", "nothing")
    outcome = run_mutant(workspace, gone, timeout=60)
    assert outcome.status == STALE
    assert "found 0 times" in outcome.detail


def test_list_prints_the_catalogue(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list", "--only", "cli"]) == 0
    out = capsys.readouterr().out
    assert "cli-join-timeout" in out and "--ack-timeout defaults to 0.6" in out
    assert main(["--only", "nothing-like-it"]) == 2


def test_a_mutant_that_breaks_the_import_is_killed_not_a_crash_of_the_tool() -> None:
    workspace = Workspace.of(ROOT)
    workspace.traces = ["traces/test1.jsonl", "traces/test2.jsonl"]
    broken = mutant("syntax", "screen", "chatapp/screen.py", "PROMPT = ", "PROMPT = = ", "bad")
    outcome = run_mutant(workspace, broken, timeout=60)
    assert (outcome.status, outcome.killer) == (KILLED, "traces/test1.jsonl")
    assert "SyntaxError" in outcome.detail or "crashed" in outcome.detail, outcome.detail
