"""``chat-replay``: replay a recorded chatapp run, check its history, draw it.

- ``engine``: plays a trace again with fresh nodes (or one node, the others
  played from the recording) and records a new trace;
- ``compare``: compares two traces node by node, after normalising both;
- ``check``: the protocol's invariants over one trace;
- ``show``: a trace as a terminal timeline or a Mermaid diagram;
- ``cli``: the ``chat-replay`` command.
"""
