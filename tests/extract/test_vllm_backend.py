"""vLLM backend: against a plain transformers fp32 forward on the same ids (hidden states, final top-k, alignment).

Two kinds of test:

- unit tests of the driver-side conversions (prompt log-probs -> TopK with the +1 shift, residual rows, the lazy
  import error), which run in any interpreter;
- the real check: a tiny Qwen2 teacher (built here, < 1M parameters) run under vLLM in the vLLM environment
  (``$VLSI_VLLM_PYTHON``, default ``/work/vllm-venv/bin/python``, made by ``scripts/vllm_env.sh``) as a subprocess;
  the reference forward runs here, in the main environment. Skipped, with the reason, when no vLLM Python is found.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlsi.extract.backends import vllm_backend as vb

LAYERS = [0, 2]
TOP_K = 8


# ----------------------------------------------------------------------------------------------------------------
# Unit tests (no vLLM needed)
# ----------------------------------------------------------------------------------------------------------------


def _flat(per_position):
    """A FlatLogprobs-shaped object: per position, a list of (token_id, logprob, rank) or None for position 0."""
    fl = SimpleNamespace(start_indices=[], end_indices=[], token_ids=[], logprobs=[], ranks=[])
    for entries in per_position:
        fl.start_indices.append(len(fl.token_ids))
        for tid, lp, rank in entries or []:
            fl.token_ids.append(tid)
            fl.logprobs.append(lp)
            fl.ranks.append(rank)
        fl.end_indices.append(len(fl.token_ids))
    return fl


def _vllm_like_prompt_logprobs(logprobs: torch.Tensor, ids: list[int], k: int):
    """What vLLM returns for prompt ``ids`` when row ``t`` of ``logprobs`` is the distribution after ``ids[:t+1]``."""
    per_pos = [None]
    for p in range(1, len(ids)):
        row = logprobs[p - 1]
        top = torch.topk(row, k)
        rank_of_prompt = int((row > row[ids[p]]).sum()) + 1
        entries = [(ids[p], float(row[ids[p]]), rank_of_prompt)]
        entries += [(int(t), float(v), r + 1) for r, (v, t) in enumerate(zip(top.values, top.indices))]
        per_pos.append(entries)
    return _flat(per_pos)


def test_prompt_logprobs_topk_shift_and_tail():
    from vlsi.ops import head_topk

    torch.manual_seed(0)
    T, d, V, k = 9, 16, 40, 5
    h, w = torch.randn(T, d), torch.randn(V, d)
    logprobs = torch.log_softmax(h @ w.T, -1)
    ids = torch.randint(0, V, (T,)).tolist()
    rows = [2, 3, 7]
    got = vb.prompt_logprobs_topk(_vllm_like_prompt_logprobs(logprobs, ids, k), rows, k, V, "s0")
    ref = head_topk(h[rows], w, k, V, impl="torch")
    assert got.ids.dtype == torch.int32 and got.logprobs.dtype == torch.float32 and got.tail.dtype == torch.float32
    assert torch.equal(got.ids, ref.ids)
    torch.testing.assert_close(got.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.tail, ref.tail, atol=1e-5, rtol=1e-5)
    # Off-by-one guard: reading position t instead of t + 1 gives other distributions.
    shifted = vb.prompt_logprobs_topk(_vllm_like_prompt_logprobs(logprobs, ids, k), [r - 1 for r in rows], k, V, "s0")
    assert not torch.allclose(shifted.logprobs, got.logprobs)


def test_prompt_logprobs_topk_rejects_bad_ranks_and_padded_ids():
    fl = _flat([None, [(3, -0.1, 1), (3, -0.1, 1), (4, -3.0, 3)]])
    with pytest.raises(vb.VllmBackendError, match="sample s1: row 0"):
        vb.prompt_logprobs_topk(fl, [0], 2, 10, "s1")
    fl = _flat([None, [(3, -0.1, 1), (3, -0.1, 1), (12, -3.0, 2)]])
    with pytest.raises(vb.VllmBackendError, match="vocab_size=10"):
        vb.prompt_logprobs_topk(fl, [0], 2, 10, "s2")


def test_residual_rows_is_the_sum_and_a_copy():
    h, r = torch.randn(6, 4), torch.randn(6, 4)
    rows = torch.tensor([1, 4])
    want = h[rows] + r[rows]
    got = vb._residual_rows((h, r), rows)
    torch.testing.assert_close(got, want)
    h.zero_()  # vLLM's next fused add-norm writes in place: what we kept must not change
    r.zero_()
    torch.testing.assert_close(got, want)
    assert torch.equal(vb._residual_rows((h, None), rows), h[rows])


def test_missing_vllm_is_a_clear_error(monkeypatch):
    if vb.vllm_available():
        pytest.skip("vLLM is importable here: the missing-vLLM message cannot be observed")
    with pytest.raises(vb.VllmNotInstalledError, match="scripts/vllm_env.sh"):
        vb.VllmBackend("/nonexistent")


# ----------------------------------------------------------------------------------------------------------------
# The real check under vLLM (subprocess in the vLLM environment)
# ----------------------------------------------------------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import json, sys, torch
    from vlsi.extract.backends.base import TeacherRequest
    from vlsi.extract.backends.vllm_backend import VllmBackend, VllmBackendError

    def main(spec_path, out_path):
        spec = json.load(open(spec_path))
        reqs = [TeacherRequest(s["id"], torch.tensor(s["ids"]), torch.tensor(s["pos"])) for s in spec["samples"]]
        result = {}
        for run in spec["runs"]:
            if run.get("expect_error"):
                try:
                    VllmBackend(run["model"], final=run["final"], **spec["engine"])
                    result[run["name"]] = "no error"
                except VllmBackendError as exc:
                    result[run["name"]] = str(exc)
                continue
            be = VllmBackend(run["model"], final=run["final"], top_k=spec["top_k"], **spec["engine"])
            outs = be.run(reqs, spec["layers"])
            outs2 = be.run(reqs[::-1], spec["layers"])  # another batch composition, same answers expected
            result[run["name"]] = {"final": be.final, "vocab": be.vocab_size, "padded": be.padded_vocab_size,
                                   "outs": [o.__dict__ for o in outs], "outs2": [o.__dict__ for o in outs2]}
            be.close()
        torch.save(result, out_path)

    if __name__ == "__main__":
        main(sys.argv[1], sys.argv[2])
    """
)


def _vllm_python() -> str | None:
    exe = os.environ.get("VLSI_VLLM_PYTHON", "/work/vllm-venv/bin/python")
    return exe if Path(exe).exists() else None


def _write_teacher(out: Path, tokenizer, padded: bool) -> Path:
    """A 3-layer Qwen2 (hidden 64, head_dim 32: vLLM's CPU attention has no kernel below 32), ~110k parameters."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    n = len(tokenizer)
    cfg = Qwen2Config(
        vocab_size=(n + 63) // 64 * 64 if padded else n, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, tie_word_embeddings=False,
        rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(1)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # larger than the default init so that distributions are far from uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.25)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    exe = _vllm_python()
    if exe is None:
        pytest.skip("no vLLM environment: run scripts/vllm_env.sh or set VLSI_VLLM_PYTHON to a Python with vLLM")
    probe = subprocess.run([exe, "-c", "import vllm, vlsi.extract.backends.vllm_backend"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{exe} cannot import vllm + vlsi: {probe.stderr.strip().splitlines()[-1:]}")
    from vlsi.demo.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("vllm")
    tok = build_tokenizer(vocab_size=300, family="qwen2")
    padded = _write_teacher(root / "padded", tok, padded=True)
    unpadded = _write_teacher(root / "unpadded", tok, padded=False)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i, T in enumerate([40, 7, 75, 23]):  # 75 > max_num_batched_tokens: chunked prefill across steps
        ids = torch.randint(0, len(tok), (T,), generator=g).tolist()
        pos = sorted(set(torch.randint(0, T - 1, (max(1, T // 3),), generator=g).tolist()) | {T - 2})
        samples.append({"id": f"s{i}", "ids": ids, "pos": pos})
    spec = {
        "samples": samples, "layers": LAYERS, "top_k": TOP_K,
        "engine": {"dtype": "float32", "max_model_len": 128, "max_num_batched_tokens": 32, "max_num_seqs": 4,
                   "kv_cache_memory_bytes": 64 << 20, "seed": 0},
        "runs": [
            {"name": "hidden", "model": str(padded), "final": "auto"},
            {"name": "logprobs", "model": str(unpadded), "final": "logprobs"},
            {"name": "refuse", "model": str(padded), "final": "logprobs", "expect_error": True},
        ],
    }
    (root / "spec.json").write_text(json.dumps(spec))
    (root / "worker.py").write_text(_WORKER)
    # In-process engine: ~3 s per engine instead of ~35 s for the default engine-core + worker processes (the
    # multiprocess path, which is what users run, was checked by hand: docs/vllm.md).
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1")
    proc = subprocess.run([exe, str(root / "worker.py"), str(root / "spec.json"), str(root / "out.pt")],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise AssertionError("vLLM worker failed:\n" + proc.stderr[-4000:])
    return SimpleNamespace(spec=spec, tok=tok, padded=padded, unpadded=unpadded,
                           result=torch.load(root / "out.pt", weights_only=False))


def _reference(model_dir: Path, ids: list[int], pos: list[int]):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Decoder layer outputs from hooks: transformers' hidden_states[i + 1] is the same except for the LAST layer,
    # whose entry there is after the final norm; LAYERS includes the last layer on purpose.
    seen = {}
    handles = [model.model.layers[i].register_forward_hook(
        lambda m, a, o, i=i: seen.__setitem__(i, (o[0] if isinstance(o, tuple) else o)[0, pos])) for i in LAYERS]
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    for h in handles:
        h.remove()
    for i in LAYERS[:-1]:
        torch.testing.assert_close(seen[i], out.hidden_states[i + 1][0, pos])
    final = out.hidden_states[-1][0, pos]  # after the final norm
    return seen, final, model.lm_head.weight


@pytest.mark.vllm
def test_hidden_mode_matches_transformers(vllm_run):
    from vlsi.ops import head_topk

    res = vllm_run.result["hidden"]
    assert res["final"] == "hidden"  # auto: padded head -> hidden
    assert res["vocab"] == len(vllm_run.tok) < res["padded"]
    for s, out, out2 in zip(vllm_run.spec["samples"], res["outs"], reversed(res["outs2"])):
        hs, final, w = _reference(vllm_run.padded, s["ids"], s["pos"])
        assert out["sample_id"] == s["id"] and out["final_topk"] is None
        assert sorted(out["layer_hidden"]) == LAYERS
        for i in LAYERS:
            torch.testing.assert_close(out["layer_hidden"][i].float(), hs[i], atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(out2["layer_hidden"][i], out["layer_hidden"][i], atol=2e-5, rtol=0)
        torch.testing.assert_close(out["final_hidden"].float(), final, atol=2e-4, rtol=1e-4)
        got = head_topk(out["final_hidden"].float(), w, TOP_K, res["vocab"], impl="torch")
        ref = head_topk(final, w, TOP_K, res["vocab"], impl="torch")
        assert torch.equal(got.ids, ref.ids)
        torch.testing.assert_close(got.logprobs, ref.logprobs, atol=1e-4, rtol=0)


@pytest.mark.vllm
def test_logprobs_mode_matches_transformers(vllm_run):
    res = vllm_run.result["logprobs"]
    assert res["final"] == "logprobs" and res["vocab"] == res["padded"] == len(vllm_run.tok)
    for s, out in zip(vllm_run.spec["samples"], res["outs"]):
        hs, final, w = _reference(vllm_run.unpadded, s["ids"], s["pos"])
        for i in LAYERS:
            torch.testing.assert_close(out["layer_hidden"][i].float(), hs[i], atol=2e-4, rtol=1e-4)
        assert out["final_hidden"] is None
        ids, lps, tail = out["final_topk"]
        ref_lp = torch.log_softmax(final @ w.T, -1)  # row t: distribution of token t + 1
        ref = torch.topk(ref_lp, TOP_K)
        # ids equal except exact ties: compare the log-probs of the returned ids, and the sorted values
        torch.testing.assert_close(torch.gather(ref_lp, 1, ids.long()), lps, atol=1e-4, rtol=0)
        torch.testing.assert_close(lps, ref.values, atol=1e-4, rtol=0)
        assert (ids == ref.indices.int()).float().mean() > 0.95
        ref_tail = torch.log1p(-ref.values.exp().sum(-1))
        torch.testing.assert_close(tail, ref_tail, atol=1e-4, rtol=0)


@pytest.mark.vllm
def test_logprobs_mode_refused_on_padded_head(vllm_run):
    msg = vllm_run.result["refuse"]
    assert "unpadded head" in msg and "final='hidden'" in msg and "\n" not in msg
