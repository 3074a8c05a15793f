"""sdd.generation on CPU with tiny real Qwen3 models: sampling semantics, determinism, stopping, order."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sdd.errors import SddError
from sdd.generation import (
    SamplingParams,
    _as_int64,
    _mix64,
    filter_candidates,
    generate,
    row_key,
    sample_tokens,
    trainer_generation_options,
    uniform_noise,
    vllm_sampling_kwargs,
)

PAD, EOS, END = 0, 1, 2  # END: a second stop token, listed only in the model's generation_config


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", extra_special_tokens=["<end>"]
    )


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and on shared cores OpenMP threads waiting for a busy core
    made each generate call ~100x slower (measured: 3.9 s vs 0.04 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VOCAB = ["<pad>", "<eos>", "<end>"] + [f"w{i}" for i in range(3, 256)]


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def model():
    """A random tiny Qwen3 in fp32: on CPU its batched and unbatched logits agree well enough for exact tests."""
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(VOCAB), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None,
    )  # fmt: skip
    model = Qwen3ForCausalLM(config).eval()
    model.generation_config.eos_token_id = [EOS, END]
    return model


def text(*token_ids: int) -> str:
    return " ".join(VOCAB[i] for i in token_ids)


def ids_of(results) -> list[list[list[int]]]:
    return [[c.token_ids for c in samples] for samples in results]


# Prompts of very different lengths, so that batches need padding and bucketing reorders them.
PROMPTS = [
    text(*range(10, 13)),
    text(*range(20, 60)),
    text(7),
    text(*range(100, 125)),
    text(*range(200, 208)),
]


def test_noise_is_splitmix64_of_row_key_step_and_token():
    """The int64 tensor arithmetic must equal splitmix64 mod 2**64 computed in Python, or seeds mean
    something different on another machine."""
    keys = [row_key(0, 0, 0), row_key(123, 4, 5), 2**64 - 1, 0]
    token_ids = torch.tensor([[0, 1, 151_935, 2**24 - 1]] * len(keys))
    for step in (0, 1, 4095):
        noise = uniform_noise(torch.tensor([_as_int64(k) for k in keys]), step, token_ids)
        for row, key in enumerate(keys):
            for column, token in enumerate(token_ids[row].tolist()):
                state = (key + ((step << 24) + token) * 0x9E3779B97F4A7C15) % 2**64
                expected = ((_mix64(state) >> 41) + 0.5) / 2**23
                assert noise[row, column].item() == expected


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(0.7, 5, 0.8), (1.3, 0, 0.5), (0.5, 10, 1.0), (1.0, -1, 0.95), (0.9, 1, 0.3)],
)
def test_filter_keeps_what_transformers_warpers_keep(temperature, top_k, top_p):
    """Temperature, then top-k, then top-p, with transformers' warpers (and vLLM's order) as the reference."""
    logits = torch.randn(64, 40, generator=torch.Generator().manual_seed(1)) * 3
    reference = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k > 0:
        reference = TopKLogitsWarper(top_k)(None, reference)
    if top_p < 1:
        reference = TopPLogitsWarper(top_p)(None, reference)
    scaled, candidate_ids = filter_candidates(logits, temperature, top_k, top_p)
    for row in range(logits.shape[0]):
        kept = candidate_ids[row][scaled[row].isfinite()]
        assert set(kept.tolist()) == set(reference[row].isfinite().nonzero().flatten().tolist())
        torch.testing.assert_close(scaled[row][scaled[row].isfinite()], reference[row][kept])


def test_gumbel_max_draws_from_the_filtered_softmax():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 40_000
    keys = torch.tensor([_as_int64(row_key(7, i, 0)) for i in range(rows)])
    for top_k in (0, 3):
        drawn = sample_tokens(logits.expand(rows, -1), keys, 0, 0.8, top_k, 1.0)
        frequencies = torch.bincount(drawn, minlength=6).float() / rows
        kept = logits if top_k == 0 else logits.masked_fill(torch.arange(6) >= top_k, float("-inf"))
        expected = (kept / 0.8).softmax(-1)
        # 4 standard errors of a frequency at p = 0.5 and 40k draws
        torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0)
        if top_k:
            assert frequencies[top_k:].sum() == 0


def test_same_seed_same_samples_other_seed_other_samples(model, tokenizer):
    params = SamplingParams(n=2, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=10, seed=3)
    first = ids_of(generate(model, tokenizer, PROMPTS, params))
    assert first == ids_of(generate(model, tokenizer, PROMPTS, params))
    other_seed = ids_of(generate(model, tokenizer, PROMPTS, dataclasses.replace(params, seed=4)))
    assert all(
        a != b
        for row_a, row_b in zip(first, other_seed, strict=True)
        for a, b in zip(row_a, row_b, strict=True)
    )
    assert all(samples[0] != samples[1] for samples in first)


def test_samples_do_not_depend_on_batch_size_or_neighbours(model, tokenizer):
    params = SamplingParams(n=3, temperature=0.9, top_k=20, top_p=0.9, max_new_tokens=12, seed=11)
    together = ids_of(generate(model, tokenizer, PROMPTS, params, batch_size=15))
    assert together == ids_of(generate(model, tokenizer, PROMPTS, params, batch_size=1))
    assert together == ids_of(generate(model, tokenizer, PROMPTS, params, batch_size=4))
    other_neighbours = [PROMPTS[0], text(9, 9, 9), text(*range(30, 90)), text(5, 6)]
    assert ids_of(generate(model, tokenizer, other_neighbours, params, batch_size=12))[0] == together[0]


def test_a_slice_with_its_prompt_indices_samples_what_the_whole_list_does(model, tokenizer):
    """What data-parallel sampling rests on: rank r of P generating positions r, r + P, ... with those
    indices draws exactly the rows one process draws for them; without the indices it would not."""
    params = SamplingParams(n=2, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=10, seed=3)
    whole = ids_of(generate(model, tokenizer, PROMPTS, params))
    for rank in (0, 1):
        positions = range(rank, len(PROMPTS), 2)
        share = ids_of(generate(model, tokenizer, [PROMPTS[p] for p in positions], params, prompt_indices=positions))
        assert share == [whole[p] for p in positions]
    unindexed = ids_of(generate(model, tokenizer, PROMPTS[1::2], params))
    assert unindexed != [whole[p] for p in range(1, len(PROMPTS), 2)]
    with pytest.raises(SddError, match="prompt_indices has 1 entries for 2 prompts"):
        generate(model, tokenizer, PROMPTS[:2], params, prompt_indices=[0])


def test_static_cache_path_samples_as_the_dynamic_one(model, tokenizer):
    """The static path pads widths and fills the last batch with copies; neither may change a sample."""
    params = SamplingParams(n=1, temperature=0.8, max_new_tokens=8, seed=5)
    dynamic = ids_of(generate(model, tokenizer, PROMPTS, params, hf_mode="dynamic"))
    assert ids_of(generate(model, tokenizer, PROMPTS, params, batch_size=3, hf_mode="static")) == dynamic
    assert (
        ids_of(generate(model, tokenizer, PROMPTS, params, hf_mode="static")) == dynamic
    )  # 5 rows + 3 fillers


@pytest.fixture(scope="module")
def chain_model():
    """A Qwen3 turned into a bigram table: attention and MLP outputs are zeroed, so the next-token logits
    depend on the last token alone; lm_head then spells fixed chains:
    w3 -> w4 -> w5 -> <eos>,  w6 -> <end> (a stop id only the generation_config lists),  w7 <-> w8 forever.
    """
    config = Qwen3Config(
        vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=EOS,
        bos_token_id=None,
    )  # fmt: skip
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(16))
        model.lm_head.weight.zero_()
        for token, next_token in {3: 4, 4: 5, 5: EOS, 6: END, 7: 8, 8: 7}.items():
            model.lm_head.weight[next_token, token] = 5.0  # logit 20 after the norm: the rest are 0
    model.generation_config.eos_token_id = [EOS, END]
    return model


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_each_row_stops_at_its_own_stop_token(chain_model, temperature):
    tokenizer = word_tokenizer(VOCAB[:16])
    prompts = [text(9, 3), text(6), text(9, 9, 7), text(4)]
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=6)
    results = generate(chain_model, tokenizer, prompts, params, batch_size=8)
    expected = [([4, 5, EOS], "stop"), ([END], "stop"), ([8, 7, 8, 7, 8, 7], "length"), ([5, EOS], "stop")]
    for samples, (token_ids, reason) in zip(results, expected, strict=True):
        assert [(c.token_ids, c.finish_reason) for c in samples] == [(token_ids, reason)] * 2
        assert all(c.text == text(*[t for t in token_ids if t not in (EOS, END)]) for c in samples)


def test_length_bucketing_returns_input_order(model, tokenizer):
    """Batched in length order (batches of 2 over 5 prompts of 1 to 40 tokens), each prompt's greedy
    completion must equal what that prompt alone produces, at its own position."""
    params = SamplingParams(temperature=0, max_new_tokens=10)
    finished = []
    batched = generate(model, tokenizer, PROMPTS, params, batch_size=2, progress=finished.append)
    alone = [generate(model, tokenizer, [prompt], params)[0] for prompt in PROMPTS]
    assert ids_of(batched) == ids_of(alone)
    assert finished == [2, 2, 1]


def test_greedy_is_argmax_decoding(model, tokenizer):
    """Against a decode with no cache and no padding: full forward, argmax, append."""
    params = SamplingParams(n=2, temperature=0, max_new_tokens=8)
    results = generate(model, tokenizer, PROMPTS[:3], params)
    for prompt, samples in zip(PROMPTS[:3], results, strict=True):
        sequence = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        expected = []
        with torch.no_grad():
            for _ in range(8):
                next_id = model(sequence).logits[0, -1].argmax().item()
                expected.append(next_id)
                if next_id in (EOS, END):
                    break
                sequence = torch.cat([sequence, torch.tensor([[next_id]])], dim=1)
        assert [c.token_ids for c in samples] == [expected, expected]


def test_top_k_1_is_greedy(model, tokenizer):
    greedy = generate(model, tokenizer, PROMPTS, SamplingParams(n=2, temperature=0, max_new_tokens=10))
    top_1 = generate(
        model, tokenizer, PROMPTS, SamplingParams(n=2, temperature=0.7, top_k=1, max_new_tokens=10)
    )
    assert ids_of(top_1) == ids_of(greedy)


def test_vllm_sampling_kwargs_carry_every_option():
    params = SamplingParams(
        n=4, temperature=0.6, top_p=0.95, top_k=0, max_new_tokens=512, min_new_tokens=3, seed=9
    )
    kwargs = vllm_sampling_kwargs(params, prompt_index=2)
    seed = kwargs.pop("seed")
    assert kwargs == {
        "n": 4, "temperature": 0.6, "top_p": 0.95, "top_k": -1, "max_tokens": 512, "min_tokens": 3,
        "skip_special_tokens": True,
    }  # fmt: skip
    assert 0 <= seed < 2**63
    assert seed == vllm_sampling_kwargs(params, 2)["seed"] != vllm_sampling_kwargs(params, 3)["seed"]
    assert seed != vllm_sampling_kwargs(dataclasses.replace(params, seed=10), 2)["seed"]
    assert vllm_sampling_kwargs(dataclasses.replace(params, top_k=20), 0)["top_k"] == 20

    greedy = vllm_sampling_kwargs(dataclasses.replace(params, temperature=0.0), 0)
    assert (greedy["n"], greedy["temperature"], greedy["top_p"], greedy["top_k"]) == (1, 0.0, 1.0, -1)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_backend_without_vllm_says_how_to_install(tokenizer):
    with pytest.raises(SddError, match="pip install vllm"):
        generate("some/model", tokenizer, ["w3"], SamplingParams(), backend="vllm")


def test_trainer_generation_options_are_fields_of_both_trl_configs():
    from trl import DistillationConfig, GRPOConfig

    shared_fields = {f.name for f in dataclasses.fields(GRPOConfig)} & {
        f.name for f in dataclasses.fields(DistillationConfig)
    }
    assert trainer_generation_options("hf")["use_vllm"] is False
    assert trainer_generation_options("vllm") == {"use_vllm": True, "vllm_mode": "colocate"}
    for backend in ("hf", "vllm"):
        assert set(trainer_generation_options(backend)) <= shared_fields
    with pytest.raises(SddError):
        trainer_generation_options("sglang")


def test_unknown_backend_and_bad_params_are_user_errors(model, tokenizer):
    with pytest.raises(SddError):
        generate(model, tokenizer, ["w3"], SamplingParams(), backend="tgi")
    with pytest.raises(SddError):
        SamplingParams(temperature=-0.1)
    with pytest.raises(SddError):
        SamplingParams(top_p=0)
