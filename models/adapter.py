"""One uniform view over the supported HF architectures (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, Qwen2, Llama).

``load_model`` returns a ``ModelAdapter`` exposing decoder layers, final norm, LM head, real vs padded vocab, the
processor bundle and a fingerprint, and ``forward_hidden``: a teacher-forced forward of the BASE model (never the LM
head, so [tokens x vocab] logits are never computed) that captures hidden states with forward hooks only at the
requested decoder layers, gathered at the answer rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from vlsi.models.errors import VlsiError
from vlsi.models.presets import Preset, default_target_layers, resolve_model
from vlsi.cache_format.compat import config_hash, tokenizer_hash
from vlsi.models.processors import ProcessorBundle, family_of, load_processor_bundle

if TYPE_CHECKING:
    import torch

    from vlsi.models.encoding import Batch

_MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2": "Qwen2ForCausalLM",
    "llama": "LlamaForCausalLM",
}


@dataclass
class HiddenOut:
    """Output of ``ModelAdapter.forward_hidden``.

    ``layer_hidden[i]``: [R, d] output of decoder layer ``i`` (= ``hidden_states[i + 1]``, before the final norm;
    for the last layer transformers' ``hidden_states[-1]`` is already normed, the hook's value is not);
    ``final_hidden``: [R, d] last layer after the final norm (what the LM head reads). Rows are the selected
    positions of every sample concatenated in batch order; ``row_counts[b]`` rows belong to sample ``b``;
    ``positions`` are their token positions within the sample. With ``rows="answer"`` row ``t`` predicts token
    ``t + 1`` (``batch.answer_targets``).
    """

    layer_hidden: dict[int, "torch.Tensor"]
    final_hidden: "torch.Tensor"
    row_counts: list[int]
    positions: "torch.Tensor"


class TeacherView:
    """Accessors every model view shares (``ModelAdapter``, ``HeadOnlyTeacher``), derived from ``bundle``,
    ``text_config``, ``lm_head``, ``preset``, ``family`` and ``num_layers``."""

    @property
    def target_layers(self) -> tuple[tuple[int, ...], str]:
        """Default target decoder layers and where they come from (one line).

        A preset's layers with source ``"preset <name>"``; otherwise (a local model directory) the family's rule for
        this model's depth, ``vlsi.models.presets.default_target_layers(family, num_layers)``, e.g.
        ``((2, 6, ..., 26), "qwen2_vl rule for 28 layers: every 4 layers from 2")``.
        """
        if self.preset is not None:
            return tuple(self.preset.target_layers), f"preset {self.preset.name}"
        return default_target_layers(self.family, self.num_layers)

    @property
    def tokenizer(self):
        return self.bundle.tokenizer

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def intermediate_size(self) -> int:
        return int(self.text_config.intermediate_size)

    @property
    def vocab_size(self) -> int:
        """Real vocabulary: ``len(tokenizer)``. Softmax/top-k/KL use only these head rows."""
        return len(self.bundle.tokenizer)

    @property
    def padded_vocab_size(self) -> int:
        return int(self.lm_head.weight.shape[0])


class ModelAdapter(TeacherView):
    """A loaded model plus the uniform accessors extract / train / eval use. Build with ``load_model``."""

    def __init__(self, model, bundle: ProcessorBundle, *, name: str, model_dir: Path, preset: Preset | None):
        self.model = model
        self.bundle = bundle
        self.name = name
        self.model_dir = model_dir
        self.preset = preset
        self.family = bundle.family
        self.config = model.config
        self.text_config = model.config.get_text_config()
        self.base_model = model.model  # the trunk without the LM head (VLM: vision + LLM; text: the LLM)
        # VLMs keep the LLM under .language_model; text models are the LLM themselves.
        self.text_model = getattr(self.base_model, "language_model", self.base_model)

    # uniform accessors ---------------------------------------------------------------------------------------
    @property
    def image_processor(self):
        return self.bundle.image_processor

    @property
    def chat_template(self) -> str:
        return self.bundle.tokenizer.chat_template

    @property
    def decoder_layers(self):
        return self.text_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.text_model.layers)

    @property
    def final_norm(self):
        return self.text_model.norm

    @property
    def lm_head(self):
        return self.model.lm_head

    @property
    def vision_module(self):
        """The vision encoder with its projector/merger (Qwen2-VL ``visual``, LLaVA-OV ``vision_tower`` +
        ``multi_modal_projector``) as a list of modules; empty for text-only models."""
        base = self.base_model
        return [m for m in (getattr(base, n, None) for n in ("visual", "vision_tower", "multi_modal_projector"))
                if m is not None]

    @property
    def image_token_id(self) -> int | None:
        return self.bundle.image_token_id

    @property
    def device(self):
        """Where inputs go: the input embeddings' device (the first device of a ``device_map``)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def head_device(self):
        """The LM head's device: where the head losses and top-k run (the last device of a ``device_map``)."""
        return self.lm_head.weight.device

    @property
    def devices(self) -> list:
        """Every device holding a parameter of the model, in order of first appearance."""
        return list(dict.fromkeys(_exec_device(m) for m in (*self.decoder_layers, self.final_norm, self.lm_head)))

    def layer_device(self, i: int):
        """The device decoder layer ``i`` runs on, i.e. where its output (the hooked hidden state) lives: the
        accelerate execution device under a ``device_map`` (also for offloaded layers), else its weights'."""
        return _exec_device(self.decoder_layers[int(i)])

    @property
    def norm_device(self):
        return _exec_device(self.final_norm)

    @property
    def dtype(self):
        return self.model.get_input_embeddings().weight.dtype

    def fingerprint(self) -> dict:
        """What identifies this model for caches and verbalizers (JSON-able, stable across runs)."""
        return model_fingerprint(self.config, self.bundle, name=self.name, model_dir=self.model_dir,
                                 preset=self.preset, num_layers=self.num_layers, hidden_size=self.hidden_size,
                                 padded_vocab_size=self.padded_vocab_size)

    # the forward ------------------------------------------------------------------------------------------
    def forward_hidden(self, batch: "Batch", layers: Sequence[int], *, rows: str = "answer") -> HiddenOut:
        """Teacher-forced forward on ``batch``; hooks capture only ``layers``; results gathered at ``rows``.

        ``rows="answer"``: positions ``t`` with ``answer_mask[t + 1]`` (``batch.answer_positions``);
        ``rows="all"``: every non-padding position. Works under ``torch.no_grad()`` and with autograd (LoRA).
        The LM head is not run.
        """
        import torch

        layers = sorted(set(int(i) for i in layers))
        for i in layers:
            if not 0 <= i < self.num_layers:
                raise VlsiError(f"layer {i} out of range: {self.name} has decoder layers 0..{self.num_layers - 1}")
        if rows not in ("answer", "all"):
            raise ValueError(f"rows must be 'answer' or 'all', got {rows!r}")
        dev = self.device
        if rows == "answer":
            b_idx, t_idx = batch.answer_index()
        else:
            b_idx, t_idx = batch.attention_mask.nonzero(as_tuple=True)
        counts = torch.bincount(b_idx, minlength=batch.input_ids.shape[0]).tolist()
        captured: dict[int, torch.Tensor] = {}

        def hook_for(i):
            def hook(_module, _args, output):
                h = output[0] if isinstance(output, tuple) else output
                # Gather inside the hook: only [rows, d] is kept, never [B, T, d] per layer.
                captured[i] = h[b_idx.to(h.device), t_idx.to(h.device)]

            return hook

        handles = [self.decoder_layers[i].register_forward_hook(hook_for(i)) for i in layers]
        try:
            inputs = batch.model_kwargs(dev, self.dtype)
            out = self.base_model(**inputs, use_cache=False, return_dict=True)
        finally:
            for h in handles:
                h.remove()
        last = out.last_hidden_state
        # Under a device_map the trunk's output stays on the final norm's device: move the [R, d] rows to the head.
        final = last[b_idx.to(last.device), t_idx.to(last.device)].to(self.head_device)
        return HiddenOut(captured, final, counts, t_idx)


def _exec_device(module):
    """The device ``module`` computes on: accelerate's hook execution device when dispatched, else its first
    parameter's (or buffer's) device."""
    import torch

    for m in module.modules():  # the module's own hook first, else the first dispatched submodule's
        hook = getattr(m, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook or one
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def model_fingerprint(config, bundle: ProcessorBundle, *, name: str, model_dir: Path, preset: Preset | None,
                      num_layers: int, hidden_size: int, padded_vocab_size: int) -> dict:
    """A model's identity for caches and verbalizers; THE definition, shared by ``ModelAdapter`` and
    ``vlsi.models.head_only.HeadOnlyTeacher`` (which never loads the decoder), so both give the same dict."""
    return {
        # a local directory is named by its basename: workers on other nodes (other mount paths) and resumes
        # from a moved copy must agree; config_hash and revision identify the weights' architecture/version
        "name": preset.hub_id if preset else _portable_name(name),
        "revision": _snapshot_revision(model_dir),
        "family": bundle.family,
        "config_hash": config_hash(config),
        "num_layers": int(num_layers),
        "hidden_size": int(hidden_size),
        "vocab_size": len(bundle.tokenizer),
        "padded_vocab_size": int(padded_vocab_size),
        "tokenizer_hash": tokenizer_hash(bundle.tokenizer),
        "processor": bundle.processor_settings(),
    }


def _snapshot_revision(model_dir: Path) -> str | None:
    # HF cache layout: .../snapshots/<commit sha>/ ; a plain local dir has no revision.
    if model_dir.parent.name == "snapshots" and len(model_dir.name) == 40:
        return model_dir.name
    return None


def torch_dtype(name: str | None):
    """The torch dtype of a ``--dtype`` name (``vlsi.common.config.DTYPES``); ``auto``/``None`` -> ``None``
    (= bf16 on GPU, fp32 on CPU, decided by the loader)."""
    import torch

    if name is None or not isinstance(name, str):
        return name
    return {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def load_model(
    name_or_path: str | Path,
    *,
    dtype=None,
    device=None,
    device_map=None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
    attn_implementation: str | None = None,
) -> ModelAdapter:
    """Load a supported model (local dir, preset name or cached hub id) in eval mode with frozen parameters.

    Defaults: bf16 on GPU, fp32 on CPU; ``device`` defaults to ``cuda`` when available. ``device_map="auto"``
    (or an explicit ``{module name: device}`` dict) spreads a big teacher over all GPUs (accelerate) and then
    ``device`` is ignored; ``max_memory`` (``{0: "70GiB", "cpu": "200GiB"}``) caps each device's share and
    ``offload_folder`` holds modules mapped to ``"disk"``. The LM head must sit on a real device (the head ops read
    its weight directly, outside any accelerate hook).
    """
    import torch
    import transformers
    from transformers import AutoConfig

    dtype = torch_dtype(dtype)
    model_dir, preset = resolve_model(name_or_path)
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (ValueError, KeyError) as e:
        raise VlsiError(f"{model_dir}: cannot read config.json ({e})") from None
    family = family_of(config, str(model_dir))
    bundle = load_processor_bundle(model_dir, config=config)
    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        on_gpu = torch.cuda.is_available() if device_map is not None else str(device).startswith("cuda")
        dtype = torch.bfloat16 if on_gpu else torch.float32
    cls = getattr(transformers, _MODEL_CLASSES[family])
    kwargs = dict(dtype=dtype)
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory:
            kwargs["max_memory"] = dict(max_memory)
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = cls.from_pretrained(str(model_dir), **kwargs)
    if device_map is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)  # frozen by default: callers that train (LoRA) opt in explicitly
    if device_map is not None and model.lm_head.weight.device.type == "meta":
        raise VlsiError(f"{model_dir}: the device map offloads the LM head ({getattr(model, 'hf_device_map', {})}); "
                        "give it a GPU (or cpu) in --max-memory")
    name = preset.name if preset else str(name_or_path)
    return ModelAdapter(model, bundle, name=name, model_dir=model_dir, preset=preset)


def _portable_name(name: str) -> str:
    """A hub id stays as is; a local path becomes its directory name (``/data/ckpt/teacher/`` -> ``teacher``)."""
    p = Path(name)
    return p.name if p.exists() or p.is_absolute() or name.startswith(".") else name
