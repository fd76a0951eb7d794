"""The fuzzers' short pass for CI (the long run is ``scripts/fuzz``).

In process: every role (the parser alone, S2S receiving with dialback and
bidi, S2S initiating, the dialback verification connection, the
component listener with XEP-0114 and XEP-0225) gets
``FEDGATE_FUZZ_CI_EXAMPLES`` hypothesis cases from a fixed seed and as many
from a random one, which tests/conftest.py prints (``FEDGATE_FUZZ_SEED=N``
repeats it).  Each case must pass the oracle of :mod:`tests.fuzz.roles`;
each role's cases must also reach its deep states, so that a grammar that
stopped getting past the stream header would fail here.
"""

from __future__ import annotations

import os

import pytest

from tests.fuzz.roles import ROLES, Stats
from tests.fuzz.run import FIXED_SEED, fuzz

EXAMPLES = int(os.environ.get("FEDGATE_FUZZ_CI_EXAMPLES", "300"))


def seeds():
    return [("fixed", FIXED_SEED), ("random", int(os.environ["FEDGATE_FUZZ_SEED"]))]


@pytest.mark.parametrize("which", ["fixed", "random"])
@pytest.mark.parametrize("role", list(ROLES))
def test_in_process(role, which):
    seed = dict(seeds())[which]
    stats = Stats()
    fuzz(role, seed, EXAMPLES, stats)  # raises with the shrunk failing case
    assert stats.cases >= EXAMPLES, (role, seed, stats)
    if role != "parser":
        # Every connection ended: a stream error, a clean close, or (once
        # authenticated) left to TCP's close.
        ended = stats.stream_error + stats.clean_close + stats.open_until_tcp_close
        assert ended == stats.cases, stats
        assert stats.stream_error > stats.cases // 10, stats
    if role in ("s2s-in", "s2s-out", "component"):
        assert stats.authenticated >= stats.cases // 20, (role, seed, stats)
    if role in ("s2s-in", "s2s-out"):
        assert stats.bidi > 0, (role, seed, stats)
    print(f"{role} seed {seed}: {stats}")


def test_over_loopback():
    """``FEDGATE_FUZZ_CI_LOOPBACK`` cases (half from each seed) over TCP
    against ``twistd fedgate``: alive, a clean log, every connection ended
    within 5 s of our close, RSS within 10% (tests.fuzz.loopback.passed)."""
    from tests.fuzz import loopback
    count = int(os.environ.get("FEDGATE_FUZZ_CI_LOOPBACK", "300"))
    figures = loopback.run(count, [seed for _, seed in seeds()], warmup=100, quiet=True)
    print(figures)
    assert loopback.passed(figures) == [], figures
    assert figures["connections"] == count
    # The cases reached the gateway's answers, not just its TCP accept.
    assert figures["stream_error"] > count // 2, figures
