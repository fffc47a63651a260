"""GenRecal's Recalibrator: student-space sequence -> teacher-space states the frozen teacher head reads.

Shape (docs/method.md "GenRecal"; arXiv 2506.15681)::

    pre:    Linear(d_teacher -> d_student)            applied by the caller to TEACHER rows only
    blocks: n_blocks (2) decoder blocks of the STUDENT's family and text config (width, heads, KV heads, MLP,
            RoPE theta), fresh position ids 0..n-1 over the joined sequence, causal attention
    post:   Linear(d_student -> d_teacher)
    norm:   LayerNorm(d_teacher) (paper) or RMSNorm(d_teacher) (``norm="rmsnorm"``)

``forward(parts)`` takes, per sample, the joined sequence ``[question rows ; answer rows]`` already in student
space (the main pass joins the student's own question states with ``pre(z_teacher_answer)``; the regulariser
joins ``pre(z_teacher_question)`` with ``pre(z_teacher_answer)``), right-pads them into one batch and returns the
teacher-space output of every row.

The blocks are the student family's own transformers text model (``AutoModel.from_config`` of the student's text
config with ``num_hidden_layers = n_blocks``: ``Qwen2VLTextModel``, ``Qwen2_5_VLTextModel``, ``Qwen2Model``,
``LlamaModel``), fed ``inputs_embeds``, with its token embedding removed and its final norm replaced by the
identity (the Recalibrator's own norm follows ``post``). So the blocks, their attention masks and their RoPE are
exactly the family's code.

Position ids: ``0 .. n_b - 1`` for sample ``b`` (right padding, so one ``arange`` serves the batch). For M-RoPE
students (Qwen2-VL, Qwen2.5-VL) the 1-D ids are replicated on the 3 axes (temporal, height, width), which is what
the family's text model does with 2-D ``position_ids`` and what its text tokens get: the joined sequence mixes two
models' positions, so no image grid is meaningful in it; the image rows are positioned as text.

Identity initialisation (:meth:`Recalibrator.identity_init`, the wiring test's; not the default):

- every block's attention output projection ``o_proj`` and MLP ``down_proj`` are zero, so each block returns its
  input (pre-norm residual blocks: ``h + 0``);
- ``post.weight = diag(1 / g) @ pinv(pre.weight)``, ``post.bias = -post.weight @ pre.bias``, where ``g`` is the
  teacher's final RMSNorm weight: ``post(pre(z)) = z / g`` exactly when ``pre`` has full column rank
  (``d_student >= d_teacher``); with ``d_student < d_teacher`` it is the least-squares projection instead;
- the norm's weight = ``g * sqrt(1 + eps)`` (LayerNorm bias 0). A teacher state ``z = g * h / rms(h)`` has
  ``z / g = u`` with ``rms(u) = 1``, so ``RMSNorm(u) = g * sqrt(1 + eps) * u / sqrt(1 + eps) = z`` up to float
  error (the teacher's own norm eps makes ``rms(u)`` 1 to ~eps / rms(h)^2): teacher-only input through the
  Recalibrator reproduces the teacher's own states, hence its distribution. A LayerNorm also subtracts the row
  mean, ``LN(u) = g * sqrt(1 + eps) * (u - mean u) / sqrt(1 - mean(u)^2 + eps)``: exact only for rows with
  ``mean(u) = 0``
  (no affine LayerNorm inverts centring for every row), which is why the test of the full wiring uses
  ``norm="rmsnorm"`` and the LayerNorm variant is tested on centred rows.

Default initialisation (``init="random"``, paper silent): the family's own init for the blocks
(``initializer_range``), torch's default for the two linears, norm weight 1 / bias 0.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from vlsi.models.names import REC_INITS, REC_NORMS

__all__ = ["Recalibrator", "REC_NORMS", "REC_INITS", "joined_position_ids"]



class _RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)`` computed in fp32 (fp64 for fp64 input), as the families' RMSNorms."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        out = self.weight.to(xf.dtype) * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))
        return out.to(x.dtype)


def joined_position_ids(lengths: Sequence[int], n: int, device=None) -> torch.Tensor:
    """[B, n] position ids of right-padded joined sequences: ``0 .. len_b - 1`` then (padding) ``len_b ..``."""
    return torch.arange(n, device=device).unsqueeze(0).expand(len(lengths), n)


def _text_config(student_text_config, n_blocks: int, attn_implementation: str | None):
    c = copy.deepcopy(student_text_config)
    c.num_hidden_layers = int(n_blocks)
    if getattr(c, "layer_types", None) is not None:
        c.layer_types = list(c.layer_types[:n_blocks]) + [c.layer_types[-1]] * max(0, n_blocks - len(c.layer_types))
    c.vocab_size = 1  # the token embedding is dropped below; keep the throwaway one tiny
    c.pad_token_id = None
    if attn_implementation is not None:
        c._attn_implementation = attn_implementation
    return c


class Recalibrator(nn.Module):
    """See the module doc. ``student_text_config``: the student's ``config.get_text_config()``."""

    def __init__(self, student_text_config, d_teacher: int, *, n_blocks: int = 2, norm: str = "layernorm",
                 norm_eps: float = 1e-5, attn_implementation: str | None = "sdpa"):
        super().__init__()
        from transformers import AutoModel

        if norm not in REC_NORMS:
            raise ValueError(f"Recalibrator: norm={norm!r} is not one of {REC_NORMS}")
        if n_blocks < 1:
            raise ValueError(f"Recalibrator: n_blocks must be >= 1, got {n_blocks}")
        d_s = int(student_text_config.hidden_size)
        self.d_student, self.d_teacher, self.n_blocks, self.norm_kind = d_s, int(d_teacher), int(n_blocks), norm
        cfg = _text_config(student_text_config, n_blocks, attn_implementation)
        blocks = AutoModel.from_config(cfg)
        blocks.embed_tokens = None  # fed inputs_embeds only
        blocks.norm = nn.Identity()  # the Recalibrator's own norm follows `post`
        self.blocks = blocks
        self.pre = nn.Linear(self.d_teacher, d_s)
        self.post = nn.Linear(d_s, self.d_teacher)
        self.norm = nn.LayerNorm(self.d_teacher, eps=norm_eps) if norm == "layernorm" else _RMSNorm(self.d_teacher,
                                                                                                      norm_eps)

    # ---- initialisation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def identity_init(self, teacher_norm_weight: torch.Tensor) -> "Recalibrator":
        """Blocks pass their input through, ``post`` inverts ``pre`` and rescales by the teacher's final-norm weight
        ``g``, the norm's weight is ``g`` (module doc: exact for rmsnorm when d_student >= d_teacher)."""
        for layer in self.blocks.layers:
            layer.self_attn.o_proj.weight.zero_()
            if getattr(layer.self_attn.o_proj, "bias", None) is not None:
                layer.self_attn.o_proj.bias.zero_()
            layer.mlp.down_proj.weight.zero_()
            if getattr(layer.mlp.down_proj, "bias", None) is not None:
                layer.mlp.down_proj.bias.zero_()
        g = teacher_norm_weight.detach().to(torch.float64).cpu()
        w = self.pre.weight.detach().to(torch.float64).cpu()  # [d_s, d_T]
        inv = torch.linalg.pinv(w) / g[:, None]  # [d_T, d_s]: diag(1/g) pinv(W_pre)
        self.post.weight.copy_(inv.to(self.post.weight))
        self.post.bias.copy_((-inv @ self.pre.bias.detach().to(torch.float64).cpu()).to(self.post.bias))
        # sqrt(1 + eps): a row of rms 1 is normalised by sqrt(1 + eps), not 1; undo it so the identity is exact
        self.norm.weight.copy_((g * (1.0 + self.norm.eps) ** 0.5).to(self.norm.weight))
        if getattr(self.norm, "bias", None) is not None:
            self.norm.bias.zero_()
        return self

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, parts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``parts[b]``: [n_b, d_student] joined sequence of sample ``b``. Returns ``(out [B, n, d_teacher],
        mask [B, n] bool)`` (right padding; ``mask`` marks the real rows)."""
        if not parts:
            raise ValueError("Recalibrator: empty batch")
        lengths = [int(p.shape[0]) for p in parts]
        n, dev = max(lengths), parts[0].device
        dt = torch.promote_types(parts[0].dtype, self.pre.weight.dtype)
        x = parts[0].new_zeros((len(parts), n, self.d_student), dtype=dt)
        mask = torch.zeros((len(parts), n), dtype=torch.bool, device=dev)
        for b, p in enumerate(parts):
            if p.dim() != 2 or p.shape[1] != self.d_student:
                raise ValueError(f"Recalibrator: part {b} has shape {tuple(p.shape)}, expected [n, {self.d_student}]")
            x[b, : lengths[b]] = p.to(dt)
            mask[b, : lengths[b]] = True
        pos = joined_position_ids(lengths, n, device=dev)
        h = self.blocks(inputs_embeds=x, attention_mask=mask.long(), position_ids=pos, use_cache=False,
                        return_dict=True).last_hidden_state
        return self.norm(self.post(h)), mask

    def answer_rows(self, question: Sequence[torch.Tensor], answer: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-space output at the answer rows of ``[question[b] ; answer[b]]`` (both in student space),
        concatenated over samples in batch order: [sum A_b, d_teacher]."""
        out, _ = self(list(torch.cat([q, a.to(q.dtype)]) for q, a in zip(question, answer)))
        rows = [out[b, q.shape[0]: q.shape[0] + a.shape[0]] for b, (q, a) in enumerate(zip(question, answer))]
        return torch.cat(rows)
