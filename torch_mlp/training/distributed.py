"""DistributedDataParallel plumbing for train.py: join the group torchrun describes, reduce
across processes, and leave it cleanly.

Under torchrun (``WORLD_SIZE`` > 1), :func:`init_distributed` joins the process group (gloo on
CPU, NCCL on CUDA) unless the caller already did; :meth:`Dist.close` tears down only a group
it created: every process first meets at a barrier (none leaves while another still trains or
writes), then destroys the group. After a failure it destroys the group directly, without the
barrier, which a failed process's peers might never reach. :meth:`Dist.closing` does either
on leaving a ``with`` block.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Dist", "init_distributed"]


@dataclass
class Dist:
    """This process's place in the run: rank, world size, and whether it made the group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True: init_distributed created it, so close() destroys it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: Tensor, op: Any = None) -> Tensor:
        """Sum (or ``op``) ``t`` over the processes, in place; a no-op in one process."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self, *, failed: bool = False) -> None:
        """Leave the group this process created: barrier, then destroy; ``failed``: destroy
        at once (a barrier would wait forever for a process that stopped)."""
        if not self.owns_group:
            return
        self.owns_group = False
        if not dist.is_initialized():
            return
        try:
            if not failed:
                dist.barrier()
        finally:
            dist.destroy_process_group()

    @contextlib.contextmanager
    def closing(self) -> Iterator[Dist]:
        """``with dd.closing():`` calls :meth:`close` on the way out: barrier then destroy
        after the block ran through, destroy only after an exception (Ctrl-C included)."""
        try:
            yield self
        except BaseException:
            self.close(failed=True)  # no barrier: the other processes may never reach it
            raise
        self.close()


def init_distributed(device_name: str) -> Dist:
    """Join torchrun's process group (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        cuda = device_name.startswith("cuda") or (device_name == "auto"
                                                  and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        owns = True
    return Dist(rank, world, local, owns_group=owns)
