"""Helpers shared by several test modules (not a test module itself)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A free TCP port on the loopback interface, for a test's own torch.distributed group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
