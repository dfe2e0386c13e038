"""The benchmark suite runs end to end in its tiny mode (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_benchmark_runs_and_reports_a_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "chatapp_tools.bench", "--tiny", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "figure" in done.stdout and "baseline" in done.stdout
    document = json.loads(out.read_text(encoding="utf-8"))
    assert {"date", "machine", "figures"} <= document.keys()
    assert document["machine"]["python"] and document["machine"]["trio"]
    keys = {figure["key"] for figure in document["figures"]}
    for expected in (
        "rtt_median",
        "pty_median",
        "server_saves",
        "server_registrations",
        "trace_share",
        "sqlite_saves",
        "reg_delivery",
        "memory_2000",
        "replay_virtual",
        "registration_n50",
        "registration_bytes_n50",
        "storm_n50",
        "flood_junk_lost",
        "flood_junk_stall",
        "flood_registrations_rss",
    ):
        assert expected in keys
    assert any(key.startswith("fanout_") for key in keys)
    # tools/replay and traces/test1.jsonl are in the tree, so every figure, the replay
    # ones too, has a value (n/a would mean the benchmark failed)
    assert (ROOT / "tools" / "replay").is_dir() and (ROOT / "traces" / "test1.jsonl").is_file()
    for figure in document["figures"]:
        assert figure["value"] is not None, figure
        # A count of lost messages is 0 when all is well; every other figure measures
        # something that takes time, memory or work.
        assert figure["value"] > 0 or figure["goal_limit"] == 0, figure
        assert figure["baseline"] is not None and figure["baseline"] > 0, figure
