"""chatapp: a UDP chat system on Trio, with record and replay of every datagram."""

__version__ = "1.0.0"
