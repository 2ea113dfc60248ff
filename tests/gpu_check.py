"""
One GPU check: everything only a GPU can show, in one command that fits a short lease (about 6 minutes on one
80-141 GB GPU). Models are built from Qwen2.5's published shapes (below) with random weights: no hub access,
nothing to download; it imports torch, transformers and this project (never datasets or math-verify).

    python tests/gpu_check.py            # one CUDA GPU: prints one table, writes gpu_check.json
    python tests/gpu_check.py --tiny     # the same code paths on CPU with a tiny model, in seconds (CI runs it)

What it reports (each row says what it measured; nothing is asserted about speed):
  1. correctness: static vs eager sampler under greedy decoding (tokens, and where they part whether the eager
     logit gap was below bf16 resolution; self-certainty), CUDA-graph recordings over three calls of one shape
     (one expected), the k3 KL to a reference that is the policy (0 expected), a tied head's streamed gradient
     against full logits;
  2. sampling at the paper's per-rank shape (16 prompts x 7, 512-token prompts): tokens/s of sample,
     sample_static, model.generate with a static cache, autocast and the bf16 sampling copy, each as a fraction
     of the HBM roofline (bytes read per decode step / measured copy bandwidth);
  3. the update: forward + backward of 4 x 3584 tokens through the streamed head, with and without gradient
     checkpointing: seconds, MFU (6 N tokens / measured bf16 matmul peak), peak memory;
  4. one paper-shape step (16 prompts x 7, completions shortened to fit): sample / reference / update seconds
     and peak memory beside the memory plan;
  5. FSDP2 on one rank, Qwen2.5-3B's shape: one update's peak memory beside the plan.
"""

import argparse
import copy
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import intuitor as I  # noqa: E402
from intuitor_harness import process  # noqa: E402

SHAPES = {  # Qwen2.5's published configs: hidden, MLP, layers, query heads, KV heads, vocabulary
    "Qwen2.5-1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936),
    "Qwen2.5-3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}  # fmt: skip


def build(shape, device, seed=0, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=32768,
                         rope_theta=1e6, **overrides)  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        lm = Qwen2ForCausalLM(config)
    return lm.eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def random_prompts(n, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (length - (k % 4) * 3,), generator=g).tolist() for k in range(n)]


# ----------------------------------------------------------------------------- 1. correctness
def count_graphs():
    """Make every CUDA graph that torch (inductor's cudagraph trees) records count itself; returns the counter."""

    class CountingGraph(torch.cuda.CUDAGraph):
        recorded = 0

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            CountingGraph.recorded += 1

    torch.cuda.CUDAGraph = CountingGraph
    return CountingGraph


def correctness(shape, device, rows):
    lm = build(shape, device)
    prompts = random_prompts(4, 48, lm.config.vocab_size)
    args = (2, 64, 0.0, [], 0)  # G, new tokens, greedy, no stop token, pad id
    counter = count_graphs() if device.type == "cuda" else None
    with autocast(device):
        eager = I.sample(lm, prompts, *args)
        static = I.sample_static(lm, prompts, *args)
    same = sum(a.completion == b.completion for a, b in zip(eager, static))
    explained, sc_gap = 0, max(abs(a.self_certainty - b.self_certainty) for a, b in zip(eager, static))
    for a, b in zip(eager, static):
        if a.completion != b.completion:  # the logit gap at the first divergence, under the eager sampler
            t = next(i for i, (x, y) in enumerate(zip(a.completion, b.completion)) if x != y)
            with torch.no_grad(), autocast(device):
                logits = lm(torch.tensor([a.prompt + a.completion[:t]], device=device)).logits[0, -1].float()
            top = logits.topk(2).values
            explained += bool(top[0] - top[1] <= top[0].abs() * 2**-7)  # below bf16's 8-bit mantissa
    rows.append(("static vs eager, greedy: identical sequences", f"{same} / {len(eager)}",
                 f"{explained} of the others part at a logit gap below bf16 resolution"))  # fmt: skip
    rows.append(("static vs eager: max |SC difference|", f"{sc_gap:.2e}", "bf16 tolerance ~1e-2"))

    if device.type == "cuda":
        with autocast(device):
            for _ in range(2):
                I.sample_static(lm, prompts, *args)
        rows.append(("CUDA graphs recorded over 3 calls of one shape", counter.recorded, "1 expected"))

    ref = I.freeze(copy.deepcopy(lm), bf16_matmuls=True)
    with autocast(device):
        torch.manual_seed(0)
        rollouts = I.sample(lm, prompts, 2, 32, 1.0, [], 0)
    opt = torch.optim.SGD(lm.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ref_scorer = I.CompletionLogProbs(ref, 1.0, 1024, 4096)
    update = I.optimize(I.CompletionLogProbs(lm, 1.0, 1024, 4096), ref_scorer, opt, sched, rollouts, 0,
                        I.Args(beta=0.005, micro_batch_size=4), lambda: autocast(device))  # fmt: skip
    rows.append(("k3 KL to the reference at step 0", f"{update['kl']:.2e}", "0 expected"))
    del lm, ref, opt

    small = build("tiny", device, seed=1)  # a tied head: streamed gradient vs full logits, in fp32
    twin = copy.deepcopy(small)
    batch = I.collate([I.Rollout(p[:20], p[20:40], 0.0, 0.0, False) for p in random_prompts(3, 48, 512)], 0, device)
    (I.CompletionLogProbs(small, 0.9, 16, 128)(*batch)["logp"] * batch.completion_mask).sum().backward()
    ids, mask, n_prompt, cmask = batch
    logits = twin(input_ids=ids, attention_mask=mask, position_ids=I.positions(mask)).logits[:, n_prompt - 1 : -1]
    logp = torch.log_softmax(logits / 0.9, -1).gather(2, ids[:, n_prompt:, None]).squeeze(2)
    (logp * cmask).sum().backward()
    err = max((p.grad - q.grad).abs().max().item() / q.grad.abs().max().item()
              for p, q in zip(small.parameters(), twin.parameters()))  # fmt: skip
    rows.append(("tied head: streamed vs full-logit gradients, max relative error", f"{err:.2e}", "fp32"))


# ----------------------------------------------------------------------------- 2. sampling
def bandwidth(device):
    """Measured copy bandwidth, bytes read + written per second."""
    x = torch.empty(2**28 if device.type == "cuda" else 2**22, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    _, seconds = timed(lambda: [y.copy_(x) for _ in range(10)], device)
    return 2 * x.numel() * 4 * 10 / seconds


def sampling(shape, device, prompts_n, G, prompt_len, new_tokens, rows, out):
    lm = build(shape, device)
    copy_bf16 = I.freeze(copy.deepcopy(lm), bf16_matmuls=True)
    prompts = random_prompts(prompts_n, prompt_len, lm.config.vocab_size)
    n_params, cfg = sum(p.numel() for p in lm.parameters()), lm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * prompts_n * G  # per token
    per_step = {"autocast": 4 * n_params, "bf16 copy": 2 * n_params}  # weight bytes read per decode step
    bw = bandwidth(device)
    out["copy_bandwidth_GBps"] = bw / 1e9

    def generate(model):
        from transformers import GenerationConfig

        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
        config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                                  temperature=0.9, num_return_sequences=G, cache_implementation="static",
                                  pad_token_id=0)  # fmt: skip
        return model.generate(input_ids=ids, attention_mask=(ids != 0).long(), generation_config=config)

    variants = [("sample", "autocast", lm, lambda m: I.sample(m, prompts, G, new_tokens, 0.9, [], 0)),
                ("sample_static", "autocast", lm, lambda m: I.sample_static(m, prompts, G, new_tokens, 0.9, [], 0)),
                ("sample", "bf16 copy", copy_bf16, lambda m: I.sample(m, prompts, G, new_tokens, 0.9, [], 0)),
                ("sample_static", "bf16 copy", copy_bf16,
                 lambda m: I.sample_static(m, prompts, G, new_tokens, 0.9, [], 0)),
                ("model.generate (static cache)", "bf16 copy", copy_bf16, generate)]  # fmt: skip
    for name, weights, model, fn in variants:
        with autocast(device):
            fn(model)  # warm-up: compilation, graph recording
            _, seconds = timed(lambda model=model, fn=fn: fn(model), device)
        tokens_per_s = prompts_n * G * new_tokens / seconds
        bytes_per_step = per_step[weights] + kv_bytes * (prompt_len + new_tokens / 2)
        roofline = bw / bytes_per_step * prompts_n * G  # tokens/s if every step only streamed its bytes
        rows.append((f"sampling: {name}, {weights}", f"{tokens_per_s:.0f} tokens/s",
                     f"{tokens_per_s / roofline:.2f} of the HBM roofline"))  # fmt: skip
        out[f"sampling/{name}/{weights}"] = tokens_per_s


# ----------------------------------------------------------------------------- 3. the update
def matmul_peak(device):
    n = 8192 if device.type == "cuda" else 512
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    a @ b
    _, seconds = timed(lambda: [a @ b for _ in range(10)], device)
    return 2 * n**3 * 10 / seconds


def update(shape, device, sequences, length, rows, out):
    peak = matmul_peak(device)
    out["bf16_matmul_TFLOPs"] = peak / 1e12
    for checkpointing in (False, True):
        lm = build(shape, device)
        if checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.train()
        scorer = I.CompletionLogProbs(lm, 0.9, 1024, 4096)
        rollouts = [I.Rollout(p[:512 if length > 512 else 8], p[512 if length > 512 else 8 :], 0.0, 0.0, False)
                    for p in random_prompts(sequences, length + 12, lm.config.vocab_size)]  # fmt: skip
        batch = I.collate(rollouts, 0, device)
        reset_peak(device)
        with autocast(device):
            scorer(*batch)["logp"].sum().backward()  # warm-up
        lm.zero_grad(set_to_none=True)
        reset_peak(device)

        def step(scorer=scorer, batch=batch):
            with autocast(device):
                scorer(*batch)["logp"].sum().backward()

        _, seconds = timed(step, device)
        tokens = batch.ids.numel()
        mfu = 6 * sum(p.numel() for p in lm.parameters()) * tokens / seconds / peak
        label = "with" if checkpointing else "without"
        rows.append((f"update {sequences} x {batch.ids.shape[1]} tokens, {label} checkpointing",
                     f"{seconds:.2f} s, MFU {mfu:.2f}", f"peak {peak_gib(device):.1f} GiB"))  # fmt: skip
        out[f"update/{label}_checkpointing"] = {"seconds": seconds, "mfu": mfu, "peak_gib": peak_gib(device)}
        del lm, scorer


# ----------------------------------------------------------------------------- 4. one paper-shape step
def paper_step(shape, device, prompts_n, G, new_tokens, rows, out):
    lm = build(shape, device)
    n_params = sum(p.numel() for p in lm.parameters())
    ref = I.CompletionLogProbs(I.freeze(copy.deepcopy(lm), bf16_matmuls=True), 0.9, 1024, 4096)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    prompts = random_prompts(prompts_n, 512 if shape != "tiny" else 24, lm.config.vocab_size)
    reset_peak(device)
    with autocast(device):
        rollouts, t_sample = timed(lambda: I.sample(lm, prompts, G, new_tokens, 0.9, [], 0), device)
    rewards = I.compute_rewards(rollouts, {"self_certainty": 1.0}, G, I.Args())
    for r, a in zip(rollouts, I.weighted_advantages(rewards, {"self_certainty": 1.0}, G, I.Args())):
        r.advantage = a
    # the frozen model's streamed pass, as --certainty_model reference runs it (log-probs for the KL: the same tiles)
    _, t_ref = timed(lambda: I.reference_certainty(ref, rollouts, 4, 0, lambda: autocast(device)), device)
    lm.train()
    scorer = I.CompletionLogProbs(lm, 0.9, 1024, 4096)
    config = I.Args(micro_batch_size=4)
    _, t_update = timed(
        lambda: I.optimize(scorer, ref, opt, sched, rollouts, 0, config, lambda: autocast(device)), device
    )
    flags = I.Args(prompts_per_step=prompts_n, max_completion_length=new_tokens)
    plan = process.memory_plan(lm.config, n_params, flags, world_size=1, bf16=True)["peak"]
    rows.append((f"step {prompts_n} prompts x {G}, {new_tokens} new tokens: sample / reference / update",
                 f"{t_sample:.1f} / {t_ref:.1f} / {t_update:.1f} s",
                 f"peak {peak_gib(device):.1f} GiB, plan {plan:.1f} GiB"))  # fmt: skip
    out["paper_step"] = {"sample_s": t_sample, "reference_s": t_ref, "update_s": t_update,
                         "peak_gib": peak_gib(device), "plan_gib": plan}  # fmt: skip


# ----------------------------------------------------------------------------- 5. FSDP2 on one rank
def fsdp_step(shape, device, rows, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")  # fmt: skip
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rt = process.Runtime(device=device, bf16=True)
    lm = build(shape, "cpu")
    n_params = sum(p.numel() for p in lm.parameters())
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    scorer = process.shard(I.CompletionLogProbs(lm, 0.9, 1024, 4096, sharded=True), rt)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    length = 3584 if shape != "tiny" else 64
    rollouts = [I.Rollout(p[:8], p[8:], 0.0, 0.0, False) for p in random_prompts(4, length, lm.config.vocab_size)]
    for r in rollouts:
        r.advantage = 1.0
    reset_peak(device)
    _, seconds = timed(lambda: I.optimize(scorer, None, opt, sched, rollouts, 0, I.Args(beta=0.0),
                                          lambda: autocast(device)), device)  # fmt: skip
    flags = I.Args(parallel="fsdp", gradient_checkpointing=True, beta=0.0, max_prompt_length=8,
                   max_completion_length=length - 8, prompts_per_step=1, num_generations=4)  # fmt: skip
    plan = process.memory_plan(lm.config, n_params, flags, world_size=1, bf16=True)
    update_plan = (
        plan["weights (fp32)"] + plan["AdamW moments"] + sum(v for k, v in plan.items() if k.endswith("(update)"))
    )
    rows.append((f"FSDP2, 1 rank, {shape}: one update of 4 x {length} tokens", f"{seconds:.1f} s",
                 f"peak {peak_gib(device):.1f} GiB, plan (update phase) {update_plan:.1f} GiB"))  # fmt: skip
    out["fsdp_step"] = {"seconds": seconds, "peak_gib": peak_gib(device), "plan_update_gib": update_plan}
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model on CPU: the code paths, not the numbers")
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--new_tokens", type=int, default=256, help="sampling: new tokens per sequence after warm-up")
    a = ap.parse_args()
    if not a.tiny and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; run with --tiny for the CPU check of the code paths")
    device = torch.device("cpu" if a.tiny else "cuda")
    small, large = ("tiny", "tiny") if a.tiny else ("Qwen2.5-1.5B", "Qwen2.5-3B")
    rows, out = [], {"device": torch.cuda.get_device_name() if not a.tiny else "cpu (tiny)"}
    start = time.time()
    correctness(small, device, rows)
    sampling(small, device, *((2, 2, 24, 8) if a.tiny else (16, 7, 512, a.new_tokens)), rows, out)
    update(small, device, *((2, 64) if a.tiny else (4, 3584)), rows, out)
    paper_step(small, device, *((2, 2, 8) if a.tiny else (16, 7, a.new_tokens)), rows, out)
    fsdp_step(large, device, rows, out)
    out["rows"], out["wall_s"] = rows, time.time() - start
    width = max(len(r[0]) for r in rows)
    print(f"gpu check on {out['device']} ({out['wall_s']:.0f} s)")
    for name, value, note in rows:
        print(f"{name:<{width}} | {value} | {note}")
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
