"""The pure analysis measures, each on inputs whose answer is known: update sparsity, overlap, rank,
pass@k and the capability boundary, diversity."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sdd import analysis

# --------------------------------------------------------------------------------------------------
# Update sparsity on synthetic checkpoints.

SHAPES = {  # Llama/Qwen names, every element count a multiple of 10
    "model.embed_tokens.weight": (64, 40),
    "model.layers.0.self_attn.q_proj.weight": (40, 40),
    "model.layers.0.self_attn.k_proj.weight": (20, 40),
    "model.layers.0.mlp.down_proj.weight": (40, 80),
    "model.layers.0.input_layernorm.weight": (40,),
    "model.layers.1.self_attn.q_proj.weight": (40, 40),
    "model.layers.1.mlp.gate_proj.weight": (80, 40),
    "model.norm.weight": (40,),
}


def exactly_tenth(numel: int, generator: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[: numel // 10]] = True
    return mask


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], shards: int = 2) -> Path:
    """safetensors shards as save_pretrained lays them out: tensors split over several files."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    for shard in range(shards):
        part = {n: tensors[n].contiguous() for n in names[shard::shards]}
        save_file(part, str(directory / f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"))
    return directory


def test_smallest_bf16_changes_to_exactly_a_tenth_read_as_ten_percent(tmp_path):
    """Each changed entry moves by one bf16 step, the smallest change there is (up or down, zeros included):
    the rule must count every one of them, and nothing else."""
    generator = torch.Generator().manual_seed(0)
    before, after = {}, {}
    for name, shape in SHAPES.items():
        values = (torch.randn(shape, generator=generator) * 0.05).to(torch.bfloat16)
        values.view(-1)[:3] = torch.tensor([0.0, 1.0, -0.5])  # a zero and two powers of two: binade edges
        bits = values.view(torch.int16).reshape(-1).clone()
        mask = torch.cat([torch.ones(3, dtype=torch.bool), exactly_tenth(bits.numel() - 30, generator)])
        mask = torch.cat([mask, torch.zeros(bits.numel() - mask.numel(), dtype=torch.bool)])
        step = torch.where(torch.rand(bits.shape, generator=generator) < 0.5, 1, -1).to(torch.int16)
        step[bits == 0] = 1  # one step up from +0 is the smallest subnormal; -1 would be a NaN pattern
        bits[mask] += step[mask]
        before[name] = values
        after[name] = bits.view(torch.bfloat16).reshape(shape)
        assert int((after[name] != values).sum()) == values.numel() // 10
    result = analysis.compare_weights(write_checkpoint(tmp_path / "a", before), write_checkpoint(tmp_path / "b", after))
    assert result["total"]["fraction"] == pytest.approx(0.1, abs=0) and result["total"]["fraction_bf16"] == 0.1
    assert set(result["by_type"]) == {"embed", "q_proj", "k_proj", "down_proj", "gate_proj", "norm"}
    assert all(group["fraction"] == 0.1 for group in result["by_type"].values())
    assert [entry["layer"] for entry in result["by_layer"]] == [0, 1]
    assert all(entry["fraction"] == 0.1 for entry in result["by_layer"])
    assert {t["resolution"] for t in result["tensors"]} == {"bfloat16"}


def test_fp32_changes_below_bf16_resolution_count_only_at_stored_resolution(tmp_path):
    """fp32 training moves every weight a little: all of it is a change of the stored value, but only the
    tenth that moved by more than half a bf16 step would survive in a bf16 copy."""
    generator = torch.Generator().manual_seed(1)
    before, after = {}, {}
    for name, shape in SHAPES.items():
        values = torch.randn(shape, generator=generator) * 0.05
        visible = exactly_tenth(values.numel(), generator).reshape(shape)
        # half a bf16 step at x is at least |x| * 2**-9: 2**-6 relative is above it, 2**-12 below.
        after[name] = values + values.abs() * torch.where(visible, 2.0**-6, 2.0**-12)
        before[name] = values
    result = analysis.compare_weights(write_checkpoint(tmp_path / "a", before), write_checkpoint(tmp_path / "b", after))
    assert result["total"]["fraction"] == 1.0
    assert result["total"]["fraction_bf16"] == 0.1
    assert {t["resolution"] for t in result["tensors"]} == {"float32"}


def test_jaccard_of_known_changed_sets_and_its_chance_level(tmp_path):
    """Per tensor of n entries, seed A changes 300/2000, seed B 300/2000, 100 of them the same: J = 100/500."""
    generator = torch.Generator().manual_seed(2)
    base, seed_a, seed_b = {}, {}, {}
    expected_both = expected_either = 0.0
    for name, shape in SHAPES.items():
        values = torch.randn(shape, generator=generator)
        order = torch.randperm(values.numel(), generator=generator)
        n = values.numel()
        a_idx, b_idx = order[: 3 * n // 20], order[n // 10 : n // 10 + 3 * n // 20]  # overlap n/20
        seed_a[name], seed_b[name] = values.clone(), values.clone()
        seed_a[name].view(-1)[a_idx] += 1.0
        seed_b[name].view(-1)[b_idx] += 1.0
        base[name] = values
        a, b = len(a_idx), len(b_idx)
        expected_both += a * b / n
        expected_either += a + b - a * b / n
    result = analysis.overlap_weights((write_checkpoint(tmp_path / "base", base), write_checkpoint(tmp_path / "a", seed_a)),
                                      (tmp_path / "base", write_checkpoint(tmp_path / "b", seed_b)))
    assert result["same_base"]
    assert result["total"]["jaccard"] == pytest.approx((1 / 20) / (3 / 20 + 3 / 20 - 1 / 20), abs=1e-12)
    assert result["total"]["chance_jaccard"] == pytest.approx(expected_both / expected_either)
    assert result["by_type"]["q_proj"]["jaccard"] == pytest.approx(0.2)


def test_effective_rank_of_known_updates():
    generator = torch.Generator().manual_seed(3)
    rank_one = torch.randn(30, 1, generator=generator) @ torch.randn(1, 20, generator=generator)
    assert analysis.effective_rank(rank_one) == pytest.approx(1.0, abs=1e-3)
    assert analysis.effective_rank(torch.eye(16) * 3) == pytest.approx(16.0, rel=1e-5)
    assert analysis.effective_rank(torch.zeros(8, 8)) == 0.0


def test_streaming_comparison_of_a_sharded_model_never_holds_two_models(tmp_path):
    """A 140 MB fp32 model in ~10 MB shards, compared in a child process that measures its own peak RSS."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False)
    model = Qwen3ForCausalLM(config)
    model.save_pretrained(tmp_path / "before", max_shard_size="10MB")
    with torch.no_grad():
        for parameter in model.parameters():
            chosen = torch.rand(parameter.shape) < 0.25
            parameter.add_(torch.where(chosen, 0.01, 0.0))
    model.save_pretrained(tmp_path / "after", max_shard_size="10MB")
    del model
    shard_files = sorted((tmp_path / "before").glob("*.safetensors"))
    assert len(shard_files) >= 8
    model_bytes = sum(f.stat().st_size for f in shard_files)
    expected_changed = expected_total = 0
    for before_file in shard_files:
        before, after = load_file(before_file), load_file(tmp_path / "after" / before_file.name)
        expected_changed += sum(int((before[k] != after[k]).sum()) for k in before)
        expected_total += sum(t.numel() for t in before.values())

    # VmHWM, the peak RSS of this process image: ru_maxrss would carry over the forking parent's peak
    # (Linux keeps it across exec), which here is a test process that just built the model.
    child = (
        "import json, sys\n"
        "import torch, safetensors\n"
        "from sdd import analysis\n"
        "def status(key):\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith(key + ':'))\n"
        "    return int(line.split()[1]) * 1024\n"
        "baseline = status('VmRSS')\n"
        "result = analysis.compare_weights(sys.argv[1], sys.argv[2])\n"
        "print(json.dumps({'baseline': baseline, 'peak': status('VmHWM'), 'total': result['total']}))\n"
    )
    done = subprocess.run([sys.executable, "-c", child, str(tmp_path / "before"), str(tmp_path / "after")],
                          capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["total"]["changed"] == expected_changed and measured["total"]["parameters"] == expected_total
    growth = measured["peak"] - measured["baseline"]
    print(f"\npeak RSS growth {growth / 2**20:.0f} MB for two models of {model_bytes / 2**20:.0f} MB each: "
          f"{growth / (2 * model_bytes):.2f} of both")
    assert growth < 0.75 * model_bytes, (growth, model_bytes)  # holding even one whole model fails


# --------------------------------------------------------------------------------------------------
# Capability boundary and diversity on hand-made samples.


def brute_force_pass_at_k(correct: list[bool], k: int) -> float:
    """Share of the k-subsets of one problem's samples that hold a correct one: what pass@k estimates."""
    subsets = list(itertools.combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_curve_equals_enumeration_over_subsets():
    generator = torch.Generator().manual_seed(4)
    correct = (torch.rand(7, 6, generator=generator) < torch.linspace(0, 1, 7)[:, None]).tolist()
    curve = analysis.pass_at_k_curve(correct, 6)
    for k in range(1, 7):
        expected = sum(brute_force_pass_at_k(row, k) for row in correct) / len(correct)
        assert curve[k - 1] == pytest.approx(expected, abs=1e-12)
    assert curve == sorted(curve)


def test_capability_names_lost_and_gained_problems_and_the_crossover():
    result = analysis.capability(
        ["a", "b", "c", "d"],
        [[True, False, False, False], [True, False, False, False], [False] * 4, [True] * 4],
        [[True] * 4, [False] * 4, [False, False, True, False], [True] * 4],
    )
    assert result["lost"] == ["b"] and result["gained"] == ["c"]
    assert result["solved"] == {"from": 3, "to": 3}
    assert result["pass_at_k"]["from"][0] == pytest.approx(1.5 / 4)
    assert result["pass_at_k"]["to"][0] == pytest.approx(2.25 / 4)
    # pass@k from = (k/4 + k/4 + 0 + 1) / 4, to = (1 + 0 + k/4 + 1) / 4: the earlier catches up at k = 4
    assert result["crossover_k"] == 4
    with pytest.raises(ValueError, match="same number of samples"):
        analysis.capability(["a"], [[True, False]], [[True]])


def test_diversity_of_hand_made_samples():
    rows = [
        {"completions": ["x=1. \\boxed{2}", "y=3 \\boxed{ 2 }", "no box", "\\boxed{3}"],
         "token_ids": [[1, 2, 3], [1, 2, 3], [4, 5], [6]], "truncated": [False, False, True, False]},
        {"completions": ["Step 1: 2+3=5\nStep 2: so \\boxed{5}"] * 4,
         "token_ids": [[7, 8, 9, 10]] * 4, "truncated": [False] * 4},
    ]
    result = analysis.diversity(rows)
    assert result["distinct_answer_rate"] == pytest.approx((3 / 4 + 1 / 4) / 2)  # {2, None, 3}; {5}
    assert result["answered_rate"] == pytest.approx(7 / 8)
    assert result["distinct_2"] == pytest.approx((3 / 5 + 3 / 12) / 2)
    assert result["distinct_3"] == pytest.approx((1 / 2 + 2 / 8) / 2)
    # signatures of problem 1: two alike, two others -> 1.5 bits; problem 2: one shape -> 0 bits
    assert result["format"]["entropy_bits"] == pytest.approx((1.5 + 0.0) / 2)
    assert result["format"]["entropy_bits_max"] == 2.0
    assert result["format"]["signatures"][0] == {"signature": "boxed|eq=1|enum|len=0-15", "share": 0.5}
    assert result["length"]["mean"] == pytest.approx(25 / 8) and result["length"]["max"] == 4
    assert result["length"]["truncation_rate"] == pytest.approx(1 / 8)
    assert analysis.format_signature("48. The answer is \\boxed{48}.", 100) == "boxed|eq=0|flat|len=64-127"
    assert analysis.format_signature("- a = 1\n- b == 2\n", 16) == "nobox|eq=3|enum|len=16-31"
    assert analysis.entropy_bits(["a", "b", "c", "d"]) == pytest.approx(2.0)


def test_ulp_rule_matches_dtype_spacing():
    """half_ulp is half the gap to the next number of that dtype, at every magnitude bf16 and fp16 have."""
    for dtype in (torch.bfloat16, torch.float16):
        info = torch.finfo(dtype)
        values = torch.tensor([info.tiny, 1.0, 3.0, 1000.0, info.max / 2], dtype=dtype)
        bits = values.view(torch.int16)
        gaps = ((bits + 1).view(dtype).double() - values.double())
        assert torch.equal(analysis.half_ulp(values.double(), dtype), gaps / 2), dtype
    assert analysis.half_ulp(torch.tensor([0.0], dtype=torch.float64), torch.bfloat16).item() == math.ldexp(1, -134)
