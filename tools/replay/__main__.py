"""``python -m chatapp_tools.replay``: the same as ``chat-replay``."""

from .cli import main

main()
