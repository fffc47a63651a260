"""Named model presets (hub id + the paper's default target layers), default target layers for any depth, and
model-location resolution.

Target layers follow docs/method.md "Target layer defaults": 0-based decoder-layer ids, layer ``i`` =
``hidden_states[i + 1]``.
Qwen2-VL: students (28 layers) ``{2, 6, ..., 26}`` (7), the 72B teacher (80 layers) ``{2, 6, ..., 78}`` (20).
LLaVA-OneVision: students ``{4, 12, 20}``, the 72B teacher ``{10, 30, 50, 70}``.
Qwen2.5-VL is not in the paper (docs/method.md "Resolved ambiguities"): the project uses the Qwen2-VL rule, every
4th layer from layer 2.

``default_target_layers(family, num_layers)`` is the one place these rules live (its docstring states them): the
presets are built by it, and a local model directory (no preset) gets its layers from it by its config's depth.
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


_QWEN_VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def _strided(start: int, stride: int, num_layers: int) -> tuple[int, ...]:
    """Every ``stride``-th layer from ``start``, below the last decoder layer (``num_layers - 1``)."""
    return tuple(range(start, num_layers - 1, stride))


def default_target_layers(family: str, num_layers: int) -> tuple[tuple[int, ...], str]:
    """The default target decoder layers of a ``family`` model with ``num_layers`` decoder layers, and the rule used.

    Returns ``(layers, description)``: ``layers`` ascending 0-based ids, never the last layer, never empty;
    ``description`` one short line naming the rule, e.g. ``"qwen2_vl rule for 28 layers: every 4 layers from 2"``.

    Rules (``L = num_layers``; the last decoder layer is never a target: the final head covers it):

    - ``qwen2_vl``, ``qwen2_5_vl``: ``range(2, L - 1, 4)`` (28 -> 2..26, 7 layers; 80 -> 2..78, 20; 36 -> 2..34).
    - ``llava_onevision``: ``s = max(8, L // 4)``, ``range(s // 2, L - 1, s)``: the paper's tables (80 -> 10, 30,
      50, 70; 28 and 24 -> 4, 12, 20), generalised as every 8th layer from 4 up to 35 layers and the midpoints of
      the four quarters beyond (64 -> 8, 24, 40, 56).
    - other families: ``range(2, L - 1, 4)`` when ``L >= 8``, else ``range(0, L - 1)``.
    - a family rule that yields nothing (``L`` too small) falls back to ``range(0, L - 1)``.

    Raises ``VlsiError`` when ``L < 2`` (no decoder layer besides the last).
    """
    L = int(num_layers)
    if L < 2:
        raise VlsiError(f"{family} model with {L} decoder layer(s): no target layer below the last one; "
                        "need at least 2 decoder layers")
    if family in _QWEN_VL_FAMILIES:
        name, start, stride = family, 2, 4
    elif family == "llava_onevision":
        stride = max(8, L // 4)
        name, start = family, stride // 2
    elif L >= 8:
        name, start, stride = "generic", 2, 4
    else:
        name, start, stride = "generic", 0, 1
    layers = _strided(start, stride, L)
    if not layers:  # too shallow for the family's stride
        start, stride = 0, 1
        layers = _strided(start, stride, L)
    rule = "every layer but the last" if stride == 1 else f"every {stride} layers from {start}"
    return layers, f"{name} rule for {L} layers: {rule}"


def _preset(name: str, hub_id: str, family: str, num_layers: int) -> Preset:
    return Preset(name, hub_id, family, default_target_layers(family, num_layers)[0])


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [  # decoder depths of the released checkpoints (text_config.num_hidden_layers)
        _preset("qwen2-vl-72b", "Qwen/Qwen2-VL-72B-Instruct", "qwen2_vl", 80),
        _preset("qwen2-vl-7b", "Qwen/Qwen2-VL-7B-Instruct", "qwen2_vl", 28),
        _preset("qwen2-vl-2b", "Qwen/Qwen2-VL-2B-Instruct", "qwen2_vl", 28),
        _preset("qwen2.5-vl-72b", "Qwen/Qwen2.5-VL-72B-Instruct", "qwen2_5_vl", 80),
        _preset("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl", 28),
        _preset("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl", 36),
        _preset("llava-ov-72b", "llava-hf/llava-onevision-qwen2-72b-ov-hf", "llava_onevision", 80),
        _preset("llava-ov-7b", "llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava_onevision", 28),
        _preset("llava-ov-0.5b", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf", "llava_onevision", 24),
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
