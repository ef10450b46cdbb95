"""DDP helpers for the tests: a free local port, and one trainer process for test_train.py's
two-process test (a torch.multiprocessing.spawn target)."""

from __future__ import annotations

import os
import socket
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(rank: int, world_size: int, port: int, argv: list[str], data: Any) -> None:
    # What torchrun would set; the trainer's own code then joins the group (gloo on CPU).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from torch_mlp.training import main

    main([*argv, "--threads", "1"], data=data)
