"""Data-parallel training under torchrun: the process group, and the few collectives the engine needs.

``torchrun --nproc-per-node N $(which vlsi-train) ...`` (or ``python -m vlsi.train``) sets ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK``; :func:`init_from_env` joins the group (NCCL on CUDA, gloo on CPU). One process is a world of
size 1 and every collective is a no-op, so the engine has a single code path.

World-size invariance (docs/scale.md): the global batch of a step is ``world x micro-batch x accumulation``
micro-batches taken from ONE seeded order, rank ``r`` taking global micro-batches ``r, r + world, ...`` of each
step; losses are normalised by the step's global answer-row count; gradients are summed over ranks (each rank's
loss is already its share of the global mean); per-micro-batch randomness (layer matching) is keyed by the global
micro-batch index. The gradient sum is an explicit ``all_reduce`` over the flattened gradients rather than the
``DistributedDataParallel`` wrapper: the stages run the model through the adapter's hooked trunk and the frozen
head, not ``module.forward``, which DDP's reducer needs to see.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from vlsi.common.errors import VlsiError

__all__ = ["World", "init_from_env"]


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes to the output folder."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over ranks (float64 on the wire)."""
        if self.size == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """``obj`` of every rank, in rank order."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def sum_grads(self, params) -> None:
        """Sum the gradients of ``params`` over ranks, in one flat buffer."""
        if self.size == 1:
            return
        import torch
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        off = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[off:off + n].view_as(g).to(g.dtype)
            off += n

    def check(self, error: BaseException | None) -> None:
        """Collective: every rank calls it; if any rank failed, every rank raises (the failing one its own error,
        the others one line naming it), so no rank waits forever for a peer that stopped."""
        failed = self.sum([1.0 if error is not None else 0.0])[0] if self.size > 1 else float(error is not None)
        if not failed:
            return
        if error is not None and self.size == 1:
            raise error
        messages = self.gather(None if error is None else " ".join(str(error).split()) or type(error).__name__)
        if error is not None:
            raise error
        rank, msg = next((r, m) for r, m in enumerate(messages) if m is not None)
        raise VlsiError(f"rank {rank} stopped: {msg}")

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def _device(self):
        import torch
        import torch.distributed as dist

        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")


def init_from_env(device: str | None = None) -> World:
    """The world torchrun describes (``WORLD_SIZE`` > 1), or a world of one. Joins the process group once."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import datetime

    import torch
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("VLSI_DIST_TIMEOUT_S", "1800")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    if cuda:
        torch.cuda.set_device(local)
    return World(rank, size, local)
