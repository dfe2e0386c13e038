"""Developer tools shipped with chatapp: the replay tool and the benchmarks."""
