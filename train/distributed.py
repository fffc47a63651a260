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

``--parallel fsdp`` (:func:`shard_student`, FSDP2 ``fully_shard``): each decoder layer of the student is one FSDP
unit and the trunk (``adapter.base_model``: embeddings, vision tower, final norm) the root unit. Their parameters,
gradients and optimizer state are sharded over the ranks (DTensors); FSDP all-gathers a unit's weights in its
forward pre-hook and reduce-scatters its gradients (summed, not averaged: the losses are already shares of the
global mean) in backward. The stages call ``adapter.base_model`` (the root's hooks fire) and afterwards the final
norm alone on the verbalized rows: the root keeps its weights gathered from its forward until its backward, so
that call sees whole weights and its gradient joins the root's reduce-scatter. The LM head (used by weight, never
called) and the verbalizers stay replicated; :meth:`World.sum_grads` sums the gradients of replicated trainable
parameters only, so nothing is reduced twice.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from vlsi.common.errors import VlsiError

__all__ = ["World", "init_from_env", "shard_student", "is_sharded"]


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
        """Sum the gradients of ``params`` over ranks, in one flat buffer. FSDP-sharded parameters (DTensors) are
        skipped: FSDP has reduce-scattered their gradients in backward."""
        params = [p for p in params if not is_sharded(p)]
        if self.size == 1 or not params:
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

    def clip_grad_norm(self, params, max_norm: float) -> float:
        """Clip the gradients of ``params`` to a total L2 norm of ``max_norm`` (after :meth:`sum_grads`); returns
        the norm before clipping. Without sharded parameters this is ``torch.nn.utils.clip_grad_norm_``; with them
        the squared norms of the local gradient shards are summed over ranks and added to the replicated
        gradients' (counted once), then every gradient is scaled as torch scales them."""
        import torch

        if not any(is_sharded(p) for p in params):
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        local = [g.to_local() if is_sharded(g) else g for g in grads]
        shard_sq = sum((x.detach().double().pow(2).sum() for g, x in zip(grads, local) if is_sharded(g)),
                       torch.zeros((), dtype=torch.float64, device=self._device()))
        dist.all_reduce(shard_sq)
        repl_sq = sum(float(x.detach().double().pow(2).sum()) for g, x in zip(grads, local) if not is_sharded(g))
        total = math.sqrt(float(shard_sq) + repl_sq)
        coef = min(1.0, max_norm / (total + 1e-6))
        if coef < 1.0:  # torch multiplies by the clamped coefficient always; x 1.0 changes nothing
            for x in local:
                x.mul_(coef)
        return total

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
        import atexit

        timeout = datetime.timedelta(seconds=float(os.environ.get("VLSI_DIST_TIMEOUT_S", "1800")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        # why: a group left to interpreter teardown destroys gloo's worker threads while joinable, and the process
        # aborts ("terminate called without an active exception") after a run that already succeeded
        atexit.register(_leave)
    if cuda:
        torch.cuda.set_device(local)
    return World(rank, size, local)


def _leave() -> None:
    """Destroy the process group this module joined (at exit)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def is_sharded(t) -> bool:
    """True for an FSDP-sharded parameter or gradient (a DTensor)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_student(adapter, world: World) -> None:
    """FSDP2 over the ranks of ``world``: every decoder layer one unit, then ``adapter.base_model`` (what the stages
    call) the root unit for the rest of the trunk. The LM head, outside the trunk and used by its weight, stays
    replicated (so do tied input embeddings: FSDP ignores them). Gradients are summed over ranks (as
    :meth:`World.sum_grads` sums them) in fp32, and every rank reduces every unit's gradients, zeros where its
    micro-batches gave none, so the collectives always match."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if world.size == 1:
        return
    device = world._device()
    mesh = init_device_mesh(device.type, (world.size,))
    mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)  # weights keep their dtype; gradients reduce in fp32
    head = set(adapter.lm_head.parameters())  # replicated; tied input embeddings (2B students) are the same tensor
    units = [fully_shard(layer, mesh=mesh, mp_policy=mp) for layer in adapter.decoder_layers]
    # the root keeps its weights gathered from forward to backward (FSDP's default for a root, relied upon here):
    # the stages call the final norm again, alone, on the verbalized rows after the trunk's forward
    units.append(fully_shard(adapter.base_model, mesh=mesh, mp_policy=mp, ignored_params=head,
                             reshard_after_forward=False))
    for u in units:
        u.set_gradient_divide_factor(1.0)  # a sum: each rank's loss is already its share of the global mean
        u.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM), no division after it
        u.set_reduce_scatter_unused_params(True, recurse=False)
