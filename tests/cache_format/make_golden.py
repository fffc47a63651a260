"""Generate the golden v1.0 cache fixture (tests/cache_format/golden/v1_0). Run ONCE per format version:

    python tests/cache_format/make_golden.py tests/cache_format/golden/v1_0

The committed files are read by test_golden.py with every later version of the reader; the test recomputes
the expected values from `golden_records()` (seeded, self-contained: do not change this generator).
"""
from __future__ import annotations

import sys

import numpy as np

SEED = 20250101
N_SAMPLES, TARGET_LAYERS, K, VOCAB, PADDED = 6, (0, 2), 8, 50, 64


def golden_fingerprint_dict() -> dict:
    return {"teacher": {"name": "golden-teacher", "revision": "r1", "config_hash": "abc123", "num_layers": 3},
            "verbalizers": {"hash": "ver0", "kind": "verb-ffn", "layers": list(TARGET_LAYERS)},
            "target_layers": list(TARGET_LAYERS), "tokenizer_hash": "tokhash0", "processor": {"patch_size": 14},
            "vocab_size": VOCAB, "padded_vocab_size": PADDED, "top_k": K, "value_encoding": "fp16-logprob",
            "temperature": 1.0, "tool_version": "0.1.0", "created_at": "2025-01-01T00:00:00+00:00"}


def golden_arrays() -> list[dict]:
    """Per sample: plain numpy arrays (float32 log-probs before fp16 storage)."""
    rng = np.random.default_rng(SEED)
    L = len(TARGET_LAYERS) + 1
    out = []
    for i in range(N_SAMPLES):
        T = 5 + 3 * i
        A = 0 if i == 2 else 1 + i % 4  # sample 2 has no answer positions (edge case)
        pos = np.sort(rng.choice(T - 1, A, replace=False)).astype(np.int32)
        ids = np.stack([[rng.choice(VOCAB, K, replace=False) for _ in range(L)] for _ in range(A)]).astype(np.int32) \
            if A else np.zeros((0, L, K), np.int32)
        logits = -np.sort(-rng.standard_normal((A, L, K + 1)) * 2.5, axis=-1)
        p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        out.append({"sample_id": f"golden-{i}", "content_hash": f"{i:064x}",
                    "input_ids": rng.integers(0, VOCAB, T).astype(np.int32), "answer_positions": pos,
                    "topk_ids": ids, "topk_logprobs": np.log(p[..., :K]).astype(np.float32),
                    "tail_logmass": np.log1p(-p[..., :K].sum(-1)).astype(np.float32)})
    return out


def main(dest: str) -> None:
    from vlsi.cache_format import CacheWriter, Fingerprint, SampleRecord

    fp = Fingerprint.from_dict(golden_fingerprint_dict())
    # two segments (commit_every=4) so the fixture exercises multi-segment reads
    with CacheWriter(dest, fp, part="p0000of0001-golden000000", commit_every=4, chunk_bytes=256) as w:
        for d in golden_arrays():
            w.append(SampleRecord(**d))


if __name__ == "__main__":
    main(sys.argv[1])
