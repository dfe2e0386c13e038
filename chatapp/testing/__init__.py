"""chatapp's testing kit (as ``trio.testing`` is Trio's): what tests, the demo and
the replay use to run nodes without a terminal or a real network.

- ``MemoryNetwork``: an in-memory network that drops, duplicates, delays and
  reorders datagrams on Trio's clock (virtual time under ``MockClock``);
- ``CapturedScreen``: a client's screen that keeps its lines;
- the scenario player (``Cluster``, ``play_scenario``): a server and clients
  driven by a scenario file, over real UDP or the memory network;
- the seed's expected screens (``SEED_SCREENS``, ``SEED_LINES``);
- ``RawClient``: a client in a few calls over a plain socket (load generators,
  attackers with keys of their own).

Nodes are started with ``chatapp.launch.run_node``, as the command line starts them.
"""

from chatapp.testing.network import Faults, MemoryEndpoint, MemoryNetwork
from chatapp.testing.raw import RawClient, handshake
from chatapp.testing.scenario import (
    Cluster,
    ScenarioError,
    Step,
    load_scenario,
    parse_scenario,
    play_scenario,
    scenario_path,
)
from chatapp.testing.screen import CapturedScreen
from chatapp.testing.seed import SEED_LINES, SEED_SCREENS, line_matches, unmatched_seed_lines

__all__ = [
    "SEED_LINES",
    "SEED_SCREENS",
    "CapturedScreen",
    "Cluster",
    "Faults",
    "MemoryEndpoint",
    "MemoryNetwork",
    "RawClient",
    "ScenarioError",
    "Step",
    "handshake",
    "line_matches",
    "load_scenario",
    "parse_scenario",
    "play_scenario",
    "scenario_path",
    "unmatched_seed_lines",
]
