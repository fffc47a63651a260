"""head_topk / verbalized_topk (torch path) against a dense float64 log_softmax + topk written here."""

import math

import pytest
import torch

from vlsi.ops import TAIL_FLOOR, TopK, head_topk, log1mexp, tail_logmass, verbalized_topk


def dense_ref(x, w, k, real_vocab, bias=None):
    z = x.double() @ w[:real_vocab].double().T
    if bias is not None:
        z = z + bias[:real_vocab].double()
    lp = torch.log_softmax(z, dim=1)
    vals, ids = torch.topk(lp, k, dim=1)
    tail = torch.log1p(-vals.exp().sum(1).clamp(max=1.0))
    return ids, vals, tail, lp


def make(n=37, d=48, vocab=1000, padded=1024, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(padded, d, generator=g) * 0.4
    w[vocab:] = 1.0e3  # padded rows with huge weights: any leak into the top-k or the normaliser shows
    return x.to(dtype), w.to(dtype)


def check_against_ref(out: TopK, x, w, k, vocab, bias=None, lp_atol=2e-5):
    ids, vals, tail, lp = dense_ref(x, w, k, vocab, bias)
    assert out.ids.dtype == torch.int32 and out.logprobs.dtype == torch.float32 and out.tail.dtype == torch.float32
    assert out.ids.shape == (x.shape[0], k) and out.tail.shape == (x.shape[0],)
    assert int(out.ids.max()) < vocab
    # ids equal except exact ties: compare the reference log-prob AT the returned ids with the reference top-k
    got_lp_at_ids = torch.gather(lp, 1, out.ids.long())
    torch.testing.assert_close(got_lp_at_ids, vals, atol=lp_atol, rtol=0)
    frac_equal = (out.ids.long() == ids).float().mean().item()
    assert frac_equal > 0.99
    torch.testing.assert_close(out.logprobs.double(), vals, atol=lp_atol, rtol=0)
    assert torch.all(out.logprobs[:, :-1] >= out.logprobs[:, 1:])  # descending
    if k < vocab:
        # compare tail MASSES: the log of a small tail amplifies fp32 rounding of 1 - sum
        torch.testing.assert_close(out.tail.double().exp(), tail.exp(), atol=5e-6, rtol=1e-4)
    else:
        assert torch.all(out.tail == TAIL_FLOOR)


@pytest.mark.parametrize("k", [7, 1, 64])
def test_odd_shape_matches_dense(k):
    x, w = make()
    out = head_topk(x, w, k, 1000, impl="torch", chunk_tokens=8, chunk_vocab=96)
    check_against_ref(out, x, w, k, 1000)


def test_k_equals_vocab_and_floor():
    x, w = make(vocab=200, padded=256)
    out = head_topk(x, w, 200, 200, impl="torch", chunk_vocab=64)
    check_against_ref(out, x, w, 200, 200)
    assert sorted(out.ids[0].tolist()) == list(range(200))


def test_chunked_equals_unchunked_and_padded_rows_never_selected():
    x, w = make(seed=1)
    a = head_topk(x, w, 7, 1000, impl="torch", chunk_tokens=5, chunk_vocab=33)
    b = head_topk(x, w, 7, 1000, impl="torch", chunk_tokens=10_000, chunk_vocab=10_000)
    assert torch.equal(a.ids, b.ids)
    torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.tail, b.tail, atol=1e-4, rtol=0)
    # If padded rows leaked into the normaliser the log-probs would be ~ -1e3 * |x|; into the top-k, ids >= 1000.
    assert int(a.ids.max()) < 1000 and float(a.logprobs.max()) > -50


def test_bias_and_bf16_inputs():
    x, w = make(seed=2, dtype=torch.bfloat16)
    bias = torch.randn(1024) * 0.5
    out = head_topk(x, w, 5, 1000, head_bias=bias, impl="torch", chunk_vocab=128)
    # reference from the SAME bf16 values, computed in float64 (fp32 accumulation vs fp64: tiny differences)
    check_against_ref(out, x, w, 5, 1000, bias=bias, lp_atol=1e-4)


def test_verbalized_topk_applies_verbalizer_then_norm_and_keeps_leading_axes():
    torch.manual_seed(3)
    d, vocab = 32, 300
    h = torch.randn(2, 9, d)
    verb = torch.nn.Linear(d, d, bias=False)
    norm = torch.nn.LayerNorm(d)
    w = torch.randn(vocab, d)
    out = verbalized_topk(h, verb, norm, w, 4, vocab, impl="torch")
    assert out.ids.shape == (2, 9, 4) and out.tail.shape == (2, 9)
    with torch.no_grad():
        x = norm(verb(h)).reshape(-1, d)
    ref = head_topk(x, w, 4, vocab, impl="torch")
    assert torch.equal(out.ids.reshape(-1, 4), ref.ids)
    torch.testing.assert_close(out.logprobs.reshape(-1, 4), ref.logprobs)


def test_bad_inputs_give_one_line_errors():
    x, w = make(n=3, d=8, vocab=20, padded=24)
    for kwargs, word in [(dict(k=0), "k=0"), (dict(k=21), "k=21"), (dict(k=3, real_vocab=25), "real_vocab=25")]:
        args = dict(k=3, real_vocab=20) | kwargs
        with pytest.raises(ValueError, match=word) as e:
            head_topk(x, w, args["k"], args["real_vocab"], impl="torch")
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="hidden size"):
        head_topk(x[:, :4], w, 3, 20)
    with pytest.raises(ValueError, match="impl="):
        head_topk(x, w, 3, 20, impl="cuda")


def test_log1mexp_and_tail_logmass():
    x = torch.tensor([-1e-3, -0.5, -1.0, -30.0, 0.0, 1e-3, -1e-12], dtype=torch.float64, requires_grad=True)
    y = log1mexp(x)
    expect = [math.log(1 - math.exp(v)) if math.log(1 - math.exp(v)) > TAIL_FLOOR else TAIL_FLOOR
              for v in [-1e-3, -0.5, -1.0, -30.0]]
    torch.testing.assert_close(y[:4], torch.tensor(expect, dtype=torch.float64))
    assert torch.all(y[4:] == TAIL_FLOOR)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[4:] == 0)
    lp = torch.log(torch.tensor([[0.5, 0.25, 0.125]]))
    torch.testing.assert_close(tail_logmass(lp), torch.log(torch.tensor([0.125])))
