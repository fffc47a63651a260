"""Shared fixtures for tests/eval: tiny random models (one tokenizer, the embedded VQA corpus), generated VQA data,
random (non-identity) verbalizers, and a plain no-cache greedy loop used as the reference decoder."""

from __future__ import annotations

import dataclasses

import pytest

FAMILIES = ("qwen2_vl", "llava_onevision", "qwen2")


@pytest.fixture(scope="session")
def tokenizer():
    from vlsi.demo.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tokenizer):
    from vlsi.demo.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("eval_tiny")
    return {f: write_tiny_model(root / f, f, tokenizer=tokenizer, size="test", seed=1) for f in FAMILIES}


@pytest.fixture(scope="session")
def adapters(tiny_dirs):
    from vlsi.models import load_model

    return {f: load_model(d, device="cpu") for f, d in tiny_dirs.items()}


@pytest.fixture(scope="session")
def vqa(tmp_path_factory):
    from vlsi.demo.vqa import generate_vqa

    return generate_vqa(tmp_path_factory.mktemp("eval_vqa"), n_train=0, n_val=0, n_test=20, seed=3)


@pytest.fixture(scope="session")
def samples(vqa):
    from vlsi.models.data import read_dataset

    return list(read_dataset(vqa["test"]))


def random_verbalizers(adapter, layers, kind="verb-ffn", seed=0):
    """A verbalizer set with every weight random: far from the logit lens, so each layer decodes differently."""
    import torch

    from vlsi.models.verbalizers import VerbalizerSet

    torch.manual_seed(seed)
    vs = VerbalizerSet.for_model(adapter, layers, kind=kind)
    with torch.no_grad():
        for p in vs.parameters():
            p.normal_(0, 0.3)
    return vs


def reference_greedy(adapter, enc, n_new, *, layer=None, verbalizers=None):
    """Greedy decoding by a full forward per step (no KV cache, no batching, no generate()).

    ``layer=None``: the model's own logits; otherwise argmax of ``lm_head(final_norm(verbalizer(h_layer)))``
    at the last position. Only real-vocab columns are eligible. Returns the new ids before the end token.
    """
    import torch

    from vlsi.models.encoding import collate

    ids = enc.input_ids.clone()
    eos = adapter.tokenizer.eos_token_id
    out = []
    for _ in range(n_new):
        mi = dict(enc.model_inputs)
        if "mm_token_type_ids" in mi:
            mm = mi["mm_token_type_ids"]
            mi["mm_token_type_ids"] = torch.cat([mm, mm.new_zeros(len(ids) - len(mm))])
        step = dataclasses.replace(enc, input_ids=ids, answer_mask=torch.zeros_like(ids, dtype=torch.bool),
                                   model_inputs=mi)
        batch = collate([step], 0)
        with torch.no_grad():
            o = adapter.model(**batch.model_kwargs(adapter.device), output_hidden_states=layer is not None)
            if layer is None:
                logits = o.logits[0, -1]
            else:
                h = o.hidden_states[layer + 1][0]
                if verbalizers.needs_context:
                    y = verbalizers(layer, h, row_counts=[h.shape[0]])[-1:]
                else:
                    y = verbalizers(layer, h[-1:])
                logits = adapter.lm_head(adapter.final_norm(y))[0]
        nxt = int(logits[: adapter.vocab_size].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([nxt])])
    return out
