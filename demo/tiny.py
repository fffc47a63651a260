"""Tiny models of the real architectures, with a tokenizer trained locally: no downloads, ever.

``write_tiny_model`` writes a directory in the layout a downloaded model has (``config.json``, ``model.safetensors``,
``generation_config.json``, tokenizer files with the chat template, ``preprocessor_config.json`` for VLMs), so every
code path that loads a real model (``from_pretrained``) loads these the same way. Sizes:

- ``test``: <= ~200k parameters, for the test suite;
- ``student`` / ``teacher``: the embedded demo's pair (same tokenizer). The teacher (~1.56M parameters: 8 x 128
  decoder, 2 x 64 vision tower) learns the demo's vision within the demo budget; the student (~0.17M: 4 x 48
  decoder, 1 x 16 vision tower) is shallower and narrower in both, so a capacity gap is there to distil across
  (with the demo's noisy student labels it is 35 points below the teacher; see docs/results.md).

``num_layers=`` overrides the size's decoder depth (e.g. a 28-layer ``test``-width Qwen2-VL, ~0.36M parameters, to
exercise the depth-based default target layers of a local directory).

The tokenizer is a byte-level BPE trained with the ``tokenizers`` library on the given texts (by default the embedded
VQA generator's corpus), with the Qwen2-VL special tokens, LLaVA-OneVision's ``<image>`` token and each family's chat
template. Its vocabulary is deliberately not a multiple of 64 while the models pad their embedding to one, so the
real-vs-padded vocab distinction is exercised everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "qwen2", "llama")

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "<video>",
)

# Qwen2-VL's chat template (as shipped with Qwen2-VL-*-Instruct, vision id option kept).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LLaVA-OneVision (Qwen2 LLM) template: images rendered as `<image>` before the text of their turn.
LLAVA_OV_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text-only Qwen2 / Llama models in this project use the ChatML template.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CHAT_TEMPLATES = {
    "qwen2_vl": QWEN2_VL_CHAT_TEMPLATE,
    "qwen2_5_vl": QWEN2_VL_CHAT_TEMPLATE,
    "llava_onevision": LLAVA_OV_CHAT_TEMPLATE,
    "qwen2": CHATML_TEMPLATE,
    "llama": CHATML_TEMPLATE,
}

# Text model shapes per size: hidden, layers, heads, kv heads, intermediate.
TEXT_SHAPES = {
    "test": dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "student": dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96),
    "teacher": dict(hidden_size=128, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, intermediate_size=256),
}
# Vision tower shapes per size: depth, width, heads.
VISION_SHAPES = {
    "test": dict(depth=1, embed_dim=32, num_heads=2),
    "student": dict(depth=1, embed_dim=16, num_heads=2),
    "teacher": dict(depth=2, embed_dim=64, num_heads=4),
}
# Qwen2-VL image processing: 28-pixel units (patch 14 x merge 2); a 56x56 image -> 4 merged tokens.
QWEN_IMAGE_PROCESSOR = dict(min_pixels=28 * 28, max_pixels=112 * 112, patch_size=14, merge_size=2, temporal_patch_size=2)


def default_corpus() -> list[str]:
    """The embedded VQA generator's text, so the demo tokenizer covers every question and answer word."""
    from vlsi.demo import vqa

    return vqa.vqa_corpus_texts()


def build_tokenizer(texts: Iterable[str] | None = None, *, vocab_size: int = 700, family: str = "qwen2_vl"):
    """Train a byte-level BPE tokenizer locally and wrap it as a ``PreTrainedTokenizerFast``.

    The result carries the project's special tokens, ``<|im_end|>`` as EOS, ``<|endoftext|>`` as pad and the
    family's chat template. Deterministic for the same texts and sizes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts) if texts is not None else default_corpus()
    if not texts:
        raise ValueError("build_tokenizer: no training texts given")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tok.chat_template = CHAT_TEMPLATES[family]
    tok.padding_side = "right"
    return tok


def _padded(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def _text_kwargs(size: str, tokenizer, num_layers: int | None = None) -> dict:
    shape = dict(TEXT_SHAPES[size])
    if num_layers is not None:
        shape["num_hidden_layers"] = int(num_layers)
    return dict(
        shape,
        vocab_size=_padded(len(tokenizer)),
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )


def _mrope_section(head_dim: int) -> list[int]:
    # Qwen2-VL splits head_dim/2 rotary frequencies between (temporal, height, width), the real models use 16/24/24 of 64.
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def make_config(family: str, size: str, tokenizer, *, num_layers: int | None = None):
    """A transformers config of ``family`` at ``size`` whose vocabulary covers ``tokenizer`` (padded to 64).

    ``num_layers``: decoder layers of the language model instead of the size's (widths unchanged).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported: {', '.join(FAMILIES)}")
    if size not in TEXT_SHAPES:
        raise ValueError(f"unknown size {size!r}; supported: {', '.join(TEXT_SHAPES)}")
    if num_layers is not None and int(num_layers) < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    text = _text_kwargs(size, tokenizer, num_layers)
    vis = VISION_SHAPES[size]
    ids = tokenizer.convert_tokens_to_ids
    if family == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**text, architectures=["Qwen2ForCausalLM"])
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**text, architectures=["LlamaForCausalLM"])
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": _mrope_section(head_dim)}
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig(
            text_config=dict(text, rope_parameters=rope),
            vision_config=dict(
                depth=vis["depth"], embed_dim=vis["embed_dim"], num_heads=vis["num_heads"], mlp_ratio=2,
                hidden_size=text["hidden_size"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            ),
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=False,
            architectures=["Qwen2VLForConditionalGeneration"],
        )
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(
            text_config=dict(text, rope_parameters=rope),
            vision_config=dict(
                depth=vis["depth"], hidden_size=vis["embed_dim"], num_heads=vis["num_heads"],
                intermediate_size=2 * vis["embed_dim"], out_hidden_size=text["hidden_size"], patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[vis["depth"] - 1],
            ),
            image_token_id=ids("<|image_pad|>"),
            video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=False,
            architectures=["Qwen2_5_VLForConditionalGeneration"],
        )
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        text_config=dict(text, model_type="qwen2"),
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=vis["embed_dim"], intermediate_size=2 * vis["embed_dim"],
            num_hidden_layers=vis["depth"], num_attention_heads=vis["num_heads"], image_size=28, patch_size=14,
        ),
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
        architectures=["LlavaOnevisionForConditionalGeneration"],
    )


def make_image_processor(family: str, **overrides):
    """The PIL image processor (no torchvision) a downloaded model of ``family`` would ship, at tiny sizes.

    ``overrides``: processor settings instead of the defaults (e.g. ``image_mean`` / ``image_std`` /
    ``max_pixels`` for the demo's white-background images); written to ``preprocessor_config.json``.
    """
    if family in ("qwen2_vl", "qwen2_5_vl"):
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(**{**QWEN_IMAGE_PROCESSOR, **overrides})
    if family == "llava_onevision":
        from transformers import LlavaOnevisionImageProcessorPil

        return LlavaOnevisionImageProcessorPil(
            size={"height": 28, "width": 28},
            image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
            do_pad=True,
            **overrides,
        )
    return None


def model_class(family: str):
    import transformers

    name = {
        "qwen2_vl": "Qwen2VLForConditionalGeneration",
        "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
        "llava_onevision": "LlavaOnevisionForConditionalGeneration",
        "qwen2": "Qwen2ForCausalLM",
        "llama": "LlamaForCausalLM",
    }[family]
    return getattr(transformers, name)


def write_tiny_model(
    out_dir: str | Path,
    family: str,
    *,
    tokenizer=None,
    size: str = "test",
    seed: int = 0,
    texts: Sequence[str] | None = None,
    num_layers: int | None = None,
    processor: dict | None = None,
) -> Path:
    """Write a random-weight ``family`` model of ``size`` to ``out_dir`` in the layout of a downloaded model.

    ``tokenizer`` defaults to ``build_tokenizer(texts, family=family)``; teacher and student of a pair must be written
    with the same tokenizer object. ``num_layers`` overrides the size's decoder depth (widths stay the size's).
    ``processor``: image-processor settings instead of the defaults (see :func:`make_image_processor`).
    Returns ``out_dir``.
    """
    import torch

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported: {', '.join(FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = build_tokenizer(texts, family=family)
    else:
        tokenizer.chat_template = CHAT_TEMPLATES[family]
    config = make_config(family, size, tokenizer, num_layers=num_layers)
    torch.manual_seed(seed)
    model = model_class(family)(config).eval()
    model.generation_config.eos_token_id = config.get_text_config().eos_token_id
    model.generation_config.pad_token_id = config.get_text_config().pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    image_processor = make_image_processor(family, **(processor or {}))
    if image_processor is not None:
        image_processor.save_pretrained(out)
    meta = {"family": family, "size": size, "seed": seed}
    if num_layers is not None:
        meta["num_layers"] = int(num_layers)
    (out / "vlsi_tiny.json").write_text(json.dumps(meta) + "\n")
    return out


def parameter_count(path: str | Path) -> int:
    """Parameters stored in a model directory's safetensors files (no model instantiation)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                total += _prod(st.get_slice(k).get_shape())
    return total


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
