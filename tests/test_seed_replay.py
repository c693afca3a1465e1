"""The seed report of tests/seed_replay.py: a failing test's report names the seed its
inputs came from and how to replay it; DLOPT_TEST_SEED replays exactly those inputs; a
passing test's report says nothing."""
from __future__ import annotations

import re

pytest_plugins = ["pytester"]

INNER = """
import torch

def test_draws():
    print("drew", float(torch.rand(())))
    assert False
"""


def _run(pytester, monkeypatch, seed=None):
    if seed is None:
        monkeypatch.delenv("DLOPT_TEST_SEED", raising=False)
    else:
        monkeypatch.setenv("DLOPT_TEST_SEED", str(seed))
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_inprocess("-p", "seed_replay", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert "dlopt test seed" in text
    seed_shown = int(re.search(r"seed=(\d+), replay with DLOPT_TEST_SEED=(\d+)", text)[1])
    assert f"DLOPT_TEST_SEED={seed_shown} python -m pytest 'test_inner.py::test_draws'" in text
    return seed_shown, re.search(r"drew (\S+)", text)[1]


def test_failure_report_shows_the_seed_and_replays(pytester, monkeypatch):
    seed, drawn = _run(pytester, monkeypatch)
    assert _run(pytester, monkeypatch, seed) == (seed, drawn)


def test_passing_test_report_has_no_seed_section(pytester, monkeypatch):
    pytester.makepyfile(test_ok="def test_ok():\n    pass\n")
    result = pytester.runpytest_inprocess("-p", "seed_replay", "-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=1)
    assert "dlopt test seed" not in result.stdout.str()
