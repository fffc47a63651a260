"""GenRecal's head losses and the Recalibrator's module contract, against float64 references written here."""

from __future__ import annotations

import pytest
import torch

from vlsi.train.genrecal_losses import genrecal_terms, head_ce_kl

V_REAL, V_PAD, D = 37, 48, 12


def _ref_terms(r, z_t, w, targets, v):
    """Dense float64 per-row CE and KL(softmax head(z_t) || softmax head(r)) over the first v rows of w."""
    w = w.double()[:v]
    log_q = torch.log_softmax(r.double() @ w.T, dim=1)
    log_p = torch.log_softmax(z_t.double() @ w.T, dim=1)
    ce = -log_q[torch.arange(len(targets)), targets.long()]
    kl = (log_p.exp() * (log_p - log_q)).sum(1)
    return ce, kl


def _data(n, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V_PAD, D, generator=g) * 2.0
    w[V_REAL:] = 80.0  # padded head rows: any leak into a softmax dominates it
    r = torch.randn(n, D, generator=g).to(dtype)
    z = torch.randn(n, D, generator=g).to(dtype)
    t = torch.randint(0, V_REAL, (n,), generator=g)
    return r, z, w, t


@pytest.mark.parametrize("chunk", [1, 5, 1024])
def test_head_ce_kl_matches_float64_value_and_gradient(chunk):
    r, z, w, t = _data(13)
    r64 = r.double().requires_grad_(True)
    ce_ref, kl_ref = _ref_terms(r64, z, w, t, V_REAL)
    (ce_ref.sum() + 0.7 * kl_ref.sum()).backward()
    r.requires_grad_(True)
    ce, kl = head_ce_kl(r, z, w, t, real_vocab=V_REAL, chunk_tokens=chunk)
    assert ce.dtype == torch.float32 and ce.shape == (13,)
    torch.testing.assert_close(ce.double(), ce_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), kl_ref.detach(), rtol=1e-5, atol=1e-5)
    (ce.sum() + 0.7 * kl.sum()).backward()
    torch.testing.assert_close(r.grad.double(), r64.grad, rtol=1e-4, atol=1e-5)


def test_head_ce_kl_float64_is_exact():
    r, z, w, t = _data(9, seed=1)
    r = r.double().requires_grad_(True)
    ce, kl = head_ce_kl(r, z.double(), w.double(), t, real_vocab=V_REAL, chunk_tokens=4)
    r2 = r.detach().clone().requires_grad_(True)
    ce_ref, kl_ref = _ref_terms(r2, z, w, t, V_REAL)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kl, kl_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(kl.sum(), r)[0], torch.autograd.grad(kl_ref.sum(), r2)[0],
                               rtol=1e-10, atol=1e-12)


def test_kl_is_zero_on_the_teachers_own_states():
    _, z, w, t = _data(6, seed=2)
    ce, kl = head_ce_kl(z.clone(), z, w, t, real_vocab=V_REAL)
    assert float(kl.abs().max()) < 1e-5
    ce_t, _ = _ref_terms(z, z, w, t, V_REAL)
    torch.testing.assert_close(ce.double(), ce_t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_under_bf16_autocast_math_stays_fp32(in_dtype, device):
    r, z, w, t = _data(11, seed=3, dtype=in_dtype)
    w = w.to(in_dtype)
    r64 = r.double().requires_grad_(True)  # the reference sees the same (possibly bf16-rounded) inputs
    ce_ref, kl_ref = _ref_terms(r64, z, w, t, V_REAL)
    (ce_ref + kl_ref).sum().backward()
    r, z, w, t = (x.to(device) for x in (r, z, w, t))
    r.requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16):
        ce, kl = head_ce_kl(r, z, w, t, real_vocab=V_REAL, chunk_tokens=4)
        loss = (ce + kl).sum()
    assert ce.dtype == torch.float32
    loss.backward()
    assert r.grad.dtype == in_dtype
    torch.testing.assert_close(ce.double().cpu(), ce_ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kl.double().cpu(), kl_ref.detach(), rtol=1e-5, atol=1e-4)
    tol = dict(rtol=1e-4, atol=1e-5) if in_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(r.grad.double().cpu(), r64.grad, **tol)


def test_regulariser_terms_value_and_gradients_vs_float64():
    r, z, w, t = _data(10, seed=4)
    r_reg = torch.randn(10, D, generator=torch.Generator().manual_seed(9))
    a64, b64 = r.double().requires_grad_(True), r_reg.double().requires_grad_(True)
    ce_a, kl_a = _ref_terms(a64, z, w, t, V_REAL)
    ce_b, kl_b = _ref_terms(b64, z, w, t, V_REAL)
    ce_w, kl_w, reg_w = 0.5, 2.0, 0.3
    ref = ce_w * ce_a.sum() + kl_w * kl_a.sum() + reg_w * (ce_w * ce_b.sum() + kl_w * kl_b.sum())
    ref.backward()
    a, b = r.clone().requires_grad_(True), r_reg.clone().requires_grad_(True)
    terms = genrecal_terms(a, b, z, w, t, real_vocab=V_REAL, ce_weight=ce_w, kl_weight=kl_w, reg_weight=reg_w,
                           chunk_tokens=3)
    assert terms.rows == 10
    torch.testing.assert_close(float(terms.loss.detach()), float(ref.detach()), rtol=1e-5, atol=1e-5)
    assert terms.reg_kl == pytest.approx(float(kl_b.sum().detach()), rel=1e-5)
    assert terms.ce == pytest.approx(float(ce_a.sum().detach()), rel=1e-5)
    terms.loss.backward()
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-4, atol=1e-5)
    no_reg = genrecal_terms(r, None, z, w, t, real_vocab=V_REAL)
    assert no_reg.reg_ce == 0.0 and no_reg.reg_kl == 0.0


def test_bad_shapes_and_ids_are_refused():
    r, z, w, t = _data(4)
    with pytest.raises(ValueError, match="same"):
        head_ce_kl(r, z[:3], w, t, real_vocab=V_REAL)
    with pytest.raises(ValueError, match="real vocab"):
        head_ce_kl(r, z, w, torch.tensor([0, 1, 2, V_REAL]), real_vocab=V_REAL)


# ---- the Recalibrator's module contract ---------------------------------------------------------------------------
def _text_config(family="qwen2_vl"):
    from vlsi.demo.tiny import build_tokenizer, make_config

    tok = build_tokenizer(["a small corpus for a tiny tokenizer", "red square blue circle"], vocab_size=300,
                          family=family)
    return make_config(family, "test", tok).get_text_config()


@pytest.fixture(scope="module")
def text_config():
    return _text_config()


def test_recalibrator_shapes_padding_and_causality(text_config):
    from vlsi.models.recalibrator import Recalibrator

    torch.manual_seed(0)
    rec = Recalibrator(text_config, 24).double().eval()
    assert rec.pre.in_features == 24 and rec.pre.out_features == text_config.hidden_size
    assert rec.post.out_features == 24 and len(rec.blocks.layers) == 2
    assert rec.blocks.embed_tokens is None
    parts = [torch.randn(5, 32, dtype=torch.float64), torch.randn(3, 32, dtype=torch.float64)]
    out, mask = rec(parts)
    assert out.shape == (2, 5, 24) and mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    alone, _ = rec([parts[1]])  # right padding does not change a shorter sample's rows
    torch.testing.assert_close(out[1, :3], alone[0], rtol=1e-10, atol=1e-10)
    changed = parts[0].clone()
    changed[4] += 1.0  # causal: a later row never changes an earlier one
    out2, _ = rec([changed])
    torch.testing.assert_close(out2[0, :4], out[0, :4], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out2[0, 4], out[0, 4])
    rows = rec.answer_rows([parts[0][:2], parts[1][:1]], [parts[0][2:], parts[1][1:]])
    assert rows.shape == (5, 24)
    torch.testing.assert_close(rows, torch.cat([out[0, 2:5], out[1, 1:3]]), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", ["qwen2_vl", "llama"])
def test_recalibrator_fresh_position_ids(family):
    """Positions 0..n-1 over the joined sequence; M-RoPE students get the 1-D ids on all 3 axes."""
    from vlsi.models.recalibrator import Recalibrator

    rec = Recalibrator(_text_config(family), 16)
    seen = []
    rec.blocks.rotary_emb.register_forward_hook(
        lambda m, args, kwargs, out: seen.append((args[1] if len(args) > 1 else kwargs["position_ids"]).clone()),
        with_kwargs=True)
    rec([torch.randn(6, 32), torch.randn(4, 32)])
    pos = seen[0]
    want = torch.arange(6).expand(2, 6)
    if family == "qwen2_vl":
        assert pos.shape == (3, 2, 6) and all(torch.equal(pos[a], want) for a in range(3))
    else:
        assert torch.equal(pos, want)


def test_identity_init_layernorm_is_exact_on_centred_rows(text_config):
    """The LayerNorm variant's identity is exact when the normalised teacher state has zero row mean (module doc)."""
    from vlsi.models.recalibrator import Recalibrator

    torch.manual_seed(1)
    rec = Recalibrator(text_config, 32, norm="layernorm").double()
    g = torch.rand(32, dtype=torch.float64) + 0.5
    rec.identity_init(g)
    h = torch.randn(7, 32, dtype=torch.float64)
    h = h - h.mean(1, keepdim=True)
    z = g * h / h.pow(2).mean(1, keepdim=True).sqrt()
    out = rec.answer_rows([rec.pre(z[:3])], [rec.pre(z[3:])])
    torch.testing.assert_close(out, z[3:], rtol=1e-9, atol=1e-9)
