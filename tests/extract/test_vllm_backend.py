"""vLLM backend: against a plain transformers fp32 forward on the same ids (hidden states, final top-k, alignment).

Three kinds of test:

- unit tests of the driver-side conversions (prompt log-probs -> TopK with the +1 shift, residual rows, the lazy
  import error) and of the ``--backend vllm`` refusals, which run in any interpreter;
- the backend check: a tiny Qwen2 teacher (built here, < 1M parameters) run under vLLM in the vLLM environment
  (``$VLSI_VLLM_PYTHON``, default ``/work/vllm-venv/bin/python``, made by ``scripts/vllm_env.sh``) as a subprocess;
  the reference forward runs here, in the main environment;
- the end-to-end check: ``vlsi-extract --backend vllm`` (the CLI, in the vLLM environment) writes the same cache as
  ``--backend transformers`` (here) on the same teacher, verbalizers and data; ``--shard I/N`` and resume work.
Skipped, with the reason, when no vLLM Python is found.
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



# ----------------------------------------------------------------------------------------------------------------
# --backend vllm end to end: the cache equals the transformers backend's
# ----------------------------------------------------------------------------------------------------------------

E2E_LAYERS = [0, 2]
E2E_K = 8
# Small engines: 64 MiB KV cache (not a fraction of the machine's RAM); 32-token steps so prompts (~100 tokens) are
# chunked over several steps and packed with others, which exercises the hooks' row -> request mapping.
E2E_ENGINE = ["kv_cache_memory_bytes=67108864", "max_num_batched_tokens=32", "max_num_seqs=4"]

_DRIVER = textwrap.dedent(
    """
    # Runs in the vLLM environment: one engine serves two shard workers and a resumed run (engine start is the cost).
    import json, sys
    from vlsi.extract.config import ExtractConfig
    from vlsi.extract.run import _load_teacher, run_extract

    spec = json.load(open(sys.argv[1]))

    def cfg(**kw):
        return ExtractConfig(**spec["base"], backend="vllm", progress=False, **kw)

    teacher, backend = _load_teacher(cfg(data=spec["data"], out=spec["shards"]))
    out = {}
    for i in range(2):
        out[f"shard{i}"] = run_extract(cfg(data=spec["data"], out=spec["shards"], shard=(i, 2)),
                                       teacher=teacher, backend=backend)
    out["half"] = run_extract(cfg(data=spec["half"], out=spec["resumed"]), teacher=teacher, backend=backend)
    out["resume"] = run_extract(cfg(data=spec["data"], out=spec["resumed"], resume=True),
                                teacher=teacher, backend=backend)
    out["again"] = run_extract(cfg(data=spec["data"], out=spec["resumed"], resume=True),
                               teacher=teacher, backend=backend)
    backend.close()
    json.dump(out, open(sys.argv[2], "w"), default=str)
    """
)


def _write_e2e_teacher(out: Path, tokenizer, *, padded: bool) -> Path:
    """The demo's tiny Qwen2 ("test" shape, 4 layers) widened to head_dim 32 (vLLM's CPU attention needs >= 32),
    every weight random (norms too), ~190k parameters; ``padded``: head rows rounded up to 64 as the demo does."""
    from vlsi.demo.tiny import make_config, model_class

    cfg = make_config("qwen2", "test", tokenizer)
    cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads = 64, 128, 2, 1
    cfg.head_dim = 32
    if not padded:
        cfg.vocab_size = len(tokenizer)
    torch.manual_seed(1)
    model = model_class("qwen2")(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else torch.rand_like(p) + 0.5)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _write_e2e_verbalizers(out: Path, teacher: Path) -> Path:
    from vlsi.models import VerbalizerSet, load_model

    adapter = load_model(teacher, device="cpu")
    vs = VerbalizerSet.for_model(adapter, E2E_LAYERS)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-zero everywhere (down too): layers differ from the logit lens and from each other
        for p in vs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    vs.save(out, adapter.fingerprint())
    return out


def _vllm_or_skip() -> str:
    exe = _vllm_python()
    if exe is None:
        pytest.skip("no vLLM environment: run scripts/vllm_env.sh or set VLSI_VLLM_PYTHON to a Python with vLLM")
    probe = subprocess.run([exe, "-c", "import vllm, zarr, vlsi.extract.run, vlsi.models.head_only"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{exe} cannot import vllm + zarr + vlsi.extract: {probe.stderr.strip().splitlines()[-1:]}")
    return exe


# One vLLM process at a time unless VLSI_VLLM_TEST_PARALLEL=1 (each start takes ~1-2 GB; shared machines).
PARALLEL = os.environ.get("VLSI_VLLM_TEST_PARALLEL") == "1"


def _finish(ns, name: str, out: Path, proc) -> None:
    stdout, stderr = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"vLLM run {name} failed (rc {proc.returncode}):\n{stderr[-4000:]}")
    if name == "driver":
        ns.driver = json.loads(out.read_text())
    else:
        setattr(ns, f"{name}_vllm", out)
        setattr(ns, f"{name}_summary", json.loads(stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    exe = _vllm_or_skip()
    import sys

    from extract_testutil import make_records, write_data
    from vlsi.demo.tiny import build_tokenizer
    from vlsi.extract.config import ExtractConfig
    from vlsi.extract.run import run_extract

    root = tmp_path_factory.mktemp("vllm_e2e")
    tok = build_tokenizer(vocab_size=300, family="qwen2")
    records = make_records(10, vlm=False)
    data = write_data(root / "data.json", records)
    half = write_data(root / "half.json", records[:5])
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1")
    engine = [a for o in E2E_ENGINE for a in ("--backend-option", o)]
    procs, ns = {}, SimpleNamespace(root=root, tok=tok, data=data)
    for name, padded, final in (("padded", True, "auto"), ("unpadded", False, "logprobs")):
        teacher = _write_e2e_teacher(root / name, tok, padded=padded)
        verb = _write_e2e_verbalizers(root / f"{name}-verb", teacher)
        common = ["--teacher", str(teacher), "--verbalizers", str(verb), "--data", str(data), "--top-k", str(E2E_K),
                  "--encoding", "exact"]
        setattr(ns, name, teacher)
        # transformers reference cache (this environment)
        ref = root / f"{name}-tf"
        run_extract(ExtractConfig(teacher=str(teacher), verbalizers=str(verb), data=str(data), out=str(ref),
                                  top_k=E2E_K, progress=False, dtype="fp32", device="cpu", encoding="exact"))
        setattr(ns, f"{name}_tf", ref)
        # the CLI under vLLM (one vLLM process at a time unless VLSI_VLLM_TEST_PARALLEL=1)
        out = root / f"{name}-vllm"
        cmd = [exe, "-m", "vlsi.extract.cli", *common, "--out", str(out), "--backend", "vllm", "--vllm-final", final,
               "--no-progress", "--json", *engine]
        procs[name] = (out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        if not PARALLEL:
            _finish(ns, name, *procs.pop(name))
        if name == "padded":
            base = {"teacher": str(teacher), "verbalizers": str(verb), "top_k": E2E_K, "encoding": "exact",
                    "backend_options": {o.split("=")[0]: int(o.split("=")[1]) for o in E2E_ENGINE}}
            spec = {"base": base, "data": str(data), "half": str(half), "shards": str(root / "shards"),
                    "resumed": str(root / "resumed")}
            (root / "driver.json").write_text(json.dumps(spec))
            (root / "driver.py").write_text(_DRIVER)
            procs["driver"] = (root / "driver.out.json", subprocess.Popen(
                [exe, str(root / "driver.py"), str(root / "driver.json"), str(root / "driver.out.json")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
            if not PARALLEL:
                _finish(ns, "driver", *procs.pop("driver"))
    for name, (out, proc) in procs.items():
        _finish(ns, name, out, proc)
    print(f"vLLM e2e runs done ({sys.executable})")
    return ns


def _fp16_close(a, b):
    """Within fp16 storage rounding (one ulp of the value: 2^-10 relative) plus fp32-kernel noise."""
    import numpy as np

    return np.abs(a - b) <= 2e-4 + np.abs(b) * 2.0 ** -10


def _assert_same_values(a, b) -> None:
    """One sample from two caches: identity, ids, alignment exactly; log-probs and tails within fp16 rounding;
    top-k ids equal except where two entries tie within that tolerance (then only their order may differ)."""
    import numpy as np

    assert a.sample_id == b.sample_id and a.content_hash == b.content_hash
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.answer_positions, b.answer_positions)
    assert a.topk_ids.shape == b.topk_ids.shape == (len(a.answer_positions), len(E2E_LAYERS) + 1, E2E_K)
    assert _fp16_close(a.topk_logprobs, b.topk_logprobs).all(), (
        f"{a.sample_id}: log-probs differ by {np.abs(a.topk_logprobs - b.topk_logprobs).max()}")
    assert _fp16_close(a.tail_logmass, b.tail_logmass).all(), f"{a.sample_id}: tails differ"
    for r, l, j in zip(*np.nonzero(a.topk_ids != b.topk_ids)):
        row = b.topk_logprobs[r, l]
        tie = [jj for jj in range(E2E_K) if jj != j and _fp16_close(row[jj], row[j])]
        assert tie or j == E2E_K - 1, f"{a.sample_id}: top-k id differs at row {r} layer {l} rank {j} without a tie"
        assert int(a.topk_ids[r, l, j]) in set(b.topk_ids[r, l].tolist()) or j == E2E_K - 1


def _assert_same_cache(ref_url, got_url) -> None:
    from vlsi.cache_format import open_cache

    ref, got = open_cache(str(ref_url)), open_cache(str(got_url))
    assert sorted(ref.sample_ids) == sorted(got.sample_ids) and len(ref) == 10
    fr, fg = ref.fingerprint, got.fingerprint
    # the same teacher, verbalizers, tokenizer, layers and sizes, whichever backend (and environment) wrote it
    for field in ("teacher", "verbalizers", "target_layers", "tokenizer_hash", "processor", "vocab_size",
                  "padded_vocab_size", "top_k", "value_encoding", "temperature"):
        assert getattr(fr, field) == getattr(fg, field), field
    for sid in ref.sample_ids:
        _assert_same_values(got.get(sid), ref.get(sid))


@pytest.mark.vllm
def test_e2e_hidden_mode_cache_equals_transformers(e2e):
    s = e2e.padded_summary
    assert s["backend"] == "vllm" and s["written"] == 10 and s["skipped"] == 0
    _assert_same_cache(e2e.padded_tf, e2e.padded_vllm)


@pytest.mark.vllm
def test_e2e_logprobs_mode_cache_equals_transformers(e2e):
    # the final layer comes from vLLM's prompt log-probs here (unpadded head), the target layers from the hooks
    assert e2e.unpadded_summary["written"] == 10
    _assert_same_cache(e2e.unpadded_tf, e2e.unpadded_vllm)


@pytest.mark.vllm
def test_e2e_shards_equal_single_run(e2e):
    d = e2e.driver
    assert d["shard0"]["written"] + d["shard1"]["written"] == 10
    assert d["shard0"]["other_shards"] == d["shard1"]["written"] and d["shard0"]["written"] > 0
    assert d["shard0"]["part"] != d["shard1"]["part"]
    _assert_same_cache(e2e.padded_tf, e2e.root / "shards")


@pytest.mark.vllm
def test_e2e_resume_skips_committed_and_completes(e2e):
    d = e2e.driver
    assert d["half"]["written"] == 5
    assert d["resume"]["already_committed"] == 5 and d["resume"]["written"] == 5  # nothing recomputed
    assert d["again"]["already_committed"] == 10 and d["again"]["written"] == 0
    assert d["again"]["cache_samples"] == 10
    _assert_same_cache(e2e.padded_tf, e2e.root / "resumed")


# ----------------------------------------------------------------------------------------------------------------
# --backend vllm refusals (no vLLM needed: they come before any engine starts)
# ----------------------------------------------------------------------------------------------------------------


def test_vllm_backend_takes_a_vlm_teacher(tmp_path):
    """A VLM teacher is no longer refused before the engine: without vLLM here, the error is the missing-vLLM one."""
    from vlsi.demo.tiny import build_tokenizer, write_tiny_model
    from vlsi.extract.config import ExtractConfig
    from vlsi.extract.run import run_extract

    if vb.vllm_available():
        pytest.skip("vLLM is importable here: the engine would start")
    teacher = write_tiny_model(tmp_path / "vlm", "qwen2_vl", tokenizer=build_tokenizer(vocab_size=300))
    (tmp_path / "d.json").write_text("[]")  # the data is opened (indexed) before the teacher loads
    cfg = ExtractConfig(teacher=str(teacher), verbalizers=str(tmp_path / "v"), data=str(tmp_path / "d.json"),
                        out=str(tmp_path / "c"), backend="vllm", progress=False, device="cpu")
    with pytest.raises(vb.VllmNotInstalledError, match="scripts/vllm_env.sh"):
        run_extract(cfg)


def test_vllm_refuses_mm_processor_kwargs():
    with pytest.raises(vb.VllmBackendError, match="preprocessor_config.json") as e:
        vb.VllmBackend("/nonexistent", mm_processor_kwargs={"max_pixels": 1 << 20})
    assert "\n" not in str(e.value)


def test_vllm_options_are_checked():
    from vlsi.extract.config import ConfigError, ExtractConfig

    base = dict(teacher="t", verbalizers="v", data="d", out="o")
    with pytest.raises(ConfigError, match="need --backend vllm"):
        ExtractConfig(**base, tensor_parallel_size=8)
    with pytest.raises(ConfigError, match="--tensor-parallel-size must be >= 1"):
        ExtractConfig(**base, backend="vllm", tensor_parallel_size=0)
    with pytest.raises(ConfigError, match="--vllm-final"):
        ExtractConfig(**base, backend="vllm", vllm_final="topk")
    assert ExtractConfig(**base, backend="vllm").batch_size == 64  # vLLM batches itself: hand it more at once
    assert ExtractConfig(**base).batch_size == 8


# ----------------------------------------------------------------------------------------------------------------
# Vision-language teachers under --backend vllm (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision)
# ----------------------------------------------------------------------------------------------------------------


def test_collapse_image_tokens_one_placeholder_per_image():
    P = 9
    ids = [1, 2, P, P, P, P, 3, P, P, 4, 5]
    assert vb.collapse_image_tokens(ids, P, 2, "s") == [1, 2, P, 3, P, 4, 5]
    assert vb.collapse_image_tokens([1, 2], P, 0, "s") == [1, 2]
    with pytest.raises(vb.VllmBackendError, match="sample s7: 1 runs of image tokens for 2 image"):
        vb.collapse_image_tokens([1, P, P, P, 2], P, 2, "s7")  # adjacent images cannot be split


def test_check_same_ids_names_sample_and_first_position():
    vb.check_same_ids([1, 2, 3], [1, 2, 3], "s")
    with pytest.raises(vb.VllmBackendError, match=r"sample s1: .* at position 2 \(vLLM 9, project 3; 4 vs 3 tokens\)") as e:
        vb.check_same_ids([1, 2, 9, 9], [1, 2, 3], "s1")
    assert "\n" not in str(e.value)
    with pytest.raises(vb.VllmBackendError, match=r"at position 3 \(vLLM end, project 4"):
        vb.check_same_ids([1, 2, 3], [1, 2, 3, 4], "s2")


def test_mrope_position_check():
    # a request whose prompt is 6 tokens: text 0..1, a 2x2 image at (t, h, w) = (2, 2..3, 2..3), text after it
    table = torch.tensor([[0, 1, 2, 2, 2, 2], [0, 1, 2, 2, 3, 3], [0, 1, 2, 3, 2, 3]])
    state = SimpleNamespace(mrope_positions=table, mrope_position_delta=-2)
    # flat batch: 3 rows of another request, then sequence indices 2..6 of this one (6 = first decode token: 6 - 2)
    pos = torch.cat([torch.zeros(3, 3, dtype=torch.long), torch.cat([table[:, 2:], torch.full((3, 1), 4)], 1)], 1)
    vb._check_positions(pos, 3, 8, torch.arange(2, 7), state, "k")
    with pytest.raises(RuntimeError, match="row/position mapping mismatch for request k"):
        vb._check_positions(pos, 3, 8, torch.arange(3, 8), state, "k")  # off by one
    vb._check_positions(torch.arange(10, 15), 0, 5, torch.arange(10, 15), None, "k")  # 1-D RoPE: sequence index
    with pytest.raises(RuntimeError, match="mismatch"):
        vb._check_positions(torch.arange(10, 15), 0, 5, torch.arange(11, 16), None, "k")
    with pytest.raises(RuntimeError, match="without a positions tensor"):
        vb._check_positions(None, 0, 5, torch.arange(5), None, "k")


def test_images_only_processor_loads_and_expands_without_torchvision(tmp_path):
    """The HF processor vLLM gets (``vllm_models.images_only``): loads without torchvision, same counts as ours."""
    from PIL import Image
    from transformers.models.qwen2_vl import Qwen2VLProcessor

    from vlsi.demo.tiny import build_tokenizer, write_tiny_model
    from vlsi.extract.backends.vllm_models import images_only
    from vlsi.models.processors import load_processor_bundle

    d = write_tiny_model(tmp_path / "m", "qwen2_vl", tokenizer=build_tokenizer(vocab_size=300))
    cls = images_only(Qwen2VLProcessor)
    assert cls.get_attributes() == ["image_processor", "tokenizer"]
    proc = cls.from_pretrained(str(d))
    assert not hasattr(proc, "video_processor") and isinstance(proc, Qwen2VLProcessor)
    imgs = [Image.new("RGB", (56, 56)), Image.new("RGB", (140, 56))]
    out = proc(text=["a<|image_pad|>b<|image_pad|>"], images=imgs, return_tensors="pt")
    _, counts = load_processor_bundle(d).process_images(imgs)
    assert counts == [4, 10]
    assert int((out["input_ids"] == proc.image_token_id).sum()) == sum(counts)
    assert vb.image_settings(proc.image_processor) == vb.image_settings(load_processor_bundle(d).image_processor)


def test_an_image_the_processor_rejects_is_a_bad_sample(tmp_path):
    from PIL import Image

    from vlsi.demo.tiny import build_tokenizer, write_tiny_model
    from vlsi.models import BadSampleError, encode_sample
    from vlsi.models.dataset import open_dataset
    from vlsi.models.processors import load_processor_bundle

    d = write_tiny_model(tmp_path / "m", "qwen2_vl", tokenizer=build_tokenizer(vocab_size=300))
    Image.new("RGB", (600, 2)).save(tmp_path / "thin.png")  # aspect ratio 300: Qwen2-VL's smart_resize refuses
    (tmp_path / "d.json").write_text(json.dumps([{"id": "thin", "image": "thin.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A line."}]}]))
    sample = open_dataset(str(tmp_path / "d.json"))[0]
    with pytest.raises(BadSampleError, match="thin.*image processor cannot read.*aspect ratio"):
        encode_sample(sample, load_processor_bundle(d))


VLM_LAYERS = [0, 2]
VLM_K = 8
VLM_ATOL = 0.02  # log-probs / tails, the tolerance (what is stored is fp16; fp32 CPU agrees to ~2e-3)
VLM_CLEAR_GAP = 0.05  # top-1 ids must agree where top-1 leads top-2 by more than this
# 32-token steps: prompts (~60-140 tokens, images of 4-10 tokens) are chunked, images split across steps
VLM_ENGINE = {"kv_cache_memory_bytes": 64 << 20, "max_num_batched_tokens": 32, "max_num_seqs": 4}
VLM_ENGINE_LLAVA = dict(VLM_ENGINE, max_num_batched_tokens=256)  # a LLaVA-OV image is ~36-70 tokens

_VLM_DRIVER = textwrap.dedent(
    """
    # Runs in the vLLM environment, in-process engine: each teacher's engine serves all of its runs, one at a time.
    import json, os, sys
    from vlsi.extract.config import ExtractConfig
    from vlsi.extract.run import _load_teacher, run_extract

    spec = json.load(open(sys.argv[1]))
    out = {}
    for eng in spec["engines"]:
        base = dict(teacher=eng["teacher"], verbalizers=eng["verbalizers"], top_k=spec["top_k"], backend="vllm", encoding="exact",
                    progress=False, backend_options=eng["options"], vllm_final=eng.get("final", "auto"))
        first = eng["runs"][0]
        teacher, backend = _load_teacher(ExtractConfig(**base, data=first["data"], out=first["out"]))
        out[eng["name"]] = {"final": backend.final, "needs_images": backend.needs_images}
        for run in eng["runs"]:
            os.environ.pop("VLSI_VLLM_FAULT", None)
            if run.get("fault"):
                os.environ["VLSI_VLLM_FAULT"] = run["fault"]
            kw = {k: run[k] for k in ("shard", "resume", "on_bad_sample") if k in run}
            try:
                out[run["name"]] = run_extract(ExtractConfig(**base, data=run["data"], out=run["out"], **kw),
                                               teacher=teacher, backend=backend)
            except Exception as exc:  # the tests check the message
                out[run["name"]] = {"error": f"{type(exc).__name__}: {exc}"}
        os.environ.pop("VLSI_VLLM_FAULT", None)
        backend.close()
    json.dump(out, open(sys.argv[2], "w"), default=str)
    """
)


def _write_vlm_teacher(out: Path, family: str, tokenizer, *, padded: bool = True) -> Path:
    """The demo's tiny ``family`` model ("test" shape: 4 layers, 1-block vision tower), its text model widened to
    head_dim 32 (vLLM's CPU attention has no kernel below 32; M-RoPE sections re-split for it), every weight random
    (norms too); ``padded``: head rows rounded up to 64 (then poisoned, as the other extraction tests do)."""
    from vlsi.demo.tiny import _mrope_section, make_config, make_image_processor, model_class

    cfg = make_config(family, "test", tokenizer)
    tc = cfg.text_config
    tc.hidden_size, tc.intermediate_size, tc.num_attention_heads, tc.num_key_value_heads = 64, 128, 2, 1
    tc.head_dim = 32
    if family == "qwen2_vl":
        cfg.vision_config.hidden_size = 64  # the merger's output = the text width
    elif family == "qwen2_5_vl":
        cfg.vision_config.out_hidden_size = 64
    if family != "llava_onevision":
        tc.rope_parameters = dict(tc.rope_parameters, mrope_section=_mrope_section(32))
    if not padded:
        tc.vocab_size = len(tokenizer)
    torch.manual_seed(1)
    model = model_class(family)(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else torch.rand_like(p) + 0.5)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    make_image_processor(family).save_pretrained(out)
    if family == "llava_onevision":
        _llava_as_published(out, cfg)
    if padded:
        from conftest import _poison_padded_rows

        _poison_padded_rows(out, len(tokenizer))
    return out


def _llava_as_published(out: Path, cfg) -> None:
    """Make the tiny LLaVA-OV directory look like the published ones (llava-hf/llava-onevision-*): a
    ``processor_config.json`` (the processor's token-count facts, which vLLM's processor reads) and the SigLIP tower
    under ``vision_tower.vision_model.*`` (transformers 5.24 writes ``vision_tower.*`` for this config; vLLM 0.32's
    loader wants the published layout, and transformers loads both)."""
    from safetensors.torch import load_file, save_file

    vc = cfg.vision_config
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": (vc.image_size // vc.patch_size) ** 2,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "vision_aspect_ratio": cfg.vision_aspect_ratio}))
    f = out / "model.safetensors"
    state = load_file(str(f))
    pre = "vision_tower."
    state = {(pre + "vision_model." + k[len(pre):] if k.startswith(pre) and ".vision_model." not in k else k): v
             for k, v in state.items()}
    save_file(state, str(f), metadata={"format": "pt"})


def _write_vlm_images(root: Path) -> None:
    """The four colour squares (56 x 56: 4 tokens), a wide one (140 x 56: 10 tokens, h != w for M-RoPE), a file
    PIL cannot read, and a 600 x 2 line the image processor refuses (aspect ratio > 200)."""
    from PIL import Image

    from extract_testutil import COLOURS

    (root / "img").mkdir(parents=True, exist_ok=True)
    for name, rgb in COLOURS.items():
        img = Image.new("RGB", (56, 56), (255, 255, 255))
        img.paste(Image.new("RGB", (28, 28), rgb), (14, 14))
        img.save(root / "img" / f"{name}.png")
    wide = Image.new("RGB", (140, 56), (250, 250, 250))
    wide.paste(Image.new("RGB", (40, 20), (40, 90, 220)), (10, 18))
    wide.paste(Image.new("RGB", (30, 30), (220, 40, 40)), (90, 13))
    wide.save(root / "img" / "wide.png")
    (root / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 8)
    Image.new("RGB", (600, 2), (0, 0, 0)).save(root / "img" / "thin.png")


def _vlm_records() -> tuple[list[dict], list[dict]]:
    """(good, bad): one-image, one-image multi-turn, two-image, text-only (x3 each), two wide-image samples; and
    an unreadable image, a placeholder/image count mismatch, an image the processor refuses."""
    from extract_testutil import _conv, make_records

    good = make_records(12, vlm=True)
    good.append({"id": "wide-1", "image": "img/wide.png",
                 "conversations": _conv("<image>\nWhere is the red square?", "It is on the right.")})
    good.append({"id": "wide-2", "image": ["img/green.png", "img/wide.png"],
                 "conversations": _conv("<image>\nWhat colour?", "Green.", "<image>\nAnd how many shapes here?",
                                        "There are two shapes.")})
    bad = [
        {"id": "bad-unreadable", "image": "img/broken.png",
         "conversations": _conv("<image>\nWhat colour is the shape?", "Red.")},
        {"id": "bad-placeholders", "image": "img/red.png",
         "conversations": _conv("<image>\n<image>\nCompare the two images.", "They are the same.")},
        {"id": "bad-processor", "image": "img/thin.png",
         "conversations": _conv("<image>\nWhat is this?", "A line.")},
    ]
    return good, bad


def _assert_vlm_cache_close(ref_url, got_url, ids=None) -> None:
    """Same sample ids, fingerprint, input ids and answer positions; top-k log-probs and tails within VLM_ATOL;
    equal top-1 ids wherever the reference's top-1 leads its top-2 by more than VLM_CLEAR_GAP."""
    import numpy as np

    from vlsi.cache_format import open_cache

    ref, got = open_cache(str(ref_url)), open_cache(str(got_url))
    want = sorted(ids) if ids is not None else sorted(ref.sample_ids)
    assert sorted(got.sample_ids) == want, (sorted(got.sample_ids), want)
    for field in ("teacher", "verbalizers", "target_layers", "tokenizer_hash", "processor", "vocab_size",
                  "padded_vocab_size", "top_k", "value_encoding", "temperature"):
        assert getattr(ref.fingerprint, field) == getattr(got.fingerprint, field), field
    for sid in want:
        a, b = got.get(sid), ref.get(sid)
        assert a.content_hash == b.content_hash
        np.testing.assert_array_equal(a.input_ids, b.input_ids, err_msg=sid)
        np.testing.assert_array_equal(a.answer_positions, b.answer_positions, err_msg=sid)
        assert a.topk_ids.shape == b.topk_ids.shape == (len(b.answer_positions), len(VLM_LAYERS) + 1, VLM_K)
        d = np.abs(a.topk_logprobs - b.topk_logprobs).max()
        assert d <= VLM_ATOL, f"{sid}: top-k log-probs differ by {d:.3g}"
        assert np.abs(a.tail_logmass - b.tail_logmass).max() <= VLM_ATOL, f"{sid}: tails differ"
        clear = (b.topk_logprobs[..., 0] - b.topk_logprobs[..., 1]) > VLM_CLEAR_GAP
        bad = clear & (a.topk_ids[..., 0] != b.topk_ids[..., 0])
        assert not bad.any(), f"{sid}: top-1 differs at {np.argwhere(bad)[:3].tolist()} with a clear top-2 gap"


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """Tiny VLM teachers, transformers reference caches (here), then the vLLM runs: the CLI with the default
    multiprocess engine (the path users run: the plugin must reach vLLM's spawned processes), then one driver
    (in-process engines, one teacher after another). One vLLM process at a time."""
    exe = _vllm_or_skip()
    from extract_testutil import make_records, write_data
    from vlsi.demo.tiny import build_tokenizer
    from vlsi.extract.config import ExtractConfig
    from vlsi.extract.run import run_extract
    from vlsi.models import VerbalizerSet, load_model

    root = tmp_path_factory.mktemp("vllm_vlm")
    _write_vlm_images(root)
    good, bad = _vlm_records()
    ns = SimpleNamespace(root=root, good=[r["id"] for r in good], bad=[r["id"] for r in bad])
    ns.data = write_data(root / "data.json", good)
    ns.half = write_data(root / "half.json", good[: len(good) // 2])
    ns.bad_data = write_data(root / "bad.json", good[:5] + bad[:2] + good[5:9] + bad[2:] + good[9:])
    llava = [r for r in make_records(8, vlm=True) if not isinstance(r.get("image"), list)]  # one image or none
    ns.llava_ids = [r["id"] for r in llava]
    ns.llava_data = write_data(root / "llava.json", llava)
    ns.llava_multi = write_data(root / "llava-multi.json", [r for r in make_records(4, vlm=True)
                                                            if isinstance(r.get("image"), list)])

    def teacher(name, family, padded=True):
        tok = build_tokenizer(vocab_size=300, family=family)
        t = _write_vlm_teacher(root / name, family, tok, padded=padded)
        adapter = load_model(t, device="cpu")
        vs = VerbalizerSet.for_model(adapter, VLM_LAYERS)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():  # non-zero everywhere: layers differ from the logit lens and from each other
            for p in vs.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        vs.save(root / f"{name}-verb", adapter.fingerprint())
        return t, root / f"{name}-verb"

    def reference(name, t, v, data, **kw):
        run_extract(ExtractConfig(teacher=str(t), verbalizers=str(v), data=str(data), out=str(root / name),
                                  top_k=VLM_K, progress=False, dtype="fp32", device="cpu", encoding="exact", **kw))
        return root / name

    ns.q2, ns.q2_verb = teacher("q2vl", "qwen2_vl")
    ns.q2u, ns.q2u_verb = teacher("q2vl-unpadded", "qwen2_vl", padded=False)
    ns.q25, ns.q25_verb = teacher("q25vl", "qwen2_5_vl")
    ns.ov, ns.ov_verb = teacher("llava", "llava_onevision")
    ns.ref = reference("q2vl-tf", ns.q2, ns.q2_verb, ns.data)
    ns.ref_bad = reference("q2vl-bad-tf", ns.q2, ns.q2_verb, ns.bad_data, on_bad_sample="skip")
    ns.ref_unpadded = reference("q2vl-unpadded-tf", ns.q2u, ns.q2u_verb, ns.data)
    ns.ref_q25 = reference("q25vl-tf", ns.q25, ns.q25_verb, ns.data)
    ns.ref_llava = reference("llava-tf", ns.ov, ns.ov_verb, ns.llava_data)

    # 1. the CLI, default (multiprocess) engine: Qwen2-VL, hidden mode (padded head)
    engine = [a for k, v in VLM_ENGINE.items() for a in ("--backend-option", f"{k}={v}")]
    ns.cli = root / "q2vl-cli"
    cmd = [exe, "-m", "vlsi.extract.cli", "--teacher", str(ns.q2), "--verbalizers", str(ns.q2_verb), "--data",
           str(ns.data), "--top-k", str(VLM_K), "--encoding", "exact", "--out", str(ns.cli), "--backend", "vllm", "--no-progress", "--json",
           *engine]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"vLLM CLI run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    ns.cli_summary = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])

    # 2. the driver: every other run, on in-process engines
    def run(name, data, **kw):
        return {"name": name, "data": str(data), "out": str(root / name), **kw}

    engines = [
        {"name": "q2vl", "teacher": str(ns.q2), "verbalizers": str(ns.q2_verb), "options": VLM_ENGINE, "runs": [
            run("shards", ns.data, shard=[0, 2]), run("shards", ns.data, shard=[1, 2]) | {"name": "shards1"},
            run("resumed", ns.half), run("resumed", ns.data, resume=True) | {"name": "resume"},
            run("resumed", ns.data, resume=True) | {"name": "again"},
            run("bad-error", ns.bad_data, on_bad_sample="error"),
            run("bad-skip", ns.bad_data, on_bad_sample="skip"),
            run("fault-row_shift", ns.data, fault="row_shift"),
            run("fault-double_expand_unchecked", ns.data, fault="double_expand_unchecked"),
            run("fault-double_expand", ns.data, fault="double_expand"),
            run("fault-positions", ns.data, fault="positions"),  # last: it fails inside the engine
        ]},
        {"name": "q2vl-unpadded", "teacher": str(ns.q2u), "verbalizers": str(ns.q2u_verb), "options": VLM_ENGINE,
         "final": "logprobs", "runs": [run("q2vl-unpadded-vllm", ns.data)]},
        {"name": "q25vl", "teacher": str(ns.q25), "verbalizers": str(ns.q25_verb), "options": VLM_ENGINE,
         "runs": [run("q25vl-vllm", ns.data)]},
        {"name": "llava", "teacher": str(ns.ov), "verbalizers": str(ns.ov_verb), "options": VLM_ENGINE_LLAVA,
         "runs": [run("llava-vllm", ns.llava_data), run("llava-multi", ns.llava_multi)]},
    ]
    spec = {"top_k": VLM_K, "engines": engines}
    (root / "driver.json").write_text(json.dumps(spec))
    (root / "driver.py").write_text(_VLM_DRIVER)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS="1")
    proc = subprocess.run([exe, str(root / "driver.py"), str(root / "driver.json"), str(root / "driver.out.json")],
                          capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode != 0:
        raise AssertionError(f"vLLM VLM driver failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    ns.d = json.loads((root / "driver.out.json").read_text())
    return ns


@pytest.mark.vllm
def test_vlm_hidden_mode_cache_equals_transformers(vlm):
    # the CLI with the default multiprocess engine; one-image, two-image, multi-turn, text-only and wide samples
    s = vlm.cli_summary
    assert s["backend"] == "vllm" and s["written"] == len(vlm.good) and s["skipped"] == 0
    assert vlm.d["q2vl"] == {"final": "hidden", "needs_images": True}  # padded head -> hidden
    _assert_vlm_cache_close(vlm.ref, vlm.cli)


@pytest.mark.vllm
def test_vlm_logprobs_mode_cache_equals_transformers(vlm):
    assert vlm.d["q2vl-unpadded"]["final"] == "logprobs"
    assert vlm.d["q2vl-unpadded-vllm"]["written"] == len(vlm.good)
    _assert_vlm_cache_close(vlm.ref_unpadded, vlm.root / "q2vl-unpadded-vllm")


@pytest.mark.vllm
def test_vlm_qwen2_5_vl_cache_equals_transformers(vlm):
    assert vlm.d["q25vl-vllm"]["written"] == len(vlm.good)
    _assert_vlm_cache_close(vlm.ref_q25, vlm.root / "q25vl-vllm")


@pytest.mark.vllm
def test_vlm_llava_onevision_single_image_only(vlm):
    # one image or none per sample: the same cache; several images: refused (vLLM 0.32 runs each image through
    # anyres, transformers switches to its multi-image path: other token counts, other features)
    assert vlm.d["llava-vllm"]["written"] == len(vlm.llava_ids)
    _assert_vlm_cache_close(vlm.ref_llava, vlm.root / "llava-vllm")
    err = vlm.d["llava-multi"]["error"]
    assert "VllmBackendError" in err and "anyres" in err and "sample sample-002" in err and "\n" not in err


@pytest.mark.vllm
def test_vlm_shards_and_resume(vlm):
    d = vlm.d
    assert d["shards"]["written"] + d["shards1"]["written"] == len(vlm.good) and d["shards"]["written"] > 0
    assert d["shards"]["part"] != d["shards1"]["part"]
    _assert_vlm_cache_close(vlm.cli, vlm.root / "shards")  # == the single run
    _assert_vlm_cache_close(vlm.ref, vlm.root / "shards")
    half = len(vlm.good) // 2
    assert d["resumed"]["written"] == half
    assert d["resume"]["already_committed"] == half and d["resume"]["written"] == len(vlm.good) - half
    assert d["again"]["already_committed"] == len(vlm.good) and d["again"]["written"] == 0
    _assert_vlm_cache_close(vlm.ref, vlm.root / "resumed")


@pytest.mark.vllm
def test_vlm_bad_samples_follow_on_bad_sample(vlm):
    # error: the first bad sample (in file order) ends the run with its id; the engine then serves the next runs
    err = vlm.d["bad-error"]["error"]
    assert "bad-unreadable" in err and "unreadable image" in err and "\n" not in err
    s = vlm.d["bad-skip"]
    assert s["written"] == len(vlm.good) and s["skipped"] == 3
    reasons = {e["id"]: e["reason"] for e in s["skipped_samples"]}
    assert sorted(reasons) == sorted(vlm.bad)
    assert "unreadable image" in reasons["bad-unreadable"]
    assert "2 <image> placeholder(s) but 1 image(s)" in reasons["bad-placeholders"]
    assert "image processor cannot read" in reasons["bad-processor"]
    _assert_vlm_cache_close(vlm.ref_bad, vlm.root / "bad-skip", ids=vlm.good)


@pytest.mark.vllm
def test_vlm_comparison_catches_an_off_by_one_row_mapping(vlm):
    # each answer row taken one position early, past the backend's own mapping check: only values can tell
    assert vlm.d["fault-row_shift"]["written"] == len(vlm.good)
    with pytest.raises(AssertionError, match="differ"):
        _assert_vlm_cache_close(vlm.ref, vlm.root / "fault-row_shift")
    # the same bug before the mapping check (the row -> position map itself off by one): the check refuses
    assert "row/position mapping mismatch" in vlm.d["fault-positions"]["error"]


@pytest.mark.vllm
def test_vlm_double_expanded_images_are_caught(vlm):
    # the expanded ids sent with the images: vLLM expands each image again; the backend refuses (sample, position)
    err = vlm.d["fault-double_expand"]["error"]
    assert "VllmBackendError" in err and "vLLM's prompt differs from the project's encoding at position" in err
    assert "\n" not in err
    # without that check the cache would hold wrong rows: the comparison fails
    assert vlm.d["fault-double_expand_unchecked"]["written"] == len(vlm.good)
    with pytest.raises(AssertionError, match="differ"):
        _assert_vlm_cache_close(vlm.ref, vlm.root / "fault-double_expand_unchecked")
