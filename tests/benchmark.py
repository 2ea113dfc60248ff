"""
Benchmarks (run as a script; pytest does not collect it). Each part prints a table and ratios; nothing here
asserts anything about speed.

    python tests/benchmark.py memory                 # 1. peak memory of SC + log-probs, streamed vs full logits
    python tests/benchmark.py step [--gguf FILE]     # 2. seconds and peak memory per step vs TRL's GRPOTrainer (trl)
    python tests/benchmark.py phases [--gguf FILE]   # 3. resident memory per phase of a training step
    python tests/benchmark.py sampling [--gguf FILE] # 4. sampling tokens/s vs model.generate
    python tests/benchmark.py grading --data FILE    # 5. sandboxed grading of HumanEval's reference solutions
    python tests/benchmark.py plan                   # 6. the memory plan at the paper's shape (computed, not run)
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import intuitor as I  # noqa: E402
from intuitor_harness import process, tasks  # noqa: E402

CHUNK, VOCAB_CHUNK = I.Args.chunk_size, I.Args.vocab_chunk_size


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ----------------------------------------------------------------------------- 1. memory
def run_variant(variant, h, w, targets, backward):
    with torch.set_grad_enabled(backward):
        if variant == "full":  # what the official trainer does: materialise all logits
            logits = h @ w.T
            sc = torch.logsumexp(logits, -1) - logits.mean(-1) - math.log(w.shape[0])
            logp = torch.log_softmax(logits / 0.9, -1).gather(1, targets[:, None]).squeeze(1)
        elif backward:
            logp = I.StreamedLogProbs.apply(h, w, targets, 0.9, CHUNK, VOCAB_CHUNK)
            sc = I.streamed_token_stats(h.detach(), w.detach(), targets, 1.0, CHUNK, VOCAB_CHUNK)["self_certainty"]
        else:
            st = I.streamed_token_stats(h, w, targets, 0.9, CHUNK, VOCAB_CHUNK)
            logp, sc = st["logp"], st["self_certainty"]
        if backward:
            logp.sum().backward()
    return sc, logp


def memory_child(variant, tokens, hidden, vocab, backward, device):
    """Runs in its own process: prints the peak memory added by `variant` beyond its inputs and W.grad."""
    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, device=device).mul_(0.5).requires_grad_(backward)  # in place: no setup peak
    w = torch.randn(vocab, hidden, device=device).mul_(0.05).requires_grad_(backward)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    cuda = device == "cuda"
    run_variant(
        variant,
        h[:16].detach().requires_grad_(backward),
        w[:1000].detach().requires_grad_(backward),
        targets[:16] % 1000,
        backward,
    )  # warm up the math libraries' own buffers outside the measurement
    if backward:  # a micro-batch after the first: W.grad already holds the earlier ones' sum (pages touched)
        w.grad = torch.full_like(w, 1e-3)
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        base = current_rss_mb()
        assert peak_rss_mb() < base + 64, "setup left a memory peak that would hide the measurement"
    t0 = time.time()
    sc, logp = run_variant(variant, h, w, targets, backward)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.time() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**20) if cuda else peak_rss_mb()
    out = {
        "extra_mb": peak - base,
        "seconds": seconds,
        "sc": sc.detach().double().cpu().tolist(),
        "logp": logp.detach().double().cpu().tolist(),
    }
    if backward:
        out["grad_h"] = h.grad[:64].flatten().double().cpu().tolist()
    print(json.dumps(out))


def memory(args):
    rows = []
    for backward in (False, True):
        res = {}
        for variant in ("full", "streamed"):
            # A fixed mmap threshold makes glibc return every freed tile to the OS at once; its default dynamic
            # threshold keeps some in the heap and the peak RSS would then measure fragmentation, not tensors.
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            p = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "_memory_child",
                    variant,
                    str(args.tokens),
                    str(args.hidden),
                    str(args.vocab),
                    str(int(backward)),
                    args.device,
                ],
                capture_output=True,
                text=True,
                env=env,
            )
            if p.returncode:
                res[variant] = None
                print(f"{variant} ({'fwd+bwd' if backward else 'fwd'}) failed: {p.stderr.strip().splitlines()[-1]}")
                continue
            res[variant] = json.loads(p.stdout.strip().splitlines()[-1])
        full, ours = res["full"], res["streamed"]
        agree = {
            k: max(abs(a - b) for a, b in zip(full[k], ours[k]))
            for k in ("sc", "logp", "grad_h")
            if full and ours and k in full
        }
        rows.append(("forward + backward" if backward else "forward (scoring)", full, ours, agree))
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"\n1. memory: {args.tokens} tokens x hidden {args.hidden} x vocab {args.vocab}, float32, {dev}")
    print("| pass | full logits: extra MB | streamed: extra MB | ratio | full s | streamed s | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for name, full, ours, agree in rows:
        f = f"{full['extra_mb']:.0f}" if full else "failed"
        ratio = f"1/{full['extra_mb'] / max(ours['extra_mb'], 1):.0f}" if full and ours else "-"
        print(
            f"| {name} | {f} | {ours['extra_mb']:.0f} | {ratio} | {full['seconds'] if full else float('nan'):.1f} | "
            f"{ours['seconds']:.1f} | {', '.join(f'{k} {v:.1e}' for k, v in agree.items())} |"
        )
    print("(fwd+bwd: a micro-batch after the first, so W.grad exists already and is not counted)")


# ----------------------------------------------------------------------------- shared model setup
def model_dir(args):
    """A saved model directory: the tiny random Qwen2 of the tests, or the GGUF converted once."""
    path = os.path.join(
        tempfile.gettempdir(), "intuitor-bench-" + (os.path.basename(args.gguf).split(".")[0] if args.gguf else "tiny")
    )
    if not os.path.exists(os.path.join(path, "config.json")):
        if args.gguf:
            lm, tok = process.load_model(args.gguf, "cpu")
        else:
            from conftest import make_model, make_tokenizer

            tok = make_tokenizer()
            lm = make_model(tok, head_scale=8.0)
        lm.save_pretrained(path)
        tok.save_pretrained(path)
    return path


# ----------------------------------------------------------------------------- 2. step time and memory vs TRL
# Each side as its users run it, on the same work (prompts, G, completion length, beta, learning rate, fp32):
# intuitor.py with its defaults, and with --gradient_checkpointing (TRL's default); TRL's GRPOTrainer with its
# defaults (gradient checkpointing on, fused AdamW, loss_type dapo) at the two micro-batch x accumulation
# splits of one step's sequences a user would pick. Its bf16 default is turned off: the work here is fp32.
SIDES = {
    "intuitor.py": ("ours", []),
    "intuitor.py --gradient_checkpointing": ("ours", ["--gradient_checkpointing"]),
    "TRL, micro-batch 8": ("trl", 8),  # x 2 accumulation steps at the Table 1 shape (16 sequences)
    "TRL, micro-batch 4": ("trl", 4),  # x 4
}


def table1_flags(path, a, out, final_checkpoint=False):
    """intuitor.py's flags for the benchmark's work (the Table 1 shape with the defaults); no checkpoint but,
    if asked, the final one."""
    return ["--model", path, "--dataset", a.data, "--prompt_column", a.prompt_column,
            "--prompts_per_step", str(a.prompts), "--num_generations", str(a.G),
            "--max_completion_length", str(a.length), "--micro_batch_size", str(a.mbs), "--beta", str(a.beta),
            "--learning_rate", str(a.lr), "--max_steps", str(a.steps), "--seed", "42", "--output_dir", out,
            "--reward", a.reward, "--save_steps", "0", "--final_checkpoint", str(final_checkpoint).lower()]  # fmt: skip


def step_ours(path, a, extra):
    """intuitor.py's training loop in this process: (seconds, mean completion length) per step."""
    with tempfile.TemporaryDirectory() as out:
        I.train(I.parse_args(table1_flags(path, a, out) + extra))
        recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [(r["perf/sample_s"] + r["perf/reward_s"] + r["perf/update_s"], r["train/completion_length"]) for r in recs]


def step_trl(path, a, micro_batch):
    """TRL's GRPOTrainer with its defaults, scoring self-certainty as the official Intuitor trainer does: a
    reward function running its own batched forward pass over prompt + completion. Accuracy is graded every
    step as intuitor.py's monitor does (weight 0 with --reward self_certainty, the reward with accuracy)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows, questions, golds = tasks.load_questions(a.data, "train", a.prompt_column)
    answer_format = tasks.infer_answer_format(rows)
    system = [{"role": "system", "content": I.SYSTEM_PROMPT}]
    ds = Dataset.from_dict({"prompt": [system + [{"role": "user", "content": q}] for q in questions], "gold": golds})
    holder = {}

    def self_certainty_reward(prompts, completions, completion_ids, **_):
        """One batched forward over prompt + completion (right-padded), as the official trainer scores."""
        m = holder["trainer"].model
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        seqs = [tok(t, add_special_tokens=False).input_ids + list(ids) for t, ids in zip(texts, completion_ids)]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        with torch.no_grad():
            logits = m(input_ids=ids, attention_mask=mask).logits
        rewards = []
        for k, (s, c) in enumerate(zip(seqs, completion_ids)):
            rewards.append(I.self_certainty(logits[k, len(s) - len(c) - 1 : len(s) - 1]).mean().item())
        return rewards

    def accuracy_reward(completions, gold, **_):
        return [float(tasks.is_correct(tasks.extract_answer(c[0]["content"], answer_format), g))
                for c, g in zip(completions, gold)]  # fmt: skip

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *args_, **kw):
            self.t0 = time.time()

        def on_step_end(self, *args_, **kw):
            times.append(time.time() - self.t0)

    n = a.prompts * a.G
    sc = a.reward == "self_certainty"
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=n // micro_batch,
        num_generations=a.G,
        max_completion_length=a.length,
        beta=a.beta,
        learning_rate=a.lr,
        temperature=I.Args.temperature,
        max_steps=a.steps,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=42,
        reward_weights=[1.0, 0.0] if sc else [1.0],
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[self_certainty_reward, accuracy_reward] if sc else [accuracy_reward],
        args=cfg,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[Timer()],
    )
    holder["trainer"] = trainer
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return list(zip(times, lengths))


def step_child(name, path, a):
    """One side in this (fresh) process: its steps and the process's peak RSS, as one JSON line."""
    kind, setting = SIDES[name]
    steps = step_ours(path, a, setting) if kind == "ours" else step_trl(path, a, setting)
    print(json.dumps({"steps": steps, "peak_rss_mb": peak_rss_mb()}))


def step(args):
    path = model_dir(args)
    names = [name for name in SIDES if not args.sides or SIDES[name][0] in args.sides.split(",")]
    res = {name: {"steps": [], "peak": []} for name in names}
    for _ in range(args.rounds):  # alternate A B C D A B C D so drift in machine load hits every side
        for name in names:
            argv = [sys.executable, __file__, "step", "--child", name, "--model_path", path, *sys.argv[2:]]
            p = subprocess.run(argv, capture_output=True, text=True)
            if p.returncode:
                hint = " (TRL: pip install trl)" if SIDES[name][0] == "trl" else ""
                sys.exit(f"{name} failed{hint}: " + p.stderr.strip()[-2000:])
            out = json.loads(p.stdout.strip().splitlines()[-1])
            res[name]["steps"] += out["steps"][1:]  # the first step warms up
            res[name]["peak"].append(out["peak_rss_mb"])
    print(
        f"\n2. one training step, {'SmolLM2-135M' if args.gguf else 'tiny Qwen2'}: {args.prompts} prompts "
        f"x G={args.G}, <= {args.length} new tokens, reward {args.reward}, beta {args.beta}, lr {args.lr}, fp32, "
        f"CPU {os.cpu_count()} cores, {args.rounds} rounds alternating, steps 2-{args.steps} of each run timed"
    )
    print("| side | median s/step | mean completion length | median s per 1k tokens | peak RSS MiB (max of runs) "
          "| steps timed |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    summary, n_seq = {}, args.prompts * args.G
    for name, r in res.items():
        per_step = statistics.median(t for t, _ in r["steps"])
        per_k = statistics.median(1000 * t / (length * n_seq) for t, length in r["steps"])  # per sampled token
        length = statistics.mean(length for _, length in r["steps"])
        if SIDES[name][0] == "trl":
            name = f"{name} x {n_seq // SIDES[name][1]} accumulation"
        summary[name] = (per_step, per_k, max(r["peak"]))
        print(f"| {name} | {per_step:.2f} | {length:.1f} | {per_k:.2f} | {max(r['peak']):.0f} | {len(r['steps'])} |")
    for ours in (n for n in summary if n.startswith("intuitor")):
        for trl in (n for n in summary if n.startswith("TRL")):
            (a, b, c), (x, y, z) = summary[ours], summary[trl]
            print(f"{ours} / {trl}: {a / x:.2f} per step, {b / y:.2f} per 1k tokens, {c / z:.2f} peak RSS")


# ----------------------------------------------------------------------------- 3. memory per phase
class RssSampler:
    """Peak resident memory of this process while a block runs, polled every millisecond from a thread (torch's
    CPU kernels release the GIL, so the thread sees their buffers)."""

    def __init__(self):
        import threading

        self.peak, self.stop = 0.0, threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def poll(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, current_rss_mb())
            time.sleep(0.001)

    def __enter__(self):
        self.start = self.peak = current_rss_mb()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.end = current_rss_mb()
        self.peak = max(self.peak, self.end)


PHASES = {  # intuitor.py's own functions, in the order a step calls them
    "load (setup)": "setup",
    "1. sampling": "sample_step",
    "2. reward + reference pass": "reward_step",
    "4. update": "update_step",
    "checkpoint": "checkpoint_step",
}


def phases(args):
    """Runs intuitor.py's training loop in this process at the Table 1 shape (the final checkpoint written) and
    records, per phase, resident memory on entry, at its peak and on exit (over every step)."""
    path = model_dir(args)
    seen, built = {name: [] for name in PHASES}, {}

    def measured(name, fn):
        def wrapper(*a, **kw):
            with RssSampler() as s:
                result = fn(*a, **kw)
            if name != "checkpoint" or a[1] == a[0].max_steps:  # checkpoint_step(run, step) saves at the end
                seen[name].append(s)
            if name == "load (setup)":
                built["run"] = result
            return result

        return wrapper

    for name, fn in PHASES.items():
        setattr(I, fn, measured(name, getattr(I, fn)))
    with tempfile.TemporaryDirectory() as out:
        I.train(I.parse_args(table1_flags(path, args, out, final_checkpoint=True) + args.flags.split()))
    print(f"\n3. resident memory per phase, {'SmolLM2-135M' if args.gguf else 'tiny Qwen2'}: {args.prompts} prompts "
          f"x G={args.G}, <= {args.length} tokens, micro-batch {args.mbs} {args.flags}, fp32, {args.steps} steps, "
          "MiB")  # fmt: skip
    print("| phase | times | RSS on entry (first) | peak (max) | peak above entry (max) | RSS on exit (last) |")
    print("|---|---|---|---|---|---|")
    for name, runs_ in seen.items():
        if runs_:
            print(f"| {name} | {len(runs_)} | {runs_[0].start:.0f} | {max(s.peak for s in runs_):.0f} | "
                  f"{max(s.peak - s.start for s in runs_):.0f} | {runs_[-1].end:.0f} |")  # fmt: skip
    weights = sum(p.numel() * p.element_size() for p in built["run"].policy.parameters()) / 2**20
    print(
        f"process peak RSS: {peak_rss_mb():.0f} MiB. Tensors a step keeps alive: policy weights {weights:.0f}, "
        f"reference {weights if built['run'].ref_scorer else 0:.0f}, gradients {weights:.0f} (update), AdamW "
        f"moments {2 * weights:.0f} (from the first update on); the rest is activations and allocator slack"
    )


# ----------------------------------------------------------------------------- 4. sampling throughput
def sampling(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir(args)
    tok = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(args.device).eval()
    rows = [json.loads(line) for line in open(args.data)][: args.prompts]
    prompts = [
        tok(I.render_prompt(tok, r[args.prompt_column], I.SYSTEM_PROMPT), add_special_tokens=False).input_ids
        for r in rows
    ]
    n = len(prompts) * args.G

    def ours():
        out = I.sample(lm, prompts, args.G, args.length, 0.9, [], tok.pad_token_id)  # no stop: exactly `length` tokens
        return sum(len(r.completion) for r in out)

    def generate():
        width = max(map(len, prompts))
        ids = torch.tensor(
            [[tok.pad_token_id] * (width - len(p)) + p for p in prompts for _ in range(args.G)], device=args.device
        )
        mask = (
            torch.arange(width, device=args.device)[None]
            >= torch.tensor([width - len(p) for p in prompts for _ in range(args.G)], device=args.device)[:, None]
        ).long()
        with torch.no_grad():
            out = lm.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=0.9,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.length,
                min_new_tokens=args.length,
                pad_token_id=tok.pad_token_id,
            )
        return (out.shape[1] - width) * out.shape[0]

    def ours_static():  # --sampler static: a CUDA graph per decode step on GPU, eager here on CPU
        out = I.sample_static(lm, prompts, args.G, args.length, 0.9, [], tok.pad_token_id)
        return sum(len(r.completion) for r in out)

    samplers = {
        "intuitor.sample (SC + entropy on)": ours,
        "intuitor.sample_static": ours_static,
        "model.generate": generate,
    }
    res = {name: [] for name in samplers}
    for _ in range(args.rounds):
        for name, fn in samplers.items():
            t0 = time.time()
            tokens = fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            res[name].append(tokens / (time.time() - t0))
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(
        f"\n4. sampling, {'SmolLM2-135M' if args.gguf else 'tiny Qwen2'}: {len(prompts)} prompts x G={args.G} = "
        f"{n} sequences x {args.length} tokens, fp32, {dev}, {args.rounds} rounds alternating"
    )
    print("| sampler | median tokens/s |\n|---|---|")
    for name, v in res.items():
        print(f"| {name} | {statistics.median(v):.0f} |")
    a, b, c = (statistics.median(v) for v in res.values())
    print(f"ratios: intuitor.sample / generate = {a / c:.2f}, sample_static / generate = {b / c:.2f}")


# ----------------------------------------------------------------------------- 5. sandboxed grading
def grading(args):
    """Grade every reference solution of a HumanEval file (hub columns) in the sandbox, one program at a time
    and one per core, isolated by bubblewrap and as plain processes (the fallback) side by side; each must pass."""
    from intuitor_harness import benchmarks, sandbox

    rows = [json.loads(line) for line in open(args.data)]
    if "canonical_solution" not in rows[0]:
        sys.exit("grading: --data must be HumanEval (openai/openai_humaneval columns), see README, Data")
    texts = [[f"```python\n{row['canonical_solution']}\n```"] for row in rows]
    problems = benchmarks.load_problems("humaneval", args.data)
    bwrap = sandbox.bubblewrap()
    modes = {"process": lambda: None, **({"bubblewrap": lambda: bwrap} if bwrap else {})}
    res = {(mode, workers): [] for mode in modes for workers in (1, os.cpu_count())}
    for _ in range(args.rounds):  # alternating, so that drifting load hits every side
        for mode, workers in res:
            sandbox.bubblewrap = modes[mode]
            t0 = time.time()
            graded = benchmarks.grade_batch("humaneval", problems, texts, timeout=10, workers=workers)
            res[mode, workers].append(time.time() - t0)
            passed = sum(g.correct for [g] in graded)
            assert passed == len(rows), (mode, passed)
    print(f"\n5. sandboxed grading of {len(rows)} HumanEval reference solutions (all pass), CPU {os.cpu_count()} "
          f"cores, {args.rounds} rounds alternating")  # fmt: skip
    print("| isolation | programs at once | median s | programs/s |\n|---|---|---|---|")
    for (mode, workers), times in res.items():
        print(f"| {mode} | {workers} | {statistics.median(times):.1f} | {len(rows) / statistics.median(times):.1f} |")
    if bwrap:
        for workers in (1, os.cpu_count()):
            ratio = statistics.median(res["bubblewrap", workers]) / statistics.median(res["process", workers])
            print(f"ratio bubblewrap / process, {workers} at once = {ratio:.2f}")


# ----------------------------------------------------------------------------- 6. memory plan
def plan(args):
    """process.memory_plan at the paper's shape (128 prompts x 7 sequences of 512 + 3072 tokens per step, beta
    0.005, bf16 autocast) for Qwen2.5-1.5B, 3B, 7B and 14B from their published shapes, DDP and FSDP2, on 8 ranks
    (14B also on 16: two nodes); nothing is loaded or run."""
    from types import SimpleNamespace

    shapes = {  # parameters, hidden, layers, MLP, query heads, KV heads, vocabulary, head tied to the embedding
        "Qwen2.5-1.5B": (1_543_714_304, 1536, 28, 8960, 12, 2, 151936, True),
        "Qwen2.5-3B": (3_085_938_688, 2048, 36, 11008, 16, 2, 151936, True),
        "Qwen2.5-7B": (7_615_616_512, 3584, 28, 18944, 28, 4, 152064, False),
        "Qwen2.5-14B": (14_770_033_664, 5120, 48, 13824, 40, 8, 152064, False),
    }
    settings = [  # flags beyond the paper's defaults
        ("ddp", 8, {}),
        ("ddp", 8, {"gradient_checkpointing": True}),
        ("fsdp", 8, {"gradient_checkpointing": True}),
        ("fsdp", 8, {"gradient_checkpointing": True, "sampling_weights": "bf16"}),
        ("fsdp", 8, {"gradient_checkpointing": True, "sampling_weights": "bf16", "generation_batch_size": 28}),
        (
            "fsdp",
            16,
            {
                "gradient_checkpointing": True,
                "sampling_weights": "bf16",
                "generation_batch_size": 14,
                "micro_batch_size": 1,
            },
        ),
    ]
    print("\n6. memory plan per rank (GiB), 128 prompts x 7 per step, 512 + 3072 tokens, bf16 autocast")
    print("| model | ranks | flags beyond the defaults (micro-batch 4) | persistent | sampling | update | peak "
          "| A100-40GB | 80 GB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (n, hidden, layers, inter, heads, kv, vocab, tied) in shapes.items():
        config = SimpleNamespace(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                                 num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                                 tie_word_embeddings=tied)  # fmt: skip
        for parallel, ranks, extra in settings:
            if ranks == 16 and "14B" not in name:
                continue
            p = process.memory_plan(config, n, I.Args(parallel=parallel, **extra), world_size=ranks, bf16=True)
            fixed = p["weights (fp32)"] + p["AdamW moments"] + p["reference"] + p["bf16 sampling copy"]
            sampling = sum(v for k, v in p.items() if k.endswith("(sampling)"))
            update = sum(v for k, v in p.items() if k.endswith("(update)"))
            fits = ["yes" if p["peak"] <= cap else "no" for cap in (39.4, 79.2)]  # GiB, as torch reports them
            flags = " ".join([f"--parallel {parallel}"] + [f"--{k}" + ("" if v is True else f" {v}") for k, v in
                                                           extra.items()])  # fmt: skip
            print(f"| {name} | {ranks} | `{flags}` | {fixed:.1f} | {sampling:.1f} | {update:.1f} | {p['peak']:.1f} "
                  f"| {fits[0]} | {fits[1]} |")  # fmt: skip


PARTS = {"memory": memory, "step": step, "phases": phases, "sampling": sampling, "grading": grading, "plan": plan}

if __name__ == "__main__":
    if sys.argv[1] == "_memory_child":
        memory_child(
            sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), bool(int(sys.argv[6])), sys.argv[7]
        )
        sys.exit()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=PARTS)
    ap.add_argument("--tokens", type=int, default=3584, help="memory: tokens of one sequence (512 + 3072)")
    ap.add_argument("--hidden", type=int, default=1536, help="memory: hidden size (Qwen2.5-1.5B)")
    ap.add_argument("--vocab", type=int, default=151936, help="memory: vocabulary (Qwen2.5)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--gguf", default="", help="step/sampling: a GGUF model file (SmolLM2-135M-Instruct) instead of the tiny model"
    )
    ap.add_argument(
        "--data",
        default=os.path.join(ROOT, "data", "arithmetic_train.jsonl"),
        help="prompts (default: Table 1's); grading: HumanEval",
    )
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--mbs", type=int, default=8, help="intuitor.py's micro-batch (Table 1's)")
    ap.add_argument("--beta", type=float, default=0.005)
    ap.add_argument("--lr", type=float, default=5e-5, help="step/phases: learning rate, both sides (Table 1's)")
    ap.add_argument("--prompt_column", default="question")
    ap.add_argument("--reward", default="self_certainty", choices=["self_certainty", "accuracy"], help="step, phases")
    ap.add_argument("--flags", default="", help="phases: more intuitor.py flags, e.g. '--gradient_checkpointing'")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sides", default="", help="step: ours,trl or one of them (default: both)")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--model_path", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        step_child(a.child, a.model_path, a)
        sys.exit()
    PARTS[a.part](a)
