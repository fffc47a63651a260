"""vLLM general plugin (entry point ``vllm.general_plugins``): the VLM teachers' image path without torchvision.

vLLM loads every ``vllm.general_plugins`` entry point in each of its processes (the ``LLM`` process, the engine
core, every worker, and the subprocess that inspects model classes), which is the only hook that reaches them
all: CPU vLLM always spawns its processes, so nothing set up in the caller's process carries over.

Why it is needed: vLLM's Qwen2-VL / Qwen2.5-VL / LLaVA-OneVision code needs transformers' combined processor
(``Qwen2VLProcessor`` ...) whose video half (``Qwen2VLVideoProcessor``) requires torchvision, and vLLM's
``qwen2_vl`` module imports ``smart_resize`` from transformers' torchvision image-processor module. The CPU vLLM
environment has no torchvision (its PyPI wheels are CUDA builds that break ``import vllm`` next to the CPU torch:
``scripts/vllm_env.sh``). With torchvision importable this plugin does nothing.

What it does without torchvision: it registers the three architectures to thin subclasses in
:mod:`vlsi.extract.backends.vllm_models` (public ``ModelRegistry.register_model``, a lazy ``module:Class``
string, so nothing heavy is imported unless such a model is served). Those subclasses are vLLM's own classes with
one change: their processor is the family's HF processor WITHOUT its video processor (images only; a request
with a video gets vLLM's "video not supported" path), built from the torchvision-free PIL image processor, the
same class the project's own encoder uses (``vlsi.models.processors``). Set ``VLSI_VLLM_PLUGIN=0`` to disable.
"""

from __future__ import annotations

import importlib.util
import os

# vLLM architecture -> class in vlsi.extract.backends.vllm_models (same names as vLLM's).
ARCHITECTURES = (
    "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration",
)
MODELS_MODULE = "vlsi.extract.backends.vllm_models"


def torchvision_available() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def needed() -> bool:
    """True when the overrides apply: torchvision missing and not disabled by ``VLSI_VLLM_PLUGIN=0``."""
    return os.environ.get("VLSI_VLLM_PLUGIN", "1") != "0" and not torchvision_available()


def register() -> None:
    """The entry point: idempotent (vLLM may call it several times per process)."""
    if not needed():
        return
    from vllm import ModelRegistry

    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, f"{MODELS_MODULE}:{arch}")
