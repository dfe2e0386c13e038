"""chatapp: a UDP chat system on Trio, with record and replay of every datagram."""

from importlib import metadata

try:
    # One source for the version: pyproject.toml, as installed.
    __version__ = metadata.version("chatapp")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
