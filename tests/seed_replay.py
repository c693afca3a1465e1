"""Fresh random inputs every test, replayable: the autouse fixture seeds torch from
os.urandom (or from DLOPT_TEST_SEED when set), and a failing test's report gets a
section with that seed and the command that replays it. tests/conftest.py imports both;
a plain pytest plugin otherwise (`-p seed_replay`). Not a test module."""
from __future__ import annotations

import os

import pytest
import torch

SEED_ENV = "DLOPT_TEST_SEED"
_KEY = "dlopt_seed"  # in item.user_properties (and so in junit XML reports)


def replay_hint(seed: int, nodeid: str) -> str:
    return (f"seed={seed}, replay with {SEED_ENV}={seed}:\n"
            f"    {SEED_ENV}={seed} python -m pytest '{nodeid}'")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run; the seed goes into the test's user_properties, and
    a failure's report shows it (pytest_runtest_makereport)."""
    if SEED_ENV in os.environ:
        seed = int(os.environ[SEED_ENV])
    else:
        seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append((_KEY, seed))
    yield seed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed (or erroring) test's report gets a "dlopt test seed" section: the seed
    its inputs came from and how to replay them."""
    report = yield
    if report.failed:
        seed = dict(item.user_properties).get(_KEY)
        if seed is not None:
            report.sections.append(("dlopt test seed", replay_hint(seed, item.nodeid)))
    return report
