"""Named model presets (hub id + the paper's default target layers) and model-location resolution.

Target layers follow ``shared/METHOD.md``: 0-based decoder-layer ids, layer ``i`` = ``hidden_states[i + 1]``.
Qwen2-VL: students (28 layers) ``{2, 6, ..., 26}`` (7), the 72B teacher (80 layers) ``{2, 6, ..., 78}`` (20).
LLaVA-OneVision: students ``{4, 12, 20}``, the 72B teacher ``{10, 30, 50, 70}``.
Qwen2.5-VL is not in the paper (**[silent]**): the project uses the Qwen2-VL rule, every 4th layer from layer 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vlsi.models.errors import VlsiError


class ModelNotFoundError(VlsiError):
    """A model name/path that is neither a local model directory nor a model in the local HF cache."""


@dataclass(frozen=True)
class Preset:
    """A named model: where to get it and which decoder layers get verbalizers by default."""

    name: str
    """Short project name, e.g. ``qwen2-vl-7b``."""
    hub_id: str
    """Hugging Face hub id, e.g. ``Qwen/Qwen2-VL-7B-Instruct``."""
    family: str
    """``model_type`` of the checkpoint (``qwen2_vl``, ``qwen2_5_vl``, ``llava_onevision``)."""
    target_layers: tuple[int, ...]
    """Default 0-based target decoder layers (the final layer is never a target)."""


def _every4(start: int, num_layers: int) -> tuple[int, ...]:
    return tuple(range(start, num_layers - 1, 4))


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset("qwen2-vl-72b", "Qwen/Qwen2-VL-72B-Instruct", "qwen2_vl", _every4(2, 80)),
        Preset("qwen2-vl-7b", "Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl", _every4(2, 28)),
        Preset("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl", _every4(2, 28)),
        Preset("qwen2.5-vl-72b", "Qwen/Qwen2.5-VL-72B-Instruct", "qwen2_5_vl", _every4(2, 80)),
        Preset("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", _every4(2, 28)),
        Preset("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl", _every4(2, 36)),
        Preset("llava-ov-72b", "llava-hf/llava-onevision-qwen2-72b-ov-hf", "llava_onevision", (10, 30, 50, 70)),
        Preset("llava-ov-7b", "llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava_onevision", (4, 12, 20)),
        Preset("llava-ov-0.5b", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava_onevision", (4, 12, 20)),
    ]
}


def find_preset(name_or_hub_id: str) -> Preset | None:
    """The preset named ``name_or_hub_id`` (case-insensitive) or whose hub id it is; ``None`` otherwise."""
    key = name_or_hub_id.strip().lower()
    for p in PRESETS.values():
        if key in (p.name, p.hub_id.lower()):
            return p
    return None


def resolve_model(name_or_path: str | Path) -> tuple[Path, Preset | None]:
    """Resolve a local model directory, a preset name or a hub id to ``(local_dir, preset_or_None)``.

    Never downloads: a preset or hub id must already be in the local Hugging Face cache; otherwise the one-line
    error says how to get it (``huggingface-cli download <hub_id>``).
    """
    s = str(name_or_path)
    path = Path(s).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path}: not a model directory (no config.json)")
        return path, None
    preset = find_preset(s)
    hub_id = preset.hub_id if preset else s
    if preset is None and (s.count("/") != 1 or s.startswith((".", "/", "~"))):
        raise ModelNotFoundError(
            f"{s}: not a model directory, preset ({', '.join(PRESETS)}) or hub id (org/name)"
        )
    try:
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(hub_id, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, offline errors, bad repo ids: all mean "not here"
        raise ModelNotFoundError(
            f"{s}: {hub_id} is not in the local Hugging Face cache ({type(e).__name__}); "
            f"get it with `huggingface-cli download {hub_id}` or pass a local model directory"
        ) from None
    if not (local / "config.json").is_file():
        raise ModelNotFoundError(
            f"{s}: cached snapshot {local} has no config.json; re-run `huggingface-cli download {hub_id}`"
        )
    return local, preset
