"""Default target layers: the per-family depth rules (``default_target_layers``), the presets built from them, and a
local model directory (no preset) getting the paper's layers from its depth (``ModelAdapter.target_layers``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vlsi.models.errors import VlsiError
from vlsi.models.presets import PRESETS, default_target_layers

STUDENT_28 = (2, 6, 10, 14, 18, 22, 26)

# Decoder depths (text_config.num_hidden_layers) of the released checkpoints behind each preset.
PRESET_DEPTHS = {
    "qwen2-vl-72b": 80,
    "qwen2-vl-7b": 28,
    "qwen2-vl-2b": 28,
    "qwen2.5-vl-72b": 80,
    "qwen2.5-vl-7b": 28,
    "qwen2.5-vl-3b": 36,
    "llava-ov-72b": 80,
    "llava-ov-7b": 28,
    "llava-ov-0.5b": 24,
}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_rule(family):
    layers, desc = default_target_layers(family, 28)
    assert layers == STUDENT_28 and len(layers) == 7
    assert desc == f"{family} rule for 28 layers: every 4 layers from 2"
    layers80, _ = default_target_layers(family, 80)
    assert layers80 == tuple(range(2, 79, 4)) and len(layers80) == 20 and layers80[-1] == 78
    assert default_target_layers(family, 36)[0] == tuple(range(2, 35, 4))
    assert default_target_layers(family, 4)[0] == (2,)  # the test-size tiny models


def test_llava_paper_tables():
    assert default_target_layers("llava_onevision", 80) == (
        (10, 30, 50, 70), "llava_onevision rule for 80 layers: every 20 layers from 10")
    assert default_target_layers("llava_onevision", 28)[0] == (4, 12, 20)
    assert default_target_layers("llava_onevision", 24)[0] == (4, 12, 20)


def test_llava_other_depths():
    # stride max(8, L // 4), from half a stride: every 8th from 4 up to 35 layers, quarter midpoints beyond.
    assert default_target_layers("llava_onevision", 32)[0] == (4, 12, 20, 28)
    assert default_target_layers("llava_onevision", 64)[0] == (8, 24, 40, 56)
    assert default_target_layers("llava_onevision", 40)[0] == (5, 15, 25, 35)
    assert default_target_layers("llava_onevision", 88) == (
        (11, 33, 55, 77), "llava_onevision rule for 88 layers: every 22 layers from 11")
    assert default_target_layers("llava_onevision", 12)[0] == (4,)
    assert default_target_layers("llava_onevision", 4)[0] == (0, 1, 2)  # too shallow: every layer but the last


@pytest.mark.parametrize("family", ["qwen2", "llama", "some_future_family"])
def test_generic_rule(family):
    assert default_target_layers(family, 28) == (STUDENT_28, "generic rule for 28 layers: every 4 layers from 2")
    assert default_target_layers(family, 8)[0] == (2, 6)
    assert default_target_layers(family, 7) == (
        (0, 1, 2, 3, 4, 5), "generic rule for 7 layers: every layer but the last")
    assert default_target_layers(family, 4)[0] == (0, 1, 2)
    assert default_target_layers(family, 2)[0] == (0,)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision", "qwen2", "llama"])
@pytest.mark.parametrize("num_layers", [2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 24, 28, 32, 36, 40, 48, 64, 80, 81, 100])
def test_invariants(family, num_layers):
    layers, desc = default_target_layers(family, num_layers)
    assert layers, "never empty for >= 2 layers"
    assert list(layers) == sorted(set(layers)) and layers[0] >= 0
    assert layers[-1] < num_layers - 1, "the last decoder layer is never a target"
    assert "\n" not in desc and str(num_layers) in desc


@pytest.mark.parametrize("num_layers", [1, 0, -3])
@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision", "llama"])
def test_too_shallow_raises(family, num_layers):
    with pytest.raises(VlsiError) as e:
        default_target_layers(family, num_layers)
    assert "\n" not in str(e.value) and f"{num_layers} decoder layer" in str(e.value)


def test_presets_use_the_rules():
    assert set(PRESETS) == set(PRESET_DEPTHS)
    for name, depth in PRESET_DEPTHS.items():
        p = PRESETS[name]
        assert p.target_layers == default_target_layers(p.family, depth)[0], name


def test_presets_module_stays_free_of_torch():
    code = "import sys, vlsi.models.presets; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout


# a local 28-layer directory ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_28(qwen2vl_28_dir):
    from vlsi.models import load_model

    return load_model(qwen2vl_28_dir, device="cpu")


def test_tiny_28_layer_dir_is_small(qwen2vl_28_dir):
    from vlsi.demo.tiny import parameter_count

    assert parameter_count(qwen2vl_28_dir) <= 1_000_000


def test_local_dir_gets_the_depth_rule(adapter_28):
    assert adapter_28.preset is None and adapter_28.num_layers == 28
    layers, source = adapter_28.target_layers
    assert layers == STUDENT_28
    assert source == "qwen2_vl rule for 28 layers: every 4 layers from 2"


def test_preset_source(adapter_28, monkeypatch):
    monkeypatch.setattr(adapter_28, "preset", PRESETS["qwen2-vl-7b"])
    assert adapter_28.target_layers == (STUDENT_28, "preset qwen2-vl-7b")


def test_head_only_teacher_has_the_same_layers(qwen2vl_28_dir, adapter_28):
    from vlsi.models.head_only import load_head_only

    head = load_head_only(qwen2vl_28_dir, device="cpu")
    assert head.num_layers == 28 and head.target_layers == adapter_28.target_layers
