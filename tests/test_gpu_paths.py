"""The GPU paths, checked on CPU: the static-cache sampler against the eager one (same tokens, statistics and
truncation on left-padded prompts whose completions stop at different steps) and its cache reused across calls;
decoding always with its KV cache; the reference and the bf16 sampling copy computing exactly what the policy
computes under bf16 autocast (KL 0 at step 0); the memory plan against measured saved activations."""

import math
import os

import pytest
import torch
from conftest import make_model
from test_intuitor import metrics, small_run

import intuitor as I
from intuitor_harness import process

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
        for key in ("token_certainty", "token_entropy", "token_logp"):  # token for token
            x, y = getattr(a, key), getattr(b, key)
            assert x.shape == y.shape == (len(a.completion),)
            torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)


def test_copy_weights_casts_into_the_sampling_copy(tokenizer):
    lm = make_model(tokenizer, seed=1)
    copy = make_model(tokenizer, seed=2).to(torch.bfloat16)
    I.copy_weights(lm, copy)
    for a, b in zip(lm.parameters(), copy.parameters(), strict=True):
        assert b.dtype == torch.bfloat16 and torch.equal(a.detach().to(torch.bfloat16), b.detach())


def test_training_with_the_static_sampler_and_a_bf16_sampling_copy(tiny_dir, tmp_path):
    small_run(
        tiny_dir,
        tmp_path,
        "--max_steps",
        "2",
        "--sampler",
        "static",
        "--sampling_weights",
        "bf16",
        "--dtype",
        "bfloat16",
    )
    recs = metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2]
    assert all(math.isfinite(r["train/self_certainty"]) and r["train/completion_length"] > 0 for r in recs)


def test_memory_plan_counts_the_sampling_copy():
    from types import SimpleNamespace

    config = SimpleNamespace(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1000)  # fmt: skip
    without = process.memory_plan(config, 10**9, I.Args())
    with_copy = process.memory_plan(config, 10**9, I.Args(sampling_weights="bf16"))
    copy_bytes = 2e9 + 2 * 1000 * 64  # bf16 matmul weights, the embedding kept fp32
    assert with_copy["bf16 sampling copy"] == pytest.approx(copy_bytes / 2**30) and without["bf16 sampling copy"] == 0
    assert with_copy["autocast weight copies (sampling)"] == 0  # sampling reads the copy: no casts
    assert with_copy["peak"] - without["peak"] == pytest.approx(copy_bytes / 2**30)


@pytest.mark.parametrize("bf16", [True, False])
def test_plan_activations_match_saved_tensor_measurement(bf16):
    """Bytes saved for backward per token and decoder layer, measured through the real scorer with saved-tensor
    hooks (difference of 3 and 1 layers, of 128 and 64 tokens per sequence: constants and weights cancel) at two
    shapes, against the plan's formula."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def saved(config, tokens):
        torch.manual_seed(0)
        lm = Qwen2ForCausalLM(config)
        scorer = I.CompletionLogProbs(lm, 1.0, 1024, 4096)
        ids = torch.randint(0, config.vocab_size, (2, tokens))
        batch = I.Batch(ids, torch.ones_like(ids), tokens // 2, torch.ones(2, tokens - tokens // 2, dtype=torch.bool))
        params, storages = {p.untyped_storage().data_ptr() for p in lm.parameters()}, {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                scorer(*batch)
        return sum(n for ptr, n in storages.items() if ptr not in params)

    for hidden, inter, heads, kv in ((64, 176, 4, 2), (96, 256, 6, 3)):
        shape = dict(vocab_size=512, hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                     num_key_value_heads=kv, tie_word_embeddings=False)  # fmt: skip
        one, three = Qwen2Config(num_hidden_layers=1, **shape), Qwen2Config(num_hidden_layers=3, **shape)
        measured = ((saved(three, 128) - saved(one, 128)) - (saved(three, 64) - saved(one, 64))) / 2 / (2 * 64)
        assert measured == pytest.approx(process.saved_bytes_per_token_and_layer(one, bf16), rel=0.05)


# ---------------------------------------------------------------- bf16 copies compute what the policy computes
def blanket_bf16(model):  # what a plain .to(bfloat16) does: rounds RoPE's inv_freq, runs norms in bf16
    import copy

    return copy.deepcopy(model).requires_grad_(False).eval().to(torch.bfloat16)


@pytest.mark.parametrize("tied", [False, True])
def test_reference_and_sampling_copy_equal_the_policy_under_bf16_autocast(tokenizer, tied):
    """At step 0 the reference is the policy: the k3 KL must be exactly 0 under bf16 autocast, and rollouts
    sampled from the bf16 sampling copy must carry the policy's own self-certainty, bit for bit."""
    import copy

    policy = make_model(tokenizer, seed=4, head_scale=4.0, tie_word_embeddings=tied)
    prompts = [tokenizer(t).input_ids for t in PROMPTS]
    stop, pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    copied = I.freeze(copy.deepcopy(policy), bf16_matmuls=True)
    assert any(p.dtype == torch.bfloat16 for p in copied.parameters())
    assert copied.get_input_embeddings().weight.dtype == torch.float32
    with autocast():
        torch.manual_seed(0)
        from_policy = I.sample(policy, prompts, 3, 12, 1.0, stop, pad)
        torch.manual_seed(0)
        from_copy = I.sample(copied, prompts, 3, 12, 1.0, stop, pad)
    for a, b in zip(from_policy, from_copy, strict=True):
        assert (a.completion, a.self_certainty, a.entropy) == (b.completion, b.self_certainty, b.entropy)

    def kl_at_step_0(reference):
        rollouts = copy.deepcopy(from_policy)
        for r in rollouts:
            r.advantage = 0.0
        lm = copy.deepcopy(policy)
        opt = torch.optim.SGD(lm.parameters(), lr=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        config = I.Args(beta=0.1, micro_batch_size=4)
        ref = I.CompletionLogProbs(reference, 1.0, 8, 64)
        return I.optimize(I.CompletionLogProbs(lm, 1.0, 8, 64), ref, opt, sched, rollouts, pad, config, autocast)["kl"]

    assert kl_at_step_0(I.freeze(copy.deepcopy(policy), bf16_matmuls=True)) == 0.0
    assert kl_at_step_0(blanket_bf16(policy)) > 1e-6  # the copy a plain .to(bf16) makes is another model


def test_sampling_weights_bf16_needs_bf16_compute(tiny_dir, tmp_path):
    p = small_run(tiny_dir, tmp_path / "out", "--sampling_weights", "bf16", check=False)
    assert p.returncode == 1 and p.stderr.strip() == (
        "error: --sampling_weights bf16 samples under bf16 autocast: run on CUDA or pass --dtype bfloat16"
    )
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the static sampler's cache
def test_static_cache_is_reused_and_reset_between_calls(tokenizer):
    """CUDA graphs are recorded against the cache's addresses: a new cache per call would record a new graph per
    call. One cache per shape, emptied between calls, and the second call samples what the first did."""
    lm = make_model(tokenizer, seed=3, head_scale=4.0)
    prompts = [tokenizer(t).input_ids for t in PROMPTS]
    args = (3, 16, 0.0, list(range(40, 52)), tokenizer.pad_token_id)
    first = I.sample_static(lm, prompts, *args)
    cache = lm.static_cache
    second = I.sample_static(lm, prompts, *args)
    assert lm.static_cache is cache
    assert [r.completion for r in first] == [r.completion for r in second]
    assert [r.self_certainty for r in first] == [r.self_certainty for r in second]
    I.sample_static(lm, prompts[:1], *args)  # another batch size: another cache
    assert lm.static_cache is not cache


# ---------------------------------------------------------------- decoding always runs with its KV cache
@pytest.mark.parametrize("sampler", ["sample", "sample_static"])
def test_every_decode_step_reads_the_cache_under_the_installed_name(tokenizer, sampler):
    """A cache passed under a name the installed transformers does not take would be dropped silently: each
    decode step would then attend to its one token. Every forward must receive the cache, and no deprecation
    warning may come from the sampler's own calls."""
    import inspect
    import warnings

    from transformers import Cache

    lm = make_model(tokenizer, seed=3, head_scale=4.0)
    name, calls, forward = process.cache_argument(lm), [], lm.forward

    def spy(*args, **kwargs):
        calls.append((kwargs["input_ids"].shape[1], isinstance(kwargs.get(name), Cache)))
        return forward(*args, **kwargs)

    spy.__signature__ = inspect.signature(forward)  # the sampler reads the names the model takes
    lm.forward = spy
    prompts = [tokenizer(t).input_ids for t in PROMPTS]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        getattr(I, sampler)(lm, prompts, 2, 6, 1.0, [], tokenizer.pad_token_id)
    decode_steps = [has_cache for width, has_cache in calls if width == 1]
    assert len(decode_steps) == 5 and all(decode_steps)
    if sampler == "sample_static":
        assert calls[0][1]  # the prefill writes into the static cache


def test_gpu_check_runs_its_code_paths_on_cpu(tmp_path):
    """tests/gpu_check.py --tiny: every part of the GPU check on a tiny CPU model, so the script works when a GPU
    arrives (its numbers mean nothing here)."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "check.json"
    env = dict(os.environ, MASTER_PORT=str(free_port()))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu_check.py"), "--tiny", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads(out.read_text())
    names = [row[0] for row in result["rows"]]
    parts = ("static vs eager", "k3 KL", "tied head", "sampling: sample_static", "sampling: model.generate",
             "update", "step 2 prompts", "FSDP2")  # fmt: skip
    for part in parts:
        assert any(name.startswith(part) for name in names), part
    kl = next(row for row in result["rows"] if row[0].startswith("k3 KL"))[1]
    assert float(kl) == 0.0


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
