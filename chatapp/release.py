"""``chatapp release NAME``: an operator unbinds a name on a stopped server.

A name belongs to the key that first registered it; only the operator can
give it back. The server must be stopped (its database is locked while it
runs). The name's record and binding go, and so do the messages stored for
it: direct ones were sealed for the old key and could never be opened by the
next holder, and channel ones were meant for the person who held the name,
not for whoever takes it next.
"""

from __future__ import annotations

import sys

from chatapp.protocol.crypto import fingerprint


def release_name(name: str, path: str) -> int:
    """Release ``name`` in the database at ``path``; the exit status (0: released)."""
    if path == ":memory:":
        print("chatapp: error: a --db :memory: server keeps no names to release", file=sys.stderr)
        return 2
    from chatapp.sqlite_store import SqliteStore

    try:
        store = SqliteStore(path)
    except Exception as exc:  # locked by a running server, unreadable, not chatapp's
        print(f"chatapp: error: cannot open the database {path}: {exc}", file=sys.stderr)
        return 1
    try:
        bound = {record.name: record.key for record in store.load().clients}
        if name not in bound:
            print(f"{name} is not bound on this server: nothing to release.")
            return 1
        _, deleted = store.release(name)
    finally:
        store.close()
    print(
        f"released {name} (it was bound to key {fingerprint(bound[name])});"
        f" {deleted} stored messages for it deleted. The next client to register"
        f" {name} binds its own key."
    )
    return 0
