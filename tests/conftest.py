"""Fixtures shared by the test modules: every test's keys and state files go to a
directory of its own, never the user's; a throwaway PostgreSQL server.

``pg_server`` starts one cluster for the whole run, on first use (initdb and
pg_ctl in a temporary directory, 127.0.0.1 on a free port; see
``chatapp.testing.postgres``), and stops and removes it at the end. ``pg_url``
gives each test an empty database of its own. Without server binaries the tests
that use them are skipped, saying why, except in CI (the ``CI`` variable set),
where a missing install step must fail the run rather than pass it with skips.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatapp.testing.postgres import PgServer, ServerBinariesMissing, throwaway_server

_database_numbers = itertools.count()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    try:
        with throwaway_server() as server:
            yield server
    except ServerBinariesMissing as missing:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL tests cannot run: {missing}")
        pytest.skip(f"PostgreSQL tests skipped: {missing}")


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """postgresql://postgres@127.0.0.1:PORT/NAME of a new, empty database."""
    name = f"test_{os.getpid()}_{next(_database_numbers)}"
    yield pg_server.create_database(name)
    pg_server.drop_database(name)


@pytest.fixture(autouse=True)
def _state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path / "xdg-state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state
