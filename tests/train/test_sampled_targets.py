"""Sampled teacher targets end to end on the tiny pair: vlsi-extract --targets sampled writes draws consistent with
the teacher's top-k cache, and vlsi-train interact (layer matching included) trains from them: the held-out KL to
the exact teacher falls. Plus the loss-level refusals (reverse KL / temperature with sampled targets)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import train_config


@pytest.fixture(scope="module")
def sampled_cache(env, tmp_path_factory):
    from vlsi.extract.config import ExtractConfig
    from vlsi.extract.run import run_extract

    url = str(tmp_path_factory.mktemp("sampled") / "cache")
    summary = run_extract(ExtractConfig(teacher=str(env["teacher"]), verbalizers=str(env["teacher_verb"]),
                                        data=str(env["train"]), out=url, targets="sampled", samples_per_row=12,
                                        encoding="topk1-plain-q8", device="cpu", progress=False, batch_size=4))
    assert summary["targets"] == "sampled" and summary["value_encoding"] == "topk1-plain-q8"
    return url


def test_sampled_cache_matches_the_teacher(env, sampled_cache):
    from vlsi.cache_format import open_cache, verify_cache

    s, t = open_cache(sampled_cache), open_cache(env["cache"])  # t: the exact top-16 cache of the same teacher
    fp = s.fingerprint
    assert fp.targets == "sampled" and fp.samples_per_row == 12 and fp.top_k == 12
    assert s.attrs["required"][-2:] == ["topk-encodings-v1", "sampled-targets-v1"] and verify_cache(sampled_cache).ok
    hits = mass = drawn_top1 = p_top1 = n_rows = 0.0
    for rec in s.iter():
        ref = t.get(rec.sample_id)
        np.testing.assert_array_equal(rec.answer_positions, ref.answer_positions)
        c = rec.sample_counts
        assert (c.sum(-1) == 12).all() and ((c > 0) == np.isfinite(rec.topk_logprobs)).all()
        for a in range(c.shape[0]):
            for layer in range(c.shape[1]):
                top = dict(zip(ref.topk_ids[a, layer].tolist(), ref.topk_logprobs[a, layer].tolist()))
                for i, lp, n in zip(rec.topk_ids[a, layer], rec.topk_logprobs[a, layer], c[a, layer]):
                    if n and int(i) in top:  # the draws' teacher log-probs are the top-k cache's (q8 vs fp16)
                        hits += 1
                        mass += abs(lp - top[int(i)]) > 0.1
                t1 = int(ref.topk_ids[a, layer, 0])
                drawn_top1 += c[a, layer][rec.topk_ids[a, layer] == t1].sum() / 12
                p_top1 += np.exp(ref.topk_logprobs[a, layer, 0])
                n_rows += 1
    assert hits > 100 and mass / hits < 0.01
    # over all rows, the top-1's draw frequency is its probability (5 sigma, binomial over 12 draws per row)
    sigma = np.sqrt(p_top1 / n_rows * (1 - p_top1 / n_rows) / (12 * n_rows))
    assert abs(drawn_top1 / n_rows - p_top1 / n_rows) < 5 * sigma


def test_interact_trains_from_sampled_targets(env, sampled_cache, tmp_path):
    from test_train import _heldout_final_kl

    from vlsi.train.recipe import run

    before = _heldout_final_kl(env["student"], env)
    summary = run(train_config(env, tmp_path / "o", cache=sampled_cache, steps=30, lr=0.02, min_lr=0.002,
                               lora_rank=8, chunk_tokens=64))
    assert summary["finished"]
    after = _heldout_final_kl(tmp_path / "o" / "final", env)
    print(f"held-out KL {before:.3f} -> {after:.3f}")
    assert after < before - 0.05, (before, after)  # measured against the exact (top-k) val cache


def test_sampled_losses_refuse_reverse_and_temperature():
    from vlsi.train.losses import TeacherTargets, interaction_loss

    g = torch.Generator().manual_seed(0)
    n, L, k, V, d = 5, 3, 4, 20, 6
    w = torch.randn(V, d, generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(n * L)]).view(n, L, k)
    counts = torch.tensor([3, 1, 0, 0]).expand(n, L, k).clone()
    lp = torch.where(counts > 0, torch.tensor(-1.0), torch.tensor(float("-inf")))
    t = TeacherTargets(ids, lp, torch.full((n, L), -0.5), counts)
    xs = [torch.randn(n, d, generator=g, requires_grad=True) for _ in range(2)]
    xf = torch.randn(n, d, generator=g, requires_grad=True)
    out = interaction_loss(xs, xf, w, t, torch.zeros(n, dtype=torch.long), real_vocab=V, n_norm=n,
                           generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out.loss) and out.kl_matrix.shape == (2, 2)
    out.loss.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in xs + [xf])
    for kw in ({"direction": "reverse"}, {"temperature": 2.0}):
        with pytest.raises(ValueError, match="sampled teacher targets support only the forward KL"):
            interaction_loss(xs, xf, w, t, torch.zeros(n, dtype=torch.long), real_vocab=V, n_norm=n, **kw)
