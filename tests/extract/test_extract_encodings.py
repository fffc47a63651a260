"""vlsi-extract --encoding / --targets: a topk1-* cache holds the exact extraction's rows within the encoding's
error; sampled targets are refused where they cannot be computed; bad values are one-line errors."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from vlsi.extract.cli import main


def _args(env, out, *extra):
    return ["--teacher", str(env["teacher"]), "--verbalizers", str(env["verb"]), "--data", str(env["data"]),
            "--out", str(out), "--top-k", "8", "--no-progress", "--batch-size", "4", *extra]


def test_encoded_extraction_matches_exact(tiny_env, tmp_path):
    from vlsi.cache_format import open_cache
    from vlsi.cache_format.stats import row_kl

    env = tiny_env("qwen2")
    run = CliRunner().invoke
    r = run(main, _args(env, tmp_path / "exact", "--encoding", "exact"), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = run(main, _args(env, tmp_path / "enc", "--encoding", "topk1-prevd-dq8"), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    a, b = open_cache(str(tmp_path / "exact")), open_cache(str(tmp_path / "enc"))
    assert b.fingerprint.value_encoding == "topk1-prevd-dq8" and a.fingerprint.value_encoding == "fp16-logprob"
    assert b.attrs["required"][-1] == "topk-encodings-v1"
    n = 0
    for ra in a.iter():
        rb = b.get(ra.sample_id)
        np.testing.assert_array_equal(ra.input_ids, rb.input_ids)
        for layer in range(ra.topk_ids.shape[1]):
            kl = row_kl(ra.topk_ids[:, layer], ra.topk_logprobs[:, layer], ra.tail_logmass[:, layer],
                        rb.topk_ids[:, layer], rb.topk_logprobs[:, layer], rb.tail_logmass[:, layer],
                        a.fingerprint.vocab_size)
            assert (kl < (1 / 16) ** 2 / 8 + 1e-4).all()  # q8's bound (+ fp16 rounding of the exact cache)
            n += kl.size
    assert n > 50


def test_sampled_and_encoding_refusals(tiny_env, tmp_path):
    env = tiny_env("qwen2")
    run = CliRunner().invoke
    r = run(main, _args(env, tmp_path / "x", "--targets", "sampled", "--backend", "vllm"))
    assert r.exit_code == 2 and "error: --targets sampled needs --backend transformers" in r.output
    r = run(main, _args(env, tmp_path / "x", "--targets", "sampled", "--samples-per-row", "300"))
    assert r.exit_code == 2 and "error: --samples-per-row must be an integer in 1..255" in r.output
    r = run(main, _args(env, tmp_path / "x", "--encoding", "zip9"))
    assert r.exit_code == 2 and "error: --encoding: unknown value_encoding 'zip9'" in r.output


def test_the_default_encoding_is_the_chosen_one_and_stays_within_its_kl_budget(tiny_env, tmp_path):
    """vlsi-extract without --encoding writes topk1-prevd-dq8-kl1e-2 (docs/cache_economy.md "Choice of the
    default"): every row within a coarse KL of 1e-2 of the exact extraction, plus the 8-bit rounding."""
    from vlsi.cache_format import open_cache
    from vlsi.cache_format.stats import row_kl

    env = tiny_env("qwen2")
    run = CliRunner().invoke
    assert run(main, _args(env, tmp_path / "exact", "--encoding", "exact")).exit_code == 0
    r = run(main, _args(env, tmp_path / "default"), catch_exceptions=False)
    assert r.exit_code == 0, r.output
    a, b = open_cache(str(tmp_path / "exact")), open_cache(str(tmp_path / "default"))
    assert b.fingerprint.value_encoding == "topk1-prevd-dq8-kl1e-2"
    worst = 0.0
    for ra in a.iter():
        rb = b.get(ra.sample_id)
        for layer in range(ra.topk_ids.shape[1]):
            kl = row_kl(ra.topk_ids[:, layer], ra.topk_logprobs[:, layer], ra.tail_logmass[:, layer],
                        rb.topk_ids[:, layer], rb.topk_logprobs[:, layer], rb.tail_logmass[:, layer],
                        a.fingerprint.vocab_size)
            worst = max(worst, float(np.max(kl)))
    assert worst <= 1e-2 + 2e-3, worst
