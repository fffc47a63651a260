"""vlsi.models: presets, model adapters, processors without torchvision, dataset readers, chat encoding + answer
masks, verbalizers, the verbalization step and shared training utilities.

Names are imported lazily (PEP 562) so the CLIs' ``--help`` stays free of torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PRESETS": "presets",
    "Preset": "presets",
    "resolve_model": "presets",
    "find_preset": "presets",
    "default_target_layers": "presets",
    "ModelNotFoundError": "presets",
    "load_model": "adapter",
    "torch_dtype": "adapter",
    "load_head_only": "head_only",
    "HeadOnlyTeacher": "head_only",
    "ModelAdapter": "adapter",
    "HiddenOut": "adapter",
    "ProcessorBundle": "processors",
    "load_processor_bundle": "processors",
    "tokenizer_hash": "adapter",
    "UnsupportedModelError": "processors",
    "SUPPORTED_FAMILIES": "processors",
    "encode_sample": "encoding",
    "Encoded": "encoding",
    "collate": "encoding",
    "Batch": "encoding",
    "VerbalizerSet": "verbalizers",
    "load_verbalizers": "verbalizers",
    "parameter_count": "verbalizers",
    "verbalized_states": "verbalizers",
    "VerbalizerMismatchError": "verbalizers",
    "VlsiError": "errors",
    "BadSampleError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'vlsi.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vlsi.models.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
