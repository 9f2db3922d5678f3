"""Helpers shared by several test modules (not a test module itself; fixtures: conftest.py)."""

from __future__ import annotations

import io
import os
import socket
import tarfile


def free_port() -> int:
    """A free TCP port on the loopback interface, for a test's own torch.distributed group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_rank(rank: int, world: int, port: int) -> None:
    """In a spawned worker: the environment torchrun would give rank ``rank`` of ``world``
    (one thread, no progress bars), before the worker joins the gloo group."""
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), COP_NO_PROGRESS="1")
    torch.set_num_threads(1)


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar holding ``members`` (name, bytes) in order, as webdataset writes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
