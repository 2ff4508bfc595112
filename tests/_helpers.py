"""Helpers shared by test modules (tests/ is on sys.path under pytest's default import mode)."""

import pytest


def skip_if_declined(backend, fn):
    """Run fn(); skip with the backend's own reasons when it declines these inputs."""
    try:
        return fn()
    except ValueError as e:
        if str(e).startswith(f"backend {backend!r} cannot run"):
            pytest.skip(str(e))
        raise
