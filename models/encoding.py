"""Chat encoding of one sample (template + image-token expansion + answer mask) and batch collation.

Contract (docs/design.md "Alignment"): ``answer_mask[t]`` is True for the tokens of every assistant turn's content
plus that turn's end-of-turn token (``<|im_end|>``); never system/user text, template scaffolding, image tokens or
padding. ``answer_positions`` are the ``t`` with ``answer_mask[t + 1]``: row ``t`` predicts token ``t + 1``.

How the mask is found: the conversation is rendered once with the tokenizer's chat template and tokenized with
character offsets. For assistant turn ``i`` the template is rendered for ``messages[:i]`` + generation prompt and for
``messages[:i+1]``; both must be prefixes of the full rendering (true for ChatML-style templates, checked), and the
characters between them are that turn's answer (trimmed after its end-of-turn token). Tokens whose first character
falls inside an answer span are answer tokens. The ids are therefore exactly what ``apply_chat_template`` gives
(tests compare), and each image placeholder token is then expanded to the image's token count.

Data convention: a turn's ``<image>`` placeholders become image content parts in place; the one newline LLaVA data
puts after each ``<image>`` is dropped (each template puts its own separator around images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vlsi.models.errors import BadSampleError, VlsiError
from vlsi.models.processors import ProcessorBundle

if TYPE_CHECKING:
    import torch

IMAGE_PLACEHOLDER = "<image>"


@dataclass
class Encoded:
    """One encoded sample. ``model_inputs`` holds this sample's image tensors (empty for text-only samples)."""

    sample_id: str
    content_hash: str
    input_ids: "torch.Tensor"  # int64 [T]
    answer_mask: "torch.Tensor"  # bool [T]
    model_inputs: dict = field(default_factory=dict)
    answer_positions: "torch.Tensor" = None  # int64 [A]: t with answer_mask[t + 1]
    num_images: int = 0

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def _bundle_of(adapter_or_bundle) -> ProcessorBundle:
    if isinstance(adapter_or_bundle, ProcessorBundle):
        return adapter_or_bundle
    bundle = getattr(adapter_or_bundle, "bundle", None)
    if not isinstance(bundle, ProcessorBundle):
        raise TypeError(f"expected a ModelAdapter or ProcessorBundle, got {type(adapter_or_bundle).__name__}")
    return bundle


def build_messages(sample, *, vlm: bool) -> list[dict]:
    """Sample turns -> chat-template messages (content parts with images in place for VLMs)."""
    messages = []
    for turn in sample.turns:
        if not vlm:
            messages.append({"role": turn.role, "content": turn.text})
            continue
        parts: list[dict] = []
        pieces = turn.text.split(IMAGE_PLACEHOLDER)
        for k, piece in enumerate(pieces):
            if k > 0:
                parts.append({"type": "image"})
                if piece.startswith("\n"):
                    piece = piece[1:]
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": turn.role, "content": parts})
    return messages


def _render(tokenizer, messages, *, gen: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


def answer_char_spans(tokenizer, messages: list[dict], full: str, eot: str | None) -> list[tuple[int, int]]:
    """Character spans of every assistant turn's content + end-of-turn token in ``full`` (see module doc)."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i], gen=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], gen=False)
        start = len(prefix)
        if not (full.startswith(prefix) and full.startswith(through)):
            raise VlsiError("chat template is not prefix-stable across turns; cannot locate assistant turns")
        end = len(through)
        seg = full[start:end]
        if eot and eot in seg:
            end = start + seg.rindex(eot) + len(eot)  # drop what follows the end-of-turn token (e.g. "\n")
        else:
            end = start + len(seg.rstrip())
        spans.append((start, end))
    return spans


def encode_sample(sample, adapter_or_bundle, *, max_length: int | None = None, policy=None) -> Encoded | None:
    """Encode ``sample`` for the model behind ``adapter_or_bundle`` (a ``ModelAdapter`` or ``ProcessorBundle``).

    Bad samples (images for a text-only model, placeholder/image count mismatch, unreadable image, no answer
    tokens, longer than ``max_length`` after image expansion) raise ``BadSampleError`` or, when ``policy`` is a
    ``BadSamplePolicy`` in ``skip`` mode, are recorded in its report and ``None`` is returned.
    """
    try:
        return _encode(sample, _bundle_of(adapter_or_bundle), max_length)
    except BadSampleError as err:
        if policy is None:
            raise
        policy.handle(err)
        return None


def _encode(sample, bundle: ProcessorBundle, max_length: int | None) -> Encoded:
    import torch

    tok = bundle.tokenizer
    n_img = len(sample.images)
    if n_img and not bundle.is_vlm:
        raise sample.bad(f"{n_img} image(s) but the model ({bundle.family}) is text-only")
    n_ph = sum(t.text.count(IMAGE_PLACEHOLDER) for t in sample.turns)
    if bundle.is_vlm and n_ph != n_img:
        raise sample.bad(f"{n_ph} <image> placeholder(s) but {n_img} image(s)")
    if not any(t.role == "assistant" for t in sample.turns):
        raise sample.bad("no assistant turn")

    messages = build_messages(sample, vlm=bundle.is_vlm)
    full = _render(tok, messages, gen=False)
    eot = tok.eos_token if tok.eos_token and tok.eos_token in full else ("<|im_end|>" if "<|im_end|>" in full else None)
    spans = answer_char_spans(tok, messages, full, eot)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    mask = []
    for start, end in enc["offset_mapping"]:
        mask.append(any(s <= start < e for s, e in spans) and end > start)

    model_inputs: dict[str, Any] = {}
    if n_img:
        images = sample.pil_images()
        try:
            model_inputs, counts = bundle.process_images(images)
        except (ValueError, OSError) as exc:  # e.g. Qwen2-VL's smart_resize: aspect ratio >= 200
            raise sample.bad(f"the image processor cannot read the image(s): {exc}") from exc
        img_id = bundle.image_token_id
        where = [k for k, t in enumerate(ids) if t == img_id]
        if len(where) != n_img:
            raise sample.bad(f"template produced {len(where)} image tokens for {n_img} image(s)")
        # Expand each placeholder to its image's token count (the model checks features == tokens).
        out_ids, out_mask, prev = [], [], 0
        for k, pos in enumerate(where):
            out_ids += ids[prev:pos] + [img_id] * counts[k]
            out_mask += mask[prev:pos] + [False] * counts[k]
            prev = pos + 1
        ids, mask = out_ids + ids[prev:], out_mask + mask[prev:]
    elif bundle.image_token_id is not None and bundle.image_token_id in ids:
        raise sample.bad("text contains the image token but the sample has no images")

    if max_length is not None and len(ids) > max_length:
        raise sample.bad(f"{len(ids)} tokens > max length {max_length}")
    input_ids = torch.tensor(ids, dtype=torch.long)
    answer_mask = torch.tensor(mask, dtype=torch.bool)
    if "image_grid_thw" in model_inputs:
        # Qwen2-VL's M-RoPE needs the modality of every token (0 text, 1 image), as its processor returns.
        model_inputs["mm_token_type_ids"] = (input_ids == bundle.image_token_id).to(torch.int32)
    answer_positions = torch.nonzero(answer_mask[1:], as_tuple=False).flatten()
    if answer_positions.numel() == 0:
        raise sample.bad("no answer tokens after encoding")
    return Encoded(sample.id, sample.content_hash, input_ids, answer_mask, model_inputs, answer_positions, n_img)


@dataclass
class Batch:
    """Right-padded batch. ``model_inputs`` are the image tensors in the layout the family's forward expects."""

    sample_ids: list[str]
    content_hashes: list[str]
    input_ids: "torch.Tensor"  # [B, T]
    attention_mask: "torch.Tensor"  # [B, T] int64
    answer_mask: "torch.Tensor"  # [B, T] bool
    answer_positions: list  # per sample LongTensor[A_b]
    model_inputs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_answer_rows(self) -> int:
        return sum(int(p.numel()) for p in self.answer_positions)

    def answer_index(self):
        """(batch index, position) of every answer row, concatenated over samples in batch order."""
        import torch

        b = torch.cat([torch.full((p.numel(),), i, dtype=torch.long) for i, p in enumerate(self.answer_positions)])
        t = torch.cat([p.long() for p in self.answer_positions])
        return b, t

    @property
    def answer_targets(self) -> "torch.Tensor":
        """Token ids the answer rows predict: ``input_ids[b, t + 1]``, [sum A]."""
        b, t = self.answer_index()
        return self.input_ids[b, t + 1]

    def model_kwargs(self, device=None, dtype=None) -> dict:
        """Keyword arguments for the family's base-model forward, moved to ``device`` (floats cast to ``dtype``)."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.model_inputs}
        res = {}
        for k, v in out.items():
            if hasattr(v, "to"):
                v = v.to(device) if device is not None else v
                if dtype is not None and v.is_floating_point():
                    v = v.to(dtype)
            res[k] = v
        return res


def pad_id_of(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its eos, else 0 (padding is masked out, so
    any valid id works). The one definition every batcher uses."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def collate(items: list[Encoded], pad_id: int) -> Batch:
    """Right-pad ``items`` into a ``Batch`` and concatenate their image inputs per family layout.

    Qwen2-VL: ``pixel_values`` concatenated over all images, ``image_grid_thw`` [num_images, 3],
    ``mm_token_type_ids`` [B, T] (1 at image tokens).
    LLaVA-OV: ``pixel_values`` [num_images, max_patches, C, H, W] (zero-padded patches), ``image_sizes``
    [num_images, 2], ``batch_num_images`` [B] (0 for text-only samples).
    """
    import torch

    if not items:
        raise ValueError("collate: empty batch")
    B, T = len(items), max(e.length for e in items)
    input_ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    amask = torch.zeros((B, T), dtype=torch.bool)
    for b, e in enumerate(items):
        input_ids[b, : e.length] = e.input_ids
        attn[b, : e.length] = 1
        amask[b, : e.length] = e.answer_mask
    mi: dict = {}
    with_images = [e for e in items if e.model_inputs]
    if with_images and "image_grid_thw" in with_images[0].model_inputs:
        mi["pixel_values"] = torch.cat([e.model_inputs["pixel_values"] for e in with_images])
        mi["image_grid_thw"] = torch.cat([e.model_inputs["image_grid_thw"] for e in with_images])
        mm = torch.zeros((B, T), dtype=torch.int32)  # per-token modality, 0 for text-only samples and padding
        for b, e in enumerate(items):
            if "mm_token_type_ids" in e.model_inputs:
                mm[b, : e.length] = e.model_inputs["mm_token_type_ids"]
        mi["mm_token_type_ids"] = mm
    elif with_images and "image_sizes" in with_images[0].model_inputs:
        pvs = [pv for e in with_images for pv in e.model_inputs["pixel_values"]]  # each [patches, C, H, W]
        n = max(pv.shape[0] for pv in pvs)
        pad = [torch.cat([pv, pv.new_zeros((n - pv.shape[0], *pv.shape[1:]))]) for pv in pvs]
        mi["pixel_values"] = torch.stack(pad)
        mi["image_sizes"] = torch.cat([e.model_inputs["image_sizes"] for e in with_images])
        mi["batch_num_images"] = torch.tensor([e.num_images for e in items], dtype=torch.long)
    return Batch(
        [e.sample_id for e in items],
        [e.content_hash for e in items],
        input_ids,
        attn,
        amask,
        [e.answer_positions for e in items],
        mi,
    )
