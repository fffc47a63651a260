"""Generate the golden hidden-state feature fixtures (tests/cache_format/golden/v1_2_features). Run ONCE:

    python tests/cache_format/make_golden_features.py tests/cache_format/golden/v1_2_features

Two caches holding the v1.0 fixture's six samples plus teacher hidden states (format 1.2, feature
``hidden-states-v1``, SPEC section 5b): ``all`` is a features-only cache (no verbalizers: one layer row, the final
head, fp16-logprob) with answer and question rows; ``answer`` keeps the v1.0 fixture's layers and adds the answer
rows only. The states are bf16 bit patterns of fixed random values (d = 8), some exactly representable (0, 1, -2.5,
the largest and smallest normal bf16) to pin the bit rule. ``expected.npz`` holds what a reader must return.
test_cache_golden_features.py checks every later reader against it. Do not change this generator.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from make_golden import golden_arrays, golden_fingerprint_dict

D = 8
PART = "p0000of0001-golden000000"
KINDS = ("all", "answer")


def feature_arrays(kind: str, seed: int = 11) -> list[dict]:
    from vlsi.cache_format.features import bf16_bits, n_question_rows

    rng = np.random.default_rng(seed)
    pinned = np.array([0.0, 1.0, -2.5, 3.3895313892515355e38, 1.1754943508222875e-38, -0.0, 0.5, 7.0], np.float32)
    out = []
    for d in golden_arrays():
        A, T = len(d["answer_positions"]), len(d["input_ids"])
        rec = dict(d)
        if kind == "all":  # the final head only: the v1.0 fixture's last layer row
            rec.update(topk_ids=d["topk_ids"][:, -1:], topk_logprobs=d["topk_logprobs"][:, -1:],
                       tail_logmass=d["tail_logmass"][:, -1:])
        ha = (rng.standard_normal((A, D)) * 4).astype(np.float32)
        if A:
            ha[0] = pinned
        rec["hidden_answer"] = bf16_bits(ha)
        if kind == "all":
            rec["hidden_question"] = bf16_bits((rng.standard_normal((n_question_rows(d["answer_positions"], T), D))
                                                * 4).astype(np.float32))
        out.append(rec)
    return out


def fingerprint_dict(kind: str) -> dict:
    fpd = dict(golden_fingerprint_dict(), created_at="2026-12-02T00:00:00+00:00", tool_version="0.2.0",
               hidden_states=kind, hidden_size=D)
    if kind == "all":
        fpd.update(target_layers=[], verbalizers={"hash": "", "kind": "none", "layers": []})
    return fpd


def main(dest: str) -> None:
    from vlsi.cache_format import CacheWriter, Fingerprint, SampleRecord

    expected = {}
    for kind in KINDS:
        url = os.path.join(dest, kind)
        with CacheWriter(url, Fingerprint.from_dict(fingerprint_dict(kind)), part=PART, chunk_bytes=64) as w:
            for d in feature_arrays(kind):
                w.append(SampleRecord(**d))
                expected[f"{kind}/{d['sample_id']}/hidden_answer"] = d["hidden_answer"]
                if kind == "all":
                    expected[f"{kind}/{d['sample_id']}/hidden_question"] = d["hidden_question"]
                    expected[f"{kind}/{d['sample_id']}/topk_ids"] = d["topk_ids"]
    np.savez_compressed(os.path.join(dest, "expected.npz"), **expected)


if __name__ == "__main__":
    main(sys.argv[1])
