"""Coarse-grained KL between a student's full softmax and a teacher's cached top-k + tail (dense reference).

The coarse distribution has k + 1 buckets: the teacher's k ids and one tail bucket holding all other mass.
Teacher side: ``exp(t_logprobs)`` and ``exp(t_tail)`` as cached. Student side: its full-softmax probabilities at
the teacher's ids and ``1 - sum`` of them. The coarse KL is a lower bound of the full KL (data processing
inequality) and equals it when k = real_vocab up to ~1e-8 (the tail bucket is then empty on both sides: both
tails sit at or near TAIL_FLOOR = -20 and the bucket contributes ~exp(-20) * (difference) = 0 to fp32 precision).

Absent teacher entries: a teacher log-prob of ``-inf`` (at or below ``-1e4``) marks a slot the cache does not
hold (a truncated or padded entry of a ``topk1-*`` encoding, cache_format SPEC section 6; its id is a placeholder
and may repeat). Its mass is part of the teacher's tail, so the student's probability at that id is counted in the
student's tail bucket too, and the slot adds nothing.

Teacher normalisation: the k + 1 teacher log-masses are always renormalised over the buckets (a log-sum-exp
shift). At temperature 1 with exact cache values this is a no-op up to fp32 rounding; with low-precision cache
encodings it keeps the teacher a proper distribution, so the KL stays >= 0 and exactly 0 against itself.

Temperature tau != 1: the student's logits are divided by tau (exact). The cache holds T = 1 log-probs only,
so the teacher's tempered distribution is APPROXIMATED by tempering its k + 1 buckets (``logprob / tau``,
renormalised over the buckets); the tail bucket is treated as one token, which is not what tempering the unseen
tail tokens would give. No ``tau**2`` factor is applied; callers that want Hinton's scaling multiply.
"""

from __future__ import annotations

import torch

from ._numerics import _NEG_INF_GUARD, log1mexp, no_autocast

DIRECTIONS = ("forward", "reverse")


def _math_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def teacher_buckets(t_logprobs: torch.Tensor, t_tail: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Teacher's coarse log-distribution [N, k + 1] (k ids then the tail), tempered and renormalised.

    Inputs are raised to -1e4 first so that ``-inf`` entries (e.g. from an fp16 encoding) stay finite.
    """
    dt = _math_dtype(t_logprobs)
    buckets = torch.cat([t_logprobs.to(dt), t_tail.to(dt)[:, None]], dim=1).clamp(min=_NEG_INF_GUARD)
    if temperature != 1.0:
        buckets = buckets / temperature
    return buckets - torch.logsumexp(buckets, dim=1, keepdim=True)


def coarse_kl_terms(
    y: torch.Tensor,
    lse: torch.Tensor,
    t_logprobs: torch.Tensor,
    t_tail: torch.Tensor,
    *,
    direction: str = "forward",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-row coarse KL from the student's TEMPERED logits at the teacher ids and its tempered normaliser.

    y: [N, k] = student_logits[ids] / tau; lse: [N] = logsumexp(student_logits[:real_vocab] / tau).
    Differentiable in (y, lse): the chunked/fused paths get the whole gradient wrt the logits from
    dL/dlse (times the softmax, dense) and dL/dy (at the k ids, sparse). Returns [N] in fp32 (fp64 for fp64 y).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"coarse_kl: direction={direction!r} is not one of {DIRECTIONS}")
    dt = _math_dtype(y)
    with no_autocast(y):
        s_ids = y.to(dt) - lse.to(dt)[:, None]  # student log q at the teacher ids
        log_p = teacher_buckets(t_logprobs, t_tail, temperature).to(dt)
        # absent teacher entries (-inf: truncated or padded slots of a cache encoding) belong to the tail bucket on
        # both sides; their bucket gets the teacher's value so it adds exactly 0 and no gradient
        absent = t_logprobs.to(dt) <= _NEG_INF_GUARD
        if bool(absent.any()):
            s_tail = log1mexp(torch.logsumexp(s_ids.masked_fill(absent, float("-inf")), dim=1))
            s_ids = torch.where(absent, log_p[:, :-1].detach(), s_ids)
        else:
            s_tail = log1mexp(torch.logsumexp(s_ids, dim=1))  # log(1 - sum q), floored, zero grad at the floor
        log_q = torch.cat([s_ids, s_tail[:, None]], dim=1)
        if direction == "forward":  # KL(teacher || student)
            return (torch.exp(log_p) * (log_p - log_q)).sum(dim=1)
        return (torch.exp(log_q) * (log_q - log_p)).sum(dim=1)  # KL(student || teacher)


def check_teacher_args(fn: str, n: int, t_ids: torch.Tensor, t_logprobs: torch.Tensor, t_tail: torch.Tensor,
                       real_vocab: int) -> None:
    """Shape / range checks with one-line messages naming the field."""
    if t_ids.dim() != 2 or t_ids.shape[0] != n:
        raise ValueError(f"{fn}: t_ids must be [N={n}, k], got shape {tuple(t_ids.shape)}")
    if t_logprobs.shape != t_ids.shape:
        raise ValueError(f"{fn}: t_logprobs shape {tuple(t_logprobs.shape)} != t_ids shape {tuple(t_ids.shape)}")
    if t_tail.shape != (n,):
        raise ValueError(f"{fn}: t_tail must be [N={n}], got shape {tuple(t_tail.shape)}")
    if t_ids.dtype.is_floating_point or t_ids.dtype == torch.bool:
        raise ValueError(f"{fn}: t_ids must be an integer tensor, got {t_ids.dtype}")
    if t_ids.numel():
        lo, hi = int(t_ids.min()), int(t_ids.max())
        if lo < 0 or hi >= real_vocab:
            raise ValueError(f"{fn}: t_ids holds id {lo if lo < 0 else hi} outside the real vocab [0, {real_vocab})")


def coarse_kl(
    student_logits: torch.Tensor,
    t_ids: torch.Tensor,
    t_logprobs: torch.Tensor,
    t_tail: torch.Tensor,
    *,
    real_vocab: int,
    direction: str = "forward",
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-row coarse KL [N] from dense student logits [N, V >= real_vocab] (columns >= real_vocab ignored).

    t_ids: int [N, k] teacher top-k ids (distinct per row); t_logprobs: [N, k]; t_tail: [N] (cache record).
    direction: "forward" = KL(teacher || student), "reverse" = KL(student || teacher). fp32 math (fp64 for fp64
    logits); differentiable wrt ``student_logits`` by autograd. This is the reference the chunked
    ``sparse_kl_from_hidden`` must equal; it materialises [N, V] so use it only on small N.
    """
    if student_logits.dim() != 2 or student_logits.shape[1] < real_vocab:
        raise ValueError(f"coarse_kl: student_logits must be [N, V >= real_vocab={real_vocab}], "
                         f"got shape {tuple(student_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"coarse_kl: temperature={temperature} must be > 0")
    check_teacher_args("coarse_kl", student_logits.shape[0], t_ids, t_logprobs, t_tail, real_vocab)
    with no_autocast(student_logits):
        z = student_logits[:, :real_vocab].to(_math_dtype(student_logits)) / temperature
        lse = torch.logsumexp(z, dim=1)
        y = torch.gather(z, 1, t_ids.long())
        return coarse_kl_terms(y, lse, t_logprobs, t_tail, direction=direction, temperature=temperature)
