"""Triton kernels == torch paths on small odd shapes (values and gradients).

On a machine without CUDA, conftest.py sets TRITON_INTERPRET=1 so the kernels run in Triton's interpreter.
"""

import pytest
import torch

from vlsi.ops import TAIL_FLOOR, ce_from_hidden, coarse_kl, head_topk, sparse_kl_from_hidden
from vlsi.ops.dispatch import resolve_impl, triton_importable

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not importable")
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make(n, d, vocab, padded, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(padded, d, generator=g) * 0.4
    w[vocab:] = 1.0e3  # padded rows: huge, must never show up
    return x.to(dtype).to(DEV), w.to(dtype).to(DEV)


@pytest.mark.parametrize("k", [7, 1])
def test_head_topk_triton_matches_torch_odd_shape(k):
    x, w = make(37, 48, 1000, 1024)
    a = head_topk(x, w, k, 1000, impl="triton")
    b = head_topk(x, w, k, 1000, impl="torch")
    lp_ref = torch.log_softmax(x.double() @ w[:1000].double().T, 1)
    # ids equal except exact ties (none here); values within fp32 accumulation-order noise
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=2e-5, rtol=0)
    torch.testing.assert_close(torch.gather(lp_ref, 1, a.ids.long()).float(), a.logprobs, atol=2e-5, rtol=0)
    torch.testing.assert_close(a.tail.exp(), b.tail.exp(), atol=5e-6, rtol=1e-4)


def test_head_topk_triton_k_equals_vocab_bias_and_bf16():
    x, w = make(19, 40, 120, 128, seed=1, dtype=torch.bfloat16)
    bias = (torch.randn(128) * 0.3).to(DEV)
    a = head_topk(x, w, 120, 120, head_bias=bias, impl="triton")
    b = head_topk(x, w, 120, 120, head_bias=bias, impl="torch")
    assert torch.all(a.tail == TAIL_FLOOR)
    assert sorted(a.ids[3].tolist()) == list(range(120))
    # bf16 inputs, fp32 accumulation on both sides: log-probs agree to accumulation order
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-4, rtol=0)
    assert (a.ids == b.ids).float().mean() > 0.98  # bf16 inputs make some exact ties possible


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_sparse_kl_triton_matches_dense_values_and_grads(direction):
    x, w = make(37, 48, 1000, 1024, seed=2)
    xt, _ = make(37, 48, 1000, 1024, seed=3)
    rec = head_topk(xt, w, 7, 1000, impl="torch")
    x = x.requires_grad_(True)
    tau = 1.3 if direction == "reverse" else 1.0
    got = sparse_kl_from_hidden(x, w, rec.ids, rec.logprobs, rec.tail, real_vocab=1000, direction=direction,
                                temperature=tau, impl="triton")
    up = torch.linspace(0.5, 1.5, 37, device=DEV)
    (g_got,) = torch.autograd.grad((got * up).sum(), x)
    x64 = x.detach().double().requires_grad_(True)
    ref = coarse_kl(x64 @ w.double().T, rec.ids, rec.logprobs, rec.tail, real_vocab=1000, direction=direction,
                    temperature=tau)
    (g_ref,) = torch.autograd.grad((ref * up.double()).sum(), x64)
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g_got.double(), g_ref, atol=1e-4, rtol=1e-3)


def test_ce_triton_with_bias_matches_torch():
    x, w = make(21, 32, 300, 320, seed=4)
    bias = (torch.randn(320) * 0.3).to(DEV)
    tgt = torch.randint(0, 300, (21,)).to(DEV)
    out = {}
    for impl in ("triton", "torch"):
        xi = x.clone().requires_grad_(True)
        loss = ce_from_hidden(xi, w, tgt, real_vocab=300, head_bias=bias, impl=impl)
        loss.sum().backward()
        out[impl] = (loss.detach(), xi.grad)
    torch.testing.assert_close(out["triton"][0], out["torch"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], atol=1e-5, rtol=1e-4)


def test_auto_resolution_and_env_override(monkeypatch):
    expect = "triton" if DEV.type == "cuda" else "torch"
    monkeypatch.delenv("VLSI_OPS_IMPL", raising=False)
    assert resolve_impl("auto", DEV) == expect
    monkeypatch.setenv("VLSI_OPS_IMPL", "torch")
    assert resolve_impl("auto", DEV) == "torch"
    monkeypatch.setenv("VLSI_OPS_IMPL", "triton")
    assert resolve_impl("auto", DEV) == "triton"
