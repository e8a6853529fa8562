"""Where the shared Istio samples live, for any test that loads them.

The samples sit beside the checkout (`<repo>/../shared/samples`). When they are missing the calling
test fails with a message saying where they were expected: a silently skipped sample test would let
a loader regression through.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def samples_dir() -> Path:
    """The samples directory; fails the calling test when it does not exist."""
    path = REPO_ROOT.parent / "shared" / "samples"
    if not path.is_dir():
        pytest.fail(
            f"Istio samples not found at {path}: they must be checked out beside the repository "
            f"({REPO_ROOT.parent}/shared/samples); tests that need them fail rather than skip",
            pytrace=False,
        )
    return path
