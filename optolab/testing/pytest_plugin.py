"""pytest plugin (entry point ``pytest11: optolab``): the ``check_task`` fixture.

Importing this module is cheap; torch and the checker load only when a test asks for the
fixture, so having optolab installed does not slow down unrelated test suites.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def check_task():
    """The contract checker, :func:`optolab.testing.check_task`."""
    from optolab.testing.contract import check_task as checker

    return checker
