"""The cache holds exactly what a dense float64 reference computes, aligned row t -> token t+1, real vocab only.

The reference is written here, independently of vlsi.extract / vlsi.ops: the full model forward with
``output_hidden_states=True``, the verb-FFN math by hand from the saved safetensors, RMSNorm by hand, the head over
the first ``vocab_size`` rows, ``log_softmax`` over the whole real vocab, top-k, tail = log(1 - sum p_topk).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

K = 8


def _run(env, out, **kw):
    from vlsi.extract.config import ExtractConfig
    from vlsi.extract.run import run_extract

    cfg = ExtractConfig(teacher=str(env["teacher"]), verbalizers=str(env["verb"]), data=str(env["data"]),
                        out=str(out), top_k=K, progress=False, **{"batch_size": 3, "encoding": "exact", **kw})
    return run_extract(cfg)


def _verb_ffn(h, state, layer):
    g = state[f"{layer}.gate.weight"].double()
    u = state[f"{layer}.up.weight"].double()
    d = state[f"{layer}.down.weight"].double()
    return h + (torch.nn.functional.silu(h @ g.T) * (h @ u.T)) @ d.T


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def dense_reference(adapter, verb_dir, enc, layers):
    """Full log-softmax [A, L, V] (float64) for one encoded sample, final head last."""
    from safetensors.torch import load_file

    from vlsi.models.encoding import collate

    state = load_file(str(verb_dir / "verbalizers.safetensors"))
    V = adapter.vocab_size
    batch = collate([enc], adapter.tokenizer.pad_token_id)
    with torch.no_grad():
        out = adapter.model(**batch.model_kwargs("cpu"), output_hidden_states=True, use_cache=False)
    pos = enc.answer_positions
    W = adapter.lm_head.weight.double()[:V]
    norm = adapter.final_norm
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    rows = []
    for i in layers:
        h = out.hidden_states[i + 1][0, pos].double()  # layer i = hidden_states[i + 1]
        x = _rms(_verb_ffn(h, state, i), norm.weight, eps)
        rows.append(torch.log_softmax(x @ W.T, -1))
    rows.append(torch.log_softmax(out.logits[0, pos, :V].double(), -1))  # the native final head
    return torch.stack(rows, 1)  # [A, L, V]


def check_record(rec, full_lp, *, atol=2e-3):
    """Cached top-k == reference top-k (tie-robust), cached tail == reference tail."""
    ids = torch.as_tensor(rec.topk_ids).long()
    lp = torch.as_tensor(rec.topk_logprobs).double()
    V = full_lp.shape[-1]
    assert ids.min() >= 0 and ids.max() < V, "padded-vocab ids in the cache"
    ref_vals, _ = torch.topk(full_lp, K, dim=-1)
    # each stored value is the reference log-prob OF ITS ID, and the stored values are the k largest
    np.testing.assert_allclose(lp, torch.gather(full_lp, -1, ids), atol=atol, rtol=1e-3)
    np.testing.assert_allclose(lp, ref_vals, atol=atol, rtol=1e-3)
    assert (ids.unsqueeze(-1) == ids.unsqueeze(-2)).sum(-1).eq(1).all(), "duplicate ids in a top-k row"
    ref_tail = torch.log1p(-torch.exp(ref_vals).sum(-1))
    np.testing.assert_allclose(rec.tail_logmass, ref_tail, atol=1e-3, rtol=1e-3)


def expected_answer_text(record: dict, eot: str) -> str:
    return "".join(t["value"] + eot for t in record["conversations"] if t["from"] == "gpt")


@pytest.mark.parametrize("family", ["qwen2", "qwen2_vl", "llava_onevision"])
def test_cache_equals_dense_reference(tiny_env, tmp_path, family):
    import json

    from vlsi.cache_format import open_cache, verify_cache
    from vlsi.models import encode_sample
    from vlsi.models.data import read_dataset

    env = tiny_env(family)
    summary = _run(env, tmp_path / "cache")
    records = {r["id"]: r for r in json.loads(env["data"].read_text())}
    assert summary["written"] == len(records) and summary["skipped"] == 0
    assert summary["layers"] == [*env["layers"], "final"]
    reader = open_cache(str(tmp_path / "cache"))
    assert len(reader) == len(records)
    assert verify_cache(str(tmp_path / "cache")).ok
    fp = reader.fingerprint
    adapter = env["adapter"]
    assert fp.target_layers == tuple(env["layers"]) and fp.top_k == K
    assert fp.vocab_size == adapter.vocab_size < fp.padded_vocab_size == adapter.padded_vocab_size
    tok = adapter.tokenizer
    kinds = set()
    for sample in read_dataset(env["data"]):
        enc = encode_sample(sample, adapter)
        rec = reader.get(sample.id)
        assert rec.content_hash == sample.content_hash
        np.testing.assert_array_equal(rec.input_ids, enc.input_ids.numpy())
        np.testing.assert_array_equal(rec.answer_positions, enc.answer_positions.numpy())
        # alignment: the rows predict exactly the assistant tokens (every turn, with its end-of-turn token)
        targets = rec.input_ids[rec.answer_positions + 1]
        assert tok.decode(targets.tolist()) == expected_answer_text(records[sample.id], "<|im_end|>")
        check_record(rec, dense_reference(adapter, env["verb"], enc, env["layers"]))
        kinds.add((len(sample.images), sum(t.role == "assistant" for t in sample.turns)))
    assert (0, 2) in kinds  # multi-turn text
    if family != "qwen2":
        assert {(1, 1), (1, 2), (2, 1)} <= kinds  # single image, multi-turn with image, two images


def test_layer_subset_and_token_budget(tiny_env, tmp_path):
    """--layers picks rows of the layer axis; --max-tokens-per-batch batches differently, same numbers."""
    from vlsi.cache_format import open_cache
    from vlsi.models import encode_sample
    from vlsi.models.data import read_dataset

    env = tiny_env("qwen2_vl")
    _run(env, tmp_path / "c", layers=(2,), batch_size=None, max_tokens_per_batch=60)
    reader = open_cache(str(tmp_path / "c"))
    assert reader.fingerprint.target_layers == (2,)
    for sample in list(read_dataset(env["data"]))[:4]:
        enc = encode_sample(sample, env["adapter"])
        full = dense_reference(env["adapter"], env["verb"], enc, [2])
        check_record(reader.get(sample.id), full)


def test_deterministic(tiny_env, tmp_path):
    """Same inputs, same cache contents (bit for bit), and the same storage order."""
    from vlsi.cache_format import open_cache

    env = tiny_env("qwen2")
    _run(env, tmp_path / "a")
    _run(env, tmp_path / "b")
    a, b = open_cache(str(tmp_path / "a")), open_cache(str(tmp_path / "b"))
    assert list(a.sample_ids) == list(b.sample_ids)
    for ra, rb in zip(a.iter(), b.iter()):
        assert ra.equals(rb)
        np.testing.assert_array_equal(ra.topk_logprobs, rb.topk_logprobs)
