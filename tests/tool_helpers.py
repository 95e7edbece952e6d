"""External programs the integration tests run for real (`make install-test-tools`).

Without one, a developer's run skips the tests that need it; under CI
(`CI=true`) it fails them instead, so that a tool the install step could not
provide never turns into a green run with tests silently skipped.
"""
from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI") == "true"


def require_tool(name: str) -> str:
    """The path of program `name`. Without it the calling test (or fixture)
    is skipped, or under CI failed."""
    path = shutil.which(name)
    if path is None:
        why = f"`{name}` is not installed (make install-test-tools)"
        if IN_CI:
            pytest.fail(f"{why}; under CI=true the tests that need it must run", pytrace=False)
        pytest.skip(why)
    return path

