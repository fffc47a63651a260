"""Prompt-only encoding for generation: the conversation up to its last user turn plus the generation prompt.

``vlsi.models`` encodes whole conversations (prompt + answers, for teacher forcing). Generation needs the ids the
chat template gives for ``turns[:last user turn + 1]`` with ``add_generation_prompt=True``, images expanded the same
way. Rather than re-implement the template + image expansion (one helper in two places drifts), the sample is
cut after its last user turn, given an EMPTY assistant turn, and encoded with
:func:`vlsi.models.encoding.encode_sample`;
the empty turn's only answer token is its end-of-turn token, and everything before it is exactly the rendering of
the generation prompt (the models package checks the template is prefix-stable, which is what makes this exact).
Earlier assistant turns (multi-turn samples) stay in the prompt as gold history.
"""

from __future__ import annotations

import dataclasses

from vlsi.models.data import Sample, Turn
from vlsi.models.encoding import Encoded, encode_sample

__all__ = ["prompt_sample", "encode_prompt"]


def prompt_sample(sample: Sample) -> Sample:
    """``sample`` cut after its last user turn, plus an empty assistant turn (the one to generate)."""
    last_user = max((i for i, t in enumerate(sample.turns) if t.role == "user"), default=None)
    if last_user is None:
        raise sample.bad("no user turn to answer")
    turns = list(sample.turns[: last_user + 1]) + [Turn("assistant", "")]
    # images after the cut would belong to no placeholder; they cannot exist (no placeholders in answers)
    return dataclasses.replace(sample, turns=turns)


def encode_prompt(sample: Sample, adapter_or_bundle, *, max_length: int | None = None, policy=None) -> Encoded | None:
    """Encode the generation prompt of ``sample``: ``input_ids`` end with the template's assistant header.

    The result has an all-False ``answer_mask`` and no ``answer_positions``; ``model_inputs`` (image tensors,
    ``mm_token_type_ids``) are cut to the prompt. Bad samples follow ``policy`` like ``encode_sample`` (``None`` when
    skipped).
    """
    import torch

    enc = encode_sample(prompt_sample(sample), adapter_or_bundle, max_length=max_length, policy=policy)
    if enc is None:
        return None
    answer = torch.nonzero(enc.answer_mask).flatten()
    # The empty assistant turn's end-of-turn token is the last answer token; the prompt is everything before it.
    cut = int(answer[-1])
    if cut > 0 and bool(enc.answer_mask[cut - 1]):
        raise sample.bad("cannot locate the generation prompt (empty assistant turn encoded as more than one token)")
    inputs = dict(enc.model_inputs)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = inputs["mm_token_type_ids"][:cut]
    return dataclasses.replace(
        enc,
        input_ids=enc.input_ids[:cut],
        answer_mask=torch.zeros(cut, dtype=torch.bool),
        model_inputs=inputs,
        answer_positions=torch.zeros(0, dtype=torch.long),
    )
