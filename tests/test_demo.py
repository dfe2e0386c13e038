"""The seed's three tests, played on real loopback UDP by the demo's scenarios."""

import pytest

from chatapp.demo import play_seed_test
from chatapp.testing import SEED_LINES, unmatched_seed_lines


@pytest.mark.parametrize("test", [1, 2, 3])
async def test_seed_test_on_loopback_shows_every_seed_line(test: int) -> None:
    cluster = await play_seed_test(test, echo=False)
    for name, expected in SEED_LINES[test].items():
        assert unmatched_seed_lines(expected, cluster.clients[name].screen.lines) == []
