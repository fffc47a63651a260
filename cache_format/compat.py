"""Compatibility: compare a cache's fingerprint with a tokenizer / processor / model config.

The hash functions here are THE definitions: extract uses them to fill the fingerprint and train uses them
to check it, so both sides hash identically. Objects are duck-typed (no transformers import needed).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from .schema import Fingerprint, FieldDiff

#: processor / image-processor attributes that change how many image tokens an image becomes
PROCESSOR_KEYS = ("image_seq_length", "num_image_tokens", "patch_size", "merge_size", "temporal_patch_size",
                  "min_pixels", "max_pixels", "size", "crop_size", "do_resize", "do_center_crop", "resample",
                  "image_grid_pinpoints", "vision_feature_select_strategy", "num_additional_image_tokens",
                  "image_token", "max_image_tiles", "image_size")
#: config keys that do not change the numbers a model computes
_CONFIG_VOLATILE = ("transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype",
                    "use_cache", "_attn_implementation_autoset", "_commit_hash")


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 over what decides token ids: vocab (with ids), merges, added/special tokens, the chat template.

    Canonical JSON of those parts (not the raw tokenizer file), so re-serialising the same tokenizer with another
    ``tokenizers`` version gives the same hash. THE definition: models, extract and train all call this one.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None and hasattr(backend, "to_str") else {}
    model = spec.get("model") or {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", []) or []]
    added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in spec.get("added_tokens", []))
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "merges": merges,
        "added": added,
        "special": {k: str(v) for k, v in sorted((getattr(tokenizer, "special_tokens_map", None) or {}).items())},
        "normalizer": spec.get("normalizer"),
        "pre_tokenizer": spec.get("pre_tokenizer"),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def processor_settings(processor: Any) -> dict:
    """The settings of a processor (and its image_processor) that change image-token counts, JSON-ready."""
    out: dict = {}
    for obj in (processor, getattr(processor, "image_processor", None)):
        if obj is None:
            continue
        for k in PROCESSOR_KEYS:
            v = obj.get(k) if isinstance(obj, dict) else getattr(obj, k, None)
            if v is not None and k not in out:
                out[k] = json.loads(json.dumps(v, default=str))
    return out


def config_hash(config: Any) -> str:
    """sha256 of a model config (a dict or an object with to_dict()), ignoring keys that do not change outputs."""
    d = config if isinstance(config, dict) else config.to_dict()
    return _sha(_drop_volatile(d))


def _drop_volatile(obj: Any) -> Any:
    # nested too: from_pretrained writes the load dtype into a VLM's text/vision sub-configs
    if isinstance(obj, dict):
        return {k: _drop_volatile(v) for k, v in obj.items() if k not in _CONFIG_VOLATILE}
    if isinstance(obj, list):
        return [_drop_volatile(v) for v in obj]
    return obj


def check_compatibility(fingerprint: Fingerprint, *, tokenizer: Any = None, processor: Any = None,
                        vocab_size: int | None = None, padded_vocab_size: int | None = None,
                        teacher_config: Any = None, top_k: int | None = None,
                        temperature: float | None = None) -> list[FieldDiff]:
    """Differences between a cache's fingerprint and the given objects ([] = compatible). Only what is given
    is checked. `teacher_config` is compared through `config_hash` with `teacher.config_hash`."""
    out: list[FieldDiff] = []

    def cmp(name: str, cache_v: Any, given: Any) -> None:
        if cache_v != given:
            out.append(FieldDiff(name, cache_v, given))

    if tokenizer is not None:
        cmp("tokenizer_hash", fingerprint.tokenizer_hash, tokenizer_hash(tokenizer))
        if vocab_size is None:
            vocab_size = len(tokenizer)
    if processor is not None:
        given = processor_settings(processor)
        for k in sorted(set(given) | set(fingerprint.processor)):
            cmp(f"processor.{k}", fingerprint.processor.get(k), given.get(k))
    if vocab_size is not None:
        cmp("vocab_size", fingerprint.vocab_size, int(vocab_size))
    if padded_vocab_size is not None:
        cmp("padded_vocab_size", fingerprint.padded_vocab_size, int(padded_vocab_size))
    if teacher_config is not None:
        cmp("teacher.config_hash", fingerprint.teacher.get("config_hash"), config_hash(teacher_config))
    if top_k is not None:
        cmp("top_k", fingerprint.top_k, int(top_k))
    if temperature is not None:
        cmp("temperature", fingerprint.temperature, float(temperature))
    return out
