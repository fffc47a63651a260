"""`vlsi-extract --hidden-states answer|all`: the stored features are the teacher's post-final-norm states at the
answer and question rows (against a live one-sample forward), with or without verbalizers; shards + resume give
the same cache as one run; the vLLM backend refuses the flag in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

FAMILY = "qwen2_vl"


def _run(*args: str):
    from click.testing import CliRunner

    from vlsi.extract.cli import main

    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _args(env, out, *extra):
    return ["--teacher", str(env["teacher"]), "--data", str(env["data"]), "--image-root", str(env["root"]),
            "--out", str(out), "--top-k", "8", "--no-progress", "--batch-size", "3", "--encoding", "exact", *extra]


def _live(env):
    """Per sample id: (answer-row states, question-row states, final-head log-probs at the answer rows), float32,
    from a forward of that sample alone."""
    from vlsi.cache_format.features import question_rows
    from vlsi.models.dataset import open_dataset
    from vlsi.models.encoding import collate, encode_sample, pad_id_of

    t = env["adapter"]
    data = open_dataset(str(env["data"]), image_root=str(env["root"]))
    out = {}
    with torch.no_grad():
        for i in range(len(data)):
            enc = encode_sample(data[i], t.bundle)
            z = t.forward_hidden(collate([enc], pad_id_of(t.tokenizer)), [], rows="all").final_hidden.float()
            ap = enc.answer_positions
            q = torch.from_numpy(question_rows(ap.numpy(), enc.length))
            lp = torch.log_softmax(z[ap] @ t.lm_head.weight.float()[: t.vocab_size].T, dim=1)
            out[enc.sample_id] = (z[ap], z[q], lp)
    return out


@pytest.fixture(scope="module")
def caches(tiny_env, tmp_path_factory):
    env = tiny_env(FAMILY)
    root = tmp_path_factory.mktemp("hidden")
    r = _run(*_args(env, root / "all", "--hidden-states", "all", "--json"))
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["hidden_states"] == "all"
    r = _run(*_args(env, root / "ans", "--hidden-states", "answer", "--verbalizers", str(env["verb"])))
    assert r.exit_code == 0, r.output
    return env, root, _live(env)


def test_features_are_the_teachers_post_norm_states(caches):
    from vlsi.cache_format import open_cache, verify_cache
    from vlsi.cache_format.features import float32_of_bits

    env, root, live = caches
    rd = open_cache(str(root / "all"))
    fp = rd.fingerprint
    assert fp.hidden_states == "all" and fp.hidden_size == env["adapter"].hidden_size
    assert fp.target_layers == () and fp.n_layers == 1 and fp.verbalizers["kind"] == "none"
    assert len(rd) == len(live) and verify_cache(str(root / "all")).ok
    n_q = 0
    for sid, (za, zq, lp) in live.items():
        rec = rd.get(sid)
        assert rec.hidden_answer.dtype == np.uint16 and rec.hidden_question.dtype == np.uint16
        ga, gq = float32_of_bits(rec.hidden_answer), float32_of_bits(rec.hidden_question)
        # bf16 of the same states (the batched forward may differ from the lone one in the last fp32 bits)
        np.testing.assert_allclose(ga, za.numpy(), rtol=1e-2, atol=1e-2 * float(za.abs().max()))
        np.testing.assert_allclose(gq, zq.numpy(), rtol=1e-2, atol=1e-2 * float(zq.abs().max()))
        assert gq.shape[0] > 0
        n_q += gq.shape[0]
        # the one layer row is the final head's top-k of those states
        want = lp.topk(8, dim=1)
        np.testing.assert_allclose(rec.topk_logprobs[:, 0], want.values.numpy(), atol=2e-3)
    assert n_q > 0
    rd_ans = open_cache(str(root / "ans"))
    assert rd_ans.fingerprint.hidden_states == "answer" and rd_ans.fingerprint.n_layers == len(env["layers"]) + 1
    for sid, (za, _, _) in live.items():
        rec = rd_ans.get(sid)
        assert rec.hidden_question is None
        np.testing.assert_allclose(float32_of_bits(rec.hidden_answer), za.numpy(), rtol=1e-2,
                                   atol=1e-2 * float(za.abs().max()))


def test_shards_and_resume_equal_one_run(caches, tmp_path):
    from vlsi.cache_format import open_cache, verify_cache

    env, root, _ = caches
    out = tmp_path / "sharded"
    for i in range(2):
        r = _run(*_args(env, out, "--hidden-states", "all", "--shard", f"{i}/2", "--commit-every", "2"))
        assert r.exit_code == 0, r.output
    r = _run(*_args(env, out, "--hidden-states", "all", "--shard", "0/2"))  # again without --resume: refused
    assert r.exit_code != 0 and "--resume" in r.output
    r = _run(*_args(env, out, "--hidden-states", "all", "--shard", "0/2", "--resume", "--json"))
    assert r.exit_code == 0 and json.loads(r.stdout)["written"] == 0
    a, b = open_cache(str(root / "all")), open_cache(str(out))
    assert sorted(a.sample_ids) == sorted(b.sample_ids) and len(b.segments) > 2
    for sid in a.sample_ids:
        x, y = a.get(sid), b.get(sid)
        assert x.hidden_question.shape == y.hidden_question.shape
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
    assert verify_cache(str(out)).ok
    r = _run(*_args(env, out, "--hidden-states", "answer", "--resume"))  # another fingerprint: refused by field
    assert r.exit_code != 0 and "hidden_states" in r.output


def test_refusals_are_one_line(tiny_env, tmp_path):
    env = tiny_env(FAMILY)
    for extra, words in ((["--hidden-states", "all", "--backend", "vllm"], "--backend transformers"),
                         ([], "--verbalizers is required"),
                         (["--hidden-states", "all", "--layers", "0"], "--layers needs --verbalizers")):
        r = _run(*_args(env, tmp_path / "x", *extra))
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.output
    r = _run("--help")
    assert r.exit_code == 0 and "--hidden-states" in r.output
