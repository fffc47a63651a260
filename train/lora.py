"""Which student weights train: LoRA (peft) on the LLM's linear layers only, or the whole LLM; merge for export.

LoRA placement (paper: "LoRA r = alpha = 64 on the LLM"): every ``nn.Linear`` inside the decoder layers of the
language model - attention q/k/v/o and MLP gate/up/down. Never the vision tower, the projector/merger, the
embeddings or the LM head (the head is shared with the verbalizers and must stay frozen for the cached-KL math).

peft injects the adapters in place (``inject_adapter_in_model``), so every module reference the
``ModelAdapter`` already holds (decoder layers, base model) now runs with LoRA and ``forward_hidden`` needs no
change. ``merge_lora`` folds ``W + (alpha / r) B A`` into the base weights and removes the adapter modules, leaving
a plain transformers model.
"""

from __future__ import annotations

import re

import torch
from torch import nn

__all__ = ["lora_target_modules", "apply_lora", "enable_full_training", "merge_lora", "LORA_ADAPTER"]

LORA_ADAPTER = "default"


def lora_target_modules(model: nn.Module, decoder_layers: nn.ModuleList) -> list[str]:
    """Fully qualified names of the ``nn.Linear`` modules inside ``decoder_layers`` (the LLM's blocks)."""
    inside = {id(m) for layer in decoder_layers for m in layer.modules()}
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside]


def apply_lora(adapter, *, rank: int, alpha: float, dropout: float = 0.0, seed: int = 0) -> list[str]:
    """Inject LoRA into the student LLM in place; returns the targeted module names.

    Only the LoRA matrices require grad afterwards. ``seed`` fixes LoRA's random ``A`` init (``B`` is zero, so
    the model's outputs are unchanged at step 0).
    """
    from peft import LoraConfig, inject_adapter_in_model

    model = adapter.model
    targets = lora_target_modules(model, adapter.decoder_layers)
    if not targets:
        raise ValueError(f"{adapter.name}: no linear layers found in the decoder layers for LoRA")
    # An exact-name regex: peft matches `target_modules` strings as suffixes, which would also hit the vision tower.
    pattern = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")
    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(cfg, model, adapter_name=LORA_ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    model.to(adapter.device)
    return targets


def enable_full_training(adapter, *, everything: bool = False) -> None:
    """``--full``: every parameter of the LLM's decoder layers and final norm trains (vision, embeddings and the
    shared LM head stay frozen: the head defines the cached distributions' space).
    ``everything=True`` (``--train-all``): every parameter of the model trains (models trained from scratch)."""
    adapter.model.requires_grad_(everything)
    adapter.decoder_layers.requires_grad_(True)
    adapter.final_norm.requires_grad_(True)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base linear and replace the LoRA wrapper by the plain ``nn.Linear``."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model
