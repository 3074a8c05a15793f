"""benchmarks/memory_model.py: its activation arithmetic against autograd, and docs/scaling.md against it."""

import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import memory_model  # noqa: E402


@pytest.mark.slow  # ~45 s on 2 shared cores: four forwards of a real-width layer
def test_layer_activation_bytes_match_autograd_saved_tensors():
    """The op-by-op count of one real-width Qwen3-0.6B layer equals what autograd saves, per token, within 1%."""
    for mode, residual in (("bf16", 2), ("autocast", 4)):
        row = memory_model.measure_activations("Qwen/Qwen3-0.6B", 64, mode)
        assert row["ratio"] == pytest.approx(1.0, abs=0.01), row
        assert row["predicted_bytes_per_token"] == memory_model.layer_activation_bytes(
            memory_model.shape_of("Qwen/Qwen3-0.6B"), residual)


def test_parameter_counts_are_qwen3s():
    assert memory_model.shape_of("Qwen/Qwen3-8B").params == 8_190_735_360
    assert memory_model.shape_of("Qwen/Qwen3-1.7B").params == 1_720_574_976
    assert memory_model.shape_of("Qwen/Qwen3-0.6B").params == 596_049_920


def test_docs_recommend_what_the_model_computes():
    """docs/scaling.md's recipe YAML block is recommend()'s output, and each keeps the stage's global batch."""
    recipe_path = ROOT / "examples" / "recipes" / "qwen3-8b-to-1.7b.yaml"
    computed = memory_model.recommendations(str(recipe_path), gpus=8)
    text = (ROOT / "docs" / "scaling.md").read_text()
    block = re.search(r"```yaml\n(stages:.*?)```", text, re.S).group(1)
    assert yaml.safe_load(block)["stages"] == computed
    recipe = yaml.safe_load(recipe_path.read_text())
    for stage, values in computed.items():
        settings = recipe["stages"][stage]
        before = settings["per_device_train_batch_size"] * settings.get("gradient_accumulation_steps", 1)
        assert values["per_device_train_batch_size"] * values["gradient_accumulation_steps"] == before
        fitted = memory_model.Stage(**{**vars(next(s for s in memory_model.recipe_stages(recipe) if s.name == stage)),
                                       "per_device_batch": values["per_device_train_batch_size"],
                                       "gradient_accumulation": values["gradient_accumulation_steps"]})
        total = memory_model.stage_memory(fitted, "zero3")["total"]
        assert total <= memory_model.HEADROOM * memory_model.GPU_BYTES
        if values["per_device_train_batch_size"] * 2 <= before:  # the next power of two would not fit
            bigger = memory_model.Stage(**{**vars(fitted), "per_device_batch": fitted.per_device_batch * 2})
            assert memory_model.stage_memory(bigger, "zero3")["total"] > memory_model.HEADROOM * memory_model.GPU_BYTES
