"""Tokenizer + image processor + family, loadable without the model weights and without torchvision.

``AutoProcessor`` cannot load Qwen2-VL / LLaVA-OneVision directories on machines without torchvision (their
video processors import it), and constructing the processor classes directly fails for the same reason. So the
project never uses the combined processor: ``ProcessorBundle`` holds the tokenizer and the image processor
(``AutoImageProcessor``, falling back to the ``*ImageProcessorPil`` class), and computes the image-token counts
itself with the same arithmetic as the family's processor. The bundle is small and picklable, so DataLoader
workers can encode samples without the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlsi.models.errors import VlsiError

SUPPORTED_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision", "qwen2", "llama")
VLM_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava_onevision")


class UnsupportedModelError(VlsiError):
    """A checkpoint whose ``model_type`` the project has no adapter for."""


def family_of(config: Any, where: str = "model") -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"{where}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return model_type


def _load_image_processor(model_dir: Path, family: str):
    """``AutoImageProcessor`` if it loads; otherwise the PIL (torchvision-free) class named by the config."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(model_dir))
    except (ImportError, ValueError, OSError) as first:
        cfg_path = model_dir / "preprocessor_config.json"
        if not cfg_path.is_file():
            raise VlsiError(f"{model_dir}: no preprocessor_config.json for {family} model ({first})") from None
        name = json.loads(cfg_path.read_text()).get("image_processor_type", "")
        import transformers

        base = name.removesuffix("Fast").removesuffix("Pil")
        cls = getattr(transformers, base + "Pil", None)
        if cls is None:
            raise VlsiError(f"{cfg_path}: cannot load image processor {name!r} without torchvision ({first})") from None
        return cls.from_pretrained(str(model_dir))


# Image-processor settings that change how many image tokens an image becomes (recorded in fingerprints).
_TOKEN_COUNT_KEYS = (
    "min_pixels", "max_pixels", "size", "patch_size", "merge_size", "temporal_patch_size", "image_grid_pinpoints",
    "crop_size", "do_pad", "do_resize",
)


@dataclass
class ProcessorBundle:
    """Everything encoding needs (no weights): tokenizer, image processor, family and image-token facts."""

    tokenizer: Any
    image_processor: Any | None
    family: str
    image_token: str | None = None
    """The single placeholder token the chat template emits per image (``<|image_pad|>`` / ``<image>``)."""
    image_token_id: int | None = None
    vision: dict = field(default_factory=dict)
    """Model-config facts the token count needs (LLaVA-OV: num_image_tokens, select strategy, aspect ratio)."""

    @property
    def is_vlm(self) -> bool:
        return self.family in VLM_FAMILIES

    def processor_settings(self) -> dict:
        """Settings that change image-token counts (JSON-able), for fingerprints."""
        out: dict = {}
        if self.image_processor is not None:
            d = self.image_processor.to_dict()
            for k in _TOKEN_COUNT_KEYS:
                if d.get(k) is not None:
                    out[k] = d[k]
            out["image_processor_type"] = type(self.image_processor).__name__.removesuffix("Pil").removesuffix("Fast")
        out.update(self.vision)
        return json.loads(json.dumps(out, default=str))

    def process_images(self, images: list) -> tuple[dict, list[int]]:
        """Run the image processor on ONE sample's PIL images -> (model inputs, image-token count per image)."""
        import torch

        if self.family in ("qwen2_vl", "qwen2_5_vl"):
            out = self.image_processor(images=images, return_tensors="pt")
            grid = out["image_grid_thw"]
            merge = self.image_processor.merge_size
            counts = [int(g.prod().item()) // (merge * merge) for g in grid]
            return {"pixel_values": out["pixel_values"], "image_grid_thw": grid}, counts
        if self.family == "llava_onevision":
            # Nested list = one sample with n images: n > 1 switches LLaVA-OV to its multi-image (no anyres) path.
            out = self.image_processor(images=[images], return_tensors="pt")
            counter = _llava_ov_counter(self.image_processor, self.vision)
            counts = [counter.replace_image_token(out, i).count(self.image_token) for i in range(len(images))]
            pv = out["pixel_values"]
            if pv.dim() == 4:  # one image without padding
                pv = pv.unsqueeze(0)
            return {
                "pixel_values": pv,
                "image_sizes": out["image_sizes"],
                "batch_num_images": torch.as_tensor(out["batch_num_images"]),
            }, counts
        raise VlsiError(f"family {self.family} takes no images")


def _llava_ov_counter(image_processor, vision: dict):
    """A ``LlavaOnevisionProcessor`` used only for its token-count arithmetic (its __init__ needs torchvision)."""
    from transformers import LlavaOnevisionProcessor

    p = object.__new__(LlavaOnevisionProcessor)
    p.image_processor = image_processor
    p.image_token = "<image>"
    p.num_image_tokens = vision["num_image_tokens"]
    p.vision_feature_select_strategy = vision["vision_feature_select_strategy"]
    p.vision_aspect_ratio = vision["vision_aspect_ratio"]
    return p


def load_processor_bundle(model_dir: str | Path, *, config=None) -> ProcessorBundle:
    """Build the bundle from a model directory (config.json, tokenizer files, preprocessor_config.json)."""
    from transformers import AutoConfig, AutoTokenizer

    model_dir = Path(model_dir)
    if config is None:
        try:
            config = AutoConfig.from_pretrained(str(model_dir))
        except (ValueError, KeyError) as e:
            raise UnsupportedModelError(
                f"{model_dir}: cannot read config.json ({e}); supported: {', '.join(SUPPORTED_FAMILIES)}"
            ) from None
    family = family_of(config, str(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if not tokenizer.chat_template:
        raise VlsiError(f"{model_dir}: tokenizer has no chat template")
    if family not in VLM_FAMILIES:
        return ProcessorBundle(tokenizer, None, family)
    image_processor = _load_image_processor(model_dir, family)
    if family == "llava_onevision":
        token_id = int(config.image_token_id)
        vc = config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        vision = {
            "num_image_tokens": n,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "vision_aspect_ratio": config.vision_aspect_ratio,
        }
    else:
        token_id = int(config.image_token_id)
        vision = {}
    token = tokenizer.convert_ids_to_tokens(token_id)
    return ProcessorBundle(tokenizer, image_processor, family, token, token_id, vision)
