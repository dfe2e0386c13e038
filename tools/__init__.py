"""Developer tools shipped with chatapp: the replay tool and the benchmarks.

The repository keeps them in ``tools/``; they install as ``chatapp_tools``."""
