"""vlsi.ops: numerics shared by extraction and training (imports only vlsi.common from the project).

- :func:`head_topk` / :func:`verbalized_topk`: LM head + top-k + log-softmax normaliser + tail log-mass, never
  writing [tokens x vocab] (torch: vocab/token tiles; Triton: fused kernel). Returns :class:`TopK`.
- :func:`coarse_kl`: dense reference KL between coarse-grained (top-k + tail) distributions, both directions.
- :func:`sparse_kl_from_hidden`, :func:`ce_from_hidden`: the same losses from hidden states through a frozen head,
  memory-bounded, with gradients wrt the hidden states.
- Every op computes in fp32 (fp64 for fp64 inputs) whatever the caller's autocast context (:func:`no_autocast`
  inside, inputs upcast explicitly), on the torch and the Triton paths; gradients come back in the input's dtype.
- ``impl="auto" | "torch" | "triton"`` on the head ops (env ``VLSI_OPS_IMPL`` overrides "auto"); an impossible
  choice raises :class:`OpsError` (a ``VlsiError`` and a ``ValueError``).
"""

from ._numerics import TAIL_FLOOR, log1mexp, logits_fp32, no_autocast, tail_logmass
from .dispatch import OpsError, resolve_impl, triton_importable
from .kl import coarse_kl, teacher_buckets
from .sparse_kl import ce_from_hidden, sampled_kl_from_hidden, sampled_kl_terms, sparse_kl_from_hidden
from .topk import TopK, head_topk, verbalized_topk

__all__ = [
    "OpsError",
    "TAIL_FLOOR",
    "TopK",
    "ce_from_hidden",
    "coarse_kl",
    "head_topk",
    "log1mexp",
    "logits_fp32",
    "no_autocast",
    "resolve_impl",
    "sampled_kl_from_hidden",
    "sampled_kl_terms",
    "sparse_kl_from_hidden",
    "tail_logmass",
    "teacher_buckets",
    "triton_importable",
    "verbalized_topk",
]
