"""``chat-replay``: replay a recorded chatapp run, check its history, draw it.

- ``traces``: reads a trace, merging the parts several processes wrote;
- ``normalise``, ``describe``: stable labels for volatile values; datagrams in words;
- ``plan``: what a replay does, in which order (the recording's outside inputs);
- ``puppets``: the nodes played from the recording when one node is tested alone;
- ``runner``: carries out a plan with fresh nodes and records a new trace;
- ``compare``: matches two traces stream by stream (``report`` explains a mismatch);
- ``verdict``: judges a replay with injected faults;
- ``check``: the protocol's invariants over one trace;
- ``show``: a trace as a terminal timeline or a Mermaid diagram;
- ``cli``: the ``chat-replay`` command (``python -m chatapp_tools.replay``).
"""
