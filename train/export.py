"""ODIR/final: the trained student as a plain transformers model directory (LoRA merged), servable by vLLM.

Contents: ``config.json`` + ``model.safetensors`` (+ ``generation_config.json``) from ``save_pretrained`` of the
merged model; the tokenizer files; and the student's processor files COPIED from its source directory
(``preprocessor_config.json``, chat template files, ...) rather than saved from a processor object, which fails on
machines without torchvision. ``vlsi_train.json`` records where the weights came from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = ["export_final", "PROCESSOR_FILES"]

# Files a downloaded model ships that from_pretrained of the processor / tokenizer reads; copied when present.
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                   "chat_template.json", "chat_template.jinja")


def export_final(adapter, out_dir: str | Path, *, provenance: dict | None = None,
                 state_dict: dict | None = None) -> Path:
    """Merge LoRA (if any) into ``adapter.model`` in place and write the plain model directory ``out_dir``.
    ``state_dict``: the model's whole weights when its own are sharded (``--parallel fsdp``, gathered by the caller)."""
    from .lora import merge_lora

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model = merge_lora(adapter.model)
    if getattr(model, "is_activation_checkpointing", getattr(model, "is_gradient_checkpointing", False)):
        model.gradient_checkpointing_disable()
    model.eval()
    model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
    adapter.tokenizer.save_pretrained(str(tmp))
    src = Path(adapter.model_dir)
    for name in PROCESSOR_FILES:
        if (src / name).is_file() and not (tmp / name).exists():
            shutil.copy2(src / name, tmp / name)
    (tmp / "vlsi_train.json").write_text(json.dumps(
        {"student": adapter.name, "student_dir": str(src), **(provenance or {})}, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)  # the directory appears complete or not at all
    return out
