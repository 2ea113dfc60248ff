"""The GPU paths, checked on CPU: the static-cache sampler against the eager one (same tokens, statistics and
truncation on left-padded prompts whose completions stop at different steps), training from a bf16 sampling
copy that follows the weights, and the memory plan's share for that copy."""

import math

import pytest
import torch
from conftest import make_model
from test_intuitor import metrics, small_run

import intuitor as I
from harness import process

PROMPTS = ("What is 2 + 3?", "Compute 7 * 6 = 42, so the final answer", "x")


@pytest.mark.parametrize(
    "max_new_tokens,temperature,top_k",
    [(24, 0.0, 0), (24, 1.0, 1), (64, 0.0, 0)],  # greedy; sampling through top-k = 1; everyone stops early
)
def test_static_sampler_matches_eager(tokenizer, max_new_tokens, temperature, top_k):
    lm = make_model(tokenizer, seed=3, head_scale=4.0).eval()
    prompts = [tokenizer(t).input_ids for t in PROMPTS]
    stop = list(range(40, 52))  # many stop ids, so sequences end at different steps
    args = (prompts, 3, max_new_tokens, temperature, stop, tokenizer.pad_token_id, top_k)
    eager, static = I.sample(lm, *args), I.sample_static(lm, *args)
    lengths = [len(r.completion) for r in eager]
    assert len(set(lengths)) > 1 and any(not r.truncated for r in eager)
    for a, b in zip(eager, static, strict=True):
        assert (a.prompt, a.completion, a.truncated) == (b.prompt, b.completion, b.truncated)
        assert b.self_certainty == pytest.approx(a.self_certainty, abs=1e-5)
        assert b.entropy == pytest.approx(a.entropy, abs=1e-5)


def test_copy_weights_casts_into_the_sampling_copy(tokenizer):
    lm = make_model(tokenizer, seed=1)
    copy = make_model(tokenizer, seed=2).to(torch.bfloat16)
    I.copy_weights(lm, copy)
    for a, b in zip(lm.parameters(), copy.parameters(), strict=True):
        assert b.dtype == torch.bfloat16 and torch.equal(a.detach().to(torch.bfloat16), b.detach())


def test_training_with_the_static_sampler_and_a_bf16_sampling_copy(tiny_dir, tmp_path):
    small_run(tiny_dir, tmp_path, "--max_steps", "2", "--sampler", "static", "--sampling_weights", "bf16")
    recs = metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2]
    assert all(math.isfinite(r["train/self_certainty"]) and r["train/completion_length"] > 0 for r in recs)


def test_memory_plan_counts_the_sampling_copy():
    from types import SimpleNamespace

    config = SimpleNamespace(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2)  # fmt: skip
    without = process.memory_plan(config, 10**9, I.Args())
    with_copy = process.memory_plan(config, 10**9, I.Args(sampling_weights="bf16"))
    assert with_copy["bf16 sampling copy"] == pytest.approx(2e9 / 2**30) and without["bf16 sampling copy"] == 0
    assert with_copy["peak"] - without["peak"] == pytest.approx(2e9 / 2**30)
