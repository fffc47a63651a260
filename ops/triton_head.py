"""Triton kernels for the LM head: fused GEMM + online log-sum-exp (+ running top-k), and softmax @ W.

Imported lazily (only when ``impl`` resolves to "triton"). Under ``TRITON_INTERPRET=1`` the same kernels run on
CPU tensors (slowly), which is how CI checks them against the torch paths.

Layout of the work (both kernels): grid = (token blocks of BM rows) x (S vocab splits). A program walks its
split's vocab tiles of BN head rows, computes the [BM, BN] logits tile in registers (fp32 accumulation over the
hidden axis in BK steps) and never writes it. The S splits exist for parallelism: 4096 tokens / 64 rows is only
64 programs, too few for an H100; each split writes per-row partials that a tiny torch step merges
(``[S, N]`` max / sum-exp, ``[S, N, KP]`` top-k keys).

Top-k inside a program: each logit becomes one int64 key ``(monotone int32 of the fp32 bits) << 32 - col - 1``,
so ordering keys orders values (ties: smaller column first) and the column rides along for free. Each row keeps
an unsorted set of KP keys (KP = next power of two >= k); a tile's keys above the row's k-th best are inserted by
repeated max-extraction, replacing the set's minimum. After the first tiles few keys qualify, so a tile usually
costs a couple of reductions; a bitonic ``tl.topk`` per tile would cost a sort network on every tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._numerics import tail_logmass
from .dispatch import OpsError, triton_interpreting
from .topk import TopK

MAX_TRITON_K = 1024  # KP is a register tile; beyond this the torch path is the better tool
_MIN_KEY_C = tl.constexpr(-(2**63))


@triton.jit
def _tile_logits(x_ptr, w_ptr, b_ptr, offs_m, offs_n, N, V, D, sxm, sxd, swv, swd, scale,
                 HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """[BM, BN] fp32 tile of (x @ W.T + b) * scale; columns >= V are -inf (padded rows never read)."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, D, BK):
        offs_k = k0 + tl.arange(0, BK)
        xt = tl.load(x_ptr + offs_m[:, None] * sxm + offs_k[None, :] * sxd,
                     mask=(offs_m[:, None] < N) & (offs_k[None, :] < D), other=0.0)
        wt = tl.load(w_ptr + offs_n[None, :] * swv + offs_k[:, None] * swd,
                     mask=(offs_n[None, :] < V) & (offs_k[:, None] < D), other=0.0)
        if UPCAST:
            acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(xt, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < V, other=0.0).to(tl.float32)[None, :]
    z = acc * scale
    return tl.where(offs_n[None, :] < V, z, float("-inf"))


@triton.jit
def _lse_topk_kernel(x_ptr, w_ptr, b_ptr, max_ptr, sum_ptr, key_ptr,
                     N, V, D, sxm, sxd, swv, swd, scale, tiles_per_split,
                     HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, KP: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_run = tl.full([BM], float("-inf"), dtype=tl.float32)
    s_run = tl.zeros([BM], dtype=tl.float32)
    # Distinct placeholders (keys are unique, so "replace the minimum" replaces exactly one slot per row).
    keys_run = tl.full([BM, KP], -9223372036854775808, dtype=tl.int64) + tl.arange(0, KP)[None, :].to(tl.int64)
    n_tiles = tl.cdiv(V, BN)
    t_begin = pid_s * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    for t in range(t_begin, t_end):
        offs_n = t * BN + tl.arange(0, BN)
        z = _tile_logits(x_ptr, w_ptr, b_ptr, offs_m, offs_n, N, V, D, sxm, sxd, swv, swd, scale,
                         HAS_BIAS, UPCAST, IEEE, BM, BN, BK)
        # Online log-sum-exp; every tile has >= 1 real column, so m_new is finite and exp(-inf - m_new) = 0.
        m_new = tl.maximum(m_run, tl.max(z, axis=1))
        s_run = s_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_run = m_new
        bits = z.to(tl.int32, bitcast=True)
        mono = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed order of mono == float order of z
        keys = (mono.to(tl.int64) << 32) - offs_n.to(tl.int64)[None, :] - 1
        # Insert the tile's winners into the (unsorted) running set, replacing the row's current minimum.
        # The number of rounds is the most tile keys any row has above its k-th best: KP on the first tile,
        # then usually 0-2, so most tiles cost two reductions (no sort network on the hot path).
        kth = tl.min(keys_run, axis=1)
        rounds = tl.max(tl.sum((keys > kth[:, None]).to(tl.int32), axis=1), axis=0)
        for _ in range(rounds):
            best = tl.max(keys, axis=1)
            take = (keys_run == kth[:, None]) & (best > kth)[:, None]
            keys_run = tl.where(take, best[:, None], keys_run)
            keys = tl.where(keys == best[:, None], _MIN_KEY_C, keys)
            kth = tl.min(keys_run, axis=1)
    row_ok = offs_m < N
    base = pid_s * N + offs_m
    tl.store(max_ptr + base, m_run, mask=row_ok)
    tl.store(sum_ptr + base, s_run, mask=row_ok)
    offs_k = tl.arange(0, KP)
    tl.store(key_ptr + base[:, None] * KP + offs_k[None, :], keys_run, mask=row_ok[:, None])


@triton.jit
def _lse_kernel(x_ptr, w_ptr, b_ptr, max_ptr, sum_ptr,
                N, V, D, sxm, sxd, swv, swd, scale, tiles_per_split,
                HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_run = tl.full([BM], float("-inf"), dtype=tl.float32)
    s_run = tl.zeros([BM], dtype=tl.float32)
    n_tiles = tl.cdiv(V, BN)
    t_begin = pid_s * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    for t in range(t_begin, t_end):
        offs_n = t * BN + tl.arange(0, BN)
        z = _tile_logits(x_ptr, w_ptr, b_ptr, offs_m, offs_n, N, V, D, sxm, sxd, swv, swd, scale,
                         HAS_BIAS, UPCAST, IEEE, BM, BN, BK)
        m_new = tl.maximum(m_run, tl.max(z, axis=1))
        s_run = s_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m_run = m_new
    row_ok = offs_m < N
    tl.store(max_ptr + pid_s * N + offs_m, m_run, mask=row_ok)
    tl.store(sum_ptr + pid_s * N + offs_m, s_run, mask=row_ok)


@triton.jit
def _softmax_matmul_kernel(x_ptr, w_ptr, b_ptr, lse_ptr, coef_ptr, out_ptr,
                           N, V, D, sxm, sxd, swv, swd, som, sod, scale, tiles_per_split,
                           HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr):
    """out[n] += coef[n] * sum_v softmax(z[n] * scale)_v * W[v]: flash-attention with keys = values = W."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    row_ok = offs_m < N
    lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + offs_m, mask=row_ok, other=0.0)
    n_tiles = tl.cdiv(V, BN)
    t_begin = pid_s * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    for t in range(t_begin, t_end):
        offs_n = t * BN + tl.arange(0, BN)
        z = _tile_logits(x_ptr, w_ptr, b_ptr, offs_m, offs_n, N, V, D, sxm, sxd, swv, swd, scale,
                         HAS_BIAS, UPCAST, IEEE, BM, BN, BK)
        p = tl.exp(z - lse[:, None]) * coef[:, None]  # padded columns: exp(-inf) = 0
        p = tl.where(row_ok[:, None], p, 0.0)
        # The [BM, D] accumulator does not fit on chip for D in the thousands: add each D-slice straight into
        # the fp32 output (atomics, because the S vocab splits of one token block write the same rows).
        for d0 in range(0, D, BD):
            offs_d = d0 + tl.arange(0, BD)
            wt = tl.load(w_ptr + offs_n[:, None] * swv + offs_d[None, :] * swd,
                         mask=(offs_n[:, None] < V) & (offs_d[None, :] < D), other=0.0)
            if UPCAST:
                part = tl.dot(p, wt.to(tl.float32), input_precision="ieee")
            elif IEEE:
                part = tl.dot(p, wt, input_precision="ieee")
            else:
                part = tl.dot(p.to(wt.dtype), wt)
            tl.atomic_add(out_ptr + offs_m[:, None] * som + offs_d[None, :] * sod, part,
                          mask=row_ok[:, None] & (offs_d[None, :] < D))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _plan(x: torch.Tensor, w: torch.Tensor, n_vocab: int, bn_min: int = 16):
    """Block sizes, split count and dtype flags for one launch."""
    if triton_interpreting() or not x.is_cuda:
        bm, bn, bk, bd, warps = 16, max(64, bn_min), 32, 32, 4
    else:
        bm, bn, bk, bd, warps = 64, max(128, bn_min), 64, 128, 8
    n = x.shape[0]
    n_tiles = triton.cdiv(n_vocab, bn)
    m_blocks = triton.cdiv(n, bm)
    if x.is_cuda and not triton_interpreting():
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        want = max(1, triton.cdiv(4 * sms, m_blocks))  # ~4 programs per SM
    else:
        want = 4
    tiles_per_split = triton.cdiv(n_tiles, min(n_tiles, want))
    splits = triton.cdiv(n_tiles, tiles_per_split)  # no empty split: each sees >= 1 real column per row
    # Triton's interpreter (3.9) returns garbage for tl.dot on bf16/fp16 operands, while converting them to fp32
    # first is exact; so under the interpreter low-precision tiles are upcast (the GPU uses the native dot).
    interp_low = triton_interpreting() and x.dtype in (torch.bfloat16, torch.float16)
    upcast = x.dtype != w.dtype or x.dtype == torch.float64 or interp_low
    ieee = x.dtype == torch.float32 and not upcast
    return dict(bm=bm, bn=bn, bk=bk, bd=bd, warps=warps, splits=splits, tiles_per_split=tiles_per_split,
                upcast=upcast, ieee=ieee, m_blocks=m_blocks)


def _merge_lse(mx: torch.Tensor, sm: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(mx + torch.log(sm), dim=0)


def head_lse_triton(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, *, scale: float = 1.0) -> torch.Tensor:
    """logsumexp over rows of ``(x @ w.T + bias) * scale`` -> fp32 [N]; ``w`` holds only the real vocab rows."""
    n, d = x.shape
    v = w.shape[0]
    p = _plan(x, w, v)
    mx = torch.empty(p["splits"], n, dtype=torch.float32, device=x.device)
    sm = torch.empty_like(mx)
    _lse_kernel[(p["m_blocks"], p["splits"])](
        x, w, bias if bias is not None else x, mx, sm, n, v, d, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        float(scale), p["tiles_per_split"], HAS_BIAS=bias is not None, UPCAST=p["upcast"], IEEE=p["ieee"],
        BM=p["bm"], BN=p["bn"], BK=p["bk"], num_warps=p["warps"])
    return _merge_lse(mx, sm)


def head_softmax_matmul_triton(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, lse: torch.Tensor,
                               coef: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """``coef[:, None] * softmax((x @ w.T + bias) * scale) @ w`` -> fp32 [N, d], never forming the softmax."""
    n, d = x.shape
    v = w.shape[0]
    p = _plan(x, w, v)
    out = torch.zeros(n, d, dtype=torch.float32, device=x.device)
    _softmax_matmul_kernel[(p["m_blocks"], p["splits"])](
        x, w, bias if bias is not None else x, lse.float().contiguous(), coef.float().contiguous(), out,
        n, v, d, x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        float(scale), p["tiles_per_split"], HAS_BIAS=bias is not None, UPCAST=p["upcast"], IEEE=p["ieee"],
        BM=p["bm"], BN=p["bn"], BK=p["bk"], BD=p["bd"], num_warps=p["warps"])
    return out


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of the kernel's key encoding: int64 keys -> (fp32 values, int64 columns)."""
    mono = (keys + (2**32 - 1)) >> 32
    cols = (mono << 32) - keys - 1
    bits = torch.where(mono >= 0, mono, mono ^ 0x7FFFFFFF).to(torch.int32)
    return bits.view(torch.float32), cols


@torch.no_grad()
def head_topk_triton(x: torch.Tensor, head_weight: torch.Tensor, k: int, real_vocab: int, *,
                     head_bias: torch.Tensor | None = None) -> TopK:
    """The fused kernel behind ``head_topk(impl="triton")`` (same contract; see vlsi.ops.topk)."""
    if k > MAX_TRITON_K:
        raise OpsError(f"head_topk: impl='triton' supports k <= {MAX_TRITON_K}, got k={k}; use impl='torch'")
    n, d = x.shape
    w = head_weight[:real_vocab]
    b = None if head_bias is None else head_bias[:real_vocab]
    kp = _next_pow2(k)
    p = _plan(x, w, real_vocab, bn_min=kp)
    mx = torch.empty(p["splits"], n, dtype=torch.float32, device=x.device)
    sm = torch.empty_like(mx)
    keys = torch.empty(p["splits"], n, kp, dtype=torch.int64, device=x.device)
    _lse_topk_kernel[(p["m_blocks"], p["splits"])](
        x, w, b if b is not None else x, mx, sm, keys, n, real_vocab, d, x.stride(0), x.stride(1),
        w.stride(0), w.stride(1), 1.0, p["tiles_per_split"], HAS_BIAS=b is not None, UPCAST=p["upcast"],
        IEEE=p["ieee"], KP=kp, BM=p["bm"], BN=p["bn"], BK=p["bk"], num_warps=p["warps"])
    lse = _merge_lse(mx, sm)
    top = torch.topk(keys.permute(1, 0, 2).reshape(n, -1), k, dim=1).values  # sorted: descending logit
    val, cols = decode_keys(top)
    lp = val - lse[:, None]
    return TopK(cols.to(torch.int32), lp, tail_logmass(lp).float())
