"""The suite's own set-up: what ``make test`` relies on to share expensive fixtures."""

from __future__ import annotations

import os

import pytest


@pytest.mark.xdist_group("suite-setup")
def test_loadgroup_sends_a_group_to_one_worker(request: pytest.FixtureRequest) -> None:
    """Under ``-n 2 --dist loadgroup`` (pyproject's addopts) xdist marks a grouped test's id with
    ``@<group>``; without it the group is ignored silently and every worker builds the
    module-scoped fixtures (trained runs, process groups) again."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or not request.config.getvalue("loadgroup"):
        pytest.skip("runs only under pytest-xdist with --dist loadgroup (make test)")
    assert request.node.nodeid.endswith("@suite-setup"), request.node.nodeid


def test_a_module_scoped_fixture_groups_its_tests(request: pytest.FixtureRequest, shared_once: int) -> None:
    """conftest.py puts the tests of a module-scoped fixture into one xdist group."""
    marks = [m.args[0] for m in request.node.iter_markers("xdist_group")]
    assert marks == [f"{__name__}.shared_once"]


@pytest.fixture(scope="module")
def shared_once() -> int:
    return 1
