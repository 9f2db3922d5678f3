"""Fixtures shared by every test module (helpers that are not fixtures: tests/support.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    """No progress bars: they would interleave with pytest's output (and cost time)."""
    monkeypatch.setenv("COP_NO_PROGRESS", "1")
