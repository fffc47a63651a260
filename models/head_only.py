"""A teacher without its decoder: processor bundle, config, final norm, LM head and fingerprint.

Extraction backends that run the teacher's decoder elsewhere (vLLM, in its own worker processes) still need the
project's side of the final layer: the tokenizer/processor to encode samples, the final norm and LM head that turn
verbalized hidden states into distributions, the vocab sizes, and the fingerprint that names the teacher in the
cache. ``load_head_only`` builds exactly these, reading only the norm and head tensors from the safetensors shards
(through ``model.safetensors.index.json``), so a 72B teacher's ~2.5 GB of head + norm load without its ~140 GB of
decoder.

The norm module is the family's own class (found on a ``meta``-device instance of the full model, which allocates
nothing), so its numerics are those of the full model's ``final_norm``; ``fingerprint()`` is computed by the same
function as ``ModelAdapter.fingerprint()`` (``vlsi.models.adapter.model_fingerprint``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlsi.models.adapter import TeacherView
from vlsi.models.errors import VlsiError

__all__ = ["HeadOnlyTeacher", "load_head_only", "checkpoint_key_map"]

# Where the text model's tensors live in checkpoints of the supported families: transformers 5 writes the legacy
# layouts (``model.norm`` for Qwen2-VL, ``language_model.model.norm`` for LLaVA-OneVision), newer conversions may
# write ``model.language_model.*``. The first prefix that holds the wanted tensor wins.
_TEXT_PREFIXES = ("model.", "model.language_model.", "language_model.model.", "language_model.")
_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight", "model.lm_head.weight")


def checkpoint_key_map(model_dir: Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` of a model directory (sharded via the index, or one file)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise VlsiError(f"{index}: not a safetensors index (no weight_map: {e})") from None
        return {k: model_dir / v for k, v in weight_map.items()}
    single = model_dir / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as f:
            return {k: single for k in f.keys()}
    raise VlsiError(f"{model_dir}: no model.safetensors or model.safetensors.index.json (head-only loading needs "
                    "safetensors weights)")


def _read_tensors(key_map: dict[str, Path], keys: list[str]):
    """Read only ``keys`` (grouped by file: each shard is opened once)."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(key_map[k], []).append(k)
    out = {}
    for path, ks in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for k in ks:
                out[k] = f.get_tensor(k)
    return out


def _find_key(key_map: dict, candidates, what: str, model_dir: Path) -> str:
    for k in candidates:
        if k in key_map:
            return k
    raise VlsiError(f"{model_dir}: no {what} tensor in the checkpoint (looked for {', '.join(candidates)})")


class HeadOnlyTeacher(TeacherView):
    """What extraction needs from a teacher except its decoder. Build with :func:`load_head_only`.

    Same attribute names as ``ModelAdapter`` for the parts it has: ``bundle``, ``tokenizer``, ``config``,
    ``text_config``, ``family``, ``final_norm`` (nn.Module), ``lm_head`` (nn.Linear, no bias), ``vocab_size`` (real,
    ``len(tokenizer)``), ``padded_vocab_size`` (head rows), ``num_layers``, ``hidden_size``, ``device``, ``dtype``,
    ``fingerprint()``, ``target_layers`` (preset or depth rule, as the adapter's). No ``text_model`` /
    ``forward_hidden``: it cannot run the decoder.
    """

    def __init__(self, *, config, bundle, final_norm, lm_head, name: str, model_dir: Path, preset) -> None:
        self.config = config
        self.text_config = config.get_text_config()
        self.bundle = bundle
        self.family = bundle.family
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.name = name
        self.model_dir = model_dir
        self.preset = preset

    @property
    def is_vlm(self) -> bool:
        return bool(self.bundle.is_vlm)

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def device(self):
        return self.lm_head.weight.device

    @property
    def dtype(self):
        return self.lm_head.weight.dtype

    def fingerprint(self) -> dict:
        """Identical to ``ModelAdapter.fingerprint()`` for the same directory (one shared definition)."""
        from vlsi.models.adapter import model_fingerprint

        return model_fingerprint(self.config, self.bundle, name=self.name, model_dir=self.model_dir,
                                 preset=self.preset, num_layers=self.num_layers, hidden_size=self.hidden_size,
                                 padded_vocab_size=self.padded_vocab_size)


def _record_load_dtype(config, dtype) -> None:
    # ``from_pretrained(dtype=...)`` writes the load dtype into the config AND its sub-configs; config_hash drops
    # only the top-level key, so the sub-configs' dtype is part of a VLM's config hash. Mirror it, or the
    # head-only fingerprint would differ from the full adapter's.
    for name in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "dtype"):
            sub.dtype = dtype
    config.dtype = dtype


def load_head_only(name_or_path: str | Path, *, dtype=None, device=None) -> HeadOnlyTeacher:
    """Load a supported model's processor bundle, config, final norm and LM head, without its decoder.

    ``name_or_path``: local dir, preset name or cached hub id (as ``load_model``). Defaults as ``load_model``:
    ``device`` = ``cuda`` when available, ``dtype`` = bf16 on GPU, fp32 on CPU. Tied embeddings
    (``tie_word_embeddings``) read the embedding matrix as the head. Parameters are frozen.
    """
    import torch
    import transformers
    from transformers import AutoConfig

    from vlsi.models.adapter import _MODEL_CLASSES
    from vlsi.models.presets import resolve_model
    from vlsi.models.processors import family_of, load_processor_bundle

    model_dir, preset = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (ValueError, KeyError) as e:
        raise VlsiError(f"{model_dir}: cannot read config.json ({e})") from None
    family = family_of(config, str(model_dir))
    bundle = load_processor_bundle(model_dir, config=config)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    text_config = config.get_text_config()

    # The family's own final-norm module, shaped by the config: build the full model on the meta device (no
    # memory, no weights read) and keep only its text model's norm.
    with torch.device("meta"):
        meta = getattr(transformers, _MODEL_CLASSES[family])(config)
    base = meta.model
    norm = getattr(base, "language_model", base).norm
    del meta, base

    key_map = checkpoint_key_map(model_dir)
    norm_keys = {}
    for pname, _ in norm.named_parameters():
        norm_keys[pname] = _find_key(key_map, [p + "norm." + pname for p in _TEXT_PREFIXES], f"final norm {pname}",
                                     model_dir)
    tied = bool(getattr(config, "tie_word_embeddings", False) or getattr(text_config, "tie_word_embeddings", False))
    head_candidates = list(_HEAD_KEYS)
    if tied:  # the head IS the embedding; a checkpoint may still store a copy under lm_head
        head_candidates += [p + "embed_tokens.weight" for p in _TEXT_PREFIXES]
    head_key = _find_key(key_map, head_candidates, "LM head (lm_head.weight)", model_dir)
    tensors = _read_tensors(key_map, [*norm_keys.values(), head_key])

    norm = norm.to_empty(device=device)
    with torch.no_grad():
        for pname, key in norm_keys.items():
            param = norm.get_parameter(pname)
            if tuple(param.shape) != tuple(tensors[key].shape):
                raise VlsiError(f"{model_dir}: {key} has shape {tuple(tensors[key].shape)}, "
                                f"the config wants {tuple(param.shape)}")
            param.copy_(tensors[key])
    norm = norm.to(dtype=dtype).eval().requires_grad_(False)

    w = tensors[head_key]
    if w.dim() != 2 or w.shape[1] != int(text_config.hidden_size):
        raise VlsiError(f"{model_dir}: {head_key} has shape {tuple(w.shape)}, expected [rows, "
                        f"hidden_size={text_config.hidden_size}]")
    lm_head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lm_head.weight = torch.nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
    lm_head.eval()

    _record_load_dtype(config, dtype)
    name = preset.name if preset else str(name_or_path)
    return HeadOnlyTeacher(config=config, bundle=bundle, final_norm=norm, lm_head=lm_head, name=name,
                           model_dir=model_dir, preset=preset)
